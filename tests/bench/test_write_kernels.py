"""The cache-write microbenchmark's inputs and argument checks (the timing itself needs the GPU)."""

import pytest
import torch
from vllm_kvpress.triton_kernels.cache_write import completing_tokens, max_completions

from vllm_kvpress.bench import write_kernels


@pytest.fixture
def on_cpu(monkeypatch):
    monkeypatch.setattr(torch.Tensor, "cuda", lambda self: self)  # the slot makers move to the GPU


def test_a_decode_step_completes_exactly_the_asked_blocks(on_cpu):
    slots = write_kernels.decode_step_slots(64, 3, 64, torch)
    assert slots.shape == (64,) and len(set((slots // 64).tolist())) == 64  # a block per sequence
    done = completing_tokens(slots, 64, max_completions(64, 64, 64))
    assert done[done >= 0].tolist() == [0, 1, 2]


def test_a_prefill_chunk_fills_whole_blocks_of_distinct_pages(on_cpu):
    slots = write_kernels.prefill_chunk_slots(4, 2048, 64, torch)
    assert slots.shape == (8192,) and len(set(slots.tolist())) == 8192
    done = completing_tokens(slots, 64, max_completions(8192, 4, 64))
    assert int((done >= 0).sum()) == 128


@pytest.mark.parametrize("argv,named", [
    (["--configs", "nosuch"], "--configs"),
    (["--encode-warps", "3"], "--encode-warps"),
    (["--encode-warps", "x"], "--encode-warps"),
    (["--completing", "65"], "--completing"),
])
def test_bad_arguments_are_refused_with_what_is_allowed(argv, named, capsys):
    with pytest.raises(SystemExit):
        write_kernels.main(argv)
    err = capsys.readouterr().err
    assert named in err and "allowed" in err
