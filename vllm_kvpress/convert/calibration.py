"""Owns the calibration text of `vllm-kvpress convert` and the pass that reads a model's keys and
values on it.

`essays` (default) takes the Paul Graham essays from the last one backwards: NIAH haystacks take
them from the first one forwards (eval/niah.py), so calibration and haystack text only meet beyond
the essays' midpoint, about 75,000 tokens of haystack. `jargon` is the perplexity corpus (then a
perplexity measured on it has seen its own calibration text); any other value is a UTF-8 file.
"""

import os
from collections.abc import Callable
from typing import TYPE_CHECKING

from vllm_kvpress.errors import InputError

if TYPE_CHECKING:
    import torch

CORPORA = ("essays", "jargon")
MIN_TOKENS = 1024
"""Fewest calibration tokens accepted: below it a layer's Gram matrices (g * D wide) rest on too few
samples to tell the shared subspace from noise."""


def calibration_text(corpus: str) -> str:
    from vllm_kvpress.eval import corpora

    if corpus == "essays":
        return "\n\n".join(reversed(corpora.essays()))
    if corpus == "jargon":
        return corpora.perplexity_text()[1]
    if not os.path.isfile(corpus):
        raise InputError(f"--calibration {corpus!r}: not a file; allowed: {', '.join(CORPORA)} or a UTF-8 text file")
    with open(corpus, encoding="utf-8", errors="replace") as f:
        return f.read()


def calibration_windows(tokenizer, corpus: str, tokens: int, window: int,
                        flag: str = "--calibration-tokens") -> list[list[int]]:
    """`tokens` tokens of the corpus cut into windows of `window` (the last one shorter); `flag`
    names the setting that asked for them in the error when the corpus is shorter."""
    text = calibration_text(corpus)
    # tokenizing a whole book is slow; English text takes well under eight characters a token
    ids = tokenizer.encode(text[: tokens * 8], add_special_tokens=False)
    if len(ids) < tokens:
        raise InputError(f"--calibration {corpus!r}: {len(ids)} tokens, fewer than the {tokens} of {flag}")
    ids = ids[:tokens]
    return [ids[s : s + window] for s in range(0, tokens, window)]


def collect_keys_values(model, windows: list[list[int]],
                        consume: Callable[[int, "torch.Tensor", "torch.Tensor"], None], progress=None) -> None:
    """Run `model` over each window and hand every layer's keys and values before RoPE ([T,
    num_kv_heads, head_size] fp32, the k_proj / v_proj outputs) to `consume(layer, keys, values)`."""
    import torch  # here, so that the command line parser imports this module instantly

    from vllm_kvpress.models import head_size

    channels = head_size(model.config.get_text_config())
    layers = model.model.layers
    outputs: dict[tuple[int, str], torch.Tensor] = {}
    hooks = []
    for index, layer in enumerate(layers):
        for name in ("k_proj", "v_proj"):
            def keep(module, args, output, key=(index, name)):
                outputs[key] = output[0].float().reshape(output.shape[1], -1, channels)
            hooks.append(getattr(layer.self_attn, name).register_forward_hook(keep))
    try:
        for ids in windows:
            with torch.no_grad():
                model(torch.tensor([ids], device=model.device), use_cache=False, logits_to_keep=1)
            for index in range(len(layers)):
                consume(index, outputs.pop((index, "k_proj")), outputs.pop((index, "v_proj")))
            if progress is not None:
                progress.update(len(ids))
    finally:
        for hook in hooks:
            hook.remove()
