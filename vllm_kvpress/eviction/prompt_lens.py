"""Owns handing each request's prompt length, and its request-state slot, to the attention
metadata builder.

The builder must know every row's prompt length P to find the compaction steps (the step whose
tokens complete the prompt, and with decode-time eviction the steps that reach an eviction point)
and to hide freed blocks from the kernels afterwards. vLLM 0.26.0's V2 model runner computes
`InputBatch.prompt_lens` (forwarded as `CommonAttentionMetadata.rswa_prefix_lens`) only for R-SWA
models, so this wraps `GPUModelRunner.prepare_inputs` to fill it otherwise, as a CPU tensor: the
builder needs the numbers on the host, and reading them from the runner's host-side state avoids a
device sync. Only our builder reads the field when `rswa_window` is unset (vLLM's FlashAttention
and Triton builders check `rswa_window` first).

Decode-time eviction also needs a row's request-state slot (`InputBatch.idx_mapping_np`): a
request keeps it from its first step to its last, while its batch row changes between steps, so
the recent queries that score its evictions are stored under it. The metadata carries no such
field, so the wrapper keeps the step's slots beside the prompt-length tensor it made, and the
builder takes them only for that very tensor (`request_slots_for`).
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


def patch_v2_runner_prompt_lens() -> None:
    """Wrap vLLM 0.26.0 `vllm.v1.worker.gpu.model_runner.GPUModelRunner.prepare_inputs` (idempotent)."""
    from vllm.v1.worker.gpu.model_runner import GPUModelRunner

    if getattr(GPUModelRunner.prepare_inputs, "_kvpress_wrapped", False):
        return
    original = GPUModelRunner.prepare_inputs

    def prepare_inputs(self, scheduler_output, batch_desc):
        global _step_slots
        batch = original(self, scheduler_output, batch_desc)
        if batch.prompt_lens is None:
            batch.prompt_lens = torch.from_numpy(self.req_states.prompt_len.np[batch.idx_mapping_np])
        _step_slots = (batch.prompt_lens, batch.idx_mapping_np)
        return batch

    prepare_inputs._kvpress_wrapped = True  # type: ignore[attr-defined]
    GPUModelRunner.prepare_inputs = prepare_inputs
