"""Owns the step profile: where the GPU time of a workload's engine steps goes, kernel by kernel,
for one configuration (a vLLM baseline dtype or a plugin method), with CUDA graphs on.

    python -m vllm_kvpress.bench.step_profile --config gear --workload long-prompt \\
        --kv-cache-memory-bytes 59223080960 --out docs/results/step_profile_gear.json

The engine runs in this process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`) and is stepped by hand to the
end of the workload: every step's wall time is recorded (split into steps that carry prompt tokens
and decode-only steps), and PyTorch's profiler covers `--profile-steps` steps from each index of
`--profile-at` (CUPTI also sees the kernels inside CUDA-graph replays). Profiling slows the host
side: throughput figures come from `vllm-kvpress bench`, this only says which kernels take the time.

Before the measured run the engine runs the bench's unmeasured warm-up batch once, as every engine
of `vllm-kvpress bench` does (`--no-warmup` skips it), so that the profile sees the engine the bench
measures. Three diagnostics point at what a kernel table cannot show:

- the Triton JIT compiles during the measured run, each with the engine step it happened in: a
  kernel specialization the warm-up did not cover compiles in the middle of a measured step and
  shows up as a slow step or a slow time to first token;
- the slowest steps outside the profiled windows, with the tokens and requests they carried;
- in each profiled window, how long the GPU is busy against the window's span, and the largest
  idle gaps between two kernels: a host-side sync (a pageable host-to-device copy, an `.item()`)
  shows as the GPU idling between the kernels before and after it. The profiler slows the host, so
  the idle time inside a window is an upper bound on the idle time of an unprofiled step.
"""

import argparse
import json
import os
import sys
from contextlib import contextmanager
from itertools import pairwise
from pathlib import Path

from vllm_kvpress.provenance import git_state

TOP_KERNELS = 25
SLOWEST_STEPS = 8
TOP_GAPS = 8
SHOWN_COMPILES = 5
HOST_MARKERS = ("Command Buffer Full",)
"""CUPTI records the host waiting for a full launch queue as a device-side span: not GPU work."""


def kernel_table(events, num_steps: int) -> list[dict]:
    """Per kernel (profiler key): GPU microseconds per step, launches per step and share of the
    profiled GPU time, largest first. `events` are `profile.key_averages()` entries. Only device
    events count: a CPU op whose kernels carry no op of their own (a custom op launching Triton or
    CUDA kernels, aten::mm and its GEMMs) reports those kernels' time as its own "self" device
    time too, and would count them twice."""
    from torch.autograd import DeviceType

    rows = []
    for e in events:
        if getattr(e, "device_type", DeviceType.CUDA) == DeviceType.CPU or e.key in HOST_MARKERS:
            continue
        us = getattr(e, "self_device_time_total", None)
        if us is None:  # older PyTorch spelling
            us = getattr(e, "self_cuda_time_total", 0.0)
        if us > 0:
            rows.append({"kernel": e.key, "us_per_step": us / num_steps, "launches_per_step": e.count / num_steps})
    total = sum(r["us_per_step"] for r in rows)
    for r in rows:
        r["share"] = r["us_per_step"] / total if total else 0.0
    return sorted(rows, key=lambda r: -r["us_per_step"])


class StepTimeline:
    """Wall time of every engine step, split into steps that carry prompt tokens and decode-only
    steps. It wraps the scheduler's `schedule`: the time between two schedule calls is one step
    (with async scheduling the next schedule overlaps the step before it, so a single step's figure
    is approximate; the sums over many steps are not). Steps scheduled while `profiling` is set
    are left out of the sums: the profiler slows the host, the more the more ops a step has."""

    def __init__(self):
        self.steps = []  # (schedule time, scheduled tokens, scheduled requests, profiled)
        self.profiling = False

    def record(self, scheduler_output, now: float) -> None:
        per_request = scheduler_output.num_scheduled_tokens
        self.steps.append((now, sum(per_request.values()), len(per_request), self.profiling))

    def _counted(self, end: float):
        """(index, seconds, tokens, requests) of every step the figures count: something
        scheduled, not profiled; a step lasts until the next schedule call (the last until `end`)."""
        ends = [step[0] for step in self.steps[1:]] + [end]
        for i, ((start, tokens, requests, profiled), stop) in enumerate(zip(self.steps, ends)):
            if tokens and not profiled:
                yield i, stop - start, tokens, requests

    def summary(self, end: float) -> dict:
        out = {kind: {"steps": 0, "wall_s": 0.0, "tokens": 0, "requests": 0} for kind in ("prefill", "decode")}
        for _, seconds, tokens, requests in self._counted(end):
            row = out["prefill" if tokens > requests else "decode"]
            row["steps"] += 1
            row["wall_s"] += seconds
            row["tokens"] += tokens
            row["requests"] += requests
        for row in out.values():
            n = max(row["steps"], 1)
            row["ms_per_step"] = 1e3 * row["wall_s"] / n
            row["requests_per_step"] = row["requests"] / n
        return out

    def slowest(self, end: float, n: int = SLOWEST_STEPS) -> list[dict]:
        """The `n` longest steps that the sums count, longest first; "step" is the step's index in
        the timeline."""
        rows = [{"step": i, "ms": 1e3 * seconds, "tokens": tokens, "requests": requests}
                for i, seconds, tokens, requests in self._counted(end)]
        return sorted(rows, key=lambda r: -r["ms"])[:n]

    def current(self) -> int:
        """Index of the step being run: the last one scheduled (-1 before the first)."""
        return len(self.steps) - 1


def gpu_gaps(intervals, num_steps: int, top: int = TOP_GAPS) -> dict:
    """GPU busy time and span per step of a profiled window, and its `top` largest idle gaps,
    largest first. `intervals` are (start_us, end_us, kernel name) of device work; kernels that
    overlap (other streams) count once. Each gap names the kernel that ended last before it and
    the first one after it."""
    pieces = []  # [start, end, name of the kernel ending last, name of the first kernel]
    for start, end, name in sorted(intervals, key=lambda i: (i[0], i[1])):
        if pieces and start <= pieces[-1][1]:
            if end >= pieces[-1][1]:
                pieces[-1][1], pieces[-1][2] = end, name
        else:
            pieces.append([start, end, name, name])
    if not pieces:
        return {"busy_ms_per_step": 0.0, "span_ms_per_step": 0.0, "largest_gaps": []}
    gaps = [{"us": b[0] - a[1], "after": a[2], "before": b[3]} for a, b in pairwise(pieces)]
    return {"busy_ms_per_step": sum(end - start for start, end, *_ in pieces) / num_steps / 1e3,
            "span_ms_per_step": (pieces[-1][1] - pieces[0][0]) / num_steps / 1e3,
            "largest_gaps": sorted(gaps, key=lambda g: -g["us"])[:top]}


def device_intervals(events) -> list[tuple[float, float, str]]:
    """(start_us, end_us, name) of the device work among a profile's raw events (`prof.events()`),
    host markers left out."""
    from torch.autograd import DeviceType

    return [(e.time_range.start, e.time_range.end, e.name) for e in events
            if getattr(e, "device_type", None) == DeviceType.CUDA and e.name not in HOST_MARKERS
            and getattr(e, "time_range", None) is not None]


def _kernel_name(src, metadata) -> str:
    name = metadata.get("name") if isinstance(metadata, dict) else getattr(metadata, "name", None)
    if not name:
        name = getattr(src, "name", None) or getattr(getattr(src, "fn", None), "__name__", None)
    return str(name or "?")


class CompileLog:
    """Triton JIT compiles, each with the engine step it happened in (`current_step()` at the time).
    Triton calls its compilation listener after every compile, `cache_hit` when the binary came
    from the on-disk cache; a kernel already compiled in this process is not compiled again."""

    def __init__(self, current_step):
        self.current_step = current_step
        self.compiles = []

    def record(self, *, src, metadata, metadata_group, times, cache_hit) -> None:
        self.compiles.append({"kernel": _kernel_name(src, metadata), "ms": times.total / 1e3,
                              "cache_hit": bool(cache_hit), "step": self.current_step()})

    @contextmanager
    def watching(self):
        """Record compiles inside the block; a listener set before keeps being called."""
        from triton import knobs

        previous = knobs.compilation.listener

        def listener(**kwargs):
            try:
                self.record(**kwargs)
            finally:
                if previous is not None:
                    previous(**kwargs)

        knobs.compilation.listener = listener
        try:
            yield self
        finally:
            knobs.compilation.listener = previous


def warm_up(llm, workload, seed: int) -> None:
    """Run the bench's unmeasured warm-up batch for `workload`'s engine once."""
    from vllm import SamplingParams

    from vllm_kvpress.bench.workloads import make_prompts, warmup_for

    wl = warmup_for(workload.model, workload.max_model_len)
    params = SamplingParams(max_tokens=wl.output_len, ignore_eos=True, temperature=0.0, detokenize=False)
    llm.generate([{"prompt_token_ids": p} for p in make_prompts(wl, seed).first_prompts], params, use_tqdm=False)


def watch_steps(engine, timeline: StepTimeline) -> None:
    """Make the in-process engine core's scheduler report each step to `timeline`."""
    import time

    scheduler = engine.engine_core.engine_core.scheduler
    schedule = scheduler.schedule

    def timed_schedule(*args, **kwargs):
        out = schedule(*args, **kwargs)
        timeline.record(out, time.perf_counter())
        return out

    scheduler.schedule = timed_schedule


def profile_run(llm, workload, *, seed: int, profile_at: list[int], profile_steps: int,
                warmup: bool = True) -> dict:
    """Run the workload's requests to the end, stepping by hand, after the warm-up batch unless
    `warmup` is off; profile `profile_steps` steps from each step index in `profile_at` (one kernel
    table and GPU timeline per window), time every step and log the Triton compiles."""
    import time

    import torch
    from vllm import SamplingParams

    from vllm_kvpress.bench.workloads import make_prompts

    if warmup:
        warm_up(llm, workload, seed)  # before watch_steps: its steps are not in the timeline
    params = SamplingParams(max_tokens=workload.output_len, ignore_eos=True, temperature=0.0, detokenize=False)
    engine = llm.llm_engine
    for i, prompt in enumerate(make_prompts(workload, seed).first_prompts):
        engine.add_request(str(i), {"prompt_token_ids": prompt}, params)
    timeline = StepTimeline()
    watch_steps(engine, timeline)
    compile_log = CompileLog(timeline.current)
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    windows = []
    step = 0
    start = time.perf_counter()
    with compile_log.watching():
        while engine.has_unfinished_requests():
            if step in profile_at:
                first_profiled = len(timeline.steps)
                timeline.profiling = True
                with torch.profiler.profile(activities=activities) as prof:
                    for _ in range(profile_steps):
                        engine.step()
                    torch.cuda.synchronize()
                timeline.profiling = False
                window = timeline.steps[first_profiled:]
                windows.append({"from_step": step, "steps": profile_steps,
                                "scheduled_tokens_per_step": sum(w[1] for w in window) / max(len(window), 1),
                                "scheduled_requests_per_step": sum(w[2] for w in window) / max(len(window), 1),
                                "kernels": kernel_table(prof.key_averages(), profile_steps),
                                "gpu_timeline": gpu_gaps(device_intervals(prof.events()), profile_steps)})
                step += profile_steps
            else:
                engine.step()
                step += 1
        torch.cuda.synchronize()
    end = time.perf_counter()
    return {"wall_s": end - start, "engine_steps": step, "timeline": timeline.summary(end),
            "note": "wall_s includes the profiled windows, which run slower; the timeline leaves them out",
            "slowest_steps": timeline.slowest(end), "jit_compiles": compile_log.compiles,
            "windows": windows}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="a baseline kv_cache_dtype or METHOD[:JSON], as for bench --configs")
    p.add_argument("--workload", default="long-prompt", help="a workload name of vllm-kvpress bench")
    p.add_argument("--kv-cache-memory-bytes", type=int, default=None)
    p.add_argument("--profile-at", default="8,300",
                   help="comma-separated engine step indices where a profiled window starts "
                        "(default 8,300: among the prefills of A and B, and past them)")
    p.add_argument("--profile-steps", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the table as JSON here")
    p.add_argument("--no-warmup", dest="warmup", action="store_false",
                   help="skip the unmeasured warm-up batch that vllm-kvpress bench runs on every engine")
    return p


def print_summary(config_label: str, workload_name: str, warmup: bool, run: dict) -> None:
    print(f"{config_label} on {workload_name}: {run['wall_s']:.1f} s, {run['engine_steps']} steps"
          f"{'' if warmup else ', no warm-up'}")
    for kind, row in run["timeline"].items():
        print(f"  {kind:8s} {row['steps']:5d} steps {row['wall_s']:7.2f} s {row['ms_per_step']:7.2f} ms/step "
              f"{row['requests_per_step']:5.1f} requests/step")
    compiles = run["jit_compiles"]
    print(f"{len(compiles)} Triton compiles during the measured run "
          f"({sum(c['cache_hit'] for c in compiles)} from the disk cache), "
          f"{sum(c['ms'] for c in compiles) / 1e3:.1f} s")
    for c in compiles[:SHOWN_COMPILES]:
        print(f"  step {c['step']:5d} {c['ms']:8.0f} ms{' (cached)' if c['cache_hit'] else ''}  {c['kernel'][:80]}")
    print("slowest steps outside the profiled windows:")
    for r in run["slowest_steps"]:
        print(f"  step {r['step']:5d} {r['ms']:8.2f} ms {r['tokens']:6d} tokens {r['requests']:4d} requests")
    for w in run["windows"]:
        gpu_ms = sum(r["us_per_step"] for r in w["kernels"]) / 1e3
        print(f"steps {w['from_step']}-{w['from_step'] + w['steps']}: {gpu_ms:.2f} ms GPU/step, "
              f"{w['scheduled_tokens_per_step']:.0f} tokens/step")
        g = w["gpu_timeline"]
        print(f"  GPU busy {g['busy_ms_per_step']:.2f} of {g['span_ms_per_step']:.2f} ms/step (profiled: "
              f"the idle time is an upper bound); largest idle gaps:")
        for gap in g["largest_gaps"][:3]:
            print(f"  {gap['us']:10.1f} us after {gap['after'][:50]} before {gap['before'][:50]}")
        for r in w["kernels"][:TOP_KERNELS]:
            print(f"{r['us_per_step']:10.1f} us {100 * r['share']:5.1f}% {r['launches_per_step']:6.1f}x  "
                  f"{r['kernel'][:90]}")


def main(argv=None) -> int:
    p = parser()
    args = p.parse_args(argv)
    from vllm_kvpress.bench.configs import (
        EngineOptions,
        engine_settings,
        offline_engine_kwargs,
        parse_config_spec,
    )
    from vllm_kvpress.bench.models import get_model
    from vllm_kvpress.bench.workloads import WORKLOADS

    config = parse_config_spec(args.config)  # bad input is refused before anything starts
    try:
        profile_at = sorted({int(x) for x in args.profile_at.split(",") if x.strip()})
    except ValueError:
        p.error(f"--profile-at {args.profile_at!r}: allowed: comma-separated step indices, e.g. 8,300")
    if any(a < 0 for a in profile_at) or any(b - a < args.profile_steps for a, b in pairwise(profile_at)):
        p.error(f"--profile-at {args.profile_at!r}: indices must be >= 0 and at least --profile-steps "
                f"({args.profile_steps}) apart")
    if args.workload not in WORKLOADS:
        p.error(f"--workload {args.workload!r}: allowed: {', '.join(WORKLOADS)}")
    workload = WORKLOADS[args.workload]
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine core in this process, stepped by hand
    from vllm import LLM

    settings = engine_settings(config, model_dir=str(get_model(workload.model).config_dir),
                               max_model_len=workload.max_model_len,
                               options=EngineOptions(seed=args.seed, kv_cache_memory_bytes=args.kv_cache_memory_bytes))
    llm = LLM(**offline_engine_kwargs(settings))
    run = profile_run(llm, workload, seed=args.seed, profile_at=profile_at, profile_steps=args.profile_steps,
                      warmup=args.warmup)
    import torch

    result = {
        "benchmark": "engine step profile", "config": config.label, "workload": workload.to_dict(),
        "profile_steps": args.profile_steps, "warmup": args.warmup, "gpu": torch.cuda.get_device_name(),
        "command": " ".join(["python", "-m", "vllm_kvpress.bench.step_profile", *sys.argv[1:]]),
        **git_state(Path.cwd()), **run,
    }
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    print_summary(config.label, workload.name, args.warmup, run)
    return 0


if __name__ == "__main__":
    sys.exit(main())
