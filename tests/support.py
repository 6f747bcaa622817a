"""Shared test fixtures: random HF FlexOlmo checkpoints and a multi-process gloo launcher.

Reference models are real ``transformers`` ``FlexOlmoForCausalLM`` instances; their norm weights
and router rows are randomised so that a wrongly placed or skipped norm cannot hide behind
all-ones weights.
"""

from __future__ import annotations

import os
import socket
import time
import traceback
from pathlib import Path

import torch
import torch.multiprocessing as mp

from flexolmo_plugin.model.build import next_token_loss  # noqa: F401  (re-exported for tests)

SPAWN_TIMEOUT_S = 300
# Workers fork from one server process that has already imported torch, Megatron-Core, transformers and
# our model: a freshly spawned worker spent several seconds of CPU importing them, in each of the suite's
# many workers.  The server is a new interpreter (not a fork of pytest's process, whose tests patch and
# initialise things) that only imports: every worker still starts unpatched and enables the CPU
# compatibility itself (``_worker_entry``); Megatron-Bridge, which needs patches to import on CPU, is
# imported by the workers that use it.
_PRELOAD = ["flexolmo_plugin.compat", "flexolmo_plugin.model.build", "flexolmo_plugin.model.parallel",
            "megatron.core.dist_checkpointing", "transformers"]


def _worker_context():
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(_PRELOAD)  # takes effect when the server starts (first use in this process)
    return ctx


def hf_config(**overrides):
    from transformers import FlexOlmoConfig

    fields = dict(vocab_size=100, hidden_size=48, intermediate_size=40, num_hidden_layers=2,
                  num_attention_heads=6, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
                  max_position_embeddings=128, pad_token_id=1, eos_token_id=2)
    fields.update(overrides)
    return FlexOlmoConfig(**fields)


def make_hf_model(seed: int = 0, **overrides):
    from transformers import FlexOlmoForCausalLM

    torch.manual_seed(seed)
    model = FlexOlmoForCausalLM(hf_config(**overrides)).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                param.copy_(1.0 + 0.3 * torch.randn_like(param))
            elif name.endswith("mlp.gate.weight"):
                param.normal_(0.0, 0.5)  # sharp enough that top-k choices differ per token
    return model


def save_hf_model(model, directory: Path) -> Path:
    model.save_pretrained(directory)
    return directory


def hf_reference(model, input_ids: torch.Tensor):
    """Logits and next-token loss of the reference model."""
    with torch.no_grad():
        out = model(input_ids, labels=input_ids)
    return out.logits, out.loss


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker_entry(rank, world_size, port, fn, args, queue, collected):
    os.environ.update(OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    import datetime

    import torch.distributed as dist

    try:
        from flexolmo_plugin import compat

        compat.enable_cpu_compat()  # a worker starts unpatched (see _PRELOAD)
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world_size, timeout=datetime.timedelta(seconds=120))
        result = fn(rank, world_size, *args)
        queue.put((rank, "ok", result))
    except BaseException:  # report everything, including assertion errors, to the parent
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        # Tensors in the queue live in this process's shared memory: stay alive until the parent
        # has unpickled every result, or it would find the backing files gone.
        collected.wait(SPAWN_TIMEOUT_S)
        from flexolmo_plugin.model.parallel import teardown_model_parallel

        try:
            teardown_model_parallel()
        except Exception:
            pass


def run_distributed(fn, world_size: int, *args, timeout: float = SPAWN_TIMEOUT_S) -> dict:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` gloo processes; returns {rank: result}."""
    ctx = _worker_context()
    queue = ctx.SimpleQueue()
    collected = ctx.Event()
    port = free_port()
    # Not daemonic: Megatron's checkpoint writer starts helper processes of its own.
    procs = [ctx.Process(target=_worker_entry, args=(r, world_size, port, fn, args, queue, collected),
                         daemon=False)
             for r in range(world_size)]
    for p in procs:
        p.start()
    results, errors = {}, []

    deadline = time.monotonic() + timeout
    while len(results) + len(errors) < world_size:
        if time.monotonic() > deadline:
            break
        if queue.empty():
            if not any(p.is_alive() for p in procs) and queue.empty():
                break
            time.sleep(0.05)
            continue
        rank, status, payload = queue.get()
        (results.__setitem__(rank, payload) if status == "ok" else errors.append(f"rank {rank}:\n{payload}"))
    collected.set()
    for p in procs:
        p.join(timeout=30)
        if p.is_alive():
            p.kill()
    if errors:
        raise AssertionError("distributed worker failed:\n" + "\n".join(errors))
    if len(results) != world_size:
        raise AssertionError(f"only {sorted(results)} of {world_size} ranks reported within {timeout}s")
    return results


def hf_per_expert_tensors(hf_model, *, grads: bool) -> dict[str, torch.Tensor]:
    """The reference model's weights (or gradients) under the released per-expert HF names."""
    out = {}
    for name, param in hf_model.named_parameters():
        value = param.grad if grads else param.detach()
        if value is None:
            value = torch.zeros_like(param)
        if name.endswith("mlp.experts.gate_up_proj"):
            prefix = name[: -len("gate_up_proj")]
            for e in range(value.shape[0]):
                gate, up = value[e].chunk(2, dim=0)
                out[f"{prefix}{e}.gate_proj.weight"] = gate
                out[f"{prefix}{e}.up_proj.weight"] = up
        elif name.endswith("mlp.experts.down_proj"):
            prefix = name[: -len("down_proj")]
            for e in range(value.shape[0]):
                out[f"{prefix}{e}.down_proj.weight"] = value[e]
        else:
            out[name] = value
    return out


def canonical_reference(hf_model, config, *, grads: bool) -> dict[str, torch.Tensor]:
    """Reference tensors under canonical Megatron names, through the product's mapping table."""
    from flexolmo_plugin.conversion.mapping import entries, to_megatron

    per_expert = hf_per_expert_tensors(hf_model, grads=grads)
    return {e.megatron: to_megatron(e, tuple(per_expert[n] for n in e.hf), config).clone()
            for e in entries(config)}


def slot_errors(model, reference: dict[str, torch.Tensor], *, grads: bool) -> dict[str, float]:
    """Relative max error of every local parameter (or its gradient) against its reference slice."""
    from flexolmo_plugin.conversion.slots import slots

    errors = {}
    for slot in slots(model):
        ref = slot.select(reference[slot.canonical]).float()
        # Megatron's DDP accumulates into ``main_grad``; a bare module into ``grad``.
        ours = getattr(slot.param, "main_grad", slot.param.grad) if grads else slot.param.detach()
        if ours is None:
            errors[slot.local_name] = float("inf")
            continue
        scale = ref.abs().max().item()
        errors[slot.local_name] = (ours.float() - ref).abs().max().item() / (scale if scale > 0 else 1.0)
    return errors


def make_tokenizer(directory: Path, texts: list[str] | None = None, vocab_size: int = 300) -> Path:
    """A small byte-level BPE tokenizer (256 bytes + specials + merges, ``vocab_size`` entries)
    trained locally on ``texts`` and saved as an HF fast tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = texts or ["the quick brown fox jumps over the lazy dog", "def add(a, b): return a + b",
                      "lorem ipsum dolor sit amet", "numbers 0 1 2 3 4 5 6 7 8 9"] * 4
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<pad>", "<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", pad_token="<pad>",
                                   eos_token="<eos>")
    fast.save_pretrained(directory)
    return directory


def make_dense_model(directory: Path | None = None, *, seed: int = 1, vocab_size: int = 100, hidden_size: int = 48):
    """A small random HF OLMo-2 dense model (FlexOlmo's public architecture), norms randomised;
    saved to ``directory`` when given."""
    from transformers import Olmo2Config, Olmo2ForCausalLM

    torch.manual_seed(seed)
    model = Olmo2ForCausalLM(Olmo2Config(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=40,
                                         num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2,
                                         max_position_embeddings=64, pad_token_id=1, eos_token_id=2)).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(1 + 0.3 * torch.randn_like(param))
    if directory is not None:
        model.save_pretrained(directory)
    return model


def upcycled_start(root: Path, expert_names: tuple[str, str]) -> Path:
    """What an owner starts anchored training from, in ``root``: a tokenizer (``root/tok``, returned),
    a small random HF OLMo-2 public model (``root/public``, vocabulary 300, width 48), two domain
    embeddings and the upcycled ``[public, owner]`` checkpoint ``root/init``."""
    import numpy as np
    from transformers import Olmo2Config, Olmo2ForCausalLM

    from flexolmo_plugin.lifecycle.upcycle import upcycle

    tokenizer = make_tokenizer(root / "tok")
    torch.manual_seed(0)
    Olmo2ForCausalLM(Olmo2Config(vocab_size=300, hidden_size=48, intermediate_size=40, num_hidden_layers=2,
                                 num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=64,
                                 pad_token_id=1, eos_token_id=2)).save_pretrained(root / "public")
    generator = torch.Generator().manual_seed(1)
    for name in ("e0", "e1"):
        np.save(root / f"{name}.npy", torch.randn(48, generator=generator).numpy())
    upcycle(root / "public", root / "init", public_embedding=root / "e0.npy", domain_embedding=root / "e1.npy",
            expert_names=expert_names)
    return tokenizer


def kill_when(proc, ready, *, what: str, timeout: float = 120) -> None:
    """SIGKILL ``proc`` as soon as ``ready()`` is true (polled every 2 ms): a run killed mid-write, which
    runs no clean-up.  Fails if the process finished first (it could not be interrupted)."""
    import signal
    import time

    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and proc.poll() is None and not ready():
            time.sleep(0.002)
        assert proc.poll() is None, f"{what} finished before it could be interrupted"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
