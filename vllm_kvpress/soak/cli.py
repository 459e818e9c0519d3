"""Owns the `vllm-kvpress soak` command line: flags, their defaults and checks, and turning them into
a `runner.SoakRequest`. Nothing here imports vLLM or torch; a bad flag is an `InputError`, which the
top-level command reports as a usage error before any server starts.
"""

import argparse
import math
from pathlib import Path

from vllm_kvpress.bench.cli import byte_count, engine_options
from vllm_kvpress.bench.configs import BF16_LABEL, ConfigSpecError, resolve_configs, split_config_specs
from vllm_kvpress.bench.environment import command_line
from vllm_kvpress.errors import InputError
from vllm_kvpress.eval.cli import number_list
from vllm_kvpress.soak import plan
from vllm_kvpress.soak.driver import DEFAULT_DRAIN_TIMEOUT_S
from vllm_kvpress.soak.probes import DEFAULT_DEPTHS, DEFAULT_LENGTH_SHARES, PROBE_MAX_TOKENS, default_lengths
from vllm_kvpress.soak.side_by_side import split_memory

DEFAULT_DURATION_S = 600.0
"""The issue's acceptance: at least 10 minutes per configuration."""

EPILOG = """examples:
  vllm-kvpress soak --model smollm2 --configs gear 'kivi:{"bits":2}' snapkv kvcrush razor \\
      --duration-s 600 --kv-cache-memory-bytes 1G --out docs/results/soak_smollm2
  vllm-kvpress soak --model llama-3.1-8b --max-model-len 16384 --configs gear \\
      --duration-s 600 --kv-cache-memory-bytes 8G --out docs/results/soak_llama-3.1-8b
  vllm-kvpress soak --model smollm2 --configs gear 'kivi:{"bits":2}' snapkv kvcrush razor \\
      --side-by-side --gpu-memory-utilization 0.9 --kv-cache-memory-bytes 1G \\
      --duration-s 600 --out docs/results/soak_smollm2_side_by_side
The bf16 baseline (--baselines, default auto) runs first: its probe divergence is the reference.
--side-by-side serves every configuration at once on one GPU: one --duration-s for all of them.
What is recorded and how to read it: docs/soak.md."""


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "soak",
        help="a real vllm serve per configuration under mixed traffic, cancels, bursts and idle periods",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EPILOG,
        description="Serve each configuration with vllm serve and drive mixed traffic for a set time: prompts "
        "from 50 tokens to the context, outputs up to 2,000, streamed and not, about 10% cancelled mid-stream, "
        "bursts above the KV pool (preemption) and idle periods (leak checks); greedy needle probes before, "
        "during and after the storm. Writes JSON, a markdown summary and plots of the gauges over time.",
    )
    what = p.add_argument_group("what to run")
    what.add_argument(
        "--model",
        default=None,
        help="llama-3.1-8b or qwen2.5-7b (dummy weights, no tokenizer), smollm2 or qwen0.5b (real weights), "
        "or a Hugging Face checkpoint directory",
    )
    what.add_argument(
        "--configs",
        nargs="*",
        default=[],
        metavar="SPEC",
        help="plugin configurations, as bench's: METHOD or METHOD:JSON, e.g. gear 'kivi:{\"bits\":2}' snapkv",
    )
    what.add_argument(
        "--baselines",
        default=BF16_LABEL,
        help="vLLM kv_cache_dtype baselines soaked first (default %(default)s; 'none' for none)",
    )
    what.add_argument("--max-model-len", type=int, default=None, help="context limit (default: the model's)")
    what.add_argument(
        "--side-by-side", action="store_true",
        help="every configuration's server at once on the one GPU, each on its own port with "
        "--gpu-memory-utilization / (number of configurations) of it; all start together with "
        "--kv-cache-memory-bytes, else one after another; a server that fails to start stops the others",
    )
    traffic = p.add_argument_group("traffic (the same plan shape for every configuration)")
    traffic.add_argument(
        "--duration-s", type=float, default=DEFAULT_DURATION_S,
        help="planned traffic and idle time per configuration (default %(default)g); waiting for requests "
        "to finish before each idle period comes on top",
    )
    traffic.add_argument(
        "--request-rate", type=float, default=plan.DEFAULT_REQUEST_RATE,
        help="steady Poisson arrivals per second between bursts (default %(default)g)",
    )
    traffic.add_argument(
        "--cycle-s", type=float, default=plan.DEFAULT_CYCLE_S,
        help="length of one traffic + burst + idle cycle (default %(default)g)",
    )
    traffic.add_argument(
        "--idle-s", type=float, default=plan.DEFAULT_IDLE_S,
        help="quiet time at the end of each cycle before the leak check (default %(default)g)",
    )
    traffic.add_argument(
        "--burst-overcommit", type=float, default=plan.DEFAULT_BURST_OVERCOMMIT,
        help="a burst's prompt + output tokens in KV pools (default %(default)g; above 1 forces preemption)",
    )
    traffic.add_argument(
        "--cancel-share", type=float, default=plan.DEFAULT_CANCEL_SHARE,
        help="share of requests the client closes mid-stream, in [0, 1) (default %(default)g)",
    )
    traffic.add_argument(
        "--stream-share", type=float, default=plan.DEFAULT_STREAM_SHARE,
        help="share of the other requests that are streamed, in [0, 1] (default %(default)g)",
    )
    traffic.add_argument(
        "--max-output-len", type=int, default=plan.MAX_OUTPUT_LEN,
        help="longest output of a request, tokens (default %(default)d)",
    )
    probes = p.add_argument_group("correctness probes")
    probes.add_argument(
        "--probe-lengths", type=number_list("--probe-lengths", int, 1), default=None,
        help="probe prompt lengths in tokens, comma-separated (default: "
        f"{', '.join(f'{s:g}' for s in DEFAULT_LENGTH_SHARES)} of the context)",
    )
    probes.add_argument(
        "--probe-depths", type=number_list("--probe-depths", float, 0, 100), default=DEFAULT_DEPTHS,
        help=f"needle depths in percent (default {','.join(f'{d:g}' for d in DEFAULT_DEPTHS)}); "
        "without a tokenizer, the number of random probes per length",
    )
    engine = p.add_argument_group("vLLM settings (the same for every configuration; defaults as bench's)")
    engine.add_argument(
        "--gpu-memory-utilization", type=float, default=None,
        help="default 0.9; with --side-by-side, the share of the GPU all servers hold together, split evenly",
    )
    engine.add_argument("--max-num-seqs", type=int, default=None, help="default 256")
    engine.add_argument("--max-num-batched-tokens", type=int, default=None, help="default 8192")
    engine.add_argument("--seed", type=int, default=None, help="engine, plan and probe seed, default 0")
    engine.add_argument("--enforce-eager", action="store_true", default=None, help="no CUDA graphs / torch.compile")
    engine.add_argument("--prefix-caching", choices=("on", "off"), default=None, help="default: vLLM's (on)")
    engine.add_argument("--tensor-parallel-size", type=int, default=None, help="default 1")
    engine.add_argument(
        "--kv-cache-memory-bytes", type=byte_count, default=None,
        help="exactly this much KV cache per configuration (vLLM's flag, e.g. 1G); a small pool keeps "
        "bursts above it short",
    )
    out = p.add_argument_group("results")
    out.add_argument("--out", type=Path, default=None, help="new or empty directory for the results (required)")
    out.add_argument(
        "--drain-timeout-s", type=float, default=DEFAULT_DRAIN_TIMEOUT_S,
        help="longest wait for requests in flight before an idle period (default %(default)g); "
        "requests still running then are recorded as hung",
    )
    p.set_defaults(run=run)


def _check_range(flag: str, value: float, allowed: str, ok: bool) -> None:
    if not ok or (isinstance(value, float) and math.isnan(value)):
        raise InputError(f"{flag} {value:g}: allowed: {allowed}")


def traffic_settings(args: argparse.Namespace):
    _check_range("--duration-s", args.duration_s, "more than 0 seconds", 0 < args.duration_s < math.inf)
    _check_range("--request-rate", args.request_rate, "more than 0 per second", 0 < args.request_rate < math.inf)
    _check_range("--cycle-s", args.cycle_s, "more than 0 seconds", 0 < args.cycle_s < math.inf)
    _check_range("--idle-s", args.idle_s, "0 seconds or more, less than --cycle-s", 0 <= args.idle_s < args.cycle_s)
    _check_range("--burst-overcommit", args.burst_overcommit, "more than 0 KV pools", 0 < args.burst_overcommit < 1e3)
    _check_range("--cancel-share", args.cancel_share, "from 0 up to, not including, 1", 0 <= args.cancel_share < 1)
    _check_range("--stream-share", args.stream_share, "from 0 to 1", 0 <= args.stream_share <= 1)
    _check_range("--max-output-len", args.max_output_len, "1 token or more", args.max_output_len >= 1)
    return plan.TrafficSettings(
        duration_s=args.duration_s,
        request_rate=args.request_rate,
        cycle_s=args.cycle_s,
        idle_s=args.idle_s,
        burst_overcommit=args.burst_overcommit,
        cancel_share=args.cancel_share,
        stream_share=args.stream_share,
        max_output_len=args.max_output_len,
    )


def _configs(args: argparse.Namespace):
    baselines = [] if args.baselines.strip().lower() == "none" else split_config_specs([args.baselines])
    try:
        return resolve_configs(args.configs, baselines)
    except ConfigSpecError as e:
        raise InputError(str(e)) from None


def _check_out(out: Path | None) -> Path:
    if out is None:
        raise InputError("--out is required: a new or empty directory for the results")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InputError(f"--out {out} is not empty; soak results never overwrite others, give a new directory")
    return out


def build_request(args: argparse.Namespace):
    """The `SoakRequest` the flags describe; every check runs before the model is fetched."""
    from vllm_kvpress.soak.runner import SoakRequest
    from vllm_kvpress.soak.served_model import check_model_name, context_len_of, resolve_model

    check_model_name(args.model)
    traffic = traffic_settings(args)
    configs = _configs(args)
    context = context_len_of(args.model)
    max_model_len = args.max_model_len or context
    if not traffic.min_prompt_len + 2 <= max_model_len <= context:
        raise InputError(
            f"--max-model-len {max_model_len}: allowed: {traffic.min_prompt_len + 2} to the model's context, {context}"
        )
    longest_probe = max_model_len - PROBE_MAX_TOKENS
    probe_lengths = tuple(args.probe_lengths or default_lengths(max_model_len))
    if not probe_lengths or max(probe_lengths) > longest_probe:
        raise InputError(
            f"--probe-lengths {','.join(map(str, probe_lengths))}: allowed: 1 to {longest_probe} "
            f"(--max-model-len {max_model_len} less the answer's {PROBE_MAX_TOKENS} tokens)"
        )
    if not 0 < args.drain_timeout_s < math.inf:
        raise InputError(f"--drain-timeout-s {args.drain_timeout_s:g}: allowed: more than 0 seconds")
    engine = engine_options(args)
    if args.side_by_side:  # the arithmetic here; the runner checks it against the GPU's memory too
        split_memory(
            len(configs),
            engine.gpu_memory_utilization,
            kv_cache_memory_bytes=engine.kv_cache_memory_bytes,
            tensor_parallel_size=engine.tensor_parallel_size,
        )
    out = _check_out(args.out)
    return SoakRequest(
        model=resolve_model(args.model),
        configs=configs,
        traffic=traffic,
        out=out,
        max_model_len=max_model_len,
        probe_lengths=probe_lengths,
        probe_depths=tuple(args.probe_depths),
        engine=engine,
        drain_timeout_s=args.drain_timeout_s,
        command=command_line(),
        side_by_side=args.side_by_side,
    )


def run(args: argparse.Namespace) -> int:
    from vllm_kvpress.soak.runner import run_soak

    soak = run_soak(build_request(args))
    return 0 if soak["totals"]["all_criteria_met"] else 1
