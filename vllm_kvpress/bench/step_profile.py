"""Owns the step profile: where the GPU time of a workload's engine steps goes, kernel by kernel,
for one configuration (a vLLM baseline dtype or a plugin method), with CUDA graphs on.

    python -m vllm_kvpress.bench.step_profile --config gear --workload long-prompt \\
        --kv-cache-memory-bytes 59223080960 --out docs/results/step_profile_gear.json

The engine runs in this process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`) and is stepped by hand, so
PyTorch's profiler can cover exactly `--profile-steps` steps after `--skip-steps` (CUPTI also sees
the kernels inside CUDA-graph replays). Profiling slows the host side: throughput figures come from
`vllm-kvpress bench`, this only says which kernels take the time.
"""

import argparse
import json
import os
import sys
from pathlib import Path

from vllm_kvpress.provenance import git_state

TOP_KERNELS = 25


def kernel_table(events, num_steps: int) -> list[dict]:
    """Per kernel (profiler key): GPU microseconds per step, launches per step and share of the
    profiled GPU time, largest first. `events` are `profile.key_averages()` entries; only their own
    (self) device time counts, so a CPU op and the kernels it launched are not counted twice."""
    rows = []
    for e in events:
        us = getattr(e, "self_device_time_total", None)
        if us is None:  # older PyTorch spelling
            us = getattr(e, "self_cuda_time_total", 0.0)
        if us > 0:
            rows.append({"kernel": e.key, "us_per_step": us / num_steps, "launches_per_step": e.count / num_steps})
    total = sum(r["us_per_step"] for r in rows)
    for r in rows:
        r["share"] = r["us_per_step"] / total if total else 0.0
    return sorted(rows, key=lambda r: -r["us_per_step"])


def profile_steps(llm, workload, *, seed: int, skip_steps: int, profile_steps: int) -> tuple[list[dict], dict]:
    """Add the workload's requests, run `skip_steps` engine steps, profile the next `profile_steps`."""
    import torch
    from vllm import SamplingParams

    from vllm_kvpress.bench.workloads import make_prompts

    params = SamplingParams(max_tokens=workload.output_len, ignore_eos=True, temperature=0.0, detokenize=False)
    engine = llm.llm_engine
    for i, prompt in enumerate(make_prompts(workload, seed).first_prompts):
        engine.add_request(str(i), {"prompt_token_ids": prompt}, params)
    for _ in range(skip_steps):
        engine.step()
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(profile_steps):
            engine.step()
        torch.cuda.synchronize()
    running = engine.get_num_unfinished_requests()
    return kernel_table(prof.key_averages(), profile_steps), {"unfinished_requests_after": running}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="a baseline kv_cache_dtype or METHOD[:JSON], as for bench --configs")
    p.add_argument("--workload", default="long-prompt", help="a workload name of vllm-kvpress bench")
    p.add_argument("--kv-cache-memory-bytes", type=int, default=None)
    p.add_argument("--skip-steps", type=int, default=200,
                   help="engine steps before profiling (default 200: past the prefills of A and B)")
    p.add_argument("--profile-steps", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the table as JSON here")
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
    if args.workload not in WORKLOADS:
        p.error(f"--workload {args.workload!r}: allowed: {', '.join(WORKLOADS)}")
    workload = WORKLOADS[args.workload]
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine core in this process, stepped by hand
    from vllm import LLM

    settings = engine_settings(config, model_dir=str(get_model(workload.model).config_dir),
                               max_model_len=workload.max_model_len,
                               options=EngineOptions(seed=args.seed, kv_cache_memory_bytes=args.kv_cache_memory_bytes))
    llm = LLM(**offline_engine_kwargs(settings))
    rows, state = profile_steps(llm, workload, seed=args.seed, skip_steps=args.skip_steps,
                                profile_steps=args.profile_steps)
    import torch

    result = {
        "benchmark": "engine step profile", "config": config.label, "workload": workload.to_dict(),
        "skip_steps": args.skip_steps, "profile_steps": args.profile_steps, **state,
        "gpu_us_per_step": sum(r["us_per_step"] for r in rows), "gpu": torch.cuda.get_device_name(),
        "command": " ".join(["python", "-m", "vllm_kvpress.bench.step_profile", *sys.argv[1:]]),
        **git_state(Path.cwd()), "kernels": rows,
    }
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"{config.label} on {workload.name}: {result['gpu_us_per_step'] / 1e3:.2f} ms of GPU time per step "
          f"(steps {args.skip_steps}-{args.skip_steps + args.profile_steps})")
    for r in rows[:TOP_KERNELS]:
        print(f"{r['us_per_step']:10.1f} us {100 * r['share']:5.1f}% {r['launches_per_step']:6.1f}x  {r['kernel'][:90]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
