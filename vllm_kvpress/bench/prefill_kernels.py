"""Owns the prefill microbenchmark: a chunk of queries over a compressed context, through the Triton
prefill kernel and through FlashAttention over the dequantized context (the path vLLM runs on
Hopper), next to bf16 FlashAttention over the same lengths.

    python -m vllm_kvpress.bench.prefill_kernels --out docs/results/kernels_prefill.json

Causal attention FLOPs per sequence: 4 * heads * head_size * chunk * (context + (chunk + 1) / 2).
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from vllm_kvpress.bench.kernels import CONFIGS
from vllm_kvpress.provenance import git_state


def attention_flops(args) -> float:
    per_seq = 4 * args.heads * args.head_size * args.chunk * (args.context + (args.chunk + 1) / 2)
    return args.batch * per_seq


def bench_compressed(name, args, step, timed, fa_version) -> list[dict]:
    """The two prefill paths over `name`'s pages holding each sequence's context and chunk."""
    import torch

    from vllm_kvpress.backend.flash_prefill import flash_prefill_attention, plan_flash_prefill
    from vllm_kvpress.config import load_method_config
    from vllm_kvpress.triton_kernels.cache_write import write_kv_pages
    from vllm_kvpress.triton_kernels.prefill_attention import prefill_attention

    q, k_new, v_new, out, qsl = step
    qsl_gpu = qsl.cuda()
    b, c, n = args.batch, args.context, args.chunk
    seq = c + n
    config = load_method_config(CONFIGS[name])
    layout = config.page_layout(args.head_size)
    bs = layout.block_size
    blocks = -(-seq // bs)
    cache = torch.empty(b * blocks, args.kv_heads, layout.bytes_per_head, dtype=torch.uint8, device="cuda")
    block_table = torch.randperm(b * blocks, device="cuda").int().reshape(b, blocks)
    for s in range(b):  # real encodings of random K/V: the context, then this step's chunk
        k = torch.randn(seq, args.kv_heads, args.head_size, device="cuda", dtype=torch.bfloat16)
        k[c:] = k_new[s * n : (s + 1) * n]
        slots = (block_table[s].long()[:, None] * bs + torch.arange(bs, device="cuda")).flatten()[:seq].int()
        write_kv_pages(k, k, cache, slots, layout, power_iters=config.pages.power_iters)
    seq_lens = torch.full((b,), seq, dtype=torch.int32, device="cuda")
    plan = plan_flash_prefill(qsl.numpy(), np.full(b, seq), 0, b, bs, "cuda", fa_version)
    scale = args.head_size ** -0.5
    return [
        timed(f"{name} Triton prefill kernel", lambda: prefill_attention(
            q, k_new, v_new, out, cache, block_table, qsl_gpu, seq_lens, layout,
            scale=scale, first_seq=0, num_seqs=b, max_query_len=n)),
        timed(f"{name} FlashAttention over pages", lambda: flash_prefill_attention(
            q, k_new, v_new, out, cache, block_table, seq_lens, layout, plan, scale=scale, first_seq=0)),
    ]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=4, help="prefill sequences in the step")
    p.add_argument("--context", type=int, default=8192, help="stored tokens per sequence")
    p.add_argument("--chunk", type=int, default=2048, help="new tokens per sequence")
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-size", type=int, default=128)
    p.add_argument("--configs", default="kivi-4bit,gear-4bit", help=f"comma list from {', '.join(CONFIGS)}")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    import torch
    import triton.testing as triton_testing
    from vllm.vllm_flash_attn import flash_attn_varlen_func

    from vllm_kvpress.backend.flash_prefill import flash_attention_version

    fa_version = flash_attention_version()
    b, n = args.batch, args.chunk
    seq = args.context + n
    qsl = torch.arange(b + 1, dtype=torch.int32) * n
    q = torch.randn(b * n, args.heads, args.head_size, device="cuda", dtype=torch.bfloat16)
    k_new = torch.randn(b * n, args.kv_heads, args.head_size, device="cuda", dtype=torch.bfloat16)
    v_new = torch.randn_like(k_new)
    out = torch.empty_like(q)
    flops = attention_flops(args)

    def timed(name, run):
        ms = triton_testing.do_bench(run, warmup=25, rep=100, return_mode="median")
        return {"config": name, "ms": ms, "tflop_per_s": flops / ms / 1e9}

    # bf16 reference: FlashAttention over bf16 K/V of the whole sequence, no pages
    k_full = torch.randn(b * seq, args.kv_heads, args.head_size, device="cuda", dtype=torch.bfloat16)
    v_full = torch.randn_like(k_full)
    cu_k = torch.arange(b + 1, dtype=torch.int32, device="cuda") * seq
    cu_q = qsl.cuda()
    rows = [timed("bf16 FlashAttention", lambda: flash_attn_varlen_func(
        q, k_full, v_full, max_seqlen_q=n, cu_seqlens_q=cu_q, max_seqlen_k=seq, cu_seqlens_k=cu_k,
        softmax_scale=args.head_size ** -0.5, causal=True, out=out, fa_version=fa_version))]
    step = (q, k_new, v_new, out, qsl)
    for name in args.configs.split(","):
        rows.extend(bench_compressed(name, args, step, timed, fa_version))
        torch.cuda.empty_cache()
    for r in rows:
        r["vs_bf16"] = rows[0]["ms"] / r["ms"]
    result = {
        "benchmark": "prefill attention",
        "shape": {k: getattr(args, k) for k in ("batch", "context", "chunk", "heads", "kv_heads", "head_size")},
        "gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "flash_attention_version": fa_version,
        "command": " ".join(["python", "-m", "vllm_kvpress.bench.prefill_kernels", *sys.argv[1:]]),
        **git_state(Path.cwd()), "rows": rows,
    }
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"{'config':40} {'ms':>8} {'TFLOP/s':>8} {'vs bf16':>8}")
    for r in rows:
        print(f"{r['config']:40} {r['ms']:8.3f} {r['tflop_per_s']:8.1f} {r['vs_bf16']:7.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
