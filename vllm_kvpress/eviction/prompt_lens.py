"""Owns handing each request's prompt length to the attention metadata builder.

The builder must know every row's prompt length P to find the compaction step (the step whose
tokens complete the prompt) and to hide freed blocks from the kernels afterwards. vLLM 0.26.0's V2
model runner computes `InputBatch.prompt_lens` (forwarded as `CommonAttentionMetadata.
rswa_prefix_lens`) only for R-SWA models, so this wraps `GPUModelRunner.prepare_inputs` to fill it
otherwise, as a CPU tensor: the builder needs the numbers on the host, and reading them from the
runner's host-side state avoids a device sync. Only our builder reads the field when `rswa_window`
is unset (vLLM's FlashAttention and Triton builders check `rswa_window` first).
"""

import torch


def patch_v2_runner_prompt_lens() -> None:
    """Wrap vLLM 0.26.0 `vllm.v1.worker.gpu.model_runner.GPUModelRunner.prepare_inputs` (idempotent)."""
    from vllm.v1.worker.gpu.model_runner import GPUModelRunner

    if getattr(GPUModelRunner.prepare_inputs, "_kvpress_wrapped", False):
        return
    original = GPUModelRunner.prepare_inputs

    def prepare_inputs(self, scheduler_output, batch_desc):
        batch = original(self, scheduler_output, batch_desc)
        if batch.prompt_lens is None:
            batch.prompt_lens = torch.from_numpy(self.req_states.prompt_len.np[batch.idx_mapping_np])
        return batch

    prepare_inputs._kvpress_wrapped = True  # type: ignore[attr-defined]
    GPUModelRunner.prepare_inputs = prepare_inputs
