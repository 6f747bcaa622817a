"""``flexolmo eval``: per-domain losses, gate weights and composition efficiency of one or more checkpoints.

Apart from :mod:`flexolmo_plugin.cli.commands` because of its many options, each checked before any model
is read (a repeated domain or model, ``--public`` / ``--composed`` that would be ignored, plots that exist).
Implementation imports are deferred, as in every command.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from flexolmo_plugin.cli.commands import EXIT_OK, _megatron
from flexolmo_plugin.errors import ConfigError


def _eval_datasets(items: list[str]) -> dict[str, str]:
    """``--data NAME=PREFIX ...`` as {name: prefix}; a repeated name would silently replace the earlier one."""
    datasets: dict[str, str] = {}
    for item in items:
        name, sep, prefix = item.partition("=")
        if not sep or not name or not prefix:
            raise ConfigError(f"--data expects NAME=PREFIX, got {item!r}")
        if name in datasets:
            raise ConfigError(f"--data names {name!r} twice ({datasets[name]} and {prefix}); give each domain "
                              "its own name")
        datasets[name] = prefix
    return datasets


def _eval_role(args: argparse.Namespace, option: str) -> str | None:
    """The MCORE_DIR that ``--public``/``--composed`` names (the same directory, however spelled)."""
    given = getattr(args, option)
    if given is None:
        return None
    for directory in args.mcore_dirs:
        if Path(directory).resolve() == Path(given).resolve():
            return directory
    raise ConfigError(f"--{option} {given} is not among the evaluated models {args.mcore_dirs}")


def _eval_plots(args: argparse.Namespace) -> list[Path]:
    """One heatmap per model: ``--plot`` itself for one model, else ``STEM-1.SUFFIX``, ``STEM-2.SUFFIX``, ...
    beside it; every one new, checked before any work."""
    if not args.plot:
        return []
    from flexolmo_plugin.lifecycle.evaluation import plot_format

    plot = Path(args.plot)
    paths = [plot] if len(args.mcore_dirs) == 1 else \
        [plot.with_name(f"{plot.stem}-{i}{plot.suffix}") for i in range(1, len(args.mcore_dirs) + 1)]
    for path in paths:
        plot_format(path)
    if args.attribution and Path(args.attribution) in paths:
        raise ConfigError(f"--plot and --attribution must be different files ({args.attribution})")
    return paths


def cmd_eval(args: argparse.Namespace) -> int:
    """Per-domain loss / perplexity and where the router sends each domain, for one or more models;
    with several models also the oracle (best model per domain) and the composition efficiency."""
    _megatron()
    import math

    import flexolmo_plugin as fp
    from flexolmo_plugin.conversion.mcore_io import load_config
    from flexolmo_plugin.lifecycle import evaluation as ev
    from flexolmo_plugin.lifecycle.generation import check_outputs, write_jsonl
    from flexolmo_plugin.lifecycle.opt_out import exclude_experts

    # everything that can be refused, before the first model is evaluated
    datasets = _eval_datasets(args.data)
    if len(set(map(os.path.realpath, args.mcore_dirs))) != len(args.mcore_dirs):
        raise ConfigError(f"a model is given twice in {args.mcore_dirs}")
    if (args.public or args.composed) and len(args.mcore_dirs) < 2:
        raise ConfigError("--public and --composed compare several models (the composition efficiency); with one "
                          "MCORE_DIR they do nothing")
    if bool(args.public) != bool(args.composed):
        given, other = ("--public", "--composed") if args.public else ("--composed", "--public")
        raise ConfigError(f"{given} needs {other}: the composition efficiency compares the composed model with the "
                          "public one")
    public, composed = _eval_role(args, "public"), _eval_role(args, "composed")
    if public is not None and public == composed:
        raise ConfigError(f"--public and --composed name the same model ({public})")
    check_outputs(args.attribution)
    plots = _eval_plots(args)
    configs = [load_config(directory)[0] for directory in args.mcore_dirs]
    for seq_len, vocab_size in {(args.seq_len or c.max_position_embeddings, c.vocab_size) for c in configs}:
        for prefix in datasets.values():  # damaged, too short, or tokenized for another vocabulary
            ev.read_windows(prefix, seq_len=seq_len, max_tokens=args.max_tokens, vocab_size=vocab_size)

    records: list[dict] = []
    table: dict[str, dict[str, float]] = {}
    for number, directory in enumerate(args.mcore_dirs):
        model = fp.from_mcore(directory, dispatcher="allgather" if args.exclude else "alltoall")
        config = model.flexolmo_config
        names = config.expert_names or tuple(f"expert{i}" for i in range(config.num_experts))
        if args.exclude:
            exclude_experts(model, args.exclude)
        # the model's own context by default
        seq_len = config.max_position_embeddings if args.seq_len is None else args.seq_len
        windows: list[dict] = []
        results = ev.evaluate(model, datasets, seq_len=seq_len, max_tokens=args.max_tokens,
                              model_name=directory, attribution=windows if args.attribution else None)
        records += [{"model": directory, **w, "excluded": list(args.exclude)} for w in windows]
        table[directory] = {r.name: r.loss for r in results}
        title = f"{directory}" + (f" (excluding {', '.join(args.exclude)})" if args.exclude else "")
        print(ev.format_table(results, title))
        print("\nmean gate weight per expert (mean over layers and tokens):")
        print(ev.format_gate_weights(results, names))
        if config.top_k < config.num_experts:
            print(f"\nshare of tokens routed to each expert (top-{config.top_k} of {config.num_experts}):")
            print(ev.format_routing(results, names))
        if plots:
            ev.plot_routing(results, names, plots[number], show="weights")
            print(f"\nrouting heatmap: {plots[number]}")
        print()
    if args.attribution:
        write_jsonl(args.attribution, records)
        print(f"attribution: {len(records)} records -> {args.attribution}")
    if len(table) > 1:
        best = ev.oracle({k: v for k, v in table.items() if k != composed})
        print("oracle (best of the models per domain): " + ", ".join(f"{d} {v:.4f}" for d, v in best.items()))
        if public and composed:
            efficiency = ev.composition_efficiency(table[public], table[composed], best)
            if math.isnan(efficiency):
                print(f"composition efficiency of {composed}: undefined (the oracle of the other models is no better "
                      f"than the public model {public} on the mean over domains: there is no gain to capture; "
                      "evaluate the owners' models too)")
            else:
                print(f"composition efficiency of {composed}: {100 * efficiency:.1f}% "
                      "((public - composed) / (public - oracle), mean over domains)")
    return EXIT_OK
