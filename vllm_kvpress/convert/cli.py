"""Owns `vllm-kvpress convert`: offline checkpoint conversions that make a model's KV smaller before
vLLM loads it, so the saving stacks with every `--kv-compression` page method.

    vllm-kvpress convert kv-head-compress smollm2 smollm2-kv1 --kv-heads 1
    vllm serve smollm2-kv1 --kv-compression gear

`kv-head-compress` (convert/kv_heads.py) writes an ordinary GQA checkpoint with fewer KV heads,
which vLLM serves with its own attention. `sigma-diffqkv` merges keys and values to different head
counts (Sigma's DiffQKV: fewer K heads than V heads); vLLM has one KV head count, so the checkpoint
repeats the fewer heads' projections: its quality is the asymmetric merge's, its KV in vLLM that of
the larger count (pages with K and V of different head counts are not built). The conversion is
deterministic: the calibration windows are fixed by the corpus and the token count, and the merge is
an eigendecomposition.
"""

import argparse
import json
import os

from vllm_kvpress.convert.calibration import MIN_TOKENS
from vllm_kvpress.errors import InputError, MethodNotImplementedError

CONVERSION_RECORD = "kvpress_conversion.json"
"""Written into the output checkpoint: what was converted, how, and the KV bytes before and after."""
ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM")
"""Models whose attention the converter rewrites: q/k/v/o projections, RoPE over whole heads in
halves (pair m is channels m and m + D/2), no per-head norms on q or k."""
DEFAULT_CALIBRATION_TOKENS = 16384
DEFAULT_WINDOW = 2048
DEFAULT_RECOVERY_STEPS = 200
DEFAULT_RECOVERY_WINDOW = 512
DEFAULT_RECOVERY_LR = 3e-4
SIGMA = "sigma-diffqkv"


def _planned_conversions() -> dict[str, str]:
    from vllm_kvpress.methods.base import Family
    from vllm_kvpress.methods.registry import PLANNED

    return {info.name: info.paper for info in PLANNED if info.family is Family.OFFLINE_WEIGHTS}


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "convert",
        help="offline checkpoint conversions (kv-head-compress, sigma-diffqkv): a model with a smaller KV",
        description="Convert a Hugging Face checkpoint into one with a smaller KV cache (docs/convert.md).",
    )
    p.add_argument("conversion", choices=("kv-head-compress", SIGMA, *_planned_conversions()),
                   help="the conversion; the others listed are planned")
    p.add_argument("model", help="smollm2, qwen0.5b, or a Hugging Face checkpoint directory")
    p.add_argument("out", help="directory for the converted checkpoint (must not exist or be empty)")
    p.add_argument("--kv-heads", type=int, required=False, default=None,
                   help="kv-head-compress: KV heads of the result; must divide the model's KV head count")
    p.add_argument("--k-heads", type=int, default=None,
                   help="sigma-diffqkv: K heads of the result; must divide the model's KV head count")
    p.add_argument("--v-heads", type=int, default=None,
                   help="sigma-diffqkv: V heads of the result; must divide the model's KV head count")
    p.add_argument("--merge", choices=("svd", "mean"), default="svd",
                   help="kv-head-compress: svd (the paper's, default) or mean (GQA's mean-pooling, the baseline)")
    p.add_argument("--calibration", default="essays", metavar="CORPUS",
                   help="calibration text: essays (default), jargon, or a UTF-8 text file")
    p.add_argument("--calibration-tokens", type=int, default=DEFAULT_CALIBRATION_TOKENS,
                   help=f"calibration tokens (default {DEFAULT_CALIBRATION_TOKENS})")
    p.add_argument("--window", type=int, default=DEFAULT_WINDOW,
                   help=f"tokens per calibration forward pass (default {DEFAULT_WINDOW})")
    p.add_argument("--recovery-steps", type=int, default=DEFAULT_RECOVERY_STEPS,
                   help=f"kv-head-compress: training steps after the merge, the attention projections distilled "
                        f"from the original model (default {DEFAULT_RECOVERY_STEPS}; 0: none)")
    p.add_argument("--recovery-window", type=int, default=DEFAULT_RECOVERY_WINDOW,
                   help=f"tokens per recovery step (default {DEFAULT_RECOVERY_WINDOW})")
    p.add_argument("--recovery-lr", type=float, default=DEFAULT_RECOVERY_LR,
                   help=f"peak learning rate of the recovery, decayed linearly to 0 (default {DEFAULT_RECOVERY_LR:g})")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.set_defaults(run=run)


def kv_bytes_per_token(config, dtype_bytes: int = 2) -> int:
    """Bytes of K and V one token takes over all layers, at `dtype_bytes` per element (bf16: 2)."""
    from vllm_kvpress.models import head_size

    text = config.get_text_config()
    return 2 * text.num_hidden_layers * text.num_key_value_heads * head_size(text) * dtype_bytes


def check_kv_heads(config, kv_heads: int | None, flag: str = "--kv-heads", keep_allowed: bool = False) -> int:
    """The KV-head count's group size g (old heads per new one), or InputError naming what is allowed.
    `keep_allowed`: the model's own count is allowed too (one of sigma's K and V counts may stay)."""
    text = config.get_text_config()
    architecture = (config.architectures or ["?"])[0]
    if architecture not in ARCHITECTURES:
        raise InputError(f"model architecture {architecture}: the converter does not know it; "
                         f"allowed: {', '.join(ARCHITECTURES)}")
    if getattr(text, "partial_rotary_factor", 1.0) != 1.0:
        raise InputError(f"partial_rotary_factor {text.partial_rotary_factor}: allowed: RoPE over whole heads (1.0)")
    old = text.num_key_value_heads
    allowed = [n for n in range(1, old + keep_allowed) if old % n == 0]
    if kv_heads is None or kv_heads not in allowed:
        fewer = "dividing" if keep_allowed else "fewer, dividing"
        raise InputError(f"{flag} {kv_heads}: the model has {old} KV heads; allowed: "
                         f"{', '.join(map(str, allowed)) or 'none (it has one KV head)'} ({fewer} {old})")
    return old // kv_heads


def check_sigma_heads(config, k_heads: int | None, v_heads: int | None) -> None:
    """sigma-diffqkv's K and V head counts, or InputError: each divides the model's KV heads, and at
    least one is fewer."""
    check_kv_heads(config, k_heads, "--k-heads", keep_allowed=True)
    check_kv_heads(config, v_heads, "--v-heads", keep_allowed=True)
    old = config.get_text_config().num_key_value_heads
    if k_heads == v_heads == old:
        raise InputError(f"--k-heads {k_heads} --v-heads {v_heads}: nothing to merge; allowed: at least one "
                         f"below {old}")


def convert_kv_heads(model, windows: list[list[int]], kv_heads: int, merge: str, progress=None,
                     value_heads: int | None = None) -> None:
    """Merge `model`'s KV heads in place to `kv_heads` (see kv_heads.py), its config updated; with
    `value_heads`, keys to `kv_heads` and values to `value_heads` (sigma-diffqkv), the checkpoint at
    the larger count."""
    from vllm_kvpress.convert.calibration import collect_keys_values
    from vllm_kvpress.convert.kv_heads import GroupStatistics, HeadMerge, merge_layer
    from vllm_kvpress.models import head_size

    text = model.config.get_text_config()
    if value_heads is None:
        value_heads = kv_heads
        check_kv_heads(model.config, kv_heads)
    else:
        check_sigma_heads(model.config, kv_heads, value_heads)
    counts = sorted({kv_heads, value_heads})  # one merge per distinct head count
    old = text.num_key_value_heads
    channels = head_size(text)
    layers = model.model.layers
    if merge == "svd":
        stats = [{n: GroupStatistics.empty(n, old // n, channels) for n in counts} for _ in layers]

        def add(i, k, v):
            for layer_stats in stats[i].values():
                layer_stats.add(k, v)

        collect_keys_values(model, windows, add, progress)
        merges = [{n: HeadMerge.fit(s) for n, s in layer_stats.items()} for layer_stats in stats]
    else:
        merges = [{n: HeadMerge.mean(n, old // n, channels) for n in counts} for _ in layers]
    for layer, layer_merges in zip(layers, merges):
        out_heads = merge_layer(layer.self_attn, layer_merges[kv_heads], text.num_attention_heads,
                                layer_merges[value_heads])
        layer.self_attn.num_key_value_groups = text.num_attention_heads // out_heads
    text.num_key_value_heads = max(kv_heads, value_heads)


def run(args: argparse.Namespace) -> int:
    sigma = args.conversion == SIGMA
    if args.conversion in _planned_conversions():
        raise MethodNotImplementedError(f"convert {args.conversion}: {_planned_conversions()[args.conversion]} is "
                                        f"planned but not implemented yet; available now: kv-head-compress, {SIGMA}")
    other_flags = {"--kv-heads": args.kv_heads} if sigma else {"--k-heads": args.k_heads, "--v-heads": args.v_heads}
    for flag, value in other_flags.items():
        if value is not None:
            takes = "--k-heads and --v-heads" if sigma else "--kv-heads"
            raise InputError(f"{flag} {value}: not a setting of {args.conversion}; allowed: {takes}")
    if os.path.isdir(args.out) and os.listdir(args.out):
        raise InputError(f"out {args.out!r}: the directory is not empty; allowed: a new or empty directory")
    for flag, value in (("--window", args.window), ("--recovery-window", args.recovery_window)):
        if value < 1:
            raise InputError(f"{flag} {value}: allowed: a positive token count")
    if args.calibration_tokens < MIN_TOKENS:
        raise InputError(f"--calibration-tokens {args.calibration_tokens}: too few; allowed: at least {MIN_TOKENS}")
    if args.recovery_steps < 0:
        raise InputError(f"--recovery-steps {args.recovery_steps}: allowed: 0 (no recovery) or more")
    if not args.recovery_lr > 0:
        raise InputError(f"--recovery-lr {args.recovery_lr}: allowed: a positive learning rate")
    import torch
    from tqdm import tqdm
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from vllm_kvpress.convert.calibration import calibration_windows
    from vllm_kvpress.convert.recovery import distill_attention
    from vllm_kvpress.models import ensure_model

    source = ensure_model(args.model)
    config = AutoConfig.from_pretrained(source)
    if sigma:  # before any loading
        check_sigma_heads(config, args.k_heads, args.v_heads)
    else:
        check_kv_heads(config, args.kv_heads)
    key_heads, value_heads = (args.k_heads, args.v_heads) if sigma else (args.kv_heads, None)
    stored_v_heads = value_heads or key_heads  # the record's V count: the K count where they are one
    tokenizer = AutoTokenizer.from_pretrained(source)
    windows = (calibration_windows(tokenizer, args.calibration, args.calibration_tokens, args.window)
               if args.merge == "svd" else [])
    recovery_tokens = args.recovery_steps * args.recovery_window
    sequences = (calibration_windows(tokenizer, args.calibration, recovery_tokens, args.recovery_window,
                                     "--recovery-steps x --recovery-window") if args.recovery_steps else [])
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    saved_dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.bfloat16
    saved_dtype = getattr(torch, saved_dtype) if isinstance(saved_dtype, str) else saved_dtype
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).to(device).eval()
    before = kv_bytes_per_token(model.config, saved_dtype.itemsize)
    with tqdm(total=args.calibration_tokens if args.merge == "svd" else 0, unit="tok",
              desc="calibration", disable=args.merge != "svd") as progress:
        convert_kv_heads(model, windows, key_heads, args.merge, progress, value_heads)
    losses = []
    if args.recovery_steps:
        teacher = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).to(device).eval()
        with tqdm(total=args.recovery_steps, unit="step", desc="recovery") as progress:
            losses = distill_attention(model, teacher, sequences, args.recovery_steps, args.recovery_lr, progress)
        del teacher
    after = kv_bytes_per_token(model.config, saved_dtype.itemsize)
    text = model.config.get_text_config()
    # what K and V of their own head counts would store (sigma); the checkpoint's own count otherwise
    stored = after * (key_heads + stored_v_heads) // (2 * text.num_key_value_heads)
    model.to(saved_dtype).save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    record = {"conversion": args.conversion, "source": os.path.basename(os.path.normpath(source)),
              "merge": args.merge, "kv_heads": text.num_key_value_heads, "k_heads": key_heads,
              "v_heads": stored_v_heads, "calibration": args.calibration,
              "calibration_tokens": args.calibration_tokens if args.merge == "svd" else 0,
              "recovery": {"steps": args.recovery_steps, "window": args.recovery_window, "lr": args.recovery_lr,
                           "first_kl": losses[0] if losses else None, "last_kl": losses[-1] if losses else None},
              "kv_bytes_per_token": {"before": before, "after": after, "with_own_k_and_v_heads": stored}}
    with open(os.path.join(args.out, CONVERSION_RECORD), "w") as f:
        json.dump(record, f, indent=2)
    if sigma:
        print(f"{args.out}: {key_heads} K heads and {value_heads} V heads, KV bytes per token {stored:,} with "
              f"pages of their own head counts (was {before:,}; {before / stored:.2f}x fewer); in vLLM today "
              f"{text.num_key_value_heads} KV heads, {after:,}")
    else:
        print(f"{args.out}: {key_heads} KV heads, KV bytes per token {after:,} (was {before:,}; "
              f"{before / after:.1f}x fewer)")
    return 0
