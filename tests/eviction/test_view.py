"""eviction/view.py: the compacted block-table view equals a pure-Python construction on random
tables, and, over block tables built the way the worker builds them from vLLM 0.26.0's real
KVCacheManager (new block ids only, stale ids left in the freed range), logical position j of the
view reads the slot that holds the j-th token the request keeps, even after another request has
been handed and has overwritten the freed blocks."""

import numpy as np
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from vllm import SamplingParams
from vllm.v1.request import Request

from vllm_kvpress.eviction.policy import compacts, kept_prompt_blocks
from vllm_kvpress.eviction.view import shift_blocks, write_compacted_view

from .kv_manager import eviction_kv_manager, request_blocks

BS = 16
BUDGETS = st.one_of(st.integers(BS, 400), st.floats(0.01, 0.99))


def _reference_view(table: list[list[int]], seq_lens, kept, shift, bs):
    """Row by row, as the module docstring draws it: kept blocks, then the table after the gap."""
    rows, lens = [], []
    for row, seq, k, s in zip(table, seq_lens, kept, shift):
        view = row[:k] + row[k + s:] if s else list(row)
        rows.append(view + [row[-1]] * (len(row) - len(view)))  # clamped: the last column repeats
        lens.append(seq - s * bs)
    return rows, lens


# the device fixture is a constant string, safe to share across hypothesis inputs
@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), rows=st.integers(1, 6), width=st.integers(1, 40), extra_rows=st.integers(0, 3))
def test_view_equals_the_reference_on_random_tables(data, rows, width, extra_rows, device):
    table = [data.draw(st.lists(st.integers(1, 10_000), min_size=width, max_size=width)) for _ in range(rows)]
    kept = [data.draw(st.integers(0, width)) for _ in range(rows)]
    shift = [data.draw(st.integers(0, width - k)) for k in kept]
    seq = [data.draw(st.integers((k + s) * BS, width * BS)) for k, s in zip(kept, shift)]
    # preallocated buffers with more rows than the batch (max_num_seqs): only the first rows change
    out_table = torch.full((rows + extra_rows, width), -7, dtype=torch.int32, device=device)
    out_seq = torch.full((rows + extra_rows,), -7, dtype=torch.int32, device=device)
    write_compacted_view(
        torch.tensor(table, dtype=torch.int32, device=device), torch.tensor(seq, dtype=torch.int32, device=device),
        torch.tensor(kept, dtype=torch.int32, device=device), torch.tensor(shift, dtype=torch.int32, device=device),
        out_table[:rows], out_seq[:rows], BS,
    )
    want_table, want_seq = _reference_view(table, seq, kept, shift, BS)
    assert out_table[:rows].tolist() == want_table and out_seq[:rows].tolist() == want_seq
    assert (out_table[rows:] == -7).all() and (out_seq[rows:] == -7).all()
    assert out_table.dtype == torch.int32 and out_seq.dtype == torch.int32


def test_shift_is_zero_until_the_compaction_has_run():
    budget, prompt = 48, 150  # 9 full blocks, 3 kept: 6 freed
    context = np.array([0, 128, 149, 150, 151, 400])  # chunks, the compacting step, then decodes
    assert shift_blocks(np.full(6, prompt), context, budget, BS).tolist() == [0, 0, 0, 6, 6, 6]
    # CUDA-graph padding rows (prompt 0) and prompts the budget covers are never shifted
    assert shift_blocks([0, 40, 150], [5, 60, 150], budget, BS).tolist() == [0, 0, 6]
    assert shift_blocks([150], [150], 0.3, BS).dtype == np.int32


@settings(max_examples=60, deadline=None)
@given(
    prompt=st.integers(1, 400), budget=BUDGETS, chunk=st.integers(1, 200), decodes=st.integers(1, 40),
    seed=st.integers(0, 2**31 - 1),
)
def test_view_position_j_reads_the_jth_kept_token(prompt, budget, chunk, decodes, seed):
    num_blocks = 200
    manager = eviction_kv_manager(budget, BS, num_blocks, max_model_len=1024)
    request = Request("r", list(range(prompt)), SamplingParams(max_tokens=64), None)
    cache = torch.full((num_blocks * BS,), -1, dtype=torch.int64)  # the token id each slot holds
    worker_table: list[int] = []  # the worker's row: new block ids appended, nothing ever removed
    kept = kept_prompt_blocks(prompt, budget, BS)
    generator = torch.Generator().manual_seed(seed)
    # the method's choice: kept * BS prompt tokens, in the order the compaction writes them
    choice = torch.randperm(prompt, generator=generator)[: kept * BS].sort().values.tolist()
    logical = list(range(prompt))  # token ids the request holds, in view order

    def schedule(num_new: int) -> None:
        new_blocks = manager.allocate_slots(request, num_new)
        assert new_blocks is not None
        worker_table.extend(new_blocks.get_block_ids()[0])
        for position in range(request.num_computed_tokens, request.num_computed_tokens + num_new):
            cache[worker_table[position // BS] * BS + position % BS] = position  # cache write, then attention
        request.num_computed_tokens += num_new  # synchronous scheduling: the step's output is processed

    def check_view() -> None:
        seq = request.num_computed_tokens
        context = seq - 1  # a decode step
        shift = shift_blocks([prompt], [context], budget, BS)
        width = len(worker_table) + 3
        table = torch.tensor([worker_table + [0] * 3], dtype=torch.int32)
        out_table = torch.empty(1, width, dtype=torch.int32)
        out_seq = torch.empty(1, dtype=torch.int32)
        write_compacted_view(table, torch.tensor([seq], dtype=torch.int32), torch.tensor([kept], dtype=torch.int32),
                             torch.from_numpy(shift), out_table, out_seq, BS)
        view_len = int(out_seq[0])
        assert view_len == len(logical)
        slots = [int(out_table[0, j // BS]) * BS + j % BS for j in range(view_len)]
        assert cache[slots].tolist() == logical
        # the number the builder skips is the number of blocks the scheduler took back
        assert int(shift[0]) == sum(b.is_null for b in request_blocks(manager, "r"))

    while request.num_computed_tokens < prompt:
        schedule(min(chunk, prompt - request.num_computed_tokens))
    if compacts(prompt, budget, BS):  # after the compacting step's attention
        for j, token in enumerate(choice):
            cache[worker_table[j // BS] * BS + j % BS] = token
        logical = choice + list(range(prompt // BS * BS, prompt))
    freed_ids = set(worker_table[kept : prompt // BS])

    request.append_output_token_ids(prompt)
    schedule(1)  # the first schedule after the processed prompt frees the evicted blocks
    intruder = Request("x", list(range(10_000, 10_000 + len(freed_ids) * BS)), SamplingParams(max_tokens=1), None)
    taken = manager.allocate_slots(intruder, len(freed_ids) * BS) if freed_ids else None
    if taken is not None:  # another request is handed the freed blocks and writes them
        taken_ids = taken.get_block_ids()[0]
        # unhashed freed blocks are reused first (one may have gone to this request's new tail block)
        assert freed_ids - set(worker_table[prompt // BS :]) <= set(taken_ids)
        for block_id in taken_ids:
            cache[block_id * BS : (block_id + 1) * BS] = -2
    logical.append(prompt)
    check_view()
    for i in range(1, decodes):
        request.append_output_token_ids(prompt + i)
        schedule(1)
        logical.append(prompt + i)
        check_view()
