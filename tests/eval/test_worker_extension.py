"""The class eval's vLLM engine mixes into vLLM's workers to read the selection records."""

import torch

from vllm_kvpress.eval.engines.worker_extension import WORKER_EXTENSION, SelectionRecords
from vllm_kvpress.eviction.attention_mass import ChosenRatios


def test_vllm_can_mix_the_extension_into_its_gpu_worker():
    """vLLM resolves `worker_extension_cls` by name and refuses attributes its worker already has."""
    from vllm.utils.import_utils import resolve_obj_by_qualname
    from vllm.v1.worker.gpu_worker import Worker

    assert resolve_obj_by_qualname(WORKER_EXTENSION) is SelectionRecords
    own = [name for name in dir(SelectionRecords) if not name.startswith("__")]
    assert own == ["drain_important_shares"] and not any(hasattr(Worker, name) for name in own)


def test_the_records_drain_as_pairs_by_layer():
    ChosenRatios.drain()
    with ChosenRatios.at_layer(3):
        ChosenRatios.record(torch.tensor(0.5))
    assert SelectionRecords().drain_important_shares() == [(3, [0.5])]
    assert SelectionRecords().drain_important_shares() == []
