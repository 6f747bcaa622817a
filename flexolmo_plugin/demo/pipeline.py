"""``flexolmo demo``: the whole FlexOlmo lifecycle on one CPU machine, with the product's own tools.

A coordinator trains a small public model; three data owners each prepare their own text, compute
their domain embedding, upcycle the public model and train their expert in a process of their own
that sees only their data; the coordinator verifies and merges the expert packages, evaluates every
model on every domain, opts one owner out, and exports the merged model to Hugging Face, where
``transformers`` must compute the same logits.  Every step is the function a ``flexolmo`` command
runs (its command line is written to the log), so the demo doubles as an integration test.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import AutoModelForCausalLM
from transformers.utils import logging as hf_logging

from flexolmo_plugin.api import from_mcore
from flexolmo_plugin.conversion.convert import copy_tokenizer_files, mcore_to_hf
from flexolmo_plugin.demo.corpus import DOMAINS, build_domain, train_tokenizer
from flexolmo_plugin.demo.sizes import OWNERS, SIZES, DemoSize
from flexolmo_plugin.lifecycle.data import prepare_dataset
from flexolmo_plugin.lifecycle.domain_embedding import embed_documents, sample_documents
from flexolmo_plugin.lifecycle.evaluation import evaluate, plot_routing, read_windows
from flexolmo_plugin.lifecycle.merge import merge_experts
from flexolmo_plugin.lifecycle.opt_out import exclude_experts, opt_out
from flexolmo_plugin.lifecycle.package import package_expert
from flexolmo_plugin.lifecycle.upcycle import save_embedding, upcycle
from flexolmo_plugin.model.build import logits


class DemoError(RuntimeError):
    """A demo step failed; the message names the step and its log."""


@dataclass
class DemoResult:
    workdir: Path
    size: str
    losses: dict[str, dict[str, float]] = field(default_factory=dict)  # model -> domain -> loss
    routing: dict[str, list[float]] = field(default_factory=dict)  # merged model: domain -> expert shares
    expert_names: tuple[str, ...] = ()
    hf_max_abs_logit_diff: float = float("nan")
    physical_vs_runtime_opt_out: float = float("nan")
    step_seconds: dict[str, float] = field(default_factory=dict)
    artifacts: dict[str, str] = field(default_factory=dict)


class Demo:
    """Runs the steps in order, timing each and logging to ``<workdir>/logs/demo.log``."""

    def __init__(self, workdir: Path, size: str, *, progress: bool, echo=print):
        if size not in SIZES:
            raise ValueError(f"unknown demo size {size!r}; choose from {sorted(SIZES)}")
        self.size: DemoSize = SIZES[size]
        self.root = workdir
        self.progress = progress
        self.echo = echo
        for sub in ("data", "coordinator", "owners", "packages", "eval", "logs"):
            (workdir / sub).mkdir(parents=True, exist_ok=True)
        self.log_path = workdir / "logs" / "demo.log"

        hf_logging.disable_progress_bar()  # per-tensor "Loading weights" bars would bury the demo's own
        self.result = DemoResult(workdir=workdir, size=size)

    # ------------------------------------------------------------------ logging helpers
    def log(self, text: str) -> None:
        with open(self.log_path, "a", encoding="utf-8") as f:
            f.write(text + "\n")

    def say(self, text: str) -> None:
        self.echo(text)
        self.log(text)

    def command(self, *argv: str) -> None:
        """Record the ``flexolmo`` command line equivalent to the step being run in-process."""
        self.log("$ flexolmo " + " ".join(shlex.quote(str(a)) for a in argv))

    def step(self, name: str, fn, *args, **kwargs):
        self.say(f"\n== {name}")
        start = time.perf_counter()
        out = fn(*args, **kwargs)
        self.result.step_seconds[name] = round(time.perf_counter() - start, 1)
        self.say(f"   done in {self.result.step_seconds[name]:.1f} s")
        return out

    # ------------------------------------------------------------------ data
    def prepare_data(self) -> None:

        s, data = self.size, self.root / "data"
        files = {name: build_domain(name, data, train_chars=s.train_chars, eval_chars=s.eval_chars)
                 for name in DOMAINS}
        for f in files.values():
            self.say(f"   {f.name:<9} {f.documents:>5} documents, {f.train_chars:>8,} train / {f.eval_chars:,} "
                     f"held-out characters  ({f.train.name}, {f.eval.name})")
        texts = [json.loads(line)["text"] for f in files.values() for line in open(f.train, encoding="utf-8")]
        train_tokenizer(texts, data / "tokenizer", vocab_size=s.vocab_size)
        self.say(f"   tokenizer: byte-level BPE, {s.vocab_size} entries, trained here -> data/tokenizer")
        for name in DOMAINS:
            for part in ("train", "eval"):
                self.command("prepare-data", data / f"{name}.{part}.jsonl", data / f"{name}.{part}",
                             "--tokenizer", data / "tokenizer")
                report = prepare_dataset(data / f"{name}.{part}.jsonl", data / f"{name}.{part}",
                                         tokenizer_dir=data / "tokenizer")
                self.log(f"   {name}.{part}: {report.documents} documents, {report.tokens} tokens")

    # ------------------------------------------------------------------ training (own processes)
    def train(self, label: str, recipe: str, overrides: dict[str, object], iterations: int) -> None:
        """One Megatron-Bridge run in a process of its own (only the paths it is given)."""
        argv = [sys.executable, "-m", "flexolmo_plugin", "train", recipe,
                *[f"recipe.{k}={v}" for k, v in overrides.items()]]
        log_path = self.root / "logs" / f"train-{label}.log"
        self.log(f"$ flexolmo train {recipe} " + " ".join(shlex.quote(a) for a in argv[5:]) + f"   (log: {log_path})")
        env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false", PYTHONWARNINGS="ignore")
        pattern = re.compile(r"\[flexolmo\] iteration (\d+) \| lm loss ([0-9.]+)")
        bar = None
        if self.progress:

            bar = tqdm(total=iterations, desc=f"   {label}", unit="it", leave=True, file=sys.stdout, mininterval=1.0)
        first = last = None
        with open(log_path, "w", encoding="utf-8") as log:
            process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                       cwd=self.root)
            for line in process.stdout:
                log.write(line)
                match = pattern.search(line)
                if match:
                    loss = float(match.group(2))
                    first = loss if first is None else first
                    last = loss
                    if bar is not None:
                        bar.update(int(match.group(1)) - bar.n)
                        bar.set_postfix_str(f"loss {loss:.3f}")
            code = process.wait()
        if bar is not None:
            bar.close()
        if code != 0:
            tail = "".join(open(log_path, encoding="utf-8").readlines()[-15:])
            raise DemoError(f"training {label!r} failed (exit {code}); last lines of {log_path}:\n{tail}")
        self.say(f"   {label}: {iterations} iterations, training loss {first:.3f} -> {last:.3f}  (log: "
                 f"{log_path.relative_to(self.root)})")

    def model_overrides(self) -> dict[str, object]:
        s = self.size
        return dict(seq_length=s.seq_length, global_batch_size=s.global_batch_size,
                    micro_batch_size=s.global_batch_size, log_interval=10, seed=1234)

    def train_public(self) -> None:
        s, data = self.size, self.root / "data"
        self.train("public", "public", dict(
            save_dir=self.root / "coordinator" / "public", data_paths=f"[{data / 'public.train'}]",
            tokenizer_dir=data / "tokenizer", num_layers=s.num_layers, hidden_size=s.hidden_size,
            ffn_hidden_size=s.ffn_hidden_size, num_attention_heads=s.num_attention_heads,
            num_key_value_heads=s.num_attention_heads, eos_token_id=2, pad_token_id=1, train_iters=s.public_iters,
            lr=s.public_lr, min_lr=s.public_lr / 10, lr_warmup_iters=max(1, s.public_iters // 10),
            save_interval=s.public_iters, **self.model_overrides()), s.public_iters)

    def publish_public(self) -> None:
        """The coordinator exports the public model to HF (what owners embed their documents with)
        and computes the public domain embedding r_pub from public documents."""

        coordinator = self.root / "coordinator"
        self.command("convert", "mcore-to-hf", coordinator / "public", coordinator / "public-hf")
        mcore_to_hf(coordinator / "public", coordinator / "public-hf")
        copy_tokenizer_files(self.root / "data" / "tokenizer", coordinator / "public-hf")
        self.embed("public")

    def embed(self, name: str) -> None:

        docs_path = self.root / "data" / f"{name}.train.jsonl"
        public_hf = self.root / "coordinator" / "public-hf"
        out = self.root / ("coordinator" if name == "public" else f"owners/{name}") / f"{name}-embedding.safetensors"
        out.parent.mkdir(parents=True, exist_ok=True)
        self.command("embed-domain", docs_path, out, "--model", public_hf, "--num-docs", self.size.embed_docs)
        docs = sample_documents(docs_path, num_docs=self.size.embed_docs)
        vector = embed_documents(public_hf, docs, method="public-model", max_tokens=self.size.seq_length)
        save_embedding(out, vector, {"documents": str(len(docs)), "embedder": str(public_hf), "method": "public-model",
                                     "seed": "0"})
        self.say(f"   {name:<9} domain embedding: mean of {len(docs)} documents -> {out.relative_to(self.root)}")

    def upcycle(self, names: tuple[str, str], domain_embedding: Path, out: Path) -> None:

        public_embedding = self.root / "coordinator" / "public-embedding.safetensors"
        self.command("upcycle", self.root / "coordinator" / "public", out, "--public-embedding", public_embedding,
                     "--domain-embedding", domain_embedding, "--name", names[1])
        upcycle(self.root / "coordinator" / "public", out, public_embedding=public_embedding,
                domain_embedding=domain_embedding, expert_names=names)

    def public_start(self) -> Path:
        """The coordinator's merge base: the public model upcycled exactly as every owner's start
        (shared weights, public FFN, r_pub), so that the packages' anchors can be checked against it;
        its second expert is a copy that the merge does not use."""
        coordinator = self.root / "coordinator"
        self.upcycle(("public", "public-copy"), coordinator / "public-embedding.safetensors",
                     coordinator / "public-start")
        return coordinator / "public-start"

    def owner(self, name: str) -> None:
        """Everything one data owner does, on its own data only."""

        s, data, home = self.size, self.root / "data", self.root / "owners" / name
        self.embed(name)
        self.upcycle(("public", name), home / f"{name}-embedding.safetensors", home / "start")
        self.train(name, "expert", dict(
            init_from=home / "start", save_dir=home / "trained", data_paths=f"[{data / f'{name}.train'}]",
            train_iters=s.owner_iters, lr=s.owner_lr, min_lr=s.owner_lr / 10,
            lr_warmup_iters=max(1, s.owner_iters // 10), save_interval=s.owner_iters, **self.model_overrides()),
            s.owner_iters)
        package = self.root / "packages" / name
        tokens = s.owner_iters * s.tokens_per_iteration
        self.command("package-expert", home / "trained", package, "--name", name, "--tokens-trained", tokens)
        package_expert(home / "trained", package, name=name, description=f"demo expert trained on {name} text",
                       tokens_trained=tokens)
        self.say(f"   packaged -> {package.relative_to(self.root)}")

    # ------------------------------------------------------------------ coordinator
    def merge(self) -> None:

        coordinator = self.root / "coordinator"
        self.public_start()
        packages = [self.root / "packages" / name for name in OWNERS]
        self.command("merge", coordinator / "public-start", *packages, "--out", coordinator / "merged")
        report = merge_experts(coordinator / "public-start", packages, coordinator / "merged")
        self.say(f"   merged {len(packages)} verified packages onto the public model: {report.summary()}")
        dropped = OWNERS[0]
        self.command("opt-out", coordinator / "merged", "--drop", dropped, "--out",
                     coordinator / f"merged-without-{dropped}")

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # top-k shrinks from 4 to 3: expected here
            opt_out(coordinator / "merged", coordinator / f"merged-without-{dropped}", drop=[dropped])
        self.say(f"   opted out {dropped!r} physically -> coordinator/merged-without-{dropped}")

    def evaluate(self) -> None:

        s, data, coordinator = self.size, self.root / "data", self.root / "coordinator"
        datasets = {name: data / f"{name}.eval" for name in DOMAINS}
        kwargs = dict(seq_len=s.seq_length, max_tokens=s.eval_tokens, batch_size=32)

        def losses(model) -> dict[str, float]:
            return {r.name: r.loss for r in evaluate(model, datasets, **kwargs)}

        table = self.result.losses
        table["public model"] = losses(from_mcore(coordinator / "public"))
        for name in OWNERS:
            table[f"owner {name} [public,{name}]"] = losses(from_mcore(self.root / "owners" / name / "trained"))
        merged = from_mcore(coordinator / "merged")
        results = evaluate(merged, datasets, **kwargs)
        table["merged (all experts)"] = {r.name: r.loss for r in results}
        names = merged.flexolmo_config.expert_names
        self.result.expert_names = names
        self.result.routing = {r.name: [round(v, 4) for v in r.weights.mean(0).tolist()] for r in results}
        plot_routing(results, names, self.root / "eval" / "routing.png", show="weights")
        for name in OWNERS:
            model = from_mcore(coordinator / "merged", dispatcher="allgather")
            exclude_experts(model, [name])
            table[f"merged, {name} opted out"] = losses(model)
        physical = losses(from_mcore(coordinator / f"merged-without-{OWNERS[0]}"))
        runtime = table[f"merged, {OWNERS[0]} opted out"]
        self.result.physical_vs_runtime_opt_out = max(abs(physical[d] - runtime[d]) for d in DOMAINS)
        self.say(format_losses(table))
        self.say("\n   mean gate weight per expert on each domain "
                 "(merged model, all experts active, mean over layers):")
        self.say("   " + f"{'domain':<9}" + "".join(f"{n:>10}" for n in names))
        for domain, shares in self.result.routing.items():
            self.say("   " + f"{domain:<9}" + "".join(f"{100 * v:>9.1f}%" for v in shares))
        self.say(
            f"   physically opted-out checkpoint vs run-time exclusion: max |Δloss| = "
            f"{self.result.physical_vs_runtime_opt_out:.2e}"
        )

    def export(self) -> None:


        coordinator = self.root / "coordinator"
        self.command("convert", "mcore-to-hf", coordinator / "merged", coordinator / "merged-hf")
        mcore_to_hf(coordinator / "merged", coordinator / "merged-hf")
        copy_tokenizer_files(self.root / "data" / "tokenizer", coordinator / "merged-hf")
        ids = torch.cat(
            [
                read_windows(
                    self.root / "data" / f"{d}.eval", seq_len=self.size.seq_length, max_tokens=2 * self.size.seq_length
                )
                for d in DOMAINS
            ]
        )
        ours = logits(from_mcore(coordinator / "merged"), ids).float()
        hf = AutoModelForCausalLM.from_pretrained(
            str(coordinator / "merged-hf"), dtype=torch.float32, local_files_only=True
        ).eval()
        with torch.no_grad():
            reference = hf(ids).logits.float()
        self.result.hf_max_abs_logit_diff = (ours - reference).abs().max().item()
        self.say(
            f"   transformers FlexOlmoForCausalLM loaded coordinator/merged-hf; max |Δlogit| vs Megatron on "
            f"{ids.shape[0]}x{ids.shape[1]} held-out tokens = {self.result.hf_max_abs_logit_diff:.2e}"
        )
        if not self.result.hf_max_abs_logit_diff <= 1e-4:
            raise DemoError(f"the HF export computes different logits (max |Δ| {self.result.hf_max_abs_logit_diff})")


def format_losses(table: dict[str, dict[str, float]]) -> str:
    width = max(len(k) for k in table)
    lines = [
        "\n   held-out loss per domain (nats/token; lower is better)",
        "   " + f"{'model':<{width}}" + "".join(f"{d:>10}" for d in DOMAINS),
    ]
    for model, row in table.items():
        lines.append("   " + f"{model:<{width}}" + "".join(f"{row[d]:>10.3f}" for d in DOMAINS))
    return "\n".join(lines)
