"""The ``flexolmo`` argument parser: commands, options, and the help a user reads.

Importing this imports nothing heavy (``flexolmo --help`` answers at once): the commands' modules
import their implementations only when they run.
"""

from __future__ import annotations

from flexolmo_plugin.cli import commands, eval_command, text_commands
from flexolmo_plugin.cli import options as opt
from flexolmo_plugin.cli.commands import DTYPES
from flexolmo_plugin.recipes.registry import RECIPES

TRAIN_RECIPES = tuple(RECIPES)  # listing them needs no Megatron-Bridge import


def _mix_step_arguments(parser: opt.Parser, *, model_help: str, max_tokens: int,
                        seq_len_type=opt.positive_int) -> None:
    """The arguments every coordinator router step on public + proxy text takes (align-router, scale-router)."""
    parser.add_argument("mcore_dir", metavar="MODEL_DIR", help=model_help)
    parser.add_argument("--data", required=True, metavar="PREFIX",
                        help="indexed dataset of public + proxy text (e.g. the router-tuning mix)")
    parser.add_argument("--out", required=True, metavar="DIR", help="must not exist yet")
    parser.add_argument("--max-tokens", type=opt.positive_int, default=max_tokens,
                        help="tokens read from the dataset")
    parser.add_argument("--seq-len", type=seq_len_type, default=None,
                        help="window length (default: the model's sequence length)")


def build_parser() -> opt.Parser:
    """The ``flexolmo`` parser; every option value is checked here, at parse time (see :mod:`.options`)."""
    parser = opt.Parser(
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
    parity.add_argument("--tokens", type=opt.positive_int, default=32, help="sequence length (default 32)")
    parity.add_argument("--batch", type=opt.positive_int, default=2, help="number of sequences (default 2)")
    parity.add_argument("--seed", type=opt.seed, default=0, help="seed of the random token ids (default 0)")
    parity.add_argument("--tolerance", type=opt.tolerance, default=1e-4, help="max allowed |Δlogit| (default 1e-4)")
    parity.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                        help="parameter dtype of the Megatron model (reference is always float32)")
    parity.set_defaults(func=commands.cmd_parity)

    convert = sub.add_parser(
        "convert", help="convert checkpoints between Hugging Face and Megatron torch_dist",
        description="hf-to-mcore: HF FlexOlmo (or OLMo-2 dense with --num-experts) -> a Megatron torch_dist "
                    "checkpoint plus flexolmo_config.json (load with flexolmo_plugin.from_mcore at any TP/EP). "
                    "mcore-to-hf: back to sharded safetensors + config.json for transformers. Streams one tensor "
                    "at a time, validates everything, and writes the output atomically (refuses an existing path).")
    convert.add_argument("direction", choices=["hf-to-mcore", "mcore-to-hf"])
    convert.add_argument("source", metavar="SOURCE_DIR")
    convert.add_argument("target", metavar="TARGET_DIR", help="must not exist yet")
    convert.add_argument("--dtype", choices=sorted(DTYPES), help="output dtype (default: the source's)")
    convert.add_argument("--num-experts", type=opt.positive_int,
                         help="hf-to-mcore from OLMo-2 dense: number of expert copies")
    convert.add_argument("--top-k", type=opt.positive_int,
                         help="hf-to-mcore: experts per token (default: config / all)")
    convert.add_argument("--max-shard-size", type=opt.size, default="5GB",
                         help="mcore-to-hf: safetensors shard size (default 5GB)")
    convert.add_argument("--drop-router-bias", action="store_true",
                         help="mcore-to-hf: export a model with a non-zero learned router bias without it "
                              "(HF flex_olmo has none) and report the logit change")
    convert.add_argument("--quiet", action="store_true", help="no progress bar")
    convert.set_defaults(func=commands.cmd_convert)

    up = sub.add_parser(
        "upcycle", help="public model -> [public, domain] 2-expert checkpoint for a data owner",
        description="Both experts start as the public FFN (expert 0 of a FlexOlmo public model); every layer's "
                    "router rows become [PUBLIC_EMBEDDING; DOMAIN_EMBEDDING]. PUBLIC_DIR: HF OLMo-2 dense, HF "
                    "FlexOlmo, or a Megatron checkpoint from 'flexolmo convert'. Embeddings: .safetensors or .npy.")
    up.add_argument("public_dir", metavar="PUBLIC_DIR")
    up.add_argument("out_dir", metavar="OUT_MCORE_DIR", help="must not exist yet")
    up.add_argument("--public-embedding", required=True, metavar="E0")
    up.add_argument("--domain-embedding", required=True, metavar="E1")
    up.add_argument("--name", type=opt.safe_name, default="domain",
                    help="name of the owner's expert (default 'domain')")
    up.add_argument("--dtype", choices=sorted(DTYPES), help="parameter dtype (default: the public model's)")
    bias = up.add_mutually_exclusive_group()
    bias.add_argument("--router-bias-init", type=opt.non_positive_float, default=None, metavar="B",
                      help="initial value of the owner's learned router bias, logit offset min(B, 0); <= 0 "
                           "(default 0, chosen by measurement: docs/composition.md)")
    bias.add_argument("--no-router-bias", action="store_true",
                      help="build the owner's model without the learned bias (the paper's 'no bias' ablation)")
    up.add_argument("--quiet", action="store_true")
    up.set_defaults(func=commands.cmd_upcycle)

    prep = sub.add_parser("prepare-data", help="JSON Lines -> Megatron indexed dataset (.bin/.idx)",
                          description="Tokenizes one document per line (streaming) and appends the end-of-document "
                                      "token; a bad line stops with its line number and writes nothing.")
    prep.add_argument("input", metavar="INPUT.jsonl")
    prep.add_argument("output_prefix", metavar="OUT_PREFIX")
    prep.add_argument("--tokenizer", required=True, metavar="TOKENIZER_DIR", help="local HF tokenizer directory")
    prep.add_argument("--text-key", default="text")
    prep.add_argument("--no-eod", action="store_true", help="do not append the end-of-document token")
    prep.add_argument("--quiet", action="store_true")
    prep.set_defaults(func=commands.cmd_prepare_data)

    emb = sub.add_parser("embed-domain", help="domain embedding (router row) from a sample of documents",
                         description="Mean embedding of up to --num-docs documents (paper: 1000) with a local "
                                     "encoder (sentence-transformers/HF, mean-pooled) or the public model's own "
                                     "final hidden states. The width must equal the FlexOlmo model's hidden size.")
    emb.add_argument("docs", metavar="DOCS.jsonl")
    emb.add_argument("output", metavar="OUT.safetensors")
    emb.add_argument("--model", required=True, metavar="DIR", help="local embedder or public model directory")
    emb.add_argument("--method", choices=["auto", "encoder", "public-model"], default="auto")
    emb.add_argument("--for-model", metavar="DIR", help="check the width against this model's hidden size")
    emb.add_argument("--no-normalize", action="store_true",
                     help="average the raw document embeddings instead of unit-length ones (the paper's embedder "
                          "outputs unit vectors; raw hidden-state means make router logits and z-loss large)")
    emb.add_argument("--num-docs", type=opt.positive_int, default=1000)
    emb.add_argument("--max-tokens", type=opt.positive_int, default=512)
    emb.add_argument("--seed", type=opt.seed, default=0)
    emb.add_argument("--text-key", default="text")
    emb.add_argument("--quiet", action="store_true")
    emb.set_defaults(func=commands.cmd_embed_domain)

    sel = sub.add_parser(
        "select-proxy", help="owner: pick public documents like the owner's data (proxy data for router tuning)",
        description="Trains a logistic-regression classifier (owner documents vs public documents) on document "
                    "embeddings, here on the owner's machine, scores every public document (cross-fitted) and "
                    "writes only the identifiers of the most owner-like public documents (paper §3.6). No owner "
                    "text is written.")
    sel.add_argument("owner_docs", metavar="OWNER.jsonl")
    sel.add_argument("public_docs", metavar="PUBLIC.jsonl")
    sel.add_argument("--out", required=True, metavar="PROXY.json", help="must not exist yet")
    sel.add_argument("--name", type=opt.safe_name, required=True, help="the owner's expert name")
    sel.add_argument("--embedder", required=True, metavar="DIR", help="local text encoder or the public model (HF)")
    amount = sel.add_mutually_exclusive_group(required=True)
    amount.add_argument("--fraction", type=opt.fraction, help="fraction of the public documents to select")
    amount.add_argument("--num-docs", type=opt.positive_int, help="number of public documents to select")
    sel.add_argument("--max-owner-docs", type=opt.positive_int, default=1000)
    sel.add_argument("--min-probability", type=opt.probability, default=0.5,
                     help="select only documents the classifier gives at least this probability (default 0.5)")
    sel.add_argument("--method", choices=["auto", "encoder", "public-model"], default="auto")
    sel.add_argument("--text-key", default="text")
    sel.add_argument("--id-key", default="id", help="identifier field of public documents (default 'id'; "
                                                    "the line number where a document has none)")
    sel.add_argument("--seed", type=opt.seed, default=0)
    sel.add_argument("--quiet", action="store_true")
    sel.set_defaults(func=commands.cmd_select_proxy)

    cal = sub.add_parser(
        "calibrate-router", help="owner: router rows that tell the owner's text from public text",
        description="For each layer in order, fits a logistic regression (own text vs public text, no intercept, "
                    "balanced) on the router inputs of the owner's [public, own] model and sets the owner's row to "
                    "r_pub + SCALE * w; r_pub and every other weight stay bit-identical, the learned bias is set to "
                    "0. Run on the owner's machine after anchored training, before package-expert.")
    cal.add_argument("mcore_dir", metavar="MODEL_DIR", help="the owner's trained [public, own] checkpoint")
    cal.add_argument("--own-data", required=True, metavar="PREFIX", help="the owner's indexed dataset (.bin/.idx)")
    cal.add_argument("--public-data", required=True, metavar="PREFIX", help="a public indexed dataset (.bin/.idx)")
    cal.add_argument("--out", required=True, metavar="DIR", help="must not exist yet")
    cal.add_argument("--scale", type=opt.router_scale, default=2.0,
                     help=f"multiplies the fitted log-odds direction (default 2.0; at most {opt.MAX_ROUTER_SCALE:g})")
    cal.add_argument("--regularization", type=opt.positive_float, default=1.0,
                     help="inverse L2 strength C of the logistic regression (default 1.0)")
    cal.add_argument("--public-weight", type=opt.positive_float, default=1.0,
                     help="weight of the public class against the owner's (a prior for the public expert; default 1)")
    cal.add_argument("--max-tokens", type=opt.positive_int, default=32768, help="tokens read from each dataset")
    cal.add_argument("--seq-len", type=opt.positive_int, default=None,
                     help="window length (default: the model's sequence length)")
    cal.set_defaults(func=commands.cmd_calibrate_router)

    aln = sub.add_parser(
        "align-router", help="coordinator: later layers' router rows refitted to route as layer 0 does",
        description="On a merged model: for each layer after the first, in order, fits a multinomial logistic "
                    "regression (no intercept, layer 0's routing probabilities as soft targets) on the layer's "
                    "router inputs over public and proxy text, and sets the owners' rows to r_pub + (beta_e - "
                    "beta_pub); r_pub and every other weight stay bit-identical, learned biases are set to 0.")
    _mix_step_arguments(aln, model_help="the merged checkpoint", max_tokens=32768)
    aln.add_argument("--regularization", type=opt.positive_float, default=1.0,
                     help="inverse L2 strength C of the regression (default 1.0)")
    aln.set_defaults(func=commands.cmd_align_router)

    scl = sub.add_parser(
        "scale-router", help="coordinator: one logit scale per owner expert, chosen on public + proxy text",
        description="Sets every layer's owner rows to r_pub + alpha_e (r_e - r_pub), alpha_e chosen per owner expert "
                    "by coordinate search over --grid on the language-model loss of alternate windows of the data, "
                    "and keeps them only if the other windows' loss improves (otherwise the output is the input "
                    "model, unchanged).  r_pub and every other weight stay bit-identical; no bias is added.")
    _mix_step_arguments(scl, model_help="the merged (and aligned) checkpoint", max_tokens=65536,
                        seq_len_type=opt.window_length)
    scl.add_argument("--grid", type=opt.scale_grid, default=(1.0, 2.0, 3.0, 4.0, 6.0, 9.0),
                     help=f"comma-separated scales to try, each in [0, {opt.MAX_ROUTER_SCALE:g}] (default 1,2,3,4,6,9)")
    scl.add_argument("--sweeps", type=opt.positive_int, default=2, help="passes over the experts (default 2)")
    scl.set_defaults(func=commands.cmd_scale_router)

    mix = sub.add_parser("router-mix", help="coordinator: router-tuning data from public text and proxy selections",
                         description="Every source (the public set, each owner's proxy set) contributes the same "
                                     "number of documents (default: the largest proxy set), shuffled, as JSON Lines "
                                     "(then 'flexolmo prepare-data' and 'flexolmo train router-tune').")
    mix.add_argument("public_docs", metavar="PUBLIC.jsonl")
    mix.add_argument("selections", nargs="+", metavar="PROXY.json")
    mix.add_argument("--out", required=True, metavar="MIX.jsonl")
    mix.add_argument("--public-sample", metavar="PUBLIC2.jsonl",
                     help="draw the public sample from this file (default: PUBLIC.jsonl, which the proxies refer to)")
    mix.add_argument("--per-source", type=opt.positive_int)
    mix.add_argument("--text-key", default="text")
    mix.add_argument("--seed", type=opt.seed, default=0)
    mix.set_defaults(func=commands.cmd_router_mix)

    pkg = sub.add_parser("package-expert", help="extract an owner's expert into a shareable, verifiable package",
                         description="Writes the owner's per-layer FFN, router row and bias (safetensors) and "
                                     "manifest.json (name, model shape, anchor SHA-256s, tokens trained, file hashes).")
    pkg.add_argument("owner_dir", metavar="OWNER_MCORE_DIR")
    pkg.add_argument("package_dir", metavar="PKG_DIR", help="must not exist yet")
    pkg.add_argument("--name", type=opt.safe_name, required=True)
    pkg.add_argument("--description", default="")
    pkg.add_argument("--tokens-trained", type=opt.non_negative_int)
    pkg.add_argument("--expert", type=opt.positive_int, default=1, help="index of the owner's expert (default 1)")
    pkg.add_argument("--sign", metavar="KEY", help="sign the manifest with this Ed25519 private key (from "
                                                   "'flexolmo keygen'); the signature goes to signature.json")
    pkg.set_defaults(func=commands.cmd_package_expert)

    kg = sub.add_parser("keygen", help="owner: a new Ed25519 key pair for signing expert packages",
                        description="Writes KEY (private key, PEM PKCS#8, unencrypted, mode 0600) and KEY.pub (public "
                                    "key, PEM) and prints the key's fingerprint (SHA-256 of its 32 raw bytes, hex). "
                                    "The coordinator registers KEY.pub (or the fingerprint) under the owner's expert "
                                    "name in the --trusted-keys file of 'flexolmo merge'.")
    kg.add_argument("--out", required=True, metavar="KEY", help="private key path (must not exist, nor KEY.pub)")
    kg.set_defaults(func=commands.cmd_keygen)

    mrg = sub.add_parser("merge", help="public model + expert packages -> (N+1)-expert FlexOlmo",
                         description="Expert 0 and shared weights from PUBLIC_DIR (e.g. the upcycled [public, public] "
                                     "checkpoint); one expert per package, verified against the public anchor. "
                                     "Default top-k: min(experts, 4).")
    mrg.add_argument("public_dir", metavar="PUBLIC_DIR")
    mrg.add_argument("packages", metavar="PKG_DIR", nargs="+")
    mrg.add_argument("--out", required=True, metavar="MCORE_DIR")
    mrg.add_argument("--top-k", type=opt.positive_int)
    mrg.add_argument("--trusted-keys", metavar="KEYS.json",
                     help="JSON object {expert name: owner's public key (PEM text of KEY.pub, base64 raw key, or "
                          "its SHA-256 fingerprint)}: every package must be signed by its name's key (without "
                          "it a warning says authenticity was not checked)")
    mrg.add_argument("--quiet", action="store_true")
    mrg.set_defaults(func=commands.cmd_merge)

    optout = sub.add_parser("opt-out", help="remove experts by name (physically) into a new checkpoint",
                         description="Drops the experts' FFNs, router rows and biases; top-k is reduced (with a "
                                     "warning) if it exceeds the remaining experts. For a run-time exclusion use "
                                     "flexolmo_plugin.lifecycle.opt_out.exclude_experts or 'flexolmo eval --exclude'.")
    optout.add_argument("mcore_dir", metavar="MCORE_DIR")
    optout.add_argument("--drop", required=True, nargs="+", metavar="NAME")
    optout.add_argument("--out", required=True, metavar="MCORE_DIR2")
    optout.add_argument("--quiet", action="store_true")
    optout.set_defaults(func=commands.cmd_opt_out)

    vf = sub.add_parser("verify", help="re-check a merged model's provenance record against its tensors",
                        description="Prints the provenance record (provenance.json) of MCORE_DIR and checks it: "
                                    "every expert present is in the record with the FFN weights recorded at merge "
                                    "time, every removed one is absent by name and content, the recorded manifests "
                                    "and signatures agree; with --trusted-keys also that each expert was signed by "
                                    "its name's registered key. Exit 0 consistent, 1 not, 2 bad input.")
    vf.add_argument("model_dir", metavar="MCORE_DIR")
    vf.add_argument("--trusted-keys", metavar="KEYS.json", help="the registry of owners' keys, as for merge")
    vf.set_defaults(func=commands.cmd_verify)

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
    ev.add_argument("--plot", metavar="routing.png",
                    help="write a routing heatmap, in the format its suffix names (needs matplotlib); with several "
                         "models one per model beside it: routing-1.png, routing-2.png, ...")
    ev.add_argument("--public", metavar="MCORE_DIR",
                    help="with --composed and several MCORE_DIRs: the public model among them (efficiency)")
    ev.add_argument("--composed", metavar="MCORE_DIR",
                    help="with --public and several MCORE_DIRs: the merged model among them (efficiency; left out "
                         "of the oracle)")
    ev.add_argument("--seq-len", type=opt.window_length,
                    help="window length, >= 2 (default: the model's max_position_embeddings)")
    ev.add_argument("--max-tokens", type=opt.positive_int, default=16384, help="per domain")
    ev.add_argument("--attribution", metavar="FILE.jsonl",
                    help="write one JSON record per evaluated window: each expert's share of the routing mass "
                         "(mean gate weight over layers and tokens, normalised to sum 1), named by expert")
    ev.set_defaults(func=eval_command.cmd_eval)

    gen = sub.add_parser(
        "generate", help="continue prompts with a checkpoint (greedy or sampled) and attribute each output",
        description="Generates with Megatron-Core's KV cache on the checkpoint's weights (batched; prompts of "
                    "different lengths in lock-step). --temperature 0 (default) is greedy, as transformers' "
                    "do_sample=False; otherwise sampling from softmax(logits/T) within the top-p nucleus, "
                    "reproducible with --seed. --exclude masks experts at run time (what 'opt-out' computes). "
                    "Attribution: per output, each expert's share of the routing mass (mean gate weight over "
                    "layers and the positions that chose the new tokens, normalised to sum 1). The tokenizer is "
                    "MODEL_DIR/tokenizer (or its latest iter_*'s; kept by convert, upcycle, merge, the router steps "
                    "and opt-out) unless --tokenizer.")
    gen.add_argument("model_dir", metavar="MODEL_DIR", help="Megatron checkpoint (or a training save directory)")
    source = gen.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", action="append", metavar="TEXT", help="a prompt (repeat for several)")
    source.add_argument("--prompts", metavar="FILE.jsonl", help='one {"prompt": TEXT} object per line')
    gen.add_argument("--prompt-key", default="prompt", help="field of --prompts lines (default 'prompt')")
    gen.add_argument("--tokenizer", metavar="DIR", help="tokenizer directory (default: MODEL_DIR/tokenizer)")
    gen.add_argument("--max-new-tokens", type=opt.positive_int, default=64, help="per prompt (default 64)")
    gen.add_argument("--temperature", type=opt.temperature, default=0.0, help="0 = greedy (default)")
    gen.add_argument("--top-p", type=opt.fraction, help="nucleus sampling mass (default 1.0; needs --temperature)")
    gen.add_argument("--seed", type=opt.seed,
                     help="seed of the sampling (needs --temperature; default: random, printed); batch k uses SEED+k")
    gen.add_argument("--exclude", nargs="+", action="extend", default=[], type=opt.safe_name, metavar="NAME",
                     help="experts to mask at run time, by name")
    gen.add_argument("--batch-size", type=opt.positive_int, default=8, help="prompts per batch (default 8)")
    gen.add_argument("--out", metavar="FILE.jsonl", help="write the completions here (default: print them)")
    gen.add_argument("--attribution", metavar="FILE.jsonl", help="write one attribution record per output")
    gen.set_defaults(func=text_commands.cmd_generate)

    au = sub.add_parser(
        "audit-extraction", help="how much of an owner's training text models reproduce (paper §5.3 protocol)",
        description="Before releasing an expert: for a uniform sample of the owner's documents, prompt each model "
                    "with the first --prefix-tokens tokens and compare its greedy and --samples sampled "
                    "continuations of --continuation-tokens tokens with the true continuation; a document counts "
                    "as extracted when the normalised Levenshtein similarity (rapidfuzz) is >= --threshold. "
                    "Rates with 95%% Wilson intervals for MODEL_DIR, MODEL_DIR with --exclude (the merged model "
                    "without the owner's expert) and every --compare model (e.g. the owner's 2-expert model and "
                    "the public model). Defaults are the paper's: 10000 documents, 32-token prefix, 256-token "
                    "continuation, 10 samples, threshold 0.9.")
    au.add_argument("model_dir", metavar="MODEL_DIR", help="Megatron checkpoint (e.g. the merged model)")
    au.add_argument("owner_data", metavar="OWNER_DATA.jsonl", help="the owner's training documents (stay local)")
    au.add_argument("--compare", nargs="+", action="extend", default=[], metavar="MODEL_DIR",
                    help="further checkpoints to audit on the same documents (same tokenizer)")
    au.add_argument("--exclude", nargs="+", action="extend", default=[], type=opt.safe_name, metavar="NAME",
                    help="also audit MODEL_DIR with these experts masked (run-time opt-out)")
    au.add_argument("--tokenizer", metavar="DIR", help="tokenizer directory (default: MODEL_DIR/tokenizer)")
    au.add_argument("--text-key", default="text", help="field of OWNER_DATA lines (default 'text')")
    au.add_argument("--num-docs", type=opt.positive_int, default=10_000, help="documents audited (default 10000)")
    au.add_argument("--prefix-tokens", type=opt.positive_int, default=32, help="prompt length (default 32)")
    au.add_argument("--continuation-tokens", type=opt.positive_int, default=256,
                    help="generated and compared tokens (default 256)")
    au.add_argument("--samples", type=opt.non_negative_int, default=10,
                    help="sampled continuations per document, best of them counts (default 10; 0: greedy only)")
    au.add_argument("--temperature", type=opt.positive_float, default=1.0, help="of the samples (default 1.0)")
    au.add_argument("--top-p", type=opt.fraction, default=1.0, help="nucleus of the samples (default 1.0)")
    au.add_argument("--threshold", type=opt.fraction, default=0.9,
                    help="similarity at or above which a document is extracted (default 0.9)")
    au.add_argument("--seed", type=opt.seed, default=0, help="document sample and sampling (default 0)")
    au.add_argument("--batch-size", type=opt.positive_int, default=16, help="prompts per batch (default 16)")
    au.add_argument("--out", metavar="REPORT.json", help="also write the report (rates and per-document similarity)")
    au.add_argument("--quiet", action="store_true", help="no progress bar")
    au.set_defaults(func=text_commands.cmd_audit_extraction)

    tr = sub.add_parser("train", aliases=["train-expert"],
                        help="train the public model, an owner's expert, or the router (Megatron-Bridge)",
                        description="RECIPE: 'public' (the dense public model, a one-expert FlexOlmo, every weight "
                                    "trained; sizes via recipe.num_layers=..., recipe.hidden_size=..., "
                                    "recipe.vocab_size=... or recipe.tokenizer_dir=...), "
                                    "'expert' (anchored training of the owner's expert from an upcycled "
                                    "checkpoint: top-2 of 2, LB loss off, z-loss 1e-3, LR 9e-4 cosine, wd 0) or "
                                    "'router-tune' (only router rows, all experts active; biases dropped unless "
                                    "recipe.keep_router_bias=true); 'public-7b', "
                                    "'expert-2x7b', 'router-tune-7x7b', 'inference-7x7b': the H100 production recipes "
                                    "(recipe.precision=bf16|fp8-tensorwise|fp8-blockwise, recipe.nodes=N, "
                                    "recipe.gpus_per_node=G). Overrides: "
                                    "recipe.ARG=VALUE for the recipe function (init_from, save_dir, data_paths, "
                                    "tokenizer_dir, seq_length, train_iters, global_batch_size, lr, expert_parallel, "
                                    "...), and KEY=VALUE for the Bridge ConfigContainer (e.g. train.train_iters=10). "
                                    "Run under torchrun for several processes.")
    tr.add_argument("recipe", metavar="RECIPE", choices=TRAIN_RECIPES)
    tr.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    tr.set_defaults(func=commands.cmd_train_expert)

    plan = sub.add_parser(
        "plan", help="per-GPU memory estimate of a training recipe; warns when it will not fit an 80 GB H100",
        description="Builds RECIPE (as 'flexolmo train' would, for GPUs: recipe.cpu=false unless given) and prints "
                    "the per-GPU bytes of parameters, gradients, optimizer state and one micro-batch's activations "
                    "for its parallel layout, precision, freezing policy and recompute setting (formulas: "
                    "flexolmo_plugin.recipes.memory). A production recipe without recipe.init_from is planned with "
                    "its default sizes. Exit 1 (with a warning) when the total exceeds an 80 GB H100.")
    plan.add_argument("recipe", metavar="RECIPE", choices=TRAIN_RECIPES)
    plan.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                      help="recipe.ARG=VALUE and ConfigContainer overrides, as for 'flexolmo train'")
    plan.add_argument("--gpus", type=opt.positive_int,
                      help="GPUs in all (default: the recipe's nodes x gpus_per_node, else the smallest number "
                           "that holds its model-parallel groups)")
    plan.set_defaults(func=commands.cmd_plan)

    demo = sub.add_parser(
        "demo", help="run the whole FlexOlmo lifecycle on this machine (5-15 minutes on 2 CPU cores; --size tiny 2-6)",
        description="Public model trained on public text; three data owners (Python code, C++ headers, licence "
                    "texts -- all read from this machine, nothing downloaded) each embed their domain, upcycle "
                    "and train their expert in their own process; merge, per-domain evaluation, opt-out, routing "
                    "heatmap, Hugging Face export checked with transformers, and a summary of every artifact. "
                    "Exit 1 if a check fails.")
    demo.add_argument("--workdir", metavar="DIR", help="new or empty directory (default: ./flexolmo-demo[-N])")
    demo.add_argument("--size", choices=["full", "tiny"], default="full",
                      help="'tiny' is the test suite's reduced run (default: full)")
    demo.add_argument("--seed", type=opt.seed, default=0,
                      help="seed of the data split, training, proxy selection and router mix (default 0)")
    demo.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                      help="change one size field (e.g. router_bias_init=none, owner_public_share=0); for ablations")
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    demo.set_defaults(func=commands.cmd_demo)
    for name in VERIFYING_COMMANDS:
        sub.choices[name].add_argument(
            "--no-verify", action="store_true",
            help="do not check the inputs' checksums (checksums.json) before reading them; a warning says so")
    return parser


# Commands that read checkpoints or datasets our tools wrote (and verify their checksums).
VERIFYING_COMMANDS = ("parity", "convert", "upcycle", "calibrate-router", "align-router", "scale-router",
                      "package-expert", "merge", "opt-out", "eval", "train", "verify", "generate", "audit-extraction")
