"""The ``flexolmo`` commands that run the model on text: ``generate`` (with attribution) and the
extraction audit built on it.  Heavy imports happen inside each command (``flexolmo --help`` stays fast)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from flexolmo_plugin.cli.commands import EXIT_OK, _megatron
from flexolmo_plugin.errors import ConfigError


def cmd_generate(args: argparse.Namespace) -> int:
    """Continue prompts with a checkpoint; print or write the completions and each one's attribution."""
    if args.temperature == 0 and (args.top_p is not None or args.seed is not None):
        raise ConfigError("--top-p and --seed only apply when sampling: give --temperature > 0")
    _megatron()
    import secrets

    import flexolmo_plugin as fp
    from flexolmo_plugin.lifecycle import generation as gen

    gen.check_outputs(args.out, args.attribution)
    texts = args.prompt if args.prompt else gen.read_prompts(args.prompts, key=args.prompt_key)
    tokenizer = gen.checkpoint_tokenizer(args.model_dir, args.tokenizer)
    prompts = gen.encode_prompts(tokenizer, texts)
    model = fp.from_mcore(args.model_dir, dispatcher="allgather" if args.exclude else "alltoall")
    gen.check_generation(model, prompts, args.max_new_tokens)  # every prompt, before the first batch runs
    seed = args.seed
    if args.temperature > 0 and seed is None:
        seed = secrets.randbelow(2**31)
        print(f"sampling with --seed {seed}", file=sys.stderr)
    outputs, attributions = [], []
    for batch, start in enumerate(range(0, len(prompts), args.batch_size)):
        result = gen.generate(model, prompts[start:start + args.batch_size], max_new_tokens=args.max_new_tokens,
                              temperature=args.temperature, top_p=1.0 if args.top_p is None else args.top_p,
                              seed=None if seed is None else (seed + batch) % 2**32,
                              eos_token_id=tokenizer.eos_token_id, exclude=args.exclude)
        for row, (tokens, shares) in enumerate(zip(result.tokens, result.attribution)):
            index = start + row
            completion = tokenizer.decode(tokens, skip_special_tokens=True)
            outputs.append({"index": index, "prompt": texts[index], "completion": completion, "tokens": tokens})
            attributions.append({"index": index, "prompt": texts[index], "tokens": len(tokens),
                                 "excluded": list(result.excluded), "attribution": shares})
            if not args.out:
                top = ", ".join(f"{name} {100 * share:.1f}%" for name, share in shares.items())
                print(f"[{index}] {texts[index]!r} -> {completion!r}\n    attribution: {top}")
    files = {path: records for path, records in ((args.out, outputs), (args.attribution, attributions)) if path}
    gen.write_outputs(files)
    for path, records in files.items():
        print(f"wrote {len(records)} records -> {path}")
    return EXIT_OK


def cmd_audit_extraction(args: argparse.Namespace) -> int:
    """The paper's extraction audit (§5.3) of one or more models on an owner's documents."""
    _megatron()
    import json

    from tqdm import tqdm

    import flexolmo_plugin as fp
    from flexolmo_plugin.conversion.atomic import check_new_output, write_file_atomically
    from flexolmo_plugin.lifecycle import extraction as ex
    from flexolmo_plugin.lifecycle.generation import checkpoint_tokenizer

    protocol = ex.ExtractionProtocol(
        num_docs=args.num_docs, prefix_tokens=args.prefix_tokens, continuation_tokens=args.continuation_tokens,
        samples=args.samples, temperature=args.temperature, top_p=args.top_p, threshold=args.threshold,
        seed=args.seed, batch_size=args.batch_size)
    if args.out:
        check_new_output(args.out)
    rows = [(args.model_dir, args.model_dir, [])]
    if args.exclude:
        rows.append((f"{args.model_dir} without {', '.join(args.exclude)}", args.model_dir, list(args.exclude)))
    rows += [(directory, directory, []) for directory in args.compare]
    for directory in {directory for _, directory, _ in rows}:  # before the (long) document pass
        if not Path(directory).is_dir():
            raise ConfigError(f"{directory}: no such checkpoint directory")
    tokenizer = checkpoint_tokenizer(args.model_dir, args.tokenizer)
    probes, short = ex.select_probes(args.owner_data, tokenizer, protocol, text_key=args.text_key)
    print(f"auditing {len(probes)} documents of {args.owner_data} ({short} too short for "
          f"{protocol.prefix_tokens} + {protocol.continuation_tokens} tokens)")
    results = []
    bar = tqdm(total=len(probes) * len(rows), unit="doc", desc="audit", disable=args.quiet or None)
    try:
        for label, directory, exclude in rows:
            model = fp.from_mcore(directory, dispatcher="allgather" if exclude else "alltoall")
            results.append(ex.audit(model, tokenizer, probes, protocol, label=label, exclude=exclude,
                                    progress=bar.update))
            del model
    finally:
        bar.close()
    print(ex.format_table(results, protocol, short))
    if args.out:
        report = {"protocol": vars(protocol), "owner_data": str(args.owner_data), "skipped_short": short,
                  "models": [r.record() for r in results]}
        write_file_atomically(args.out, (json.dumps(report, indent=1) + "\n").encode("utf-8"))
        print(f"wrote the report -> {args.out}")
    return EXIT_OK
