"""Bad data, tokenizers, embedders and output paths for the data-side commands, through the CLI.

``prepare-data``, ``embed-domain``, ``select-proxy``, ``router-mix`` and ``upcycle`` read what owners
bring: JSON Lines files, tokenizers, embedding models, embedding vectors.  Before these checks a
byte that is not UTF-8 gave a ``UnicodeDecodeError`` without file or line, a model directory without
tokenizer files or a tokenizer larger than the model's vocabulary crashed deep in the model, a config
without ``hidden_size`` gave a ``KeyError``, ``embed-domain out.npy`` wrote safetensors bytes under a
``.npy`` name, and ``upcycle --name public`` made two experts named 'public'.  Each case must exit 2
with one ``error:`` line matching its pattern, write nothing and leave every input unchanged
(:func:`tests.faults.harness.assert_refused`).
"""

from __future__ import annotations

import hashlib
import json
import re
import shlex
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from flexolmo_plugin.lifecycle.data import DataError, iter_records
from tests.faults.harness import HIDDEN, assert_refused
from tests.support import make_dense_model


@pytest.fixture(scope="module")
def bad(lab, tmp_path_factory) -> Path:
    """Bad inputs, built once, beside (not inside) each case's output directory."""
    root = tmp_path_factory.mktemp("bad_data")
    (root / "not_utf8.jsonl").write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9 \xff"}\n')
    (root / "not_json.jsonl").write_text('{"text": "fine"}\n{not json\n')
    (root / "no_text.jsonl").write_text('{"text": "fine"}\n{"body": "no text"}\n')
    (root / "not_object.jsonl").write_text('{"text": "fine"}\n[1, 2]\n')
    (root / "blank.jsonl").write_text("\n  \n")
    (root / "surrogate.jsonl").write_text('{"text": "fine"}\n{"text": "hi\\ud800 there"}\n')  # valid JSON, not text
    (root / "selection.json").write_bytes(b'{"kind": "flexolmo-proxy-selection", "owner": "caf\xe9"}\n')
    for name, config in (("no_width", {"model_type": "olmo2"}), ("width_64", {"hidden_size": 64}),
                         ("width_text", {"hidden_size": "48"})):
        (root / name).mkdir()
        (root / name / "config.json").write_text(json.dumps(config))
    shutil.copytree(lab.public_hf, root / "public_tok")  # lab.public_hf itself has no tokenizer
    make_dense_model(root / "small_vocab", vocab_size=100, hidden_size=HIDDEN)  # the tokenizer's 300 ids do not fit
    for directory in (root / "public_tok", root / "small_vocab"):
        for file in lab.tokenizer.iterdir():
            shutil.copy2(file, directory / file.name)
    # a valid selection of the non-UTF-8 public file: router-mix gets as far as reading it
    digest = hashlib.sha256((root / "not_utf8.jsonl").read_bytes()).hexdigest()
    (root / "of_not_utf8.json").write_text(json.dumps({
        "format_version": 1, "kind": "flexolmo-proxy-selection", "owner": "code", "id_key": "id",
        "public_file": {"name": "not_utf8.jsonl", "sha256": digest}, "selected": ["line:1"]}))
    save_file({"embedding": torch.ones(HIDDEN)}, str(root / "safetensors.npy"))  # what embed-domain used to write
    return root


PREP = "prepare-data {docs} {tmp}/out --tokenizer {tokenizer}"
EMBED = "embed-domain {docs} {tmp}/e.safetensors --model {bad}/public_tok"
SELECT = "select-proxy {docs} {docs} --out {tmp}/p.json --name code --embedder {bad}/public_tok --num-docs 2"
UPCYCLE = "upcycle {public_hf} {tmp}/up --public-embedding {e0} --domain-embedding {e1}"
UTF8 = r"not_utf8\.jsonl:2: not valid UTF-8 \(byte 0xe9 at byte 14 of the line\)"
NO_TOKENIZER = r"public_hf: no tokenizer here \(none of tokenizer\.json"
EXISTS = "already exists"
# was: TypeError: TextEncodeInput must be Union[TextInputSequence, Tuple[InputSequence, InputSequence]]
SURROGATE = r"surrogate\.jsonl:2: a string holds the lone UTF-16 surrogate \\ud800, which is not text"

# (id COMMAND-WHAT, command line, regex of the one error line)
CASES = [
    ("prepare-data-not-utf8", "prepare-data {bad}/not_utf8.jsonl {tmp}/out --tokenizer {tokenizer}", UTF8),
    ("prepare-data-not-json", "prepare-data {bad}/not_json.jsonl {tmp}/out --tokenizer {tokenizer}",
     r"not_json\.jsonl:2: not valid JSON"),
    ("prepare-data-no-text", "prepare-data {bad}/no_text.jsonl {tmp}/out --tokenizer {tokenizer}",
     r"no_text\.jsonl:2: expected an object with a string field 'text'"),
    ("prepare-data-other-text-key", f"{PREP} --text-key body",
     r"docs\.jsonl:1: expected an object with a string field 'body'"),
    ("prepare-data-not-an-object", "prepare-data {bad}/not_object.jsonl {tmp}/out --tokenizer {tokenizer}",
     r"not_object\.jsonl:2: expected a JSON object"),
    ("prepare-data-no-documents", "prepare-data {bad}/blank.jsonl {tmp}/out --tokenizer {tokenizer}",
     r"blank\.jsonl: no documents"),
    ("prepare-data-missing-input", "prepare-data {tmp}/missing.jsonl {tmp}/out --tokenizer {tokenizer}",
     r"missing\.jsonl: no such file"),
    ("prepare-data-model-without-tokenizer", "prepare-data {docs} {tmp}/out --tokenizer {public_hf}", NO_TOKENIZER),
    ("prepare-data-missing-tokenizer", "prepare-data {docs} {tmp}/out --tokenizer {tmp}/none",
     "tokenizer directory .*none does not exist"),
    ("prepare-data-existing-output", "prepare-data {docs} {dataset} --tokenizer {tokenizer}", EXISTS),
    ("prepare-data-missing-output-directory", "prepare-data {docs} {tmp}/no/out --tokenizer {tokenizer}",
     "output directory .*no does not exist"),
    ("prepare-data-lone-surrogate", "prepare-data {bad}/surrogate.jsonl {tmp}/out --tokenizer {tokenizer}", SURROGATE),
    ("embed-domain-lone-surrogate", "embed-domain {bad}/surrogate.jsonl {tmp}/e.safetensors --model {bad}/public_tok",
     SURROGATE),
    ("select-proxy-owner-lone-surrogate", SELECT.replace("{docs} {docs}", "{bad}/surrogate.jsonl {docs}"), SURROGATE),
    ("select-proxy-public-lone-surrogate", SELECT.replace("{docs} {docs}", "{docs} {bad}/surrogate.jsonl"), SURROGATE),
    ("embed-domain-not-utf8", "embed-domain {bad}/not_utf8.jsonl {tmp}/e.safetensors --model {bad}/public_tok",
     UTF8),
    ("embed-domain-for-model-without-hidden-size", f"{EMBED} --for-model {{bad}}/no_width",
     r"no_width.config\.json has no integer 'hidden_size'"),
    ("embed-domain-for-model-hidden-size-text", f"{EMBED} --for-model {{bad}}/width_text",
     r"width_text.config\.json has no integer 'hidden_size'"),
    ("embed-domain-for-model-of-another-width", f"{EMBED} --for-model {{bad}}/width_64",
     f"produces {HIDDEN}-dimensional embeddings, but the FlexOlmo model's hidden size is 64"),
    ("embed-domain-model-without-tokenizer", "embed-domain {docs} {tmp}/e.safetensors --model {public_hf}",
     NO_TOKENIZER),
    ("embed-domain-tokenizer-beyond-vocabulary", "embed-domain {docs} {tmp}/e.safetensors --model {bad}/small_vocab",
     r"small_vocab: the tokenizer produced token id \d+ \(it has 300 tokens\) but the model's embedding table has "
     "100 rows"),
    ("embed-domain-missing-model", "embed-domain {docs} {tmp}/e.safetensors --model {tmp}/none",
     "embedding model directory .*none does not exist"),
    *[(f"embed-domain-output-suffix-{name}", f"embed-domain {{docs}} {{tmp}}/{name} --model {{bad}}/public_tok",
       r"an embedding is written as \.safetensors or \.npy") for name in ("e.txt", "e.pt", "e")],
    ("embed-domain-existing-output", "embed-domain {docs} {e0} --model {bad}/public_tok", EXISTS),
    ("select-proxy-owner-not-utf8", SELECT.replace("{docs} {docs}", "{bad}/not_utf8.jsonl {docs}"), UTF8),
    ("select-proxy-public-not-utf8", SELECT.replace("{docs} {docs}", "{docs} {bad}/not_utf8.jsonl"), UTF8),
    ("select-proxy-embedder-without-tokenizer", SELECT.replace("{bad}/public_tok", "{public_hf}"), NO_TOKENIZER),
    ("router-mix-selection-not-utf8", "router-mix {docs} {bad}/selection.json --out {tmp}/mix.jsonl",
     r"selection\.json: not a proxy selection \('utf-8' codec can't decode"),
    ("router-mix-public-not-utf8", "router-mix {bad}/not_utf8.jsonl {bad}/of_not_utf8.json --out {tmp}/mix.jsonl",
     UTF8),
    ("upcycle-name-public", f"{UPCYCLE} --name public", r"expert names must differ, 'public' is given twice"),
    ("upcycle-safetensors-under-npy-name", f"{UPCYCLE.replace('{e1}', '{bad}/safetensors.npy')} --name code",
     r"safetensors\.npy: not a \.npy file \(no NumPy header\) \(it holds safetensors data: rename it to "
     r"\.safetensors\)"),
]


def _command_line(template: str, lab, bad: Path, tmp: Path) -> tuple[list[str], tuple[Path, ...]]:
    """The argv of a case, and the inputs it names (they must be unchanged after the refusal)."""
    items = {"public_hf": lab.public_hf, "docs": lab.docs, "dataset": lab.dataset, "tokenizer": lab.tokenizer,
             "e0": lab.embeddings[0], "e1": lab.embeddings[1], "bad": bad}
    argv = [token.format(tmp=tmp, **items) for token in shlex.split(template)]
    return argv, tuple(path for name, path in items.items() if "{" + name + "}" in template)


@pytest.mark.parametrize(("template", "match"), [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_bad_data_is_refused(lab, bad, capsys, tmp_path, template, match):
    argv, inputs = _command_line(template, lab, bad, tmp_path)
    assert_refused(argv, capsys, match=match, workdir=tmp_path, inputs=inputs)


def test_the_bad_inputs_are_fine_once_repaired(lab, bad, capsys, tmp_path):
    """The cases fail for the reason they name: the same commands with the fault removed succeed
    (and ``embed-domain out.npy`` writes a real ``.npy`` that ``upcycle`` reads)."""
    from flexolmo_plugin.cli import main

    docs, model = str(lab.docs), str(bad / "public_tok")
    assert main(["prepare-data", docs, str(tmp_path / "out"), "--tokenizer", str(lab.tokenizer), "--quiet"]) == 0
    assert main(["embed-domain", docs, str(tmp_path / "e.npy"), "--model", model, "--for-model", str(lab.public_hf),
                 "--quiet"]) == 0
    assert main(["upcycle", str(lab.public_hf), str(tmp_path / "up"), "--public-embedding", str(lab.embeddings[0]),
                 "--domain-embedding", str(tmp_path / "e.npy"), "--name", "code", "--quiet"]) == 0


@pytest.mark.parametrize("prefix", ["", ".", "..", "/", "sub/"])
def test_an_output_prefix_that_names_a_directory_is_refused(lab, tmp_path, capsys, monkeypatch, prefix):
    """Was: ValueError: PosixPath('.') has an empty name (a traceback)."""
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path / "sub")
    assert_refused(["prepare-data", lab.docs, prefix, "--tokenizer", lab.tokenizer], capsys,
                   match=rf"output prefix {re.escape(repr(prefix))} names a directory, not a dataset: give DIR/NAME",
                   workdir=tmp_path, inputs=(lab.docs, lab.tokenizer))


def test_a_lone_surrogate_is_found_anywhere_in_a_record(tmp_path):
    """Keys and nested values too (an id becomes part of a proxy selection), not only the text."""
    path = tmp_path / "nested.jsonl"
    path.write_text('{"text": "fine", "meta": {"tags": ["ok", "\\udc00"]}}\n{"\\ud83d": 1, "text": "x"}\n'
                    '{"text": "a pair is text: \\ud83d\\ude00"}\n')
    with pytest.raises(DataError, match=r"nested\.jsonl:1: a string holds the lone UTF-16 surrogate \\udc00"):
        list(iter_records(path))
    path.write_text('{"text": "a pair is text: \\ud83d\\ude00"}\n{"\\ud83d": 1, "text": "x"}\n')
    with pytest.raises(DataError, match=r"nested\.jsonl:2: .* surrogate \\ud83d"):
        list(iter_records(path))


def test_quiet_embed_domain_prints_no_progress_bar(lab, bad, tmp_path, capsys):
    """Before: transformers' "Loading weights" bar reached stderr under --quiet, so a refusal after the
    load was two lines and a quiet success was not quiet."""
    from tests.faults.harness import run_cli

    code, err = run_cli(["embed-domain", lab.docs, tmp_path / "e.safetensors", "--model", bad / "public_tok",
                         "--quiet"], capsys)
    assert code == 0, err
    assert "Loading weights" not in err and "%|" not in err, err
