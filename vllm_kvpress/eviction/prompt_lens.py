"""Owns handing each request's request-state slot to the attention metadata builder, beside its
prompt length.

The builder must know every row's prompt length P to find the compaction steps (the step whose
tokens complete the prompt, and with decode-time eviction the steps that reach an eviction point)
and to hide freed blocks from the kernels afterwards. vLLM 0.26.0's V2 model runner computes
`InputBatch.prompt_lens` (forwarded as `CommonAttentionMetadata.rswa_prefix_lens`) only for R-SWA
models; the wrapper of `GPUModelRunner.prepare_inputs` in vllm_kvpress/vllm_patches.py fills it
otherwise, as a CPU tensor: the builder needs the numbers on the host, and reading them from the
runner's host-side state avoids a device sync.

Decode-time eviction also needs a row's request-state slot (`InputBatch.idx_mapping_np`): a
request keeps it from its first step to its last, while its batch row changes between steps, so
the recent queries that score its evictions are stored under it. The metadata carries no such
field, so the wrapper records the step's slots here beside the prompt-length tensor it made
(`record_step_slots`), and the builder takes them only for that very tensor (`request_slots_for`).
"""

import numpy as np
import torch

_step_slots: tuple[torch.Tensor, np.ndarray] | None = None
"""(the prompt-length tensor of the step being prepared, its rows' request-state slots)."""


def request_slots_for(prompt_lens: torch.Tensor) -> np.ndarray | None:
    """int32 [rows] request-state slots of the step whose `prompt_lens` this is, else None."""
    if _step_slots is None or _step_slots[0] is not prompt_lens:
        return None
    return _step_slots[1]


def record_step_slots(prompt_lens: torch.Tensor, slots: np.ndarray) -> None:
    """Keep the rows' request-state slots of the step whose prompt-length tensor is `prompt_lens`."""
    global _step_slots
    _step_slots = (prompt_lens, slots)
