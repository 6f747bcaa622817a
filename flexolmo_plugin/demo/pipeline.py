"""``flexolmo demo``: the whole FlexOlmo lifecycle on one CPU machine, with the product's own tools.

A coordinator trains a small public model; three data owners each prepare their own text, compute
their domain embedding, upcycle the public model and train their expert in a process of their own
that sees only their data; the coordinator verifies and merges the expert packages, evaluates every
model on every domain, opts one owner out, and exports the merged model to Hugging Face, where
``transformers`` must compute the same logits.  Every step is the function a ``flexolmo`` command
runs (its command line is written to the log), so the demo doubles as an integration test.
"""

from __future__ import annotations

import contextlib
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

from tqdm import tqdm
from transformers.utils import logging as hf_logging

from flexolmo_plugin.cli import main as flexolmo_main
from flexolmo_plugin.conversion.atomic import write_file_atomically
from flexolmo_plugin.conversion.convert import mcore_to_hf
from flexolmo_plugin.demo.corpus import DOMAINS, build_domain, train_tokenizer
from flexolmo_plugin.demo.sizes import OWNERS, SIZES, DemoSize, sized
from flexolmo_plugin.lifecycle.data import prepare_dataset
from flexolmo_plugin.lifecycle.domain_embedding import embed_documents, sample_documents
from flexolmo_plugin.lifecycle.merge import merge_experts
from flexolmo_plugin.lifecycle.opt_out import opt_out
from flexolmo_plugin.lifecycle.package import package_expert
from flexolmo_plugin.lifecycle.proxy import router_mix, select_proxy
from flexolmo_plugin.lifecycle.signing import keygen, public_path
from flexolmo_plugin.lifecycle.upcycle import save_embedding, upcycle


class DemoError(RuntimeError):
    """A demo step failed; the message names the step and its log."""


@dataclass
class DemoResult:
    workdir: Path
    size: str
    seed: int = 0
    losses: dict[str, dict[str, float]] = field(default_factory=dict)  # model -> domain -> loss
    # mean gate weight per expert on each domain (mean over layers and tokens), before / after the router step
    routing: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    expert_names: tuple[str, ...] = ()
    oracle: dict[str, float] = field(default_factory=dict)  # best single model (public or one owner) per domain
    efficiency: float = float("nan")  # (public - final) / (public - oracle), mean over domains
    proxies: dict[str, int] = field(default_factory=dict)  # owner -> public documents selected as proxies
    router_scaling: str = ""  # flexolmo scale-router's report (the chosen logit scales), if it ran
    hf_max_abs_logit_diff: float = float("nan")
    hf_max_abs_logit: float = float("nan")
    hf_fp32_max_abs_logit_diff: float = float("nan")  # transformers fp32 vs transformers float64
    hf_mean_abs_logit_diff: float = float("nan")  # Megatron fp32 vs transformers float64, mean over logits
    hf_fp32_mean_abs_logit_diff: float = float("nan")  # transformers fp32 vs transformers float64, mean
    physical_vs_runtime_opt_out: float = float("nan")
    # one held-out prompt per domain, continued by the final model: the completion and each expert's share of it
    attribution: dict[str, dict] = field(default_factory=dict)
    step_seconds: dict[str, float] = field(default_factory=dict)
    artifacts: dict[str, str] = field(default_factory=dict)


class Demo:
    """Runs the steps in order, timing each and logging to ``<workdir>/logs/demo.log``."""

    def __init__(self, workdir: Path, size: str, *, seed: int = 0, overrides: dict[str, str] | None = None,
                 progress: bool, echo=print):
        if size not in SIZES:
            raise ValueError(f"unknown demo size {size!r}; choose from {sorted(SIZES)}")
        self.size: DemoSize = sized(size, overrides)
        self.seed = seed
        self.root = workdir
        self.progress = progress
        self.echo = echo
        for sub in ("data", "coordinator", "owners", "packages", "eval", "logs"):
            (workdir / sub).mkdir(parents=True, exist_ok=True)
        self.log_path = workdir / "logs" / "demo.log"

        hf_logging.disable_progress_bar()  # per-tensor "Loading weights" bars would bury the demo's own
        self.result = DemoResult(workdir=workdir, size=size, seed=seed)

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
        files = {name: build_domain(name, data, train_chars=s.public_chars if name == "public" else s.train_chars,
                                    eval_chars=s.eval_chars, pool_chars=s.pool_chars if name == "public" else 0,
                                    seed=self.seed) for name in DOMAINS}
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
        env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false", PYTHONWARNINGS="ignore",
                   OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
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
                    micro_batch_size=s.global_batch_size, log_interval=10, seed=1234 + self.seed)

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
        mcore_to_hf(coordinator / "public", coordinator / "public-hf")  # with its training run's tokenizer
        self.embed("public")

    def embed(self, name: str) -> None:
        """r_i as the mean of ``embed_docs`` documents, embedded by the public model's own hidden states or,
        with ``domain_encoder``, by that local encoder (every domain, r_pub included, as in the paper)."""
        docs_path = self.root / "data" / f"{name}.train.jsonl"
        public_hf = self.root / "coordinator" / "public-hf"
        embedder, method = (Path(self.size.domain_encoder), "encoder") if self.size.domain_encoder else (
            public_hf, "public-model")
        out = self.root / ("coordinator" if name == "public" else f"owners/{name}") / f"{name}-embedding.safetensors"
        out.parent.mkdir(parents=True, exist_ok=True)
        unit = self.size.unit_document_embeddings
        self.command("embed-domain", docs_path, out, "--model", embedder, "--method", method,
                     "--for-model", public_hf, "--num-docs", self.size.embed_docs,
                     "--max-tokens", self.size.seq_length, "--seed", self.seed, *(() if unit else ("--no-normalize",)))
        docs = sample_documents(docs_path, num_docs=self.size.embed_docs, seed=self.seed)
        vector = embed_documents(embedder, docs, method=method, max_tokens=self.size.seq_length, normalize=unit,
                                 expected_width=self.size.hidden_size)
        save_embedding(out, vector, {"documents": str(len(docs)), "embedder": str(embedder), "method": method,
                                     "seed": str(self.seed), "normalized": str(unit).lower()})
        self.say(f"   {name:<9} domain embedding ({method}): mean of {len(docs)} documents -> "
                 f"{out.relative_to(self.root)}")

    def upcycle(self, names: tuple[str, str], domain_embedding: Path, out: Path) -> None:
        public_embedding = self.root / "coordinator" / "public-embedding.safetensors"
        bias = self.size.router_bias_init
        self.command("upcycle", self.root / "coordinator" / "public", out, "--public-embedding", public_embedding,
                     "--domain-embedding", domain_embedding, "--name", names[1],
                     *(("--no-router-bias",) if bias is None else ("--router-bias-init", bias)))
        upcycle(self.root / "coordinator" / "public", out, public_embedding=public_embedding,
                domain_embedding=domain_embedding, expert_names=names, router_bias_init=bias)

    # ------------------------------------------------------------------ a data owner (own data only)
    def owner(self, name: str) -> None:
        """Everything one data owner does: embedding, upcycle, anchored training (learned bias on), router
        calibration (unless the size turns it off), package, and proxy selection from the public text
        (only public identifiers leave)."""
        s, data, home = self.size, self.root / "data", self.root / "owners" / name
        self.embed(name)
        self.upcycle(("public", name), home / f"{name}-embedding.safetensors", home / "start")
        share = s.owner_public_share  # public replay: public text is public, the owner may train on it too
        stream = (f"[{1 - share},{data / f'{name}.train'},{share},{data / 'public.train'}]" if share
                  else f"[{data / f'{name}.train'}]")
        self.train(name, "expert", dict(
            init_from=home / "start", save_dir=home / "trained", data_paths=stream,
            train_iters=s.owner_iters, lr=s.owner_lr, min_lr=s.owner_lr / 10,
            lr_warmup_iters=max(1, s.owner_iters // 10), save_interval=s.owner_iters, **self.model_overrides()),
            s.owner_iters)
        trained = self.calibrate(name) if s.router_calibration_scale is not None else home / "trained"
        package = self.root / "packages" / name
        tokens = s.owner_iters * s.tokens_per_iteration
        key = home / f"{name}-key"  # the owner's signing key; only key.pub goes to the coordinator
        self.command("keygen", "--out", key)
        keygen(key)
        self.command("package-expert", trained, package, "--name", name, "--tokens-trained", tokens, "--sign", key)
        package_expert(trained, package, name=name, description=f"demo expert trained on {name} text",
                       tokens_trained=tokens, sign_key=key)
        proxy = self.root / "packages" / f"{name}-proxy.json"
        public_hf = self.root / "coordinator" / "public-hf"
        self.command("select-proxy", data / f"{name}.train.jsonl", data / "public.pool.jsonl", "--out", proxy,
                     "--name", name, "--embedder", public_hf, "--fraction", s.proxy_fraction, "--seed", self.seed)
        selection = select_proxy(data / f"{name}.train.jsonl", data / "public.pool.jsonl", proxy, embedder=public_hf,
                                 owner=name, fraction=s.proxy_fraction, max_owner_docs=s.embed_docs,
                                 max_tokens=s.seq_length, seed=self.seed)
        self.result.proxies[name] = len(selection.selected)
        self.say(f"   packaged -> {package.relative_to(self.root)}; proxy data: {len(selection.selected)} public "
                 f"documents (classifier accuracy {100 * selection.cross_validated_accuracy:.0f}%) -> "
                 f"{proxy.relative_to(self.root)}")

    def calibrate(self, name: str) -> Path:
        """The owner's router rows refitted as a discriminant of its text against public text
        (``flexolmo calibrate-router``); returns the calibrated checkpoint."""
        data, home = self.root / "data", self.root / "owners" / name
        out = home / "calibrated"
        s = self.size
        self.run_command(f"calibrate-{name}", "calibrate-router", home / "trained",
                         "--own-data", data / f"{name}.train", "--public-data", data / "public.train", "--out", out,
                         "--scale", s.router_calibration_scale, "--public-weight", s.calibration_public_weight,
                         "--max-tokens", s.calibration_tokens)
        return out

    def run_command(self, label: str, *argv) -> str:
        """A ``flexolmo`` command run as its logged command line parses (log: ``logs/<label>.log``); its
        last line.  It runs in this process through the CLI's own entry point: the same code and exit codes
        as ``$ flexolmo ...``, without another interpreter start (torch + Megatron imports, ~8 s on the 2-core VM)."""
        argv = [str(a) for a in argv]
        self.command(*argv)
        log_path = self.root / "logs" / f"{label}.log"
        with open(log_path, "w", encoding="utf-8") as log, contextlib.redirect_stdout(log), \
                contextlib.redirect_stderr(log), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            code = flexolmo_main(argv)
        lines = open(log_path, encoding="utf-8").read().splitlines()
        if code != 0:
            raise DemoError(f"flexolmo {argv[0]} failed (exit {code}); last lines of {log_path}:\n"
                            + "\n".join(lines[-15:]))
        self.say(f"   {argv[0]}: {lines[-1].rsplit(' -> ', 1)[0]}")
        return lines[-1]

    # ------------------------------------------------------------------ coordinator
    def merge(self) -> None:
        """Verify and merge the packages onto the public start (the public model upcycled exactly as every
        owner's start, so that each package's anchor can be checked against it)."""
        coordinator = self.root / "coordinator"
        self.upcycle(("public", "public-copy"), coordinator / "public-embedding.safetensors",
                     coordinator / "public-start")
        packages = [self.root / "packages" / name for name in OWNERS]
        # the coordinator's registry of each owner's public key (received from the owner, out of band)
        trusted = coordinator / "trusted-keys.json"
        registry = {name: public_path(self.root / "owners" / name / f"{name}-key").read_text() for name in OWNERS}
        write_file_atomically(trusted, (json.dumps(registry, indent=1) + "\n").encode())
        self.command("merge", coordinator / "public-start", *packages, "--out", coordinator / "merged",
                     "--trusted-keys", trusted)
        report = merge_experts(coordinator / "public-start", packages, coordinator / "merged", trusted_keys=trusted)
        self.say(f"   merged {len(packages)} packages, each verified (checksums, anchor, the owner's registered "
                 f"signature) onto the public model: {report.summary()}")

    def router_tune(self) -> None:
        """The coordinator's router step on public text plus the owners' proxy selections -- never owner
        text: alignment of the later layers, per-expert logit scales, LM router tuning (each as the size
        says).  The learned biases are dropped here, so the final model exports to HF exactly."""
        s, data, coordinator = self.size, self.root / "data", self.root / "coordinator"
        proxies = [self.root / "packages" / f"{name}-proxy.json" for name in OWNERS]
        self.command("router-mix", data / "public.pool.jsonl", *proxies, "--public-sample", data / "public.train.jsonl",
                     "--out", data / "router-mix.jsonl", "--seed", self.seed)
        mix = router_mix(data / "public.pool.jsonl", proxies, data / "router-mix.jsonl",
                         public_sample=data / "public.train.jsonl", seed=self.seed)
        self.say("   router-tuning data: " + ", ".join(f"{k} {v}" for k, v in mix.per_source.items()) + " documents")
        self.command("prepare-data", data / "router-mix.jsonl", data / "router-mix", "--tokenizer", data / "tokenizer")
        prepare_dataset(data / "router-mix.jsonl", data / "router-mix", tokenizer_dir=data / "tokenizer")
        stages = [name for name, on in (("aligned", s.router_calibration_scale is not None),
                                        ("scaled", s.router_scaling_sweeps > 0), ("tuned", s.router_iters > 0)) if on]
        start = coordinator / "merged"
        for stage in stages:  # each stage reads the previous one's output; the last one writes "final"
            out = coordinator / ("final" if stage == stages[-1] else stage)
            if stage == "aligned":  # the owners calibrated layer 0's rows; align the others to it
                self.run_command("align-router", "align-router", start, "--data", data / "router-mix",
                                 "--out", out, "--max-tokens", s.calibration_tokens)
            elif stage == "scaled":
                line = self.run_command("scale-router", "scale-router", start, "--data", data / "router-mix",
                                        "--out", out, "--sweeps", s.router_scaling_sweeps)
                self.result.router_scaling = line.rsplit(" -> ", 1)[0]
            else:
                self.train("router-tune", "router-tune", dict(
                    init_from=start, save_dir=out, data_paths=f"[{data / 'router-mix'}]",
                    train_iters=s.router_iters, lr=s.router_lr, min_lr=s.router_lr / 10,
                    lr_warmup_iters=max(1, s.router_iters // 10), save_interval=s.router_iters,
                    **self.model_overrides()), s.router_iters)
            start = out
        dropped = OWNERS[0]
        self.command("opt-out", coordinator / "final", "--drop", dropped, "--out",
                     coordinator / f"final-without-{dropped}")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # top-k shrinks from 4 to 3: expected here
            opt_out(coordinator / "final", coordinator / f"final-without-{dropped}", drop=[dropped])
        self.say(f"   opted out {dropped!r} physically -> coordinator/final-without-{dropped}")
