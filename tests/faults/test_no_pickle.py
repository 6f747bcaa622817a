"""No pickle from a checkpoint is ever executed: a crafted ``.metadata`` (or ``common.pt``) that would
create a file when unpickled is refused by every command that reads a Megatron checkpoint."""

import io
import pickle

import pytest
import torch

from flexolmo_plugin.conversion.safe_metadata import UnsafeCheckpointError, read_metadata
from tests.faults.harness import assert_refused


class _Payload:
    """Unpickling this calls ``exec``: what an attacker puts into a checkpoint."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').close()",)


def _crafted(lab, tmp_path, item, filename=".metadata"):
    """A copy of a lab checkpoint whose ``filename`` runs code when unpickled; and the file it would create.
    Without checksums (as a checkpoint from another tool): the allow-list must hold on its own."""
    copy = lab.copy(item, tmp_path)
    (copy / "checksums.json").unlink()
    marker = tmp_path / "code_ran"
    (copy / filename).write_bytes(pickle.dumps(_Payload(marker)))
    return copy, marker


def test_the_payload_runs_under_plain_pickle(tmp_path):
    """The control: without the allow-list the crafted file does execute code."""
    marker = tmp_path / "code_ran"
    pickle.loads(pickle.dumps(_Payload(marker)))
    assert marker.exists()


@pytest.mark.parametrize("command", ["mcore-to-hf", "opt-out", "eval", "package-expert", "merge", "upcycle"])
def test_crafted_metadata_is_refused_by_every_reader(command, lab, tmp_path, capsys):
    item = {"package-expert": "owner", "merge": "anchor", "upcycle": "anchor"}.get(command, "merged")
    crafted, marker = _crafted(lab, tmp_path, item)
    out = tmp_path / "out"
    argv = {
        "mcore-to-hf": ["convert", "mcore-to-hf", crafted, out],
        "opt-out": ["opt-out", crafted, "--drop", "code", "--out", out],
        "eval": ["eval", crafted, "--data", f"code={lab.dataset}", "--seq-len", 8],
        "package-expert": ["package-expert", crafted, out, "--name", "code"],
        "merge": ["merge", crafted, lab.package, "--out", out],
        "upcycle": ["upcycle", crafted, out, "--public-embedding", lab.embeddings[0],
                    "--domain-embedding", lab.embeddings[1]],
    }[command]
    assert_refused(argv, capsys, match=r"\.metadata: refers to builtins\.exec.*refusing to unpickle",
                   workdir=tmp_path, inputs=(crafted,))
    assert not marker.exists()


def test_crafted_common_pt_is_refused(lab, tmp_path, capsys):
    """Megatron reads ``common.pt`` with ``torch.load``, whose default (weights_only) refuses it."""
    crafted, marker = _crafted(lab, tmp_path, "merged", filename="common.pt")
    assert_refused(["eval", crafted, "--data", f"code={lab.dataset}", "--seq-len", 8], capsys,
                   match=r"common\.pt: holds objects a checkpoint never contains; refusing to unpickle",
                   workdir=tmp_path,
                   inputs=(crafted,))
    assert not marker.exists()


def test_real_checkpoints_pass_the_allow_list(lab):
    for directory in (lab.anchor, lab.owner, lab.merged):
        assert read_metadata(directory).state_dict_metadata


def test_truncated_metadata_is_reported_as_corrupt(lab, tmp_path, capsys):
    copy = lab.copy("merged", tmp_path)
    data = (copy / ".metadata").read_bytes()
    (copy / ".metadata").write_bytes(data[: len(data) // 2])
    assert_refused(["convert", "mcore-to-hf", copy, tmp_path / "out"], capsys,
                   match=r"\.metadata: not a readable torch_dist metadata file", workdir=tmp_path, inputs=(copy,))


def test_the_allow_list_names_what_it_refused(tmp_path):
    (tmp_path / ".metadata").write_bytes(pickle.dumps(_Payload(tmp_path / "x")))
    with pytest.raises(UnsafeCheckpointError, match="builtins.exec"):
        read_metadata(tmp_path)


@pytest.mark.parametrize("which", ["init_from", "resume"])
def test_train_refuses_a_crafted_start_or_resume_checkpoint(which, lab, tmp_path, capsys):
    """Bridge's own loader (resume: checkpoint.load) unpickles .metadata without an allow-list: the
    run is refused before it starts."""
    from tests.faults.test_train_faults import _train

    crafted, marker = _crafted(lab, tmp_path, "anchor")
    argv = _train(lab, tmp_path, init_from=crafted if which == "init_from" else None,
                  extra=[f"checkpoint.load={crafted}"] if which == "resume" else [])
    assert_refused(argv, capsys, match=r"anchor_copy/\.metadata: refers to builtins\.exec.*refusing to unpickle",
                   workdir=tmp_path,
                   inputs=(crafted,))
    assert not marker.exists()


def test_a_pickle_cannot_set_attributes_of_an_allowed_class(tmp_path):
    """BUILD on an allowed *class* (not an instance) would change it for the whole process without
    running any code of the file: e.g. every Path naming another file.  Refused; Path untouched."""
    import pathlib

    # GLOBAL pathlib.PosixPath; state (None, {"_str": "/victim"}); BUILD: setattr(PosixPath, "_str", ...)
    payload = b"\x80\x04cpathlib\nPosixPath\nN}(\x8c\x04_str\x8c\x07/victimu\x86b."
    control = tmp_path / "control"
    control.write_bytes(payload)
    assert pickle.loads(payload) is pathlib.PosixPath  # plain pickle performs it (then we undo it)
    del pathlib.PosixPath._str
    (tmp_path / ".metadata").write_bytes(payload)
    with pytest.raises(UnsafeCheckpointError, match="sets the state of a type"):
        read_metadata(tmp_path)
    assert str(pathlib.Path("x")) == "x"


def test_a_crafted_byte_object_in_a_data_file_is_refused(lab, tmp_path, capsys):
    """Megatron's non-tensor objects (RNG, optimizer settings, TE extra state) are torch.save pickles
    inside the .distcp files, which torch's load planner reads with weights_only=False: a payload
    there is refused before any loader sees the checkpoint."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    copy = lab.copy("merged", tmp_path)
    (copy / "checksums.json").unlink()
    marker = tmp_path / "code_ran"
    metadata = read_metadata(copy)
    index = next(i for i in metadata.storage_data if isinstance(metadata.state_dict_metadata[i.fqn],
                                                                 BytesStorageMetadata))
    info = metadata.storage_data[index]
    data_file = copy / info.relative_path
    buffer = io.BytesIO()
    torch.save(_Payload(marker), buffer)
    offset = data_file.stat().st_size
    with open(data_file, "ab") as file:
        file.write(buffer.getvalue())
    info.offset, info.length = offset, len(buffer.getvalue())
    metadata.storage_meta = None
    (copy / ".metadata").write_bytes(pickle.dumps(metadata))
    assert_refused(["eval", copy, "--data", f"code={lab.dataset}", "--seq-len", 8], capsys,
                   match=rf"object {index.fqn} holds objects a checkpoint never contains; refusing to unpickle",
                   workdir=tmp_path, inputs=(copy,))
    assert not marker.exists()
