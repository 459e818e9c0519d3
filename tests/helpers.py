"""Helpers shared by tests: building compressed caches and batches the way vLLM lays them out."""

import json
import subprocess
import sys
import tempfile
from dataclasses import dataclass

import torch

from vllm_kvpress.config import load_method_config
from vllm_kvpress.layout import PageLayout


def run_script(script: str, *args: str) -> tuple[dict, str]:
    """Run `python -c script args` in its own process and return the JSON its last `RESULT ` line
    carries, and its whole output. It runs in the temporary directory because `-c` puts the working
    directory first on sys.path, and from the repository root the source tree's vllm_kvpress (which
    lacks the installed triton_kernels and configs) would shadow the installed package."""
    out = subprocess.run([sys.executable, "-c", script, *args], cwd=tempfile.gettempdir(), check=False,
                         capture_output=True, text=True, timeout=900)
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-5000:]
    line = [row for row in out.stdout.splitlines() if row.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):]), log


def layout_for(method: str, head_size: int, **overrides) -> tuple[PageLayout, int]:
    config = load_method_config({"method": method, **overrides})
    return config.page_layout(head_size), config.pages.power_iters


@dataclass
class Batch:
    """A vLLM-style batch: `context` tokens already in the pages, `query` new tokens per sequence."""

    context_lens: list[int]
    query_lens: list[int]
    block_table: torch.Tensor
    full_k: list[torch.Tensor]
    full_v: list[torch.Tensor]

    @property
    def seq_lens(self) -> list[int]:
        return [c + q for c, q in zip(self.context_lens, self.query_lens)]

    def slots(self, i: int, start: int, end: int, block_size: int) -> torch.Tensor:
        row = self.block_table[i].tolist()
        return torch.tensor([row[t // block_size] * block_size + t % block_size for t in range(start, end)],
                            dtype=torch.int32)

    def new_kv(self):
        k = torch.cat([k[c:] for k, c in zip(self.full_k, self.context_lens)])
        v = torch.cat([v[c:] for v, c in zip(self.full_v, self.context_lens)])
        return k, v

    def new_slots(self, block_size: int) -> torch.Tensor:
        return torch.cat([self.slots(i, c, c + q, block_size)
                          for i, (c, q) in enumerate(zip(self.context_lens, self.query_lens))])

    def write_context(self, write, block_size: int) -> None:
        """Write every sequence's context as one earlier step did: write(key, value, slot_mapping)."""
        device = self.block_table.device
        for i, c in enumerate(self.context_lens):
            if c:
                write(self.full_k[i][:c], self.full_v[i][:c], self.slots(i, 0, c, block_size).to(device))

    def write_new(self, write, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this step's tokens of every sequence in one call; returns their (key, value)."""
        k_new, v_new = self.new_kv()
        write(k_new, v_new, self.new_slots(block_size).to(self.block_table.device))
        return k_new, v_new

    def query_start_loc(self) -> torch.Tensor:
        return torch.tensor([0] + torch.tensor(self.query_lens).cumsum(0).tolist(), dtype=torch.int32)


def make_batch(context_lens, query_lens, num_kv_heads, head_size, block_size, num_blocks=None,
               dtype=torch.bfloat16, device="cpu", channel_outlier=4.0) -> Batch:
    """Random K/V (never zeros; one strong K outlier channel, as real keys have) and a shuffled block table."""
    seq_lens = [c + q for c, q in zip(context_lens, query_lens)]
    max_blocks = max(-(-s // block_size) for s in seq_lens)
    num_blocks = num_blocks or len(seq_lens) * max_blocks + 3
    ids = torch.randperm(num_blocks)[: len(seq_lens) * max_blocks].reshape(len(seq_lens), max_blocks)
    full_k, full_v = [], []
    for s in seq_lens:
        k = torch.randn(s, num_kv_heads, head_size)
        k[:, :, 1] = k[:, :, 1] * channel_outlier + channel_outlier
        full_k.append(k.to(dtype).to(device))
        full_v.append(torch.randn(s, num_kv_heads, head_size).to(dtype).to(device))
    return Batch(list(context_lens), list(query_lens), ids.int().to(device), full_k, full_v)


def write_batch(batch: Batch, layout: PageLayout, power_iters: int, spare_blocks: int = 0):
    """A cache holding each sequence's context, written as an earlier step did, and this step's
    tokens, written in one call as the step's cache update does: (cache, k_new, v_new)."""
    from vllm_kvpress.triton_kernels.cache_write import write_kv_pages

    num_kv_heads = batch.full_k[0].shape[1]
    cache = torch.zeros(int(batch.block_table.max()) + 1 + spare_blocks, num_kv_heads, layout.bytes_per_head,
                        dtype=torch.uint8, device=batch.block_table.device)

    def write(k, v, slots):
        write_kv_pages(k, v, cache, slots, layout, power_iters=power_iters)

    batch.write_context(write, layout.block_size)
    k_new, v_new = batch.write_new(write, layout.block_size)
    return cache, k_new, v_new


def write_batch_exact_tail(batch: Batch, layout: PageLayout, power_iters: int, request_slots: list[int],
                           spare_blocks: int = 0):
    """`write_batch` for a layout with `exact_tail_keys`: sequence i keeps its partial block's keys
    under request-state slot request_slots[i] of a fresh tail: (cache, tail, k_new, v_new)."""
    from vllm_kvpress.triton_kernels.cache_write import write_kv_pages
    from vllm_kvpress.triton_kernels.exact_tail import exact_tail_buffer

    device, bs = batch.block_table.device, layout.block_size
    num_kv_heads = batch.full_k[0].shape[1]
    cache = torch.zeros(int(batch.block_table.max()) + 1 + spare_blocks, num_kv_heads, layout.bytes_per_head,
                        dtype=torch.uint8, device=device)
    tail = exact_tail_buffer(max(request_slots) + 1, num_kv_heads, layout, batch.full_k[0].dtype, device)
    for i, c in enumerate(batch.context_lens):  # each context as an earlier step of its own wrote it
        if c:
            token_slots = torch.full((c,), request_slots[i], dtype=torch.int32, device=device)
            write_kv_pages(batch.full_k[i][:c], batch.full_v[i][:c], cache, batch.slots(i, 0, c, bs).to(device),
                           layout, power_iters=power_iters, tail=(tail, token_slots))
    k_new, v_new = batch.new_kv()
    token_slots = torch.repeat_interleave(torch.tensor(request_slots, dtype=torch.int32),
                                          torch.tensor(batch.query_lens)).to(device)
    write_kv_pages(k_new, v_new, cache, batch.new_slots(bs).to(device), layout, power_iters=power_iters,
                   tail=(tail, token_slots))
    return cache, tail, k_new, v_new


def single_request_step_metadata(builder, block_table, context, seq_len, slot_mapping, prompt_len, device,
                                 request_slot: int | None = None):
    """The builder's metadata of one request's step over tokens [context, seq_len), with the
    prompt length vLLM's V2 runner hands evicting methods (`rswa_prefix_lens`) and, given
    `request_slot`, the request-state slot its prepare_inputs patch keeps beside it."""
    import numpy as np
    from vllm.v1.attention.backend import CommonAttentionMetadata

    from vllm_kvpress.eviction import prompt_lens

    query_len = seq_len - context
    qsl = torch.tensor([0, query_len], dtype=torch.int32)
    seq = torch.tensor([seq_len], dtype=torch.int32)
    common = CommonAttentionMetadata(
        query_start_loc=qsl.to(device), query_start_loc_cpu=qsl, seq_lens=seq.to(device), _seq_lens_cpu=seq,
        num_reqs=1, num_actual_tokens=query_len, max_query_len=query_len, max_seq_len=seq_len,
        block_table_tensor=block_table, slot_mapping=slot_mapping,
        rswa_prefix_lens=torch.tensor([prompt_len], dtype=torch.int32),
    )
    if request_slot is not None:  # what the runner patch keeps for this step's prompt lengths
        prompt_lens._step_slots = (common.rswa_prefix_lens, np.array([request_slot], dtype=np.int32))
    return builder.build(0, common)


def use_cpu_platform(monkeypatch) -> None:
    """vLLM's CUDA wheel cannot infer a device on a CPU-only machine ("Failed to infer device
    type"); pretending to be its CPU platform lets engine configs and the CLI parser be built."""
    import sys

    import vllm.platforms
    from vllm.platforms.cpu import CpuPlatform

    cpu = CpuPlatform()
    monkeypatch.setattr(vllm.platforms, "_current_platform", cpu, raising=False)
    monkeypatch.setattr(vllm.platforms, "current_platform", cpu)
    # vLLM modules imported earlier in the session bound the platform of that moment by name
    # (`from vllm.platforms import current_platform`): a test run after them would see it
    for name, module in list(sys.modules.items()):
        if name.startswith("vllm.") and module is not vllm.platforms and "current_platform" in vars(module):
            monkeypatch.setattr(module, "current_platform", cpu)


def use_v2_runner(monkeypatch) -> None:
    """Engine configs made from here on are as vLLM makes them on a GPU, where it runs its V2 model
    runner (on a CPU platform vLLM picks V1: there is no Triton attention backend there). Set before
    the config is made: the plugin checks the runner and resolves tail_keys auto against it at
    creation; vLLM's check that this platform can run V2 is left out."""
    from vllm.config import VllmConfig

    monkeypatch.setattr(VllmConfig, "use_v2_model_runner", property(lambda self: True))
    monkeypatch.setattr(VllmConfig, "_validate_v2_model_runner", lambda self: None)


def v2_runner_config(engine_config, monkeypatch, settings: dict, block_size: int):
    """The engine config for `settings` as vLLM makes it on a GPU (`use_v2_runner`)."""
    use_v2_runner(monkeypatch)
    return engine_config(block_size=block_size, additional_config={"kv_compression": settings})


def impl_for(vllm_config, monkeypatch, heads: int, kv_heads: int, head_size: int):
    """KVPressImpl of the config's method, made under the config as vLLM makes each layer's."""
    from vllm.config import set_current_vllm_config

    from vllm_kvpress.backend import impl as impl_module
    from vllm_kvpress.config import load_method_config

    config = load_method_config(vllm_config.additional_config["kv_compression"])
    monkeypatch.setattr(impl_module, "current_method", lambda: config)
    with set_current_vllm_config(vllm_config):
        return impl_module.KVPressImpl(heads, head_size, head_size ** -0.5, kv_heads, None, None, "auto")


def reference_step(reference, q, k_new, v_new, scale: float):
    """The reference engine's attention for a step of the worker (prefill chunks attend to their
    fresh K/V, and a sparse prefill's chunks to the context the method picks), and the stored
    tokens its `append` returned."""
    from vllm_kvpress.reference.attention import causal_attention

    stored_k, stored_v = reference.append(k_new.cpu(), v_new.cpu())
    attended_k, attended_v = stored_k, stored_v
    if q.shape[0] > 1:
        past = stored_k.shape[0] - q.shape[0]
        attended_k = torch.cat([stored_k[:past], k_new.cpu().float()])
        attended_v = torch.cat([stored_v[:past], v_new.cpu().float()])
        attended_k, attended_v = reference.chunk_keys_values(q.cpu(), attended_k, attended_v, past, scale)
    return causal_attention(q.cpu(), attended_k, attended_v, scale), stored_k, stored_v


def run_steps_against_reference(impl, builder, method, steps, prompt_len: int, num_heads: int, device,
                                request_slot: int | None = None, check=None):
    """One request's steps [(context, seq_len)] through the metadata builder and the impl (the
    cache update, then attention, then any compaction), each step's output compared with the
    reference engine's attention over its own pages, which compact as the worker's do
    (`SequencePages.compact_if_due`). `check(context, seq_len, metadata)` runs on every step's
    metadata (its buffers are the builder's persistent ones: read them there). Returns the
    reference's `SequencePages`."""
    import types

    from vllm_kvpress.eval.engines.reference import SequencePages
    from vllm_kvpress.eviction.attention_mass import ChosenRatios

    layer = types.SimpleNamespace(layer_name="model.layers.0.self_attn.attn")  # what vLLM's layer hands the impl
    layout, bs = impl.layout, impl.layout.block_size
    kv_heads, head_size, scale = impl.num_kv_heads, impl.head_size, impl.scale
    batch = make_batch([0], [steps[-1][1]], kv_heads, head_size, bs, device=device)
    k_all, v_all = batch.full_k[0], batch.full_v[0]
    cache = torch.zeros(batch.block_table.max() + 1, kv_heads, layout.bytes_per_head, dtype=torch.uint8, device=device)
    reference = SequencePages(layout, method.pages.power_iters, kv_heads, steps[-1][1], torch.device("cpu"),
                              eviction=method.eviction, prompt_len=prompt_len)
    for context, seq_len in steps:
        slots = batch.slots(0, context, seq_len, bs).to(device)
        metadata = single_request_step_metadata(builder, batch.block_table, context, seq_len, slots, prompt_len,
                                                device, request_slot=request_slot)
        if check is not None:
            check(context, seq_len, metadata)
        k_new, v_new = k_all[context:seq_len], v_all[context:seq_len]
        impl.do_kv_cache_update(None, k_new, v_new, cache, slots)
        q = torch.randn(seq_len - context, num_heads, head_size, device=device).bfloat16()
        out = torch.full_like(q, float("nan"))
        impl.forward(layer, q, k_new, v_new, cache, metadata, out)
        expected, stored_k, stored_v = reference_step(reference, q, k_new, v_new, scale)
        torch.testing.assert_close(out.float().cpu(), expected, atol=3e-2, rtol=2e-2,
                                   msg=f"step ({context}, {seq_len})")
        with ChosenRatios.at_layer(0):  # as the reference engine's layer 0
            reference.compact_if_due(q.cpu(), stored_k, stored_v, scale)
    return reference


def reference_layer_call(pages, q_new, k_seen, v_seen, scale: float):
    """One layer's attention through the reference engine's attention function, as transformers
    calls it: q_new [T, num_heads, D], k_seen/v_seen [S, num_kv_heads, D] (the model's whole cache);
    returns [T, num_heads, D]."""
    import types

    from vllm_kvpress.eval.engines.reference import PAGES_KWARG, compressed_attention_forward

    out, _ = compressed_attention_forward(
        types.SimpleNamespace(layer_idx=0), q_new.transpose(0, 1)[None], k_seen.transpose(0, 1)[None],
        v_seen.transpose(0, 1)[None], attention_mask=None, scaling=scale, **{PAGES_KWARG: [pages]},
    )
    return out[0]


def reference_layer_steps(pages, q, k, v, step_lengths: list[int], scale: float) -> list:
    """`reference_layer_call` over consecutive steps of `step_lengths` tokens of q/k/v: each step's output."""
    outs, seen = [], 0
    for num_new in step_lengths:
        end = seen + num_new
        outs.append(reference_layer_call(pages, q[seen:end], k[:end], v[:end], scale))
        seen = end
    return outs


def llama_rotary_embedding(head_size: int, theta: float = 10000.0):
    """transformers' Llama RoPE (default type) as the model's `rotary_emb` is called:
    (x, position_ids [1, T]) -> cos, sin [1, T, head_size]."""

    def rotary_embedding(x: torch.Tensor, position_ids: torch.Tensor):
        inv_freq = 1.0 / theta ** (torch.arange(0, head_size, 2, dtype=torch.float32) / head_size)
        angles = position_ids[0, :, None].float() * inv_freq[None]
        emb = torch.cat([angles, angles], dim=-1)
        return emb.cos()[None], emb.sin()[None]

    return rotary_embedding
