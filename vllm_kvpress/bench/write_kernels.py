"""Owns the cache-write microbenchmark: one layer's write of new K/V into compressed pages, for a
prefill chunk and for a decode step, next to vLLM's own bf16 and fp8 cache write.

    python -m vllm_kvpress.bench.write_kernels --out docs/results/kernels_write.json

A prefill chunk (default 4 sequences x 2,048 new tokens, block-aligned) completes many blocks at
once: the encode kernel's throughput counts. A decode step (default 64 sequences, one token each)
completes about one block per layer, and the step waits for that one encode: its latency counts.
The list of block-completing tokens is made once per step for every layer (by the metadata
builder), so it is made outside the timed call here too. Times are of CUDA-graph replays: GPU time,
without the host's launch cost.
"""

import argparse
import functools
import json
import sys
from pathlib import Path

from vllm_kvpress.bench.kernels import CONFIGS as DECODE_CONFIGS
from vllm_kvpress.provenance import git_state

CONFIGS = {
    **DECODE_CONFIGS,
    # variants that isolate one cost of GEAR's encode: power iterations and the low-rank term
    "gear-4bit-p1": {"method": "gear", "bits": 4, "power_iters": 1},
    "gear-4bit-r0": {"method": "gear", "bits": 4, "rank": 0},
}
DEFAULT_CONFIGS = ("kivi-4bit", "gear-4bit", "gear-4bit-o0", "gear-4bit-p1", "gear-4bit-r0", "gear-2bit")


def decode_step_slots(num_seqs: int, completing: int, block_size: int, torch):
    """One new token per sequence, each in its own block: the first `completing` at a block's last
    offset, the others at random earlier offsets."""
    offsets = torch.randint(0, block_size - 1, (num_seqs,))
    offsets[:completing] = block_size - 1
    blocks = torch.randperm(4 * num_seqs)[:num_seqs]
    return (blocks * block_size + offsets).int().cuda()


def prefill_chunk_slots(num_seqs: int, chunk: int, block_size: int, torch):
    """`chunk` new tokens per sequence from a block boundary on, into shuffled blocks."""
    blocks_per_seq = -(-chunk // block_size)
    blocks = torch.randperm(2 * num_seqs * blocks_per_seq)[: num_seqs * blocks_per_seq].reshape(num_seqs, -1)
    slots = blocks[:, :, None] * block_size + torch.arange(block_size)
    return slots.reshape(num_seqs, -1)[:, :chunk].flatten().int().cuda()


def bench_step(step: str, slots, num_seqs: int, args, timed, torch) -> list[dict]:
    from vllm import _custom_ops as vllm_ops

    from vllm_kvpress.config import load_method_config
    from vllm_kvpress.triton_kernels import cache_write
    from vllm_kvpress.triton_kernels.cache_write import completing_tokens, max_completions, write_kv_pages

    n = slots.shape[0]
    key = torch.randn(n, args.kv_heads, args.head_size, device="cuda", dtype=torch.bfloat16)
    value = torch.randn_like(key)
    num_blocks = int(slots.max()) // 16 + 1  # enough for any block size >= 16
    rows = []
    for dtype in ("auto", "fp8"):  # vLLM's cache write, [blocks, block size 16, heads, head size] each
        cache_dtype = torch.bfloat16 if dtype == "auto" else torch.uint8
        k_cache = torch.zeros(num_blocks, 16, args.kv_heads, args.head_size, dtype=cache_dtype, device="cuda")
        v_cache = torch.zeros_like(k_cache)
        scale = torch.ones(1, dtype=torch.float32, device="cuda")
        write = functools.partial(vllm_ops.reshape_and_cache_flash, key, value, k_cache, v_cache, slots.long(),
                                  dtype, scale, scale)
        rows.append(timed(step, f"vLLM {'bf16' if dtype == 'auto' else dtype}", write))
        del k_cache, v_cache
    for name in args.configs.split(","):
        config = load_method_config(CONFIGS[name])
        layout = config.page_layout(args.head_size)
        pages = int(slots.max()) // layout.block_size + 1
        cache = torch.randint(0, 255, (pages, args.kv_heads, layout.bytes_per_head), dtype=torch.uint8,
                              device="cuda")
        completing = completing_tokens(slots, layout.block_size, max_completions(n, num_seqs, layout.block_size))
        iters = config.pages.power_iters
        for warps in args.encode_warps:
            cache_write.ENCODE_NUM_WARPS = warps  # read at each launch
            write = functools.partial(write_kv_pages, key, value, cache, slots, layout, power_iters=iters,
                                      completing=completing)
            row = timed(step, name, write)
            rows.append({**row, "encode_warps": warps, "completed_blocks": int((completing >= 0).sum())})
        del cache
        torch.cuda.empty_cache()
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prefill-seqs", type=int, default=4)
    p.add_argument("--chunk", type=int, default=2048, help="new tokens per prefill sequence")
    p.add_argument("--decode-seqs", type=int, default=64)
    p.add_argument("--completing", type=int, default=1, help="decode tokens that complete a block")
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-size", type=int, default=128)
    p.add_argument("--configs", default=",".join(DEFAULT_CONFIGS), help=f"comma list from {', '.join(CONFIGS)}")
    p.add_argument("--encode-warps", default=None,
                   help="comma list of warp counts for the block-encode kernel (default: its own)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    unknown = [c for c in args.configs.split(",") if c not in CONFIGS]
    if unknown:
        p.error(f"--configs: unknown {', '.join(unknown)}; allowed: {', '.join(CONFIGS)}")
    from vllm_kvpress.triton_kernels.cache_write import ENCODE_NUM_WARPS

    try:
        args.encode_warps = [int(w) for w in (args.encode_warps or str(ENCODE_NUM_WARPS)).split(",")]
    except ValueError:
        p.error(f"--encode-warps {args.encode_warps!r}: allowed: comma-separated powers of two, e.g. 8,16")
    if any(w not in (1, 2, 4, 8, 16, 32) for w in args.encode_warps):
        p.error(f"--encode-warps {args.encode_warps}: allowed: 1, 2, 4, 8, 16, 32")
    if not 0 <= args.completing <= args.decode_seqs:
        p.error(f"--completing {args.completing}: allowed: 0 to --decode-seqs ({args.decode_seqs})")
    import torch
    import triton.testing as triton_testing

    def timed(step, name, run):
        run()  # compile outside the capture
        # replayed from a CUDA graph, as vLLM runs decode steps: a decode step's write is a few
        # microseconds of GPU work, far below the host's cost of launching it
        us = 1e3 * triton_testing.do_bench_cudagraph(run, rep=100, return_mode="median")
        return {"step": step, "config": name, "us": us}

    torch.manual_seed(0)
    rows = []
    for block_size in sorted({CONFIGS[c].get("block_size", 64) for c in args.configs.split(",")}):
        prefill = prefill_chunk_slots(args.prefill_seqs, args.chunk, block_size, torch)
        decode = decode_step_slots(args.decode_seqs, args.completing, block_size, torch)
        rows += bench_step("prefill chunk", prefill, args.prefill_seqs, args, timed, torch)
        rows += bench_step("decode step", decode, args.decode_seqs, args, timed, torch)
    result = {
        "benchmark": "cache write", "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
        "shape": {k: getattr(args, k) for k in ("prefill_seqs", "chunk", "decode_seqs", "completing",
                                                "kv_heads", "head_size")},
        "command": " ".join(["python", "-m", "vllm_kvpress.bench.write_kernels", *sys.argv[1:]]),
        **git_state(Path.cwd()), "rows": rows,
    }
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"{'step':14} {'config':16} {'warps':>5} {'us':>9} {'blocks':>7}")
    for r in rows:
        print(f"{r['step']:14} {r['config']:16} {r.get('encode_warps', '-'):>5} {r['us']:9.1f} "
              f"{r.get('completed_blocks', '-'):>7}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
