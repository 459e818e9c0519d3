"""Owns the `vllm-kvpress bench` command line: flags, their defaults, and turning them into a
`runner.BenchRequest`. Nothing here imports vLLM or torch."""

import argparse
import math
import sys
from pathlib import Path

from vllm_kvpress.bench.configs import DEFAULT_BASELINES, EngineOptions, resolve_configs, split_config_specs
from vllm_kvpress.bench.environment import command_line
from vllm_kvpress.bench.results import RUN_FILE, load_rows, read_json
from vllm_kvpress.bench.workloads import ALIASES, WORKLOADS, Workload, resolve_workloads
from vllm_kvpress.errors import InputError

DEFAULT_WORKLOADS = "A,B"
RUN_SETTING_FLAGS = (
    "workloads",
    "model",
    "mode",
    "gpu_memory_utilization",
    "max_num_seqs",
    "max_num_batched_tokens",
    "seed",
    "enforce_eager",
    "prefix_caching",
    "tensor_parallel_size",
    "kv_cache_memory_bytes",
    "request_rate",
    "max_concurrency",
)
"""Flags that define a run; `--resume` takes them from the run's run.json instead."""

EPILOG = """examples:
  vllm-kvpress bench --workloads A,B --configs gear 'gear:{"bits":2}' 'kivi:{"bits":2}'
  vllm-kvpress bench --workloads multi-turn --mode online --request-rate 4 --configs gear
  vllm-kvpress bench --resume docs/results/<run> --configs 'kivi:{"bits":2}'
The vLLM baselines (--baselines, default auto,fp8,int4_per_token_head) run in every run.
Details, figures and how they are measured: docs/bench.md."""


def _workload_help() -> str:
    names = ", ".join(
        f"{w.name} ({w.num_requests}x{w.prompt_len}+{w.output_len}"
        + (f", {w.turns} turns" if w.turns > 1 else "")
        + ")"
        for w in WORKLOADS.values()
    )
    aliases = ", ".join(f"{a}={'+'.join(v)}" for a, v in ALIASES.items())
    return f"comma-separated workloads (default {DEFAULT_WORKLOADS}): {names}; aliases {aliases}"


def byte_count(value: str) -> int:
    # vLLM's own parser for its flag of that name, imported only when the flag is given
    from vllm.utils.argparse_utils import human_readable_int

    return human_readable_int(value)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "bench",
        help="KV capacity and throughput: vLLM baselines vs vllm-kvpress methods, one process each",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EPILOG,
        description="Measure KV-cache capacity, throughput and latency of vLLM with its own KV-cache dtypes "
        "and with vllm-kvpress methods, on real architectures with dummy weights.",
    )
    what = p.add_argument_group("what to run")
    what.add_argument("--workloads", default=None, help=_workload_help())
    what.add_argument(
        "--model",
        default=None,
        help="run the workloads on this model instead of their own (llama-3.1-8b, qwen2.5-7b)",
    )
    what.add_argument(
        "--configs",
        nargs="*",
        default=[],
        metavar="SPEC",
        help="plugin configurations: METHOD or METHOD:JSON, e.g. gear 'gear:{\"bits\":2}'; "
        "baseline kv_cache_dtypes are accepted too",
    )
    what.add_argument(
        "--baselines",
        default=",".join(DEFAULT_BASELINES),
        help="vLLM kv_cache_dtype baselines measured first (default %(default)s; 'none' for none)",
    )
    what.add_argument(
        "--mode",
        choices=("offline", "online"),
        default=None,
        help="offline: vllm.LLM.generate of the whole batch (default); online: vllm serve + "
        "streaming HTTP clients, adds ITL and serving TTFT",
    )
    engine = p.add_argument_group("vLLM settings (the same for every configuration)")
    engine.add_argument("--gpu-memory-utilization", type=float, default=None, help="default 0.9")
    engine.add_argument("--max-num-seqs", type=int, default=None, help="default 256")
    engine.add_argument("--max-num-batched-tokens", type=int, default=None, help="default 8192")
    engine.add_argument("--seed", type=int, default=None, help="engine and prompt seed, default 0")
    engine.add_argument(
        "--enforce-eager",
        action="store_true",
        default=None,
        help="no CUDA graphs / torch.compile (correctness runs only; not for reported numbers)",
    )
    engine.add_argument("--prefix-caching", choices=("on", "off"), default=None, help="default: vLLM's (on)")
    engine.add_argument("--tensor-parallel-size", type=int, default=None, help="default 1")
    engine.add_argument(
        "--kv-cache-memory-bytes", type=byte_count, default=None,
        help="give every configuration exactly this many bytes of KV cache (vLLM's flag of that name, "
        "with its suffixes: 20G = 20 GiB, 20g = 20 * 10^9; default: sized from --gpu-memory-utilization "
        "by vLLM's profiling)",
    )
    online = p.add_argument_group("online mode")
    online.add_argument(
        "--request-rate",
        type=float,
        default=None,
        help="requests (conversations) started per second, Poisson; default inf (all at once)",
    )
    online.add_argument("--max-concurrency", type=int, default=None, help="cap on requests in flight")
    out = p.add_argument_group("results")
    out.add_argument(
        "--results-root",
        type=Path,
        default=Path("docs/results"),
        help="a new run directory is created under it (default docs/results)",
    )
    out.add_argument(
        "--resume",
        type=Path,
        default=None,
        metavar="RUN_DIR",
        help="add configurations to (or rerun failed ones of) an existing run, with its settings",
    )
    out.add_argument(
        "--retry-failed",
        action="store_true",
        help="with --resume: also rerun configurations that failed (timed-out ones always are)",
    )
    out.add_argument(
        "--deadline-s",
        type=float,
        default=None,
        help="time budget of this command; unstarted configurations are left for --resume",
    )
    out.add_argument(
        "--quality",
        type=Path,
        nargs="+",
        default=[],
        metavar="EVAL_JSON",
        help="eval result files for the capacity-vs-quality figure (format: docs/bench.md)",
    )
    out.add_argument(
        "--no-warmup",
        dest="warmup",
        action="store_false",
        help="skip the short unmeasured warm-up batch after each engine start",
    )
    p.set_defaults(run=run)


def engine_options(args: argparse.Namespace) -> EngineOptions:
    defaults = EngineOptions()

    def pick(name):
        value = getattr(args, name)
        return getattr(defaults, name) if value is None else value

    return EngineOptions(
        gpu_memory_utilization=pick("gpu_memory_utilization"),
        max_num_seqs=pick("max_num_seqs"),
        max_num_batched_tokens=pick("max_num_batched_tokens"),
        seed=pick("seed"),
        enforce_eager=bool(args.enforce_eager),
        enable_prefix_caching=None if args.prefix_caching is None else args.prefix_caching == "on",
        tensor_parallel_size=pick("tensor_parallel_size"),
        kv_cache_memory_bytes=args.kv_cache_memory_bytes,
    )


def build_request(args: argparse.Namespace):
    """The `BenchRequest` the flags describe; with --resume, the run's own settings."""
    from vllm_kvpress.bench.runner import BenchRequest

    baselines = [] if args.baselines.strip().lower() == "none" else split_config_specs([args.baselines])
    configs = resolve_configs(args.configs, baselines) if (args.configs or baselines) else []
    if args.retry_failed and args.resume is None:
        raise InputError("--retry-failed needs --resume RUN_DIR")
    common = dict(
        configs=configs,
        results_root=args.results_root,
        deadline_s=args.deadline_s,
        retry_failed=args.retry_failed,
        quality_files=tuple(args.quality),
        warmup=args.warmup,
        command=command_line(),
    )
    if args.resume is not None:
        given = [f"--{n.replace('_', '-')}" for n in RUN_SETTING_FLAGS if getattr(args, n) is not None]
        if given:
            raise InputError(
                f"--resume takes the run's settings from its {RUN_FILE}; "
                f"drop {', '.join(given)}"
            )
        run = read_json(args.resume / RUN_FILE)
        rate = run.get("request_rate")
        return BenchRequest(
            workloads=[Workload.from_dict(w) for w in run["workloads"]],
            engine=EngineOptions(**run["engine"]),
            mode=run["mode"],
            request_rate=math.inf if rate is None else rate,
            max_concurrency=run.get("max_concurrency"),
            resume=args.resume,
            **common,
        )
    if not configs:
        raise InputError("nothing to run; give --configs or keep --baselines")
    mode = args.mode or "offline"
    if mode == "offline" and (args.request_rate is not None or args.max_concurrency is not None):
        raise InputError("--request-rate/--max-concurrency need --mode online")
    return BenchRequest(
        workloads=resolve_workloads(args.workloads or DEFAULT_WORKLOADS, model=args.model),
        engine=engine_options(args),
        mode=mode,
        request_rate=math.inf if args.request_rate is None else args.request_rate,
        max_concurrency=args.max_concurrency,
        **common,
    )


def run(args: argparse.Namespace) -> int:
    from vllm_kvpress.bench.runner import run_bench

    try:
        request = build_request(args)
    except (ValueError, NotImplementedError) as e:  # bad --configs/--workloads/--model: no traceback
        print(f"vllm-kvpress bench: {e}", file=sys.stderr)
        return 2
    rows = load_rows(run_bench(request))
    return 0 if rows and all(r.get("status") == "ok" for r in rows) else 1
