"""What each ``flexolmo`` command does: one ``cmd_*`` function per command, given parsed arguments.

Each command imports its implementation when it runs (``--help`` must not import torch, Megatron or
transformers, which take seconds); these deferred imports are the CLI's, and only the CLI's.  The
option values arrive already checked (:mod:`flexolmo_plugin.cli.options`).
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

from flexolmo_plugin.errors import ConfigError

EXIT_OK, EXIT_CHECK_FAILED, EXIT_BAD_INPUT = 0, 1, 2

DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16"}


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
                          params_dtype=getattr(torch, DTYPES[args.dtype]), tolerance=args.tolerance)
    print(report.describe())
    return EXIT_OK if report.passed else EXIT_CHECK_FAILED


def cmd_convert(args: argparse.Namespace) -> int:
    """HF <-> Megatron conversion with a progress bar and a final summary."""
    _megatron()
    import torch

    from flexolmo_plugin.conversion.convert import hf_to_mcore, mcore_to_hf

    dtype = getattr(torch, DTYPES[args.dtype]) if args.dtype else None
    if args.direction == "hf-to-mcore":
        report = hf_to_mcore(args.source, args.target, dtype=dtype, num_experts=args.num_experts,
                             top_k=args.top_k, progress=not args.quiet)
    else:
        if args.num_experts is not None or args.top_k is not None:
            raise ConfigError("--num-experts/--top-k only apply to hf-to-mcore")
        report = mcore_to_hf(args.source, args.target, dtype=dtype, max_shard_bytes=args.max_shard_size,
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

    from flexolmo_plugin.lifecycle.upcycle import DEFAULT_ROUTER_BIAS_INIT, upcycle

    bias = None if args.no_router_bias else DEFAULT_ROUTER_BIAS_INIT if args.router_bias_init is None \
        else args.router_bias_init
    report = upcycle(args.public_dir, args.out_dir, public_embedding=args.public_embedding,
                     domain_embedding=args.domain_embedding, expert_names=("public", args.name),
                     dtype=getattr(torch, DTYPES[args.dtype]) if args.dtype else None, router_bias_init=bias,
                     progress=not args.quiet)
    print(f"upcycled: {report.summary()}; learned router bias: "
          + ("none" if bias is None else f"starts at {bias:g} (logit offset min(b, 0))"))
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
    from flexolmo_plugin.lifecycle.domain_embedding import embed_documents, model_width, sample_documents
    from flexolmo_plugin.lifecycle.upcycle import check_embedding_output, save_embedding

    check_embedding_output(args.output)  # before any work: a suffix we cannot write, or an existing file
    width = model_width(args.for_model) if args.for_model else None
    docs = sample_documents(args.docs, num_docs=args.num_docs, seed=args.seed, text_key=args.text_key)
    vector = embed_documents(args.model, docs, method=args.method, max_tokens=args.max_tokens,
                             expected_width=width, normalize=not args.no_normalize, progress=not args.quiet)
    save_embedding(args.output, vector, {"documents": str(len(docs)), "embedder": str(args.model),
                                         "method": args.method, "seed": str(args.seed),
                                         "normalized": str(not args.no_normalize).lower()})
    print(f"wrote {args.output}: mean of {len(docs)} documents, width {vector.numel()}, "
          f"L2 norm {vector.norm().item():.4f}")
    return EXIT_OK


def cmd_calibrate_router(args: argparse.Namespace) -> int:
    """Owner side: the owner's router rows as a discriminant of its own text against public text."""
    _megatron()
    from flexolmo_plugin.api import from_mcore, save_mcore
    from flexolmo_plugin.conversion.atomic import check_new_output
    from flexolmo_plugin.conversion.mcore_io import load_config
    from flexolmo_plugin.lifecycle.evaluation import read_windows
    from flexolmo_plugin.lifecycle.router_calibration import calibrate_router

    check_new_output(args.out)
    config = load_config(args.mcore_dir)[0]
    seq_len = args.seq_len or config.max_position_embeddings
    own, public = (read_windows(prefix, seq_len=seq_len, max_tokens=args.max_tokens, vocab_size=config.vocab_size)
                   for prefix in (args.own_data, args.public_data))
    model = from_mcore(args.mcore_dir)
    report = calibrate_router(model, own, public, scale=args.scale, regularization=args.regularization,
                              public_weight=args.public_weight)
    save_mcore(model, args.out, carry_from=args.mcore_dir)
    print(f"{report.summary()} -> {args.out}")
    return EXIT_OK


def _router_step_on_mix(args: argparse.Namespace, step) -> int:
    """A coordinator router step (align-router, scale-router): ``step(model, windows)`` on the model read
    from ``args.mcore_dir`` and windows of ``args.data`` (public + proxy text); the model is saved to ``args.out``."""
    _megatron()
    from flexolmo_plugin.api import from_mcore, save_mcore
    from flexolmo_plugin.conversion.atomic import check_new_output
    from flexolmo_plugin.conversion.mcore_io import load_config
    from flexolmo_plugin.lifecycle.evaluation import read_windows

    check_new_output(args.out)
    config = load_config(args.mcore_dir)[0]
    seq_len = args.seq_len or config.max_position_embeddings
    windows = read_windows(args.data, seq_len=seq_len, max_tokens=args.max_tokens, vocab_size=config.vocab_size)
    model = from_mcore(args.mcore_dir)
    report = step(model, windows)
    save_mcore(model, args.out, carry_from=args.mcore_dir)
    print(f"{report.summary()} -> {args.out}")
    return EXIT_OK


def cmd_align_router(args: argparse.Namespace) -> int:
    """Coordinator side: every layer after the first refitted to route as layer 0 does."""
    def step(model, windows):
        from flexolmo_plugin.lifecycle.router_calibration import align_router
        return align_router(model, windows, regularization=args.regularization)

    return _router_step_on_mix(args, step)


def cmd_scale_router(args: argparse.Namespace) -> int:
    """Coordinator side: one logit scale per owner expert, kept only if held-out mix text improves."""
    def step(model, windows):
        from flexolmo_plugin.lifecycle.router_scaling import scale_router
        return scale_router(model, windows, grid=args.grid, sweeps=args.sweeps)

    return _router_step_on_mix(args, step)


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
                          tokens_trained=args.tokens_trained, expert=args.expert, sign_key=args.sign)
    print(f"packaged expert {args.name!r} -> {path}" + (f" (signed with {args.sign})" if args.sign else ""))
    return EXIT_OK


def cmd_keygen(args: argparse.Namespace) -> int:
    """A new Ed25519 key pair for signing expert packages."""
    from flexolmo_plugin.lifecycle.signing import keygen

    fingerprint, private, public = keygen(args.out)
    print(f"wrote private key {private} (mode 0600; keep it secret) and public key {public} (send it to the "
          "coordinator)")
    print(f"fingerprint (SHA-256 of the raw public key): {fingerprint}")
    return EXIT_OK


def cmd_verify(args: argparse.Namespace) -> int:
    """Re-check a merged model's provenance record against its tensors (and the owners' registered keys)."""
    _megatron()
    from flexolmo_plugin.lifecycle.provenance import verify_model
    from flexolmo_plugin.lifecycle.signing import load_trusted_keys

    trusted = load_trusted_keys(args.trusted_keys) if args.trusted_keys else None
    report = verify_model(args.model_dir, trusted)
    print(report.describe())
    return EXIT_OK if report.consistent else EXIT_CHECK_FAILED


def cmd_merge(args: argparse.Namespace) -> int:
    _megatron()
    from flexolmo_plugin.lifecycle.merge import merge_experts

    report = merge_experts(args.public_dir, args.packages, args.out, top_k=args.top_k, progress=not args.quiet,
                           trusted_keys=args.trusted_keys)
    print(f"merged {len(args.packages)} expert(s) onto the public model: {report.summary()}")
    return EXIT_OK


def cmd_opt_out(args: argparse.Namespace) -> int:
    _megatron()
    from flexolmo_plugin.lifecycle.opt_out import opt_out

    report = opt_out(args.mcore_dir, args.out, drop=args.drop, progress=not args.quiet)
    print(f"opted out {args.drop}: {report.summary()}")
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


def cmd_plan(args: argparse.Namespace) -> int:
    """Per-GPU memory of a recipe and layout; exit 1 with a warning when it will not fit an 80 GB H100."""
    _quiet_imports()
    import inspect

    from flexolmo_plugin.compat import enable_bridge_compat
    from flexolmo_plugin.recipes import memory, registry
    from flexolmo_plugin.recipes.train import build_config, silence_absent_transformer_engine_imports

    silence_absent_transformer_engine_imports()
    enable_bridge_compat()
    overrides = list(args.overrides)
    given = {o.partition("=")[0] for o in overrides}
    parameters = inspect.signature(registry.recipe(args.recipe)).parameters
    if "recipe.cpu" not in given and "cpu" in parameters:
        overrides.append("recipe.cpu=false")  # plan the GPU run, also from a machine without CUDA
    config = build_config(args.recipe, overrides)
    gpus = args.gpus
    if gpus is None and {"nodes", "gpus_per_node"} <= set(parameters):
        values = {name: parameters[name].default for name in ("nodes", "gpus_per_node")}
        for override in overrides:
            key, _, value = override.partition("=")
            if key in ("recipe.nodes", "recipe.gpus_per_node"):
                values[key.partition(".")[2]] = int(value)
        gpus = values["nodes"] * values["gpus_per_node"]
    text, fits = memory.describe(args.recipe, config, gpus)
    print(text)
    if not fits:
        print(f"warning: {args.recipe} will not fit an 80 GB H100 at this layout; reduce the activations "
              "(model.recompute_granularity=full or selective, a smaller micro-batch) or the per-GPU share of the "
              "model (more TP or EP, the distributed optimizer over more GPUs)", file=sys.stderr)
        return EXIT_CHECK_FAILED
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
