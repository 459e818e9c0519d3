"""Owns the decode-kernel microbenchmark: achieved bandwidth on the packed bytes vs bf16 FlashAttention.

    python -m vllm_kvpress.bench.kernels --out docs/results/kernels_decode.json

Decode attention reads every stored KV byte once per step, so its roofline is HBM bandwidth: we
report bytes the kernel must read (every page region of every block of every sequence) over the
median time, next to the GPU's measured device-to-device copy bandwidth (bytes read + written)
and FlashAttention 3's bf16 paged decode on the same shapes.
"""

import argparse
import json
import platform
import sys
from pathlib import Path

from vllm_kvpress.provenance import git_state

CONFIGS = {
    "kivi-4bit": {"method": "kivi", "bits": 4},
    "kivi-2bit": {"method": "kivi", "bits": 2},
    "gear-4bit": {"method": "gear", "bits": 4},
    "gear-2bit": {"method": "gear", "bits": 2},
    # variants that isolate one cost: V groups (kivi's default is 64 channels) and GEAR's outlier slots
    "kivi-4bit-vhead": {"method": "kivi", "bits": 4, "group_size": "head"},
    "gear-4bit-o0": {"method": "gear", "bits": 4, "outliers": 0},
    "gear-4bit-o32": {"method": "gear", "bits": 4, "outliers": 32},
}
DEFAULT_CONFIGS = ("kivi-4bit", "kivi-2bit", "gear-4bit", "gear-2bit")


def measure_copy_bandwidth(torch, triton_testing) -> float:
    """GB/s of a large device-to-device copy, counting bytes read and written."""
    src = torch.empty(2 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = triton_testing.do_bench(lambda: dst.copy_(src), warmup=50, rep=300, return_mode="median")
    return 2 * src.numel() / ms / 1e6


def bench_compressed(name, settings, args, torch, triton_testing) -> dict:
    from vllm_kvpress.backend.metadata import num_decode_splits
    from vllm_kvpress.config import load_method_config
    from vllm_kvpress.decode import decode_attention
    from vllm_kvpress.triton_kernels.cache_write import write_kv_pages
    from vllm_kvpress.triton_kernels.decode_attention import split_buffers

    config = load_method_config(settings)
    layout = config.page_layout(args.head_size)
    bs = layout.block_size
    blocks_per_seq = args.context // bs
    num_blocks = args.batch * blocks_per_seq
    cache = torch.empty(num_blocks, args.kv_heads, layout.bytes_per_head, dtype=torch.uint8, device="cuda")
    block_table = torch.randperm(num_blocks, device="cuda").int().reshape(args.batch, blocks_per_seq)
    # fill with real encodings of random K/V, one sequence at a time (bounded memory)
    for s in range(args.batch):
        k = torch.randn(args.context, args.kv_heads, args.head_size, device="cuda", dtype=torch.bfloat16)
        slots = (block_table[s].long()[:, None] * bs + torch.arange(bs, device="cuda")).flatten().int()
        write_kv_pages(k, k, cache, slots, layout, power_iters=config.pages.power_iters)
    q = torch.randn(args.batch, args.heads, args.head_size, device="cuda", dtype=torch.bfloat16)
    out = torch.empty_like(q)
    seq_lens = torch.full((args.batch,), args.context, dtype=torch.int32, device="cuda")
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    splits = num_decode_splits(args.batch, args.kv_heads, sms)
    buffers = split_buffers(args.batch * splits, args.heads, args.head_size, "cuda")

    nbytes = args.batch * blocks_per_seq * args.kv_heads * layout.bytes_per_head
    rows = []
    for kernel in args.kernels:
        # the launch knobs of each kernel: Triton's num_stages, CUDA's CTAs per multiprocessor
        tuning = ("num_stages", args.num_stages) if kernel == "triton" else ("min_ctas", args.min_ctas)
        for num_warps in args.num_warps:
            for knob in tuning[1]:
                def run(num_warps=num_warps, kernel=kernel, launch=(tuning[0], knob)):
                    decode_attention(q, cache, block_table, seq_lens, out, layout, scale=args.head_size ** -0.5,
                                     num_splits=splits, split_buffers=buffers, num_warps=num_warps, kernel=kernel,
                                     **{launch[0]: launch[1]})

                run()  # builds the CUDA kernel outside the graph capture
                ms = triton_testing.do_bench_cudagraph(run, rep=200, return_mode="median")
                rows.append({"config": name, "settings": settings, "kernel": kernel, "ms": ms, "bytes": nbytes,
                             "gb_per_s": nbytes / ms / 1e6, "bytes_per_token_head": layout.bytes_per_token_head,
                             "num_splits": splits, "num_warps": num_warps, tuning[0]: knob})
    return rows


def bench_flash_attention_bf16(args, torch, triton_testing) -> dict:
    from vllm.vllm_flash_attn.flash_attn_interface import flash_attn_varlen_func

    bs = 16
    blocks_per_seq = args.context // bs
    num_blocks = args.batch * blocks_per_seq
    k_cache = torch.randn(num_blocks, bs, args.kv_heads, args.head_size, device="cuda", dtype=torch.bfloat16)
    v_cache = torch.randn_like(k_cache)
    block_table = torch.randperm(num_blocks, device="cuda").int().reshape(args.batch, blocks_per_seq)
    q = torch.randn(args.batch, args.heads, args.head_size, device="cuda", dtype=torch.bfloat16)
    cu_q = torch.arange(args.batch + 1, device="cuda", dtype=torch.int32)
    seq_lens = torch.full((args.batch,), args.context, dtype=torch.int32, device="cuda")

    def run():
        flash_attn_varlen_func(q, k_cache, v_cache, max_seqlen_q=1, cu_seqlens_q=cu_q, max_seqlen_k=args.context,
                               seqused_k=seq_lens, softmax_scale=args.head_size ** -0.5, causal=True,
                               block_table=block_table, fa_version=3)

    ms = triton_testing.do_bench_cudagraph(run, rep=200, return_mode="median")
    nbytes = 2 * k_cache.numel() * k_cache.element_size()
    return {"config": "bf16 FlashAttention-3", "ms": ms, "bytes": nbytes, "gb_per_s": nbytes / ms / 1e6,
            "bytes_per_token_head": 4 * args.head_size}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--context", type=int, default=32768)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-size", type=int, default=128)
    p.add_argument("--configs", default=",".join(DEFAULT_CONFIGS), help=f"comma list from {', '.join(CONFIGS)}")
    p.add_argument("--num-warps", type=lambda v: [int(x) for x in v.split(",")], default=[4],
                   help="comma list of decode launch num_warps to time")
    p.add_argument("--num-stages", type=lambda v: [int(x) for x in v.split(",")], default=[3],
                   help="comma list of decode launch num_stages to time")
    p.add_argument("--kernels", type=lambda v: v.split(","), default=["cuda", "triton"],
                   help="comma list of decode kernels to time: cuda, triton")
    p.add_argument("--min-ctas", type=lambda v: [int(x) for x in v.split(",")], default=[2],
                   help="comma list of the CUDA kernel's CTAs per multiprocessor to time")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    import torch
    import triton.testing as triton_testing

    copy_gbs = measure_copy_bandwidth(torch, triton_testing)
    rows = [bench_flash_attention_bf16(args, torch, triton_testing)]
    for name in args.configs.split(","):
        rows.extend(bench_compressed(name, CONFIGS[name], args, torch, triton_testing))
        torch.cuda.empty_cache()
    for r in rows:
        r["fraction_of_copy_bandwidth"] = r["gb_per_s"] / copy_gbs
        r["speedup_vs_bf16"] = rows[0]["ms"] / r["ms"]
    result = {
        "benchmark": "decode attention kernel",
        "shape": {k: getattr(args, k) for k in ("batch", "context", "heads", "kv_heads", "head_size")},
        "gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "copy_gb_per_s": copy_gbs,
        "command": " ".join([sys.executable.split("/")[-1], "-m", "vllm_kvpress.bench.kernels", *sys.argv[1:]]),
        **git_state(Path.cwd()), "host": platform.machine(), "rows": rows,
    }
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    print(f"copy bandwidth {copy_gbs:.0f} GB/s on {result['gpu']}")
    print(f"{'config':24} {'kernel':>7} {'warps/knob':>10} {'ms':>8} {'GB/s':>8} {'% copy':>7} {'vs bf16':>8} "
          f"{'B/tok/head':>10}")
    for r in rows:
        launch = f"{r['num_warps']}/{r.get('num_stages', r.get('min_ctas'))}" if "num_warps" in r else "-"
        share = 100 * r["fraction_of_copy_bandwidth"]
        print(f"{r['config']:24} {r.get('kernel', 'FA3'):>7} {launch:>10} {r['ms']:8.3f} {r['gb_per_s']:8.0f} "
              f"{share:6.1f}% {r['speedup_vs_bf16']:7.2f}x {r['bytes_per_token_head']:10.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
