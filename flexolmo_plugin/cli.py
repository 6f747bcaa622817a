"""The ``flexolmo`` command line: one tool for the FlexOlmo lifecycle.

Exit codes: 0 success, 1 a check failed (e.g. parity above tolerance), 2 bad input or usage.
Each command imports its implementation when it runs (``--help`` must not import torch, Megatron or
transformers, which take seconds); these deferred imports are the CLI's, and only the CLI's.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

from flexolmo_plugin.errors import ConfigError, FlexOlmoError
from flexolmo_plugin.recipes.registry import RECIPES

EXIT_OK, EXIT_CHECK_FAILED, EXIT_BAD_INPUT = 0, 1, 2
TRAIN_RECIPES = tuple(RECIPES)  # listing them needs no Megatron-Bridge import

_DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16"}


def _quiet_imports() -> None:
    """Megatron and transformers print advisory warnings at import that say nothing to a CLI user."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    import logging

    for name in ("megatron", "megatron.core", "transformers", "torch.utils.cpp_extension"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _megatron() -> None:
    """Setup of every command that runs megatron-core: quiet imports, then the CPU compatibility
    shims where CUDA is absent (the CLI is an entry point: it applies them, logged once)."""
    _quiet_imports()
    from flexolmo_plugin import compat

    compat.enable_cpu_compat()


def cmd_parity(args: argparse.Namespace) -> int:
    """Compare our Megatron model's logits with transformers' FlexOlmoForCausalLM on random tokens."""
    _megatron()
    import torch

    from flexolmo_plugin.parity import check_parity

    report = check_parity(args.hf_dir, tokens=args.tokens, batch=args.batch, seed=args.seed,
                          params_dtype=getattr(torch, _DTYPES[args.dtype]), tolerance=args.tolerance)
    print(report.describe())
    return EXIT_OK if report.passed else EXIT_CHECK_FAILED


def _parse_size(text: str) -> int:
    units = {"KB": 2**10, "MB": 2**20, "GB": 2**30, "TB": 2**40, "B": 1}
    upper = text.strip().upper()
    for unit, factor in units.items():
        if upper.endswith(unit):
            return int(float(upper[: -len(unit)]) * factor)
    return int(upper)


def cmd_convert(args: argparse.Namespace) -> int:
    """HF <-> Megatron conversion with a progress bar and a final summary."""
    _megatron()
    import torch

    from flexolmo_plugin.conversion.convert import hf_to_mcore, mcore_to_hf

    dtype = getattr(torch, _DTYPES[args.dtype]) if args.dtype else None
    if args.direction == "hf-to-mcore":
        report = hf_to_mcore(args.source, args.target, dtype=dtype, num_experts=args.num_experts,
                             top_k=args.top_k, progress=not args.quiet)
    else:
        if args.num_experts or args.top_k:
            raise ConfigError("--num-experts/--top-k only apply to hf-to-mcore")
        report = mcore_to_hf(args.source, args.target, dtype=dtype, max_shard_bytes=_parse_size(args.max_shard_size),
                             drop_router_bias=args.drop_router_bias, progress=not args.quiet)
    print(f"converted {args.direction}: {report.summary()}")
    if args.direction == "mcore-to-hf" and args.drop_router_bias:
        from flexolmo_plugin.api import from_mcore
        from flexolmo_plugin.conversion.convert import router_bias_magnitude
        from flexolmo_plugin.lifecycle.evaluation import router_bias_logit_change

        if router_bias_magnitude(args.source) > 0:
            change = router_bias_logit_change(from_mcore(args.source, dispatcher="allgather"))
            print(f"router bias dropped: max |Δlogit| vs the Megatron model on random tokens = {change:.4g}")
    return EXIT_OK


def cmd_upcycle(args: argparse.Namespace) -> int:
    """Public model -> the [public, domain] 2-expert Megatron checkpoint an owner trains."""
    _megatron()
    import torch

    from flexolmo_plugin.lifecycle.upcycle import upcycle

    report = upcycle(args.public_dir, args.out_dir, public_embedding=args.public_embedding,
                     domain_embedding=args.domain_embedding, expert_names=("public", args.name),
                     dtype=getattr(torch, _DTYPES[args.dtype]) if args.dtype else None, progress=not args.quiet)
    print(f"upcycled: {report.summary()}")
    return EXIT_OK


def cmd_prepare_data(args: argparse.Namespace) -> int:
    """JSON Lines -> Megatron indexed dataset."""
    _megatron()
    from flexolmo_plugin.lifecycle.data import prepare_dataset

    report = prepare_dataset(args.input, args.output_prefix, tokenizer_dir=args.tokenizer, text_key=args.text_key,
                             append_eod=not args.no_eod, progress=not args.quiet)
    print(f"wrote {report.prefix}.bin/.idx: {report.documents} documents, {report.tokens} tokens")
    return EXIT_OK


def cmd_embed_domain(args: argparse.Namespace) -> int:
    """Mean embedding of a sample of the owner's documents -> a router row."""
    _megatron()
    from flexolmo_plugin.lifecycle.domain_embedding import (
        embed_documents,
        sample_documents,
    )
    from flexolmo_plugin.lifecycle.upcycle import save_embedding

    width = None
    if args.for_model:
        import json
        from pathlib import Path

        width = json.loads((Path(args.for_model) / "config.json").read_text())["hidden_size"]
    docs = sample_documents(args.docs, num_docs=args.num_docs, seed=args.seed, text_key=args.text_key)
    vector = embed_documents(args.model, docs, method=args.method, max_tokens=args.max_tokens,
                             expected_width=width, progress=not args.quiet)
    save_embedding(args.output, vector, {"documents": str(len(docs)), "embedder": str(args.model),
                                         "method": args.method, "seed": str(args.seed)})
    print(f"wrote {args.output}: mean of {len(docs)} documents, width {vector.numel()}, "
          f"L2 norm {vector.norm().item():.4f}")
    return EXIT_OK


def cmd_select_proxy(args: argparse.Namespace) -> int:
    """Owner side: identifiers of the public documents most like the owner's (no owner text leaves)."""
    _megatron()
    from flexolmo_plugin.lifecycle.proxy import select_proxy

    selection = select_proxy(args.owner_docs, args.public_docs, args.out, embedder=args.embedder, owner=args.name,
                             fraction=args.fraction, num_docs=args.num_docs, max_owner_docs=args.max_owner_docs,
                             min_probability=args.min_probability, method=args.method, text_key=args.text_key,
                             id_key=args.id_key, seed=args.seed, progress=not args.quiet)
    print(f"selected {len(selection.selected)} of {selection.public_documents} public documents as proxies for "
          f"{args.name!r} (classifier cross-validated accuracy {100 * selection.cross_validated_accuracy:.1f}%) "
          f"-> {args.out}")
    return EXIT_OK


def cmd_router_mix(args: argparse.Namespace) -> int:
    """Coordinator side: the router-tuning data from the public set and the owners' proxy selections."""
    _quiet_imports()
    from flexolmo_plugin.lifecycle.proxy import router_mix

    report = router_mix(args.public_docs, args.selections, args.out, public_sample=args.public_sample,
                        per_source=args.per_source, seed=args.seed, text_key=args.text_key)
    parts = ", ".join(f"{source} {count}" for source, count in report.per_source.items())
    print(f"wrote {report.documents} documents ({parts}) -> {report.path}")
    return EXIT_OK


def cmd_package_expert(args: argparse.Namespace) -> int:
    _megatron()
    from flexolmo_plugin.lifecycle.package import package_expert

    path = package_expert(args.owner_dir, args.package_dir, name=args.name, description=args.description,
                          tokens_trained=args.tokens_trained, expert=args.expert)
    print(f"packaged expert {args.name!r} -> {path}")
    return EXIT_OK


def cmd_merge(args: argparse.Namespace) -> int:
    _megatron()
    from flexolmo_plugin.lifecycle.merge import merge_experts

    report = merge_experts(args.public_dir, args.packages, args.out, top_k=args.top_k, progress=not args.quiet)
    print(f"merged {len(args.packages)} expert(s) onto the public model: {report.summary()}")
    return EXIT_OK


def cmd_opt_out(args: argparse.Namespace) -> int:
    _megatron()
    from flexolmo_plugin.lifecycle.opt_out import opt_out

    report = opt_out(args.mcore_dir, args.out, drop=args.drop, progress=not args.quiet)
    print(f"opted out {args.drop}: {report.summary()}")
    return EXIT_OK


def cmd_eval(args: argparse.Namespace) -> int:
    """Per-domain loss / perplexity and where the router sends each domain, for one or more models;
    with several models also the oracle (best model per domain) and the composition efficiency."""
    _megatron()
    import flexolmo_plugin as fp
    from flexolmo_plugin.lifecycle import evaluation as ev
    from flexolmo_plugin.lifecycle.opt_out import exclude_experts

    datasets = {}
    for item in args.data:
        name, sep, prefix = item.partition("=")
        if not sep or not name or not prefix:
            raise ConfigError(f"--data expects NAME=PREFIX, got {item!r}")
        datasets[name] = prefix
    for flag, value in (("--seq-len", args.seq_len), ("--max-tokens", args.max_tokens)):
        if value is not None and value < 1:
            raise ConfigError(f"{flag} must be >= 1, got {value}")
    table: dict[str, dict[str, float]] = {}
    for directory in args.mcore_dirs:
        model = fp.from_mcore(directory, dispatcher="allgather" if args.exclude else "alltoall")
        config = model.flexolmo_config
        names = config.expert_names or tuple(f"expert{i}" for i in range(config.num_experts))
        if args.exclude:
            exclude_experts(model, args.exclude)
        seq_len = args.seq_len or config.max_position_embeddings  # the model's own context by default
        results = ev.evaluate(model, datasets, seq_len=seq_len, max_tokens=args.max_tokens)
        table[directory] = {r.name: r.loss for r in results}
        title = f"{directory}" + (f" (excluding {', '.join(args.exclude)})" if args.exclude else "")
        print(ev.format_table(results, title))
        print("\nmean gate weight per expert (mean over layers and tokens):")
        print(ev.format_gate_weights(results, names))
        if config.top_k < config.num_experts:
            print(f"\nshare of tokens routed to each expert (top-{config.top_k} of {config.num_experts}):")
            print(ev.format_routing(results, names))
        if args.plot:
            path = args.plot if len(args.mcore_dirs) == 1 else f"{Path(args.plot).stem}-{len(table)}.png"
            ev.plot_routing(results, names, path, show="weights")
            print(f"\nrouting heatmap: {path}")
        print()
    if len(table) > 1:
        best = ev.oracle({k: v for k, v in table.items() if k != args.composed})
        print("oracle (best of the models per domain): " + ", ".join(f"{d} {v:.4f}" for d, v in best.items()))
        if args.public and args.composed:
            missing = [d for d in (args.public, args.composed) if d not in table]
            if missing:
                raise ConfigError(f"--public / --composed must be among the evaluated models, not {missing}")
            efficiency = ev.composition_efficiency(table[args.public], table[args.composed], best)
            print(f"composition efficiency of {args.composed}: {100 * efficiency:.1f}% "
                  "((public - composed) / (public - oracle), mean over domains)")
    return EXIT_OK


def cmd_train_expert(args: argparse.Namespace) -> int:
    """Anchored expert training / router tuning on Megatron-Bridge (torchrun-compatible)."""
    _quiet_imports()
    from flexolmo_plugin.recipes.train import run

    log = run(args.recipe, args.overrides)
    if log.history:
        first, last = log.history[0], log.history[-1]
        print(f"trained iterations {first[0]}-{last[0]}: lm loss {first[1]:.4f} -> {last[1]:.4f}")
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    """The whole lifecycle on this machine: public model, three owners, merge, eval, opt-out, HF export."""
    _quiet_imports()
    from flexolmo_plugin.demo.pipeline import DemoError
    from flexolmo_plugin.demo.run import run_demo

    try:
        overrides = {}
        for item in args.set:
            key, sep, value = item.partition("=")
            if not sep:
                raise ConfigError(f"--set expects FIELD=VALUE, got {item!r}")
            overrides[key] = value
        _, claims = run_demo(args.workdir, size=args.size, seed=args.seed, overrides=overrides,
                             progress=not args.quiet)
    except DemoError as error:
        print(f"demo failed: {error}", file=sys.stderr)
        return EXIT_CHECK_FAILED
    return EXIT_OK if all(ok for _, ok in claims) else EXIT_CHECK_FAILED


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flexolmo",
        description="FlexOlmo on Megatron-Core: check, convert, train, merge and opt out experts.",
        epilog="Exit codes: 0 success, 1 a check failed, 2 bad input.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    parity = sub.add_parser(
        "parity", help="compare logits with transformers' FlexOlmoForCausalLM",
        description="Load HF_DIR into the Megatron FlexOlmo model and into transformers, run both on the "
                    "same random tokens, print max |Δlogit| and exit 1 if it exceeds the tolerance.")
    parity.add_argument("hf_dir", metavar="HF_DIR", help="Hugging Face FlexOlmo directory (safetensors + config.json)")
    parity.add_argument("--tokens", type=int, default=32, help="sequence length (default 32)")
    parity.add_argument("--batch", type=int, default=2, help="number of sequences (default 2)")
    parity.add_argument("--seed", type=int, default=0, help="seed of the random token ids (default 0)")
    parity.add_argument("--tolerance", type=float, default=1e-4, help="max allowed |Δlogit| (default 1e-4)")
    parity.add_argument("--dtype", choices=sorted(_DTYPES), default="float32",
                        help="parameter dtype of the Megatron model (reference is always float32)")
    parity.set_defaults(func=cmd_parity)

    convert = sub.add_parser(
        "convert", help="convert checkpoints between Hugging Face and Megatron torch_dist",
        description="hf-to-mcore: HF FlexOlmo (or OLMo-2 dense with --num-experts) -> a Megatron torch_dist "
                    "checkpoint plus flexolmo_config.json (load with flexolmo_plugin.from_mcore at any TP/EP). "
                    "mcore-to-hf: back to sharded safetensors + config.json for transformers. Streams one tensor "
                    "at a time, validates everything, and writes the output atomically (refuses an existing path).")
    convert.add_argument("direction", choices=["hf-to-mcore", "mcore-to-hf"])
    convert.add_argument("source", metavar="SOURCE_DIR")
    convert.add_argument("target", metavar="TARGET_DIR", help="must not exist yet")
    convert.add_argument("--dtype", choices=sorted(_DTYPES), help="output dtype (default: the source's)")
    convert.add_argument("--num-experts", type=int, help="hf-to-mcore from OLMo-2 dense: number of expert copies")
    convert.add_argument("--top-k", type=int, help="hf-to-mcore: experts per token (default: config / all)")
    convert.add_argument("--max-shard-size", default="5GB", help="mcore-to-hf: safetensors shard size (default 5GB)")
    convert.add_argument("--drop-router-bias", action="store_true",
                         help="mcore-to-hf: export a model with a non-zero learned router bias without it "
                              "(HF flex_olmo has none) and report the logit change")
    convert.add_argument("--quiet", action="store_true", help="no progress bar")
    convert.set_defaults(func=cmd_convert)

    up = sub.add_parser(
        "upcycle", help="public model -> [public, domain] 2-expert checkpoint for a data owner",
        description="Both experts start as the public FFN (expert 0 of a FlexOlmo public model); every layer's "
                    "router rows become [PUBLIC_EMBEDDING; DOMAIN_EMBEDDING]. PUBLIC_DIR: HF OLMo-2 dense, HF "
                    "FlexOlmo, or a Megatron checkpoint from 'flexolmo convert'. Embeddings: .safetensors or .npy.")
    up.add_argument("public_dir", metavar="PUBLIC_DIR")
    up.add_argument("out_dir", metavar="OUT_MCORE_DIR", help="must not exist yet")
    up.add_argument("--public-embedding", required=True, metavar="E0")
    up.add_argument("--domain-embedding", required=True, metavar="E1")
    up.add_argument("--name", default="domain", help="name of the owner's expert (default 'domain')")
    up.add_argument("--dtype", choices=sorted(_DTYPES), help="parameter dtype (default: the public model's)")
    up.add_argument("--quiet", action="store_true")
    up.set_defaults(func=cmd_upcycle)

    prep = sub.add_parser("prepare-data", help="JSON Lines -> Megatron indexed dataset (.bin/.idx)",
                          description="Tokenizes one document per line (streaming) and appends the end-of-document "
                                      "token; a bad line stops with its line number and writes nothing.")
    prep.add_argument("input", metavar="INPUT.jsonl")
    prep.add_argument("output_prefix", metavar="OUT_PREFIX")
    prep.add_argument("--tokenizer", required=True, metavar="TOKENIZER_DIR", help="local HF tokenizer directory")
    prep.add_argument("--text-key", default="text")
    prep.add_argument("--no-eod", action="store_true", help="do not append the end-of-document token")
    prep.add_argument("--quiet", action="store_true")
    prep.set_defaults(func=cmd_prepare_data)

    emb = sub.add_parser("embed-domain", help="domain embedding (router row) from a sample of documents",
                         description="Mean embedding of up to --num-docs documents (paper: 1000) with a local "
                                     "encoder (sentence-transformers/HF, mean-pooled) or the public model's own "
                                     "final hidden states. The width must equal the FlexOlmo model's hidden size.")
    emb.add_argument("docs", metavar="DOCS.jsonl")
    emb.add_argument("output", metavar="OUT.safetensors")
    emb.add_argument("--model", required=True, metavar="DIR", help="local embedder or public model directory")
    emb.add_argument("--method", choices=["auto", "encoder", "public-model"], default="auto")
    emb.add_argument("--for-model", metavar="DIR", help="check the width against this model's hidden size")
    emb.add_argument("--num-docs", type=int, default=1000)
    emb.add_argument("--max-tokens", type=int, default=512)
    emb.add_argument("--seed", type=int, default=0)
    emb.add_argument("--text-key", default="text")
    emb.add_argument("--quiet", action="store_true")
    emb.set_defaults(func=cmd_embed_domain)

    sel = sub.add_parser(
        "select-proxy", help="owner: pick public documents like the owner's data (proxy data for router tuning)",
        description="Trains a logistic-regression classifier (owner documents vs public documents) on document "
                    "embeddings, here on the owner's machine, scores every public document (cross-fitted) and "
                    "writes only the identifiers of the most owner-like public documents (paper §3.6). No owner "
                    "text is written.")
    sel.add_argument("owner_docs", metavar="OWNER.jsonl")
    sel.add_argument("public_docs", metavar="PUBLIC.jsonl")
    sel.add_argument("--out", required=True, metavar="PROXY.json", help="must not exist yet")
    sel.add_argument("--name", required=True, help="the owner's expert name")
    sel.add_argument("--embedder", required=True, metavar="DIR", help="local text encoder or the public model (HF)")
    amount = sel.add_mutually_exclusive_group(required=True)
    amount.add_argument("--fraction", type=float, help="fraction of the public documents to select")
    amount.add_argument("--num-docs", type=int, help="number of public documents to select")
    sel.add_argument("--max-owner-docs", type=int, default=1000)
    sel.add_argument("--min-probability", type=float, default=0.5,
                     help="select only documents the classifier gives at least this probability (default 0.5)")
    sel.add_argument("--method", choices=["auto", "encoder", "public-model"], default="auto")
    sel.add_argument("--text-key", default="text")
    sel.add_argument("--id-key", default="id", help="identifier field of public documents (default: line number)")
    sel.add_argument("--seed", type=int, default=0)
    sel.add_argument("--quiet", action="store_true")
    sel.set_defaults(func=cmd_select_proxy)

    mix = sub.add_parser("router-mix", help="coordinator: router-tuning data from public text and proxy selections",
                         description="Every source (the public set, each owner's proxy set) contributes the same "
                                     "number of documents (default: the largest proxy set), shuffled, as JSON Lines "
                                     "(then 'flexolmo prepare-data' and 'flexolmo train router-tune').")
    mix.add_argument("public_docs", metavar="PUBLIC.jsonl")
    mix.add_argument("selections", nargs="+", metavar="PROXY.json")
    mix.add_argument("--out", required=True, metavar="MIX.jsonl")
    mix.add_argument("--public-sample", metavar="PUBLIC2.jsonl",
                     help="draw the public sample from this file (default: PUBLIC.jsonl, which the proxies refer to)")
    mix.add_argument("--per-source", type=int)
    mix.add_argument("--text-key", default="text")
    mix.add_argument("--seed", type=int, default=0)
    mix.set_defaults(func=cmd_router_mix)

    pkg = sub.add_parser("package-expert", help="extract an owner's expert into a shareable, verifiable package",
                         description="Writes the owner's per-layer FFN, router row and bias (safetensors) and "
                                     "manifest.json (name, model shape, anchor SHA-256s, tokens trained, file hashes).")
    pkg.add_argument("owner_dir", metavar="OWNER_MCORE_DIR")
    pkg.add_argument("package_dir", metavar="PKG_DIR", help="must not exist yet")
    pkg.add_argument("--name", required=True)
    pkg.add_argument("--description", default="")
    pkg.add_argument("--tokens-trained", type=int)
    pkg.add_argument("--expert", type=int, default=1, help="index of the owner's expert (default 1)")
    pkg.set_defaults(func=cmd_package_expert)

    mrg = sub.add_parser("merge", help="public model + expert packages -> (N+1)-expert FlexOlmo",
                         description="Expert 0 and shared weights from PUBLIC_DIR (e.g. the upcycled [public, public] "
                                     "checkpoint); one expert per package, verified against the public anchor. "
                                     "Default top-k: min(experts, 4).")
    mrg.add_argument("public_dir", metavar="PUBLIC_DIR")
    mrg.add_argument("packages", metavar="PKG_DIR", nargs="+")
    mrg.add_argument("--out", required=True, metavar="MCORE_DIR")
    mrg.add_argument("--top-k", type=int)
    mrg.add_argument("--quiet", action="store_true")
    mrg.set_defaults(func=cmd_merge)

    opt = sub.add_parser("opt-out", help="remove experts by name (physically) into a new checkpoint",
                         description="Drops the experts' FFNs, router rows and biases; top-k is reduced (with a "
                                     "warning) if it exceeds the remaining experts. For a run-time exclusion use "
                                     "flexolmo_plugin.lifecycle.opt_out.exclude_experts or 'flexolmo eval --exclude'.")
    opt.add_argument("mcore_dir", metavar="MCORE_DIR")
    opt.add_argument("--drop", required=True, nargs="+", metavar="NAME")
    opt.add_argument("--out", required=True, metavar="MCORE_DIR2")
    opt.add_argument("--quiet", action="store_true")
    opt.set_defaults(func=cmd_opt_out)

    ev = sub.add_parser("eval", help="per-domain loss / perplexity and gate weights of one or more checkpoints",
                        description="Evaluates each MCORE_DIR on Megatron indexed datasets (from prepare-data), "
                                    "prints a "
                                    "loss/perplexity table and each expert's mean gate weight on each domain; "
                                    "--exclude masks experts by name at run time (no new checkpoint). With several "
                                    "models: the oracle (best model per domain) and, given --public and --composed, "
                                    "the composition efficiency.")
    ev.add_argument("mcore_dirs", nargs="+", metavar="MCORE_DIR")
    ev.add_argument("--data", required=True, nargs="+", metavar="NAME=PREFIX")
    ev.add_argument("--exclude", nargs="*", default=[], metavar="NAME")
    ev.add_argument("--plot", metavar="routing.png", help="write a routing heatmap (needs matplotlib)")
    ev.add_argument("--public", metavar="MCORE_DIR", help="the public model among MCORE_DIRs (efficiency)")
    ev.add_argument("--composed", metavar="MCORE_DIR", help="the merged model among MCORE_DIRs (efficiency)")
    ev.add_argument("--seq-len", type=int, help="window length (default: the model's max_position_embeddings)")
    ev.add_argument("--max-tokens", type=int, default=16384, help="per domain")
    ev.set_defaults(func=cmd_eval)

    tr = sub.add_parser("train", aliases=["train-expert"],
                        help="train the public model, an owner's expert, or the router (Megatron-Bridge)",
                        description="RECIPE: 'public' (the dense public model, a one-expert FlexOlmo, every weight "
                                    "trained; sizes via recipe.num_layers=..., recipe.hidden_size=..., "
                                    "recipe.vocab_size=... or recipe.tokenizer_dir=...), "
                                    "'expert' (anchored training of the owner's expert from an upcycled "
                                    "checkpoint: top-2 of 2, LB loss off, z-loss 1e-3, LR 9e-4 cosine, wd 0) or "
                                    "'router-tune' (only router rows/biases, all experts active); 'public-7b', "
                                    "'expert-2x7b', 'router-tune-7x7b', 'inference-7x7b': the H100 production recipes "
                                    "(recipe.precision=bf16|fp8-tensorwise|fp8-blockwise, recipe.nodes=N, "
                                    "recipe.gpus_per_node=G). Overrides: "
                                    "recipe.ARG=VALUE for the recipe function (init_from, save_dir, data_paths, "
                                    "tokenizer_dir, seq_length, train_iters, global_batch_size, lr, expert_parallel, "
                                    "...), and KEY=VALUE for the Bridge ConfigContainer (e.g. train.train_iters=10). "
                                    "Run under torchrun for several processes.")
    tr.add_argument("recipe", metavar="RECIPE", choices=TRAIN_RECIPES)
    tr.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    tr.set_defaults(func=cmd_train_expert)

    demo = sub.add_parser(
        "demo", help="run the whole FlexOlmo lifecycle on this machine (about 7 minutes on 2 CPU cores)",
        description="Public model trained on public text; three data owners (Python code, C++ headers, licence "
                    "texts -- all read from this machine, nothing downloaded) each embed their domain, upcycle "
                    "and train their expert in their own process; merge, per-domain evaluation, opt-out, routing "
                    "heatmap, Hugging Face export checked with transformers, and a summary of every artifact. "
                    "Exit 1 if a check fails.")
    demo.add_argument("--workdir", metavar="DIR", help="new or empty directory (default: ./flexolmo-demo[-N])")
    demo.add_argument("--size", choices=["full", "tiny"], default="full",
                      help="'tiny' is the test suite's reduced run (default: full)")
    demo.add_argument("--seed", type=int, default=0,
                      help="seed of the data split, training, proxy selection and router mix (default 0)")
    demo.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                      help="change one size field (e.g. router_bias_init=none, owner_public_share=0); for ablations")
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command.  A refusal of the user's input (:class:`~flexolmo_plugin.errors.FlexOlmoError`,
    or a path that does not exist / already exists) prints one line and exits 2; anything else is a
    bug and propagates with its traceback (a non-zero exit that is never reported as bad input)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (FlexOlmoError, FileNotFoundError, FileExistsError) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
