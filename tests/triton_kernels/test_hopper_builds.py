"""Every Triton kernel as Hopper's JIT builds it, reached the way an engine reaches it: one
attention layer through vLLM's memory-profiling run, CUDA-graph capture of decode batches and the
steps of a chunked-prefill scheduler (tests/engine_steps.py), with Triton's own JIT and ptxas
building each launch for sm_90a instead of running it (tests/compile_only.py).

What the interpreter cannot show: that the GPU-only code paths build, that no engine step builds a
variant of a kernel again (a cold engine once compiled 11 variants, 3.5 s, inside workload A's
first steps: docs/results/step_profile_h200), and what ptxas makes of each kernel."""

import collections
import json
import os
import subprocess
import sys

import pytest
from compile_only import HOPPER_MAX_SHARED_BYTES

from vllm_kvpress.config import load_method_config

ENGINE_STEPS = os.path.join(os.path.dirname(os.path.dirname(__file__)), "engine_steps.py")

SCENARIOS = {  # name: (model, kv_compression settings, prefill path)
    "llama-3.1-8b gear-4 flash": ("llama-3.1-8b", {"method": "gear"}, "flash"),
    "llama-3.1-8b gear-2 triton": ("llama-3.1-8b", {"method": "gear", "bits": 2}, "triton"),
    "llama-3.1-8b kivi-2 flash": ("llama-3.1-8b", {"method": "kivi", "bits": 2}, "flash"),
    "llama-3.1-8b kivi-4-staged triton": ("llama-3.1-8b", {"method": "kivi", "tail_keys": "staged"}, "triton"),
    "llama-3.1-8b kivi-8 flash": ("llama-3.1-8b", {"method": "kivi", "bits": 8}, "flash"),
    "qwen2.5-coder-0.5b gear-4 flash": ("qwen2.5-coder-0.5b", {"method": "gear"}, "flash"),
    "qwen2.5-coder-0.5b kivi-2 triton": ("qwen2.5-coder-0.5b", {"method": "kivi", "bits": 2}, "triton"),
    "smollm2-135m kivi-4 triton": ("smollm2-135m", {"method": "kivi"}, "triton"),
    "smollm2-135m gear-2 flash": ("smollm2-135m", {"method": "gear", "bits": 2}, "flash"),
    "smollm2-135m kivi-8 flash": ("smollm2-135m", {"method": "kivi", "bits": 8}, "flash"),
    "llama-3.1-8b snapkv flash": ("llama-3.1-8b", {"method": "snapkv"}, "flash"),
    "qwen2.5-coder-0.5b razor flash": ("qwen2.5-coder-0.5b", {"method": "razor", "head_choice": "first"}, "flash"),
    "smollm2-135m scissorhands triton": (
        "smollm2-135m", {"method": "scissorhands", "decode_interval": 64, "budget": 1024}, "triton"),
    "llama-3.1-8b kvcrush-on-gear-4 flash": (
        "llama-3.1-8b", {"method": "kvcrush", "pages": "gear", "bits": 4}, "flash"),
}

KNOWN_SPILLS = {
    ("llama-3.1-8b gear-2 triton", "_encode_blocks_kernel"): 48,
    ("smollm2-135m kivi-8 flash", "_decode_split_kernel"): 12,
    ("smollm2-135m scissorhands triton", "_decode_split_kernel"): 20,
}
"""Bytes per thread ptxas spills building these kernels (Triton 3.6's ptxas, sm_90a): GEAR's
2-bit encode at head size 128 needs more than the 128 registers a thread of its 16 warps may have
(ENCODE_NUM_WARPS); 8-bit decode at head size 64 spills at 72 registers with 3 query heads per KV
head only (2 and 4 use 72 and 80 without spilling, and 2 pipeline stages instead of 3 use 96), an
allocation choice of ptxas. Neither is timed on a GPU yet; a new spill, or a larger one, fails here."""


@pytest.fixture(scope="module")
def builds(tmp_path_factory) -> dict[str, list[dict]]:
    workdir = tmp_path_factory.mktemp("hopper_builds")
    scenarios = [{"name": name, "model": model, "settings": settings, "prefill": prefill}
                 for name, (model, settings, prefill) in SCENARIOS.items()]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(workdir / "triton_cache")  # every variant is built here, none found
    out = workdir / "builds.json"
    run = subprocess.run([sys.executable, ENGINE_STEPS, json.dumps(scenarios), str(out)], check=False, env=env,
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return json.loads(out.read_text())


def _kernels_needed(settings: dict, prefill: str) -> set[str]:
    """Kernels one layer of this configuration launches: the cache write's two, decode and the
    split reduction, the prefill's (FlashAttention reads the context through read_pages), the
    compaction's read of the prompt (evicting methods) and decode-time eviction's query ring."""
    needed = {"_encode_blocks_kernel", "_stage_tokens_kernel", "_decode_split_kernel", "_reduce_splits_kernel"}
    needed.add("_read_pages_kernel" if prefill == "flash" else "_prefill_kernel")
    if load_method_config(settings).evicts_tokens:
        needed.add("_read_pages_kernel")
    if settings.get("decode_interval"):
        needed.add("_write_recent_queries_kernel")
    return needed


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_each_kernel_variant_is_built_once(builds, scenario):
    """Across the profiling run, capture of 9 decode batch sizes and the serving steps (prefill
    chunks with and without context beside 0 to 16 decodes), a variant (argument types and
    constexprs) is built at most once: no per-step integer or pointer specialization rebuilds it."""
    _, settings, prefill = SCENARIOS[scenario]
    counts = collections.Counter((b["kernel"], b["variant"]) for b in builds[scenario])
    rebuilt = [f"{kernel} (at {[b['phase'] for b in builds[scenario] if b['variant'] == variant]})"
               for (kernel, variant), n in counts.items() if n > 1]
    assert not rebuilt, f"built again in later steps: {rebuilt}"
    assert {kernel for kernel, _ in counts} == _kernels_needed(settings, prefill)


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_serving_steps_build_only_prefill_kernels(builds, scenario):
    """Capture builds the decode step's kernels (cache write, decode, reduction) before the engine
    serves; a served step builds only what a prefill with context first needs, once."""
    served = {b["kernel"] for b in builds[scenario] if b["phase"].startswith("step")}
    assert served <= {"_prefill_kernel", "_read_pages_kernel"}, served


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_builds_fit_hopper(builds, scenario):
    for b in builds[scenario]:
        assert b["shared_bytes"] <= HOPPER_MAX_SHARED_BYTES, b
        assert b["registers"] <= 255, b
        spilled = max(b["spill_store_bytes"], b["spill_load_bytes"])
        assert spilled <= KNOWN_SPILLS.get((scenario, b["kernel"]), 0), b
