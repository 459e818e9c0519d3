"""triton_kernels/recent_queries.py (TRITON_INTERPRET=1 on CPU): every row's last W queries land in
its request slot at position % W, over steps of decodes, short chunks and chunks longer than W."""

import pytest
import torch
from vllm_kvpress.triton_kernels.recent_queries import recent_queries, recent_query_ring, write_recent_queries

HEADS, HEAD_SIZE, WINDOW, SLOTS = 6, 64, 8, 5  # 6 heads: a head count that is not a power of two


def _step(ring, history, rows, device):
    """One step over rows [(slot, context, new tokens)]: the kernel's write, and the reference's
    record of every query each slot has seen, by position."""
    counts = [n for _, _, n in rows]
    query = torch.randn(sum(counts) + 3, HEADS, HEAD_SIZE, device=device).bfloat16()  # + padded tokens
    starts = torch.tensor([0] + counts, dtype=torch.int32).cumsum(0).to(torch.int32)
    seq_lens = torch.tensor([c + n for _, c, n in rows], dtype=torch.int32)
    slots = torch.tensor([s for s, _, _ in rows], dtype=torch.int32)
    write_recent_queries(query, ring, slots.to(device), starts.to(device), seq_lens.to(device), len(rows))
    for (slot, context, n), start in zip(rows, starts.tolist()):
        for i in range(n):
            history.setdefault(slot, {})[context + i] = query[start + i]


def test_each_slot_holds_its_last_window_queries(device):
    ring = recent_query_ring(SLOTS - 1, WINDOW, HEADS, HEAD_SIZE, torch.bfloat16, device)
    ring.fill_(float("nan"))
    history = {}
    spare = SLOTS - 1
    # slot 2: a 20-token chunk (longer than W), then decodes; slot 0: a 3-token chunk, then a
    # 6-token one (its last W span both); slot 3: decodes only; a padding row (no tokens) last
    _step(ring, history, [(2, 0, 20), (0, 0, 3), (3, 40, 1), (spare, 0, 0)], device)
    _step(ring, history, [(3, 41, 1), (2, 20, 1), (0, 3, 6)], device)
    for step in range(5):
        _step(ring, history, [(0, 9 + step, 1), (2, 21 + step, 1), (3, 42 + step, 1), (spare, 0, 0)], device)
    for slot, seen in history.items():
        seq_len = max(seen) + 1
        queries, positions = recent_queries(ring, slot, seq_len)
        assert positions.tolist() == list(range(seq_len - WINDOW, seq_len))
        for query, position in zip(queries, positions.tolist()):
            if position in seen:
                assert torch.equal(query, seen[position]), (slot, position)
            else:  # slot 3 started at position 40: earlier positions were never written
                assert slot == 3 and position < 40 and torch.isnan(query.float()).all()
    assert torch.isnan(ring[1].float()).all()  # a slot no row named stays untouched
    assert torch.isnan(ring[spare].float()).all()  # padding rows have no tokens and write nothing


def test_the_ring_refuses_queries_of_another_shape(device):
    ring = recent_query_ring(2, WINDOW, HEADS, HEAD_SIZE, torch.bfloat16, device)
    one = torch.zeros(2, dtype=torch.int32, device=device)
    with pytest.raises(ValueError, match="does not take queries"):
        write_recent_queries(torch.randn(1, HEADS, 128, device=device).bfloat16(), ring, one, one, one, 1)
