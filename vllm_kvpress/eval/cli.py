"""Owns `vllm-kvpress eval`: its flags, their validation, the default grids, and the quick grid.

    vllm-kvpress eval --engine reference --model smollm2 --method none,kivi --quick
    vllm-kvpress eval --engine vllm --model qwen0.5b --method none,kivi,gear --tasks niah,ruler,ppl
    vllm-kvpress eval --engine vllm --model smollm2 --method none --kv-cache-dtype fp8

Heavy imports (torch, transformers, vLLM) happen inside `run`.
"""

import argparse
import shlex
import sys

from vllm_kvpress.errors import InputError
from vllm_kvpress.eval.engines import ENGINES
from vllm_kvpress.eval.ruler import TASKS as RULER_TASKS
from vllm_kvpress.eval.runner import DEFAULT_TASKS, TASKS, UNCOMPRESSED

KV_CACHE_DTYPES = ("auto", "fp8", "int4_per_token_head")
DEFAULT_LENGTHS = {"smollm2": (2000, 4000, 7500), "qwen0.5b": (4000, 8000, 16000)}
"""Per embedded model: up to nearly its context (SmolLM2 8192, Qwen2.5 32768 but slow to run)."""
DEFAULT_LENGTHS_OTHER = (2000, 4000)
DEFAULT_DEPTHS = (0.0, 25.0, 50.0, 75.0, 100.0)
DEFAULT_SAMPLES = 6
DEFAULT_PPL_TOKENS = 4096
DEFAULT_PPL_WINDOWS = 2
DEFAULT_PREFILL_CHUNK = 512
MAX_TOKENS_MARGIN = 128
"""Room left for the answer when lengths are capped by the context."""
QUICK = {
    "lengths": (1000,),
    "depths": (10.0, 50.0, 90.0),
    "ruler_tasks": ("niah_single_1", "niah_multikey_2"),
    "samples_per_length": 3,
    "ppl_tokens": 1024,
    "ppl_windows": 1,
    "prefill_chunk": 256,
}
"""A grid the reference engine runs on a 2-core CPU in a few minutes per method (docs/eval.md)."""


def _choices_list(flag: str, allowed: tuple[str, ...]):
    def parse(value: str) -> tuple[str, ...]:
        items = tuple(v.strip() for v in value.split(",") if v.strip())
        unknown = [v for v in items if v not in allowed]
        if not items or unknown:
            raise argparse.ArgumentTypeError(
                f"{flag} {value!r}: unknown {', '.join(unknown) or '(empty)'}; allowed: {', '.join(allowed)} "
                "(comma-separated)"
            )
        return tuple(dict.fromkeys(items))

    return parse


def number_list(flag: str, kind, low: float, high: float | None = None):
    def parse(value: str):
        try:
            items = tuple(kind(v) for v in value.split(",") if v.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{flag} {value!r} is not a comma-separated list of numbers"
            ) from None
        bad = [v for v in items if v < low or (high is not None and v > high)]
        if not items or bad:
            upper = f" to {high}" if high is not None else " or more"
            raise argparse.ArgumentTypeError(f"{flag} {value!r}: allowed: numbers from {low}{upper}")
        return items

    return parse


def _method_names() -> tuple[str, ...]:
    from vllm_kvpress.methods.registry import method_table

    return (UNCOMPRESSED, *(m.name for m in method_table()))


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "eval",
        help="quality harness: NIAH, RULER, multi-turn recall, perplexity per method",
        description="Evaluate KV-compression methods on generated long-context tasks (docs/eval.md).",
    )
    p.add_argument(
        "--engine",
        required=True,
        choices=ENGINES,
        help="reference: transformers + reference page codec (CPU/GPU); vllm: vLLM with the plugin (GPU)",
    )
    p.add_argument(
        "--model", default="smollm2", help="smollm2, qwen0.5b, or a Hugging Face checkpoint directory"
    )
    p.add_argument(
        "--method",
        required=True,
        type=_choices_list("--method", _method_names()),
        help="comma-separated: none (uncompressed) and/or methods of `vllm-kvpress methods`",
    )
    p.add_argument(
        "--config",
        default=None,
        metavar="JSON|FILE",
        help="settings over the method's defaults for every compressed method, e.g. '{\"bits\": 2}'",
    )
    p.add_argument(
        "--kv-cache-dtype",
        default="auto",
        choices=KV_CACHE_DTYPES,
        help="vLLM's own KV dtype as a baseline row (--engine vllm, --method none only)",
    )
    p.add_argument(
        "--tasks",
        default=DEFAULT_TASKS,
        type=_choices_list("--tasks", TASKS),
        help=f"comma-separated subset of {','.join(TASKS)} (default: {','.join(DEFAULT_TASKS)})",
    )
    p.add_argument(
        "--ruler-tasks",
        default=None,
        type=_choices_list("--ruler-tasks", RULER_TASKS),
        help=f"comma-separated subset of {','.join(RULER_TASKS)} (default: all)",
    )
    p.add_argument(
        "--lengths",
        default=None,
        type=number_list("--lengths", int, 256),
        help="prompt lengths in tokens, comma-separated (default per model)",
    )
    p.add_argument(
        "--depths",
        default=None,
        type=number_list("--depths", float, 0, 100),
        help=f"NIAH needle depths in percent (default {','.join(f'{d:g}' for d in DEFAULT_DEPTHS)})",
    )
    p.add_argument(
        "--samples",
        type=int,
        default=None,
        help=f"RULER/multi-turn samples per length (default {DEFAULT_SAMPLES})",
    )
    p.add_argument(
        "--ppl-tokens",
        type=int,
        default=None,
        help=f"tokens per perplexity window (default {DEFAULT_PPL_TOKENS})",
    )
    p.add_argument(
        "--prefill-chunk",
        type=int,
        default=None,
        help=f"prompt tokens per prefill step, 0 = whole prompt (default {DEFAULT_PREFILL_CHUNK})",
    )
    p.add_argument("--quick", action="store_true", help="a small grid for a CPU in minutes (flags given win)")
    p.add_argument("--out", default="eval_results", help="parent directory of the result directory")
    p.add_argument("--max-model-len", type=int, default=None, help="context limit (default: the model's)")
    p.add_argument("--seed", type=int, default=0, help="seed of every generated sample")
    p.add_argument(
        "--device", default=None, help="reference engine: cpu or cuda (default cuda when available)"
    )
    p.add_argument(
        "--dtype",
        default=None,
        choices=("bfloat16", "float16", "float32"),
        help="reference engine: model dtype (default bfloat16)",
    )
    p.add_argument("--gpu-memory-utilization", type=float, default=0.85, help="vllm engine")
    p.add_argument("--enforce-eager", action="store_true", help="vllm engine: no CUDA graphs")
    p.set_defaults(run=run)


def resolve_methods(methods: tuple[str, ...], config_arg: str | None) -> tuple[list, list]:
    """(MethodRun per method, validated method config or None per method); raises on any bad setting."""
    from vllm_kvpress.config import load_method_config, parse_config_argument
    from vllm_kvpress.eval.runner import MethodRun

    overrides = parse_config_argument(config_arg, flag="--config") if config_arg else {}
    overrides.pop("method", None)
    if overrides and methods == (UNCOMPRESSED,):
        raise InputError("--config sets method settings, but --method is only 'none'")
    runs, configs = [], []
    for name in methods:
        if name == UNCOMPRESSED:  # the baseline row: the model's own KV cache, no plugin method
            runs.append(MethodRun(name, {}, None))
            configs.append(None)
            continue
        method_config = load_method_config({"method": name, **overrides})
        runs.append(MethodRun(name, dict(overrides), method_config.to_dict()))
        configs.append(method_config)
    return runs, configs


def build_config(args: argparse.Namespace):
    """Resolve defaults (per model, --quick) into an EvalConfig and the validated method configs."""
    from vllm_kvpress.eval.runner import EvalConfig
    from vllm_kvpress.models import ensure_model, max_model_len

    if args.kv_cache_dtype != "auto" and (args.engine != "vllm" or args.method != (UNCOMPRESSED,)):
        raise InputError(
            f"--kv-cache-dtype {args.kv_cache_dtype} is vLLM's own KV format: it needs --engine vllm "
            "and --method none"
        )
    if args.engine == "vllm" and "decode-ppl" in args.tasks:
        raise InputError(
            "--tasks decode-ppl feeds a text one token per step after its prompt, which vLLM's engine "
            "cannot (it decodes only the tokens it samples); allowed: --engine reference"
        )
    runs, method_configs = resolve_methods(args.method, args.config)
    if args.engine == "vllm":
        from vllm_kvpress.eval.engines.vllm_engine import cuda_gpu_present

        if not cuda_gpu_present():  # before any model download or result directory
            raise InputError("--engine vllm needs a CUDA GPU, which this machine lacks; on a CPU: --engine reference")
    model_path = ensure_model(args.model)
    context = args.max_model_len or max_model_len(args.model)
    quick = QUICK if args.quick else {}
    lengths = (
        args.lengths
        or quick.get("lengths")
        or tuple(
            min(n, context - MAX_TOKENS_MARGIN)
            for n in DEFAULT_LENGTHS.get(args.model, DEFAULT_LENGTHS_OTHER)
        )
    )
    too_long = [n for n in lengths if n + MAX_TOKENS_MARGIN > context]
    if too_long:
        raise InputError(
            f"--lengths {','.join(map(str, too_long))} leave no room for the answer within "
            f"--max-model-len {context}; allowed: up to {context - MAX_TOKENS_MARGIN}"
        )
    ppl_tokens = args.ppl_tokens or quick.get("ppl_tokens") or min(DEFAULT_PPL_TOKENS, context)
    if not 16 <= ppl_tokens <= context:
        raise InputError(f"--ppl-tokens {ppl_tokens}; allowed: 16 to --max-model-len {context}")
    prefill_chunk = (
        args.prefill_chunk
        if args.prefill_chunk is not None
        else quick.get("prefill_chunk", DEFAULT_PREFILL_CHUNK)
    )
    if prefill_chunk < 0 or (args.engine == "vllm" and 0 < prefill_chunk < 16):
        raise InputError(f"--prefill-chunk {prefill_chunk}; allowed: 0 (whole prompt) or 16 and more")
    samples = args.samples if args.samples is not None else quick.get("samples_per_length", DEFAULT_SAMPLES)
    if samples < 1:
        raise InputError(f"--samples {samples}; allowed: 1 or more")
    config = EvalConfig(
        engine=args.engine,
        model=args.model,
        model_path=model_path,
        runs=tuple(runs),
        kv_cache_dtype=args.kv_cache_dtype,
        tasks=args.tasks,
        ruler_tasks=args.ruler_tasks or quick.get("ruler_tasks") or RULER_TASKS,
        lengths=tuple(lengths),
        depths=args.depths or quick.get("depths") or DEFAULT_DEPTHS,
        samples_per_length=samples,
        ppl_tokens=ppl_tokens,
        ppl_windows=quick.get("ppl_windows", DEFAULT_PPL_WINDOWS),
        prefill_chunk=prefill_chunk,
        max_model_len=context,
        seed=args.seed,
        quick=args.quick,
        out=args.out,
        device=args.device,
        dtype=args.dtype,
        gpu_memory_utilization=args.gpu_memory_utilization,
        enforce_eager=args.enforce_eager,
    )
    return config, method_configs


def run(args: argparse.Namespace) -> int:
    from vllm_kvpress.eval.results import markdown_tables
    from vllm_kvpress.eval.runner import evaluate

    config, method_configs = build_config(args)
    argv = getattr(args, "argv", None) or sys.argv
    result_dir = evaluate(config, method_configs, shlex.join(["vllm-kvpress", *argv[1:]]))
    with open(f"{result_dir}/results.json") as f:
        import json

        print(markdown_tables(json.load(f)))
    print(f"results: {result_dir}")
    return 0


def main(argv: list[str]) -> int:
    """`vllm-kvpress eval ARGV...` without the other subcommands' parsers (tests, scripts)."""
    parser = argparse.ArgumentParser(prog="vllm-kvpress")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["eval", *argv])
    args.argv = ["vllm-kvpress", "eval", *argv]
    return args.run(args)
