"""Real text for the demo, found on the machine: nothing is downloaded.

FlexOlmo's setting needs a *public* text mix and data owners whose domains the public data does not
cover.  Every Python installation that can run this package carries such text:

* ``public`` -- English technical prose (the Python language reference and library documentation
  topics that CPython ships in ``pydoc_data``, what ``help()`` prints) and installed packages'
  metadata pages; plus a public *pool* the public model is not trained on (more metadata pages,
  numpy's C headers and Python sources) -- documents that *resemble* the owners' domains, where
  owners find proxy data for router tuning (paper §3.6); no document of an owner's domain is in it;
* ``python`` -- source code: the modules of the Python standard library;
* ``cpp`` -- C++: the headers torch installs under ``torch/include``;
* ``licenses`` -- legal English: the licence files of the installed packages (``*.dist-info``) and the
  system's ``/usr/share/common-licenses`` where present.

Documents are chunks of at most ``chunk_chars`` characters cut at line boundaries, shuffled with a
fixed seed, and split into a training and a held-out evaluation part, so every run of the demo sees
the same data -- as long as the installed text is the same.  This project's own installed metadata
is left out: it holds the README (``long_description``), which quotes the demo's own numbers, so with
it every edit of the README changed the public text and every number of the next demo run.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from pydoc_data import topics

import numpy
from transformers import PreTrainedTokenizerFast

from flexolmo_plugin.errors import FlexOlmoError

DOMAINS = ("public", "python", "cpp", "licenses")


class CorpusError(FlexOlmoError):
    """The machine lacks the text a demo domain is built from."""


def _public_sources() -> Iterator[tuple[str, str]]:

    for name in sorted(topics.topics):
        yield f"pydoc:{name}", topics.topics[name]


def _files(paths: list[Path]) -> Iterator[tuple[str, str]]:
    for path in sorted(set(paths)):
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue  # binary or unreadable: not text for this demo
        if text.strip():
            yield str(path), text


def _python_sources() -> Iterator[tuple[str, str]]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    return _files(list(stdlib.glob("*.py")))


def _cpp_sources() -> Iterator[tuple[str, str]]:

    spec = importlib.util.find_spec("torch")
    if spec is None or spec.origin is None:
        return iter(())
    include = Path(spec.origin).parent / "include"
    return _files([p for p in include.rglob("*.h") if p.is_file()])


OWN_DISTRIBUTION = "flexolmo_megatron"  # this project, as named in ``<name>-<version>.dist-info``


def _dist_infos() -> list[Path]:
    """The installed packages' ``*.dist-info`` folders, except this project's own (see the module docstring)."""
    roots = {Path(sysconfig.get_paths()[key]) for key in ("purelib", "platlib")}
    return [d for root in roots for d in root.glob("*.dist-info")
            if d.name.split("-")[0].lower().replace(".", "_") != OWN_DISTRIBUTION]


def _license_sources() -> Iterator[tuple[str, str]]:
    paths = [p for d in _dist_infos() for p in d.glob("**/*")
             if p.is_file() and any(word in p.name.upper() for word in ("LICEN", "COPYING", "NOTICE"))]
    system = Path("/usr/share/common-licenses")
    if system.is_dir():
        paths += [p for p in system.iterdir() if p.is_file()]
    return _files(paths)


def _numpy_files(pattern: str) -> Iterator[tuple[str, str]]:
    root = Path(numpy.__file__).parent
    return _files([p for p in root.rglob(pattern) if p.is_file() and "tests" not in p.parts])


def _metadata_sources() -> Iterator[tuple[str, str]]:
    return _files([d / "METADATA" for d in _dist_infos() if (d / "METADATA").is_file()])


SOURCES = {"public": _public_sources, "python": _python_sources, "cpp": _cpp_sources, "licenses": _license_sources}
# The public mix: (source, share of the public model's text, share of the public pool).  The public
# model sees prose and package pages; the rest of the public text -- the *pool*, more than the public
# model was trained on, as in the paper -- also holds source code and C headers, and is where owners
# find their proxy documents.  The prose is not in the pool: CPython ships only ~0.5 MB of it.
PUBLIC_MIX = ((_public_sources, 0.7, 0.0), (_metadata_sources, 0.3, 1 / 3),
              (lambda: _numpy_files("*.h"), 0.0, 1 / 3), (lambda: _numpy_files("*.py"), 0.0, 1 / 3))


def chunks(text: str, chunk_chars: int) -> Iterator[str]:
    """Pieces of at most ``chunk_chars`` characters, cut after a newline where possible."""
    start = 0
    while start < len(text):
        end = min(len(text), start + chunk_chars)
        if end < len(text):
            cut = text.rfind("\n", start + chunk_chars // 2, end)
            end = cut + 1 if cut >= 0 else end
        piece = text[start:end]
        if piece.strip():
            yield piece
        start = end


@dataclass(frozen=True, kw_only=True)
class DomainFiles:
    name: str
    train: Path
    eval: Path
    train_chars: int
    eval_chars: int
    documents: int


def _split(pieces: list[str], budget: dict[str, int], what: str) -> dict[str, list[str]]:
    """Consecutive disjoint parts in the order of ``budget`` (held-out text first, so that it never
    overlaps training text)."""
    available, needed = sum(len(p) for p in pieces), sum(budget.values())
    if available < needed:
        raise CorpusError(f"{what}: only {available} characters of text found on this machine, {needed} needed")
    split: dict[str, list[str]] = {part: [] for part in budget}
    parts, taken, index = list(budget), 0, 0
    for piece in pieces:
        while index < len(parts) and taken >= budget[parts[index]]:
            index, taken = index + 1, 0
        if index == len(parts):
            break
        split[parts[index]].append(piece)
        taken += len(piece)
    return split


def build_domain(name: str, out_dir: Path, *, train_chars: int, eval_chars: int, pool_chars: int = 0,
                 chunk_chars: int = 2000, seed: int = 0) -> DomainFiles:
    """Write ``<name>.train.jsonl`` and ``<name>.eval.jsonl`` (``{"id": ..., "text": ...}`` per line),
    and with ``pool_chars`` a third, disjoint part ``<name>.pool.jsonl``: for the public domain, the
    public text the public model was *not* trained on (the paper's public mix is larger than what
    the public model saw), from which owners select their proxy data."""
    if name not in SOURCES:
        raise CorpusError(f"unknown demo domain {name!r}; available: {DOMAINS}")
    mix = PUBLIC_MIX if name == "public" else ((SOURCES[name], 1.0, 1.0),)
    split: dict[str, list[str]] = {"eval": [], "train": [], **({"pool": []} if pool_chars else {})}
    for index, (source, share, pool_share) in enumerate(mix):
        pieces = [piece for _, text in source() for piece in chunks(text, chunk_chars)]
        random.Random(f"{seed}:{name}:{index}").shuffle(pieces)
        budget = {"eval": round(share * eval_chars), "train": round(share * train_chars),
                  **({"pool": round(pool_share * pool_chars)} if pool_chars else {})}
        part = _split(pieces, budget, f"domain {name!r}")
        for key in split:
            split[key] += part[key]
    paths = {}
    for part, docs in split.items():
        random.Random(f"{seed}:{name}:{part}").shuffle(docs)
        path = out_dir / f"{name}.{part}.jsonl"
        temporary = path.with_name(f".{path.name}.partial")
        with open(temporary, "w", encoding="utf-8") as f:
            for i, doc in enumerate(docs):
                f.write(json.dumps({"id": f"{name}-{part}-{i}", "text": doc}) + "\n")
        os.replace(temporary, path)
        paths[part] = path
    return DomainFiles(name=name, train=paths["train"], eval=paths["eval"],
                       train_chars=sum(map(len, split["train"])), eval_chars=sum(map(len, split["eval"])),
                       documents=len(split["train"]) + len(split["eval"]))


def train_tokenizer(texts: list[str], out_dir: Path, *, vocab_size: int) -> Path:
    """A byte-level BPE tokenizer trained here on the demo's own text (saved as an HF fast tokenizer),
    so that no tokenizer has to come from a hub."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<pad>", "<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", pad_token="<pad>",
                                   eos_token="<eos>")
    fast.save_pretrained(out_dir)
    return out_dir
