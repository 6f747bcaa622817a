"""The fault-injection harness: a small real lifecycle (the "lab") and one assertion for every bad input.

Each case runs a ``flexolmo`` command in-process through :func:`flexolmo_plugin.cli.main` (the exit code
and stderr a user sees) and then checks what a user relies on after a refusal: the exit code, one line
naming the problem, no traceback, no output left behind, and every input byte-identical to before.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from flexolmo_plugin.cli import main
from flexolmo_plugin.lifecycle.data import prepare_dataset
from flexolmo_plugin.lifecycle.merge import merge_experts
from flexolmo_plugin.lifecycle.package import package_expert
from flexolmo_plugin.lifecycle.upcycle import upcycle
from tests.flexolmo_plugin.experts.helpers import make_owner
from tests.support import make_dense_model, make_tokenizer

HIDDEN = 48
VOCAB = 320  # the tokenizer below has 300 entries: it fits
DOCS = ["def add(a, b): return a + b", "the quick brown fox jumps", "lorem ipsum dolor sit amet"] * 8


@dataclasses.dataclass(frozen=True, kw_only=True)
class Lab:
    """Paths of one small FlexOlmo world, built once per test session.  Tests must never modify them:
    a case that needs a corrupt input corrupts a :meth:`copy`."""

    root: Path
    public_hf: Path  # HF OLMo-2 dense public model
    embeddings: tuple[Path, Path]  # r_pub, the owner's domain embedding (.npy)
    anchor: Path  # upcycled [public, public] Megatron checkpoint
    owner: Path  # the owner's trained 2-expert checkpoint
    package: Path  # the owner's expert package
    merged: Path  # anchor + package
    tokenizer: Path
    docs: Path  # JSON Lines
    dataset: Path  # Megatron indexed dataset prefix (.bin/.idx)

    def copy(self, name: str, into: Path) -> Path:
        """A private copy of one lab item (directory, file, or dataset prefix) to corrupt."""
        source = getattr(self, name)
        target = into / f"{name}_copy"
        if name == "dataset":
            for suffix in (".bin", ".idx"):
                shutil.copy2(source.with_name(source.name + suffix), target.with_name(target.name + suffix))
        elif source.is_dir():
            shutil.copytree(source, target)
        else:
            shutil.copy2(source, target.with_suffix(source.suffix))
            target = target.with_suffix(source.suffix)
        return target


def build_lab(root: Path) -> Lab:
    make_dense_model(root / "public_hf", seed=1, vocab_size=VOCAB, hidden_size=HIDDEN)
    embeddings = []
    for seed in (0, 1):
        path = root / f"e{seed}.npy"
        np.save(path, (torch.randn(HIDDEN, generator=torch.Generator().manual_seed(seed)) * 2).numpy())
        embeddings.append(path)
    upcycle(root / "public_hf", root / "anchor", public_embedding=embeddings[0], domain_embedding=embeddings[1],
            expert_names=("public", "code"), router_bias_init=None)
    make_owner(root / "anchor", root / "owner", seed=5)  # what anchored training changes: expert 1, its row
    package_expert(root / "owner", root / "package", name="code", tokens_trained=1000)
    merge_experts(root / "anchor", [root / "package"], root / "merged")
    make_tokenizer(root / "tokenizer")
    docs = root / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    prepare_dataset(docs, root / "data", tokenizer_dir=root / "tokenizer")
    return Lab(root=root, public_hf=root / "public_hf", embeddings=tuple(embeddings), anchor=root / "anchor",
               owner=root / "owner", package=root / "package", merged=root / "merged",
               tokenizer=root / "tokenizer", docs=docs, dataset=root / "data")


# ---------------------------------------------------------------------- what a refusal must leave
def digests(*paths: Path) -> dict[str, str]:
    """SHA-256 of every file under ``paths`` (files, directories, or dataset prefixes)."""
    found: dict[str, str] = {}
    for path in map(Path, paths):
        candidates = [path] if path.is_file() else sorted(path.rglob("*")) if path.is_dir() else \
            sorted(path.parent.glob(path.name + ".*"))
        for file in candidates:
            if file.is_file():
                found[str(file)] = hashlib.sha256(file.read_bytes()).hexdigest()
    return found


def listing(directory: Path) -> set[str]:
    """Every path under ``directory``, hidden temporaries included."""
    return {str(p.relative_to(directory)) for p in directory.rglob("*")}


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    capsys.readouterr()
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def assert_refused(argv: list[str], capsys, *, match: str, workdir: Path, inputs: tuple[Path, ...] = (),
                   code: int = 2) -> str:
    """Run ``argv``; it must exit ``code`` with a one-line message matching ``match`` (regex), print
    no traceback, leave ``workdir`` exactly as it was, and leave every input byte-identical."""
    before_inputs, before_files = digests(*inputs), listing(workdir)
    exit_code, err = run_cli(argv, capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert exit_code == code, f"exit {exit_code} != {code}; stderr:\n{err}"
    assert "Traceback" not in err, err
    assert any(re.search(match, line) for line in lines), f"no line matches {match!r}:\n{err}"
    if code == 2:
        assert len([line for line in lines if line.startswith("error:")]) == 1, err
    assert listing(workdir) == before_files, f"left behind: {sorted(listing(workdir) - before_files)}"
    assert digests(*inputs) == before_inputs, "an input was modified"
    return err
