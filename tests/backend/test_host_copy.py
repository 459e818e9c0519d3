"""The metadata builder's host-to-device copies (on the CPU here: the pinned path needs CUDA)."""

import numpy as np
import torch

from vllm_kvpress.backend.host_copy import copy_to_device, to_device


def test_a_copy_lands_in_the_view_of_a_persistent_buffer_and_nowhere_else():
    buffer = torch.full((8,), -1, dtype=torch.int32)
    values = np.random.default_rng(0).integers(0, 1000, 5).astype(np.int32)
    copy_to_device(values, buffer[:5])
    assert buffer[:5].tolist() == values.tolist() and buffer[5:].tolist() == [-1, -1, -1]


def test_a_new_tensor_takes_the_asked_dtype():
    values = np.array([3, 1, 4, 1, 5], dtype=np.int64)
    out = to_device(values, np.int32, torch.device("cpu"))
    assert out.dtype == torch.int32 and out.tolist() == [3, 1, 4, 1, 5]
    assert to_device(np.zeros(0), np.int64, torch.device("cpu")).shape == (0,)
