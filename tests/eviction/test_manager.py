"""The scheduler side of eviction with vLLM 0.26.0's real KVCacheManager, coordinator and BlockPool
(CPU): blocks of evicted prompt tokens (and, with decode-time eviction, of each round's tokens)
return to the pool exactly once and only after the compacting step was processed, nothing leaks or
is handed out twice, preemption (free + re-prefill) works, and vLLM builds our manager for a
model's worth of our specs."""

from dataclasses import dataclass

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from vllm import SamplingParams
from vllm.v1.core.kv_cache_manager import KVCacheManager
from vllm.v1.kv_cache_interface import FullAttentionSpec
from vllm.v1.request import Request

from vllm_kvpress.backend.block_manager import EvictionBlockManager
from vllm_kvpress.backend.spec import KVPressEvictionSpec
from vllm_kvpress.eviction.policy import compacts, freed_end, kept_blocks
from vllm_kvpress.vllm_patches import register_eviction_block_manager

from .kv_manager import eviction_kv_manager, eviction_spec, request_blocks

BS, NUM_BLOCKS, MAX_LEN = 16, 600, 2048


def _spec(budget, bytes_per_head=100) -> KVPressEvictionSpec:
    return eviction_spec(budget, BS, bytes_per_head)


def _manager(budget, enable_caching=False, interval_blocks=0) -> KVCacheManager:
    return eviction_kv_manager(budget, BS, NUM_BLOCKS, MAX_LEN, enable_caching, interval_blocks)


_blocks = request_blocks


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass
class _Sim:
    """One request driven the way vLLM 0.26.0's scheduler drives it: `allocate_slots`, then
    `num_computed_tokens` and `num_in_flight_tokens` grow at schedule time, and the in-flight count
    drops when the step's output is processed: at once (synchronous scheduling) or after the next
    step of the request was scheduled (async scheduling keeps one step in flight)."""

    request: Request
    chunk: int
    async_: bool
    interval_blocks: int = 0
    """Decode-time eviction every this many blocks (0: after the prompt only)."""
    pending: int = 0
    """Tokens of the step still in flight (async)."""
    freed_end: int | None = None
    """End of the range [kept, freed_end) the model says is freed now (None: nothing yet)."""

    def kept(self, budget) -> int:
        return kept_blocks(self.request.num_prompt_tokens, budget, BS, None, self.interval_blocks)

    @property
    def freed(self) -> bool:
        return self.freed_end is not None


def _schedule(manager: KVCacheManager, sim: _Sim, budget) -> None:
    request, pool = sim.request, manager.block_pool
    if request.num_computed_tokens >= request.num_tokens:  # decode: the last sampled token is new
        request.append_output_token_ids(7)
    num_new = min(sim.chunk, request.num_tokens - request.num_computed_tokens)
    prompt = request.num_prompt_tokens
    processed = request.num_computed_tokens - request.num_in_flight_tokens
    held_before = len(_blocks(manager, request.request_id))
    free_before = pool.get_num_free_blocks()

    assert manager.allocate_slots(request, num_new) is not None

    allocated = len(_blocks(manager, request.request_id)) - held_before
    returned = pool.get_num_free_blocks() - free_before + allocated
    kept = sim.kept(budget)
    before = kept if sim.freed_end is None else sim.freed_end
    end = freed_end(prompt, processed, budget, BS, None, sim.interval_blocks)
    # exactly the newly evicted range comes back, once, at the first schedule that sees the
    # compacting step processed
    assert returned == end - before
    if end > kept:
        sim.freed_end = end

    request.num_computed_tokens += num_new
    request.num_in_flight_tokens += num_new
    if sim.async_:
        request.num_in_flight_tokens -= sim.pending
        sim.pending = num_new
    else:
        request.num_in_flight_tokens -= num_new


def _preempt(manager: KVCacheManager, sim: _Sim) -> None:
    """Recompute preemption, as `Scheduler._preempt_request`: every block back, prefill from 0."""
    manager.free(sim.request)
    sim.request.num_computed_tokens = 0
    sim.request.num_in_flight_tokens = 0
    sim.pending, sim.freed_end = 0, None


def _check_blocks(manager: KVCacheManager, sim: _Sim, budget) -> None:
    """The request's block list, entry by entry: one per logical block, null exactly on the freed range."""
    request = sim.request
    blocks = _blocks(manager, request.request_id)
    assert len(blocks) == _cdiv(request.num_computed_tokens, BS)
    kept = sim.kept(budget)
    expected_null = [sim.freed and kept <= j < sim.freed_end for j in range(len(blocks))]
    assert [b.is_null for b in blocks] == expected_null


def _check_pool(manager: KVCacheManager, live: dict[str, _Sim]) -> None:
    pool = manager.block_pool
    held = [b.block_id for sim in live.values() for b in _blocks(manager, sim.request.request_id) if not b.is_null]
    free = [b.block_id for b in pool.free_block_queue.get_all_free_blocks()]
    assert len(held) == len(set(held))  # no block handed to two owners
    assert len(free) == len(set(free))  # none freed twice
    assert not set(held) & set(free)  # none free while held
    assert len(held) + len(free) == NUM_BLOCKS - 1  # none leaked (block 0 is vLLM's null block)
    for block_id in held:
        assert pool.blocks[block_id].ref_cnt == 1


_OPS = st.lists(st.tuples(st.sampled_from(["step", "step", "step", "preempt", "finish"]), st.integers(0, 3)),
                min_size=1, max_size=60)


@settings(max_examples=80, deadline=None)
@given(
    requests=st.lists(st.tuples(st.integers(1, 500), st.integers(1, 300), st.booleans()), min_size=1, max_size=4),
    budget=st.one_of(st.integers(BS, 400), st.floats(0.01, 0.99)),
    interval_blocks=st.sampled_from([0, 0, 1, 2]),
    ops=_OPS,
)
def test_evicted_blocks_return_once_and_nothing_leaks(requests, budget, interval_blocks, ops):
    manager = _manager(budget, interval_blocks=interval_blocks)
    live = {
        f"r{i}": _Sim(Request(f"r{i}", list(range(1, p + 1)), SamplingParams(max_tokens=64), None), chunk, async_,
                      interval_blocks)
        for i, (p, chunk, async_) in enumerate(requests)
    }
    for op, index in ops:
        if not live:
            break
        sim = list(live.values())[index % len(live)]
        if op == "step" and sim.request.num_tokens < MAX_LEN - 1:
            _schedule(manager, sim, budget)
        elif op == "preempt":
            _preempt(manager, sim)
        elif op == "finish":
            manager.free(sim.request)
            del live[sim.request.request_id]
        for other in live.values():
            _check_blocks(manager, other, budget)
        _check_pool(manager, live)
    for sim in list(live.values()):  # every request runs its prompt to completion, and one decode
        while sim.request.num_computed_tokens < sim.request.num_tokens:
            _schedule(manager, sim, budget)
        _schedule(manager, sim, budget)
        _schedule(manager, sim, budget)  # async: the compacting step's output is processed by now
        if not interval_blocks:
            assert sim.freed == compacts(sim.request.num_prompt_tokens, budget, BS)
        _check_blocks(manager, sim, budget)
    _check_pool(manager, live)
    for sim in live.values():
        manager.free(sim.request)
    _check_pool(manager, {})


def test_freeing_waits_for_the_processed_prompt():
    manager = _manager(64)  # 4 blocks kept
    sim = _Sim(Request("r", list(range(300)), SamplingParams(max_tokens=8), None), chunk=128, async_=True)
    for _ in range(3):  # 128 + 128 + 44: the last chunk completes the prompt (18 full blocks + 12)
        _schedule(manager, sim, 64)
    assert sim.request.num_computed_tokens == 300 and not any(b.is_null for b in _blocks(manager, "r"))
    _schedule(manager, sim, 64)  # async: the compacting chunk is still in flight, nothing is freed
    assert not sim.freed and not any(b.is_null for b in _blocks(manager, "r"))
    _schedule(manager, sim, 64)  # its output was processed: blocks [4, 18) return
    assert [b.is_null for b in _blocks(manager, "r")] == [False] * 4 + [True] * 14 + [False]
    free = manager.block_pool.get_num_free_blocks()
    for _ in range(2):  # later schedules free nothing more (12 prompt + 4 decoded tokens fill block 18)
        _schedule(manager, sim, 64)
    assert manager.block_pool.get_num_free_blocks() == free


def test_decode_time_eviction_frees_each_round_after_it_was_processed():
    manager = _manager(64, interval_blocks=2)  # 4 blocks kept; a round every 2 blocks after block 18
    sim = _Sim(Request("r", list(range(300)), SamplingParams(max_tokens=64), None), chunk=128, async_=False,
               interval_blocks=2)
    for _ in range(4):  # the prompt (3 chunks) and the first decode, which sees it processed
        _schedule(manager, sim, 64)
    assert [b.is_null for b in _blocks(manager, "r")] == [False] * 4 + [True] * 14 + [False]
    while sim.request.num_computed_tokens < 20 * BS:  # decodes up to the first round's point
        _schedule(manager, sim, 64)
    assert sim.freed_end == 18  # the step that reached it was not processed yet
    _schedule(manager, sim, 64)
    assert sim.freed_end == 20
    assert [b.is_null for b in _blocks(manager, "r")] == [False] * 4 + [True] * 16 + [False]
    held = sum(not b.is_null for b in _blocks(manager, "r"))
    while sim.request.num_computed_tokens < 40 * BS:  # however long it decodes: kept + at most T + 1
        _schedule(manager, sim, 64)
        assert sum(not b.is_null for b in _blocks(manager, "r")) <= 4 + 2 + 1
    assert sim.freed_end == 38 and held == 5


def test_decode_time_eviction_keeps_the_budget_of_a_short_prompt():
    manager = _manager(64, interval_blocks=1)  # 4 blocks: a 40-token prompt (2 full blocks) keeps all
    sim = _Sim(Request("r", list(range(40)), SamplingParams(max_tokens=64), None), chunk=64, async_=False,
               interval_blocks=1)
    while sim.request.num_computed_tokens < 5 * BS + 1:  # decodes fill the budget's 4 blocks, then 1 more
        _schedule(manager, sim, 64)
    assert sim.freed_end == 5  # the first round that evicts: block 4 of 5 complete ones
    assert [b.is_null for b in _blocks(manager, "r")] == [False] * 4 + [True] + [False]


def test_budget_covering_the_prompt_frees_nothing():
    manager = _manager(0.99)
    sim = _Sim(Request("r", list(range(40)), SamplingParams(max_tokens=8), None), chunk=64, async_=False)
    for _ in range(4):
        _schedule(manager, sim, 0.99)
    assert not sim.freed and not any(b.is_null for b in _blocks(manager, "r"))


def test_no_prefix_cache_hits_or_hashing_even_with_caching_on():
    from vllm.utils.hashing import sha256
    from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash

    init_none_hash(sha256)
    manager = _manager(32, enable_caching=True)
    hasher = get_request_block_hasher(BS, sha256)
    first = Request("a", list(range(100)), SamplingParams(max_tokens=8), None, block_hasher=hasher)
    assert manager.allocate_slots(first, 100) is not None
    first.num_computed_tokens = 100
    assert all(b.block_hash is None for b in _blocks(manager, "a"))  # no block enters the prefix cache
    second = Request("b", list(range(100)), SamplingParams(max_tokens=8), None, block_hasher=hasher)
    hits, num_hit_tokens, _ = manager.get_computed_blocks(second)
    assert num_hit_tokens == 0 and all(len(group) == 0 for group in hits.blocks)
    assert manager.get_num_common_prefix_blocks("a") == [0]


def test_manager_refuses_the_placeholder_budget():
    from vllm.v1.core.block_pool import BlockPool

    pool = BlockPool(num_gpu_blocks=8, enable_caching=False, hash_block_size=BS)
    with pytest.raises(ValueError, match="positive budget"):
        EvictionBlockManager(_spec(0), block_pool=pool, enable_caching=False, kv_cache_group_id=0,
                             scheduler_block_size=BS)


def test_registration_is_idempotent_and_keeps_the_built_ins():
    from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager
    from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry

    register_eviction_block_manager()
    register_eviction_block_manager()
    assert KVCacheSpecRegistry.get_manager_class(_spec(64)) is EvictionBlockManager
    plain = FullAttentionSpec(block_size=BS, num_kv_heads=2, head_size=64, dtype=torch.bfloat16)
    assert KVCacheSpecRegistry.get_manager_class(plain) is FullAttentionManager


def test_registration_into_an_empty_registry_registers_the_built_ins_first(monkeypatch):
    """The registry's pitfall: vLLM registers its built-ins only while the registry is empty."""
    from vllm.v1 import kv_cache_spec_registry
    from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry

    monkeypatch.setattr(kv_cache_spec_registry, "_REGISTRY_KVCACHESPEC_LIST", {})
    register_eviction_block_manager()
    plain = FullAttentionSpec(block_size=BS, num_kv_heads=2, head_size=64, dtype=torch.bfloat16)
    KVCacheSpecRegistry.check_kv_cache_spec_registry({"plain": plain, "ours": _spec(64)})


def test_group_merge_keeps_the_budget_and_refuses_mixed_ones():
    merged = KVPressEvictionSpec.merge([_spec(0.25), _spec(0.25)])
    assert type(merged) is KVPressEvictionSpec and merged == _spec(0.25)
    with pytest.raises(AssertionError, match="share one page layout"):
        KVPressEvictionSpec.merge([_spec(0.25), _spec(512)])


def _model_config(vllm_config, layer_specs):
    from vllm.v1.core.kv_cache_utils import generate_scheduler_kv_cache_config, get_kv_cache_configs

    configs = get_kv_cache_configs(vllm_config, [layer_specs], [1 << 30])
    return configs[0], generate_scheduler_kv_cache_config(configs)


LAYERS = [f"model.layers.{i}.self_attn.attn" for i in range(4)]


def test_vllm_builds_our_manager_for_a_model_of_our_layers(engine_config):
    vllm_config = engine_config(block_size=BS)
    register_eviction_block_manager()
    _, scheduler_config = _model_config(vllm_config, {name: _spec(0.25) for name in LAYERS})
    assert len(scheduler_config.kv_cache_groups) == 1
    assert scheduler_config.kv_cache_groups[0].kv_cache_spec == _spec(0.25)
    manager = KVCacheManager(scheduler_config, max_model_len=MAX_LEN, scheduler_block_size=BS,
                             hash_block_size=BS, enable_caching=False)
    assert type(manager.coordinator.single_type_managers[0]) is EvictionBlockManager


def test_layers_with_different_page_sizes_form_one_group_with_our_manager(engine_config):
    """Per-layer page sizes (e.g. bf16 boundary layers): vLLM makes one uniform-type group and
    builds its manager from an arbitrary layer's spec, which is ours for every layer."""
    from vllm.v1.kv_cache_interface import UniformTypeKVCacheSpecs

    vllm_config = engine_config(block_size=BS)
    register_eviction_block_manager()
    specs = {name: _spec(0.25, bytes_per_head=100 if i else 300) for i, name in enumerate(LAYERS)}
    worker_config, scheduler_config = _model_config(vllm_config, specs)
    assert isinstance(worker_config.kv_cache_groups[0].kv_cache_spec, UniformTypeKVCacheSpecs)
    manager = KVCacheManager(scheduler_config, max_model_len=MAX_LEN, scheduler_block_size=BS,
                             hash_block_size=BS, enable_caching=False)
    assert [type(m) for m in manager.coordinator.single_type_managers] == [EvictionBlockManager]


def test_our_layers_never_join_a_plain_full_attention_group_under_our_type():
    """A group is uniform-type when every layer is an instance of the first layer's base type; with
    our spec as its own base, plain layers do not silently join a group that gets our manager."""
    from vllm.v1.kv_cache_interface import UniformTypeKVCacheSpecs

    register_eviction_block_manager()
    plain = FullAttentionSpec(block_size=BS, num_kv_heads=2, head_size=64, dtype=torch.bfloat16)
    assert not UniformTypeKVCacheSpecs.is_uniform_type({"ours": _spec(64), "plain": plain})
    assert UniformTypeKVCacheSpecs.is_uniform_type({"a": _spec(64), "b": _spec(64, bytes_per_head=300)})


def test_evicting_config_gets_the_eviction_spec(engine_config, monkeypatch):
    """Through `compressed_spec_for_layer`; a quantizing method keeps the plain compressed spec."""
    from vllm_kvpress.backend import spec as spec_module
    from vllm_kvpress.backend import state
    from vllm_kvpress.config import load_method_config

    base = FullAttentionSpec(block_size=64, num_kv_heads=2, head_size=64, dtype=torch.bfloat16)
    kivi = engine_config(additional_config={"kv_compression": {"method": "kivi"}})
    assert type(spec_module.compressed_spec_for_layer(base, kivi)) is spec_module.KVPressAttentionSpec

    evicting = load_method_config({"method": "snapkv", "budget": 256, "window": 32, "decode_interval": 128})
    monkeypatch.setattr(state, "method_from_vllm_config", lambda vllm_config: evicting)
    spec = spec_module.compressed_spec_for_layer(base, vllm_config=None)
    assert type(spec) is KVPressEvictionSpec and (spec.budget, spec.interval_blocks) == (256, 2)
    assert spec.page_size_bytes == 2 * evicting.page_layout(64).bytes_per_head
    assert (spec.block_size, spec.num_kv_heads, spec.head_size, spec.dtype) == (64, 2, 64, torch.uint8)
