"""One attention layer of a served model through vLLM's sequence of calls, with Triton building
every kernel for Hopper instead of running it (compile_only.py): the memory-profiling run, the
decode batches CUDA-graph capture builds, then the steps of a continuous-batching scheduler with
chunked prefill (decodes first, then prefill chunks; chunks with and without cached context).

Run as a script in a process without TRITON_INTERPRET: `python engine_steps.py SCENARIOS_JSON
OUT_JSON` writes, for each scenario, every kernel build with the phase that caused it and ptxas's resource
usage (tests/triton_kernels/test_hopper_builds.py reads it)."""

import json
import os
import sys
import tempfile
from dataclasses import asdict

import numpy as np
import pytest
import torch

MODELS = {  # attention shapes: (heads, KV heads, head size)
    "llama-3.1-8b": (32, 8, 128),
    "qwen2.5-coder-0.5b": (14, 2, 64),
    "smollm2-135m": (9, 3, 64),
}
MAX_NUM_SEQS, MAX_BATCHED_TOKENS, MAX_MODEL_LEN = 64, 2048, 16384
CAPTURE_SIZES = [1, 2, 4, 8, 16, 24, 32, 48, 64]
"""vLLM's decode batch sizes to capture, up to MAX_NUM_SEQS."""
PROMPTS = [4008, 1680, 292, 231, 145, 203, 358, 97, 113, 2088, 258, 153, 100, 186, 1767, 209, 383, 1188, 350, 3954]
"""Chosen so that prefill chunks with context run beside 0, 1, 3, 9, 10, 14, 15 and 16 decodes (the
kernels' first prefill row: Triton specializes an integer that is 1 or a multiple of 16), and no
chunk is a single token (vLLM would count it as a decode)."""
OUTPUT_TOKENS = 5


def scheduled_steps(prompts: list[int], output_tokens: int, token_budget: int):
    """Each step's rows (request, cached tokens, new tokens) as vLLM's scheduler makes them with
    chunked prefill: every running decode, then prefill chunks until the token budget is spent."""
    cached, generated = [0] * len(prompts), [0] * len(prompts)
    while any(g < output_tokens for g in generated):
        rows, left = [], token_budget
        for r, prompt in enumerate(prompts):
            if cached[r] >= prompt and generated[r] < output_tokens:
                rows.append((r, cached[r], 1))
                left -= 1
        for r, prompt in enumerate(prompts):
            if cached[r] < prompt and left > 0:
                chunk = min(left, prompt - cached[r])
                rows.append((r, cached[r], chunk))
                left -= chunk
        for r, _, new in rows:
            cached[r] += new
            generated[r] += cached[r] >= prompts[r]  # a finished prompt samples its first token
        yield rows


def engine_config(model: str, settings: dict, monkeypatch, workdir: str):
    """vLLM's config for a one-layer model of `model`'s attention shapes, as vLLM makes it on a GPU
    (its V2 model runner; see helpers.v2_runner_config)."""
    from helpers import use_cpu_platform, v2_runner_config

    use_cpu_platform(monkeypatch)  # before vLLM's config modules bind the platform at import
    from vllm.engine.arg_utils import EngineArgs
    from vllm.plugins import load_general_plugins

    heads, kv_heads, head_size = MODELS[model]
    with open(os.path.join(workdir, "config.json"), "w") as f:
        json.dump({"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": heads * head_size,
                   "intermediate_size": 1024, "num_hidden_layers": 1, "num_attention_heads": heads,
                   "num_key_value_heads": kv_heads, "head_dim": head_size, "vocab_size": 1000,
                   "max_position_embeddings": MAX_MODEL_LEN, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
                   "torch_dtype": "bfloat16", "tie_word_embeddings": False}, f)
    load_general_plugins()

    def build(**kwargs):
        return EngineArgs(model=workdir, skip_tokenizer_init=True, load_format="dummy",
                          max_num_seqs=MAX_NUM_SEQS, max_num_batched_tokens=MAX_BATCHED_TOKENS, **kwargs
                          ).create_engine_config()

    block_size = settings.get("block_size", 64)
    return v2_runner_config(build, monkeypatch, settings, block_size)


def run_scenario(model: str, settings: dict, prefill: str, monkeypatch, workdir: str) -> list[dict]:
    """Every build of the layer's kernels, in order, with the phase that caused it."""
    from compile_only import compile_only, ptxas_report
    from helpers import impl_for
    from vllm.v1.attention.backend import CommonAttentionMetadata
    from vllm_kvpress.triton_kernels.decode_attention import split_buffers

    from vllm_kvpress.backend import impl as impl_module
    from vllm_kvpress.backend.flash_prefill import prefill_keys_values
    from vllm_kvpress.backend.metadata import KVPressMetadataBuilder
    from vllm_kvpress.eviction import prompt_lens

    heads, kv_heads, head_size = MODELS[model]
    vllm_config = engine_config(model, settings, monkeypatch, workdir)
    impl = impl_for(vllm_config, monkeypatch, heads, kv_heads, head_size)
    builder = KVPressMetadataBuilder(None, ["layer"], vllm_config, torch.device("cpu"))
    # as on an H100 (132 SMs, vLLM's FlashAttention 3), which the CPU builder cannot ask for
    builder.num_sms = 132
    builder.split_buffers = split_buffers(MAX_NUM_SEQS * 32, heads, head_size, "cpu")
    if prefill == "flash":
        builder.fa_version = 3

        def flash_prefill_without_flash_attention(query, key, value, out, cache, block_table, seq_lens, layout,
                                                  plan, *, scale, first_seq, tail=None, mixed=None,
                                                  prefill_context=None):
            # our half of the FlashAttention prefill: the context dequantized into the workspace
            prefill_keys_values(plan, key, value, cache, block_table, seq_lens, layout, first_seq, tail, mixed)
            return out

        monkeypatch.setattr(impl_module, "flash_prefill_attention", flash_prefill_without_flash_attention)
    layout, bs = impl.layout, impl.layout.block_size
    blocks_per_seq = MAX_MODEL_LEN // bs
    cache = torch.zeros(MAX_NUM_SEQS * blocks_per_seq // 8, kv_heads, layout.bytes_per_head, dtype=torch.uint8)
    # vLLM's persistent input buffers: each step reads a prefix of them
    block_table = torch.zeros(MAX_NUM_SEQS, blocks_per_seq, dtype=torch.int32)
    slot_mapping = torch.zeros(MAX_BATCHED_TOKENS, dtype=torch.int64)
    layer = torch.nn.Module()
    layer.layer_name = "model.layers.0.self_attn.attn"
    width = (heads + 2 * kv_heads) * head_size

    def step(num_tokens: int, metadata):
        """One layer's calls: vLLM's attention layer splits q, k, v out of the fused projection."""
        qkv = torch.randn(num_tokens, width).bfloat16()
        q, k, v = qkv.split([heads * head_size, kv_heads * head_size, kv_heads * head_size], dim=-1)
        q, k, v = q.view(-1, heads, head_size), k.view(-1, kv_heads, head_size), v.view(-1, kv_heads, head_size)
        out = torch.empty(num_tokens, heads * head_size).bfloat16().view(-1, heads, head_size)
        monkeypatch.setattr(impl_module, "layer_metadata", lambda name: metadata)
        impl.do_kv_cache_update(layer, k, v, cache, slot_mapping[:num_tokens])
        impl.forward(layer, q, k, v, cache, metadata, out)

    def common(rows: list[tuple[int, int, int]], request_blocks: list[int]) -> CommonAttentionMetadata:
        query_lens = np.array([new for _, _, new in rows])
        seq = torch.tensor([context + new for _, context, new in rows], dtype=torch.int32)
        qsl = torch.tensor(np.concatenate([[0], np.cumsum(query_lens)]), dtype=torch.int32)
        tokens = []
        for i, (r, context, new) in enumerate(rows):
            first = request_blocks[r]
            block_table[i] = torch.arange(first, first + blocks_per_seq, dtype=torch.int32)
            tokens.append(first * bs + np.arange(context, context + new))
        slot_mapping[: qsl[-1]] = torch.from_numpy(np.concatenate(tokens))
        prompt = torch.tensor([PROMPTS[r] if r < len(PROMPTS) else 1 for r, _, _ in rows], dtype=torch.int32)
        # the request-state slots vLLM's V2 runner hands over (eviction/prompt_lens.py)
        prompt_lens._step_slots = (prompt, np.array([r for r, _, _ in rows], dtype=np.int32))
        return CommonAttentionMetadata(
            query_start_loc=qsl, query_start_loc_cpu=qsl, seq_lens=seq, _seq_lens_cpu=seq, num_reqs=len(rows),
            num_actual_tokens=int(qsl[-1]), max_query_len=int(query_lens.max()), max_seq_len=int(seq.max()),
            block_table_tensor=block_table[: len(rows)], slot_mapping=slot_mapping[: qsl[-1]],
            rswa_prefix_lens=prompt,
        )

    builds = []
    with compile_only() as built:
        def record(phase: str):
            for b in built[len(builds):]:
                builds.append({**{k: v for k, v in asdict(b).items() if k != "ptx"}, "phase": phase,
                               **ptxas_report(b.ptx)})

        step(MAX_BATCHED_TOKENS, None)  # memory profiling: no metadata
        record("profile")
        blocks = [i * (blocks_per_seq // 8) for i in range(MAX_NUM_SEQS)]
        for size in CAPTURE_SIZES:  # decode-only batches, captured with one token of context each
            metadata = builder.build_for_cudagraph_capture(common([(r, 0, 1) for r in range(size)], blocks))
            step(size, metadata)
        record("capture")
        for i, rows in enumerate(scheduled_steps(PROMPTS, OUTPUT_TOKENS, MAX_BATCHED_TOKENS)):
            step(sum(new for _, _, new in rows), builder.build(0, common(rows, blocks)))
            record(f"step {i}")
    return builds


def clear_jit_caches() -> None:
    """Forget every kernel variant built so far, so that each scenario counts its own builds."""
    from triton.runtime.jit import JITFunction

    for module in list(sys.modules.values()):
        if getattr(module, "__name__", "").startswith("vllm_kvpress.triton_kernels"):
            for value in vars(module).values():
                if isinstance(value, JITFunction):
                    value.device_caches.clear()


def main(scenarios: list[dict]) -> dict:
    results = {}
    for scenario in scenarios:
        clear_jit_caches()
        with pytest.MonkeyPatch.context() as monkeypatch, tempfile.TemporaryDirectory() as workdir:
            results[scenario["name"]] = run_scenario(scenario["model"], scenario["settings"], scenario["prefill"],
                                                     monkeypatch, workdir)
    return results


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("engine_steps.py builds GPU kernels: run it without TRITON_INTERPRET")
    sys.path.insert(0, os.path.dirname(__file__))
    results = main(json.loads(sys.argv[1]))
    with open(sys.argv[2], "w") as f:  # not stdout: vLLM logs there
        json.dump(results, f)
