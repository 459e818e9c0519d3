"""Owns the recovery training after a KV-head merge: the merged model's attention projections are
trained to give the original model's next-token distributions on calibration text.

The paper (arXiv 2406.07056) initializes the merged heads from the KV-cache SVD and then fine-tunes
with LoRA on instruction data. Here the trainable weights are the attention projections themselves
(q, k, v, o of every layer; LoRA saves optimizer memory on 7B models, and on the small models we
convert the full projections fit, and the result is saved merged either way), and the target is the
original model (KL divergence of the next-token distributions), which needs no labelled data and
recovers what the merge lost rather than teaching anything new. Every other weight stays frozen.
"""

import torch

ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


def attention_parameters(model) -> list[torch.nn.Parameter]:
    """The q/k/v/o projection weights and biases of every layer, made trainable; the rest frozen."""
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    trainable = []
    for layer in model.model.layers:
        for name in ATTENTION_PROJECTIONS:
            for parameter in getattr(layer.self_attn, name).parameters():
                parameter.requires_grad_(True)
                trainable.append(parameter)
    return trainable


def distill_attention(student, teacher, sequences: list[list[int]], steps: int, lr: float,
                      progress=None) -> list[float]:
    """Train `student`'s attention projections for `steps` steps, one sequence a step (cycling),
    on KL(teacher || student) of the next-token distributions; returns the loss of every step."""
    params = attention_parameters(student)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / max(steps, 1))
    student.train()
    losses = []
    for step in range(steps):
        ids = torch.tensor([sequences[step % len(sequences)]], device=student.device)
        with torch.no_grad():
            target = torch.log_softmax(teacher(ids, use_cache=False).logits[0].float(), -1)
        predicted = torch.log_softmax(student(ids, use_cache=False).logits[0].float(), -1)
        loss = torch.nn.functional.kl_div(predicted, target, log_target=True, reduction="batchmean")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if progress is not None:
            progress.update(1)
            progress.set_postfix(kl=f"{losses[-1]:.3f}")
    student.eval()
    for parameter in student.parameters():
        parameter.requires_grad_(False)
    return losses
