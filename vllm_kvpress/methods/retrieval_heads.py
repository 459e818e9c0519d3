"""Owns finding the retrieval heads of a served model for RazorAttention (methods/razor.py): the
scores files in configs/razor/, one per model, and the heads each layer keeps whole.

A scores file holds, per layer and KV head, how much the head attends like a retrieval head when it
copies from far context (its induction and echo scores, the highest of the KV head's query heads);
`vllm-kvpress retrieval-heads MODEL` measures them (vllm_kvpress/eval/retrieval_heads.py). The
method keeps the same number of KV heads in every layer, the highest-scoring ones
(`retrieval_heads_by_layer`): one block table serves every layer.
"""

import functools
import json
import math

SCORE_FORMAT = 1
"""Version of the file layout; bumped when its fields change."""
FINGERPRINT_KEYS = ("model_type", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                    "hidden_size", "vocab_size")
"""The config.json fields a scores file must match: a file is for one architecture and size."""
SCORES_DIR = "razor"
"""Where the scores files live inside the installed `configs/` (vllm_kvpress.configs)."""


def model_fingerprint(config: dict) -> dict:
    config = config.get("text_config", config)
    return {key: config.get(key) for key in FINGERPRINT_KEYS}


def retrieval_heads_by_layer(scores: dict, per_layer: int) -> list[list[int]]:
    """The `per_layer` KV heads of every layer with the highest retrieval score (induction + echo),
    in head order."""
    out = []
    for induction, echo in zip(scores["induction"], scores["echo"]):
        combined = [i + e for i, e in zip(induction, echo)]
        if not 0 <= per_layer <= len(combined):
            raise ValueError(f"retrieval_heads {per_layer}: allowed: 0 to {len(combined)} (KV heads per layer)")
        ranked = sorted(range(len(combined)), key=lambda h: (-combined[h], h))
        out.append(sorted(ranked[:per_layer]))
    return out


def default_heads_per_layer(num_kv_heads: int) -> int:
    """The paper's share of retrieval heads (about 15%), at least one KV head per layer."""
    return max(1, math.ceil(0.15 * num_kv_heads))


def find_scores(config: dict, directory=None) -> dict:
    """The scores of `configs/razor/` made for this model's architecture and size (`config` is its
    config.json); `directory` (a path or importlib Traversable) replaces the installed one.

    Raises:
        FileNotFoundError: none matches; the message lists the files there and how to make one.
    """
    from importlib import resources

    if directory is None:
        directory = resources.files("vllm_kvpress.configs").joinpath(SCORES_DIR)
    wanted = model_fingerprint(config)
    files = sorted((f for f in directory.iterdir() if f.name.endswith(".json")), key=lambda f: f.name) \
        if directory.is_dir() else []
    for f in files:
        scores = json.loads(f.read_text())
        if scores.get("fingerprint") == wanted:
            return scores
    have = ", ".join(f.name for f in files) or "none"
    raise FileNotFoundError(
        f"no retrieval-head scores for this model ({wanted}) in configs/{SCORES_DIR}/ (have: {have}); "
        "make them once with `vllm-kvpress retrieval-heads MODEL --out configs/razor/NAME.json`"
    )


def retrieval_heads(model_config: dict, head_choice: str, per_layer: int) -> list[list[int]]:
    """Per layer, the `per_layer` KV heads of the served model (`model_config`: its config.json as a
    dict) that keep every token: by `head_choice`, the highest-scoring ones of its file in
    configs/razor/ ("scores"), or heads 0..R-1 ("first")."""
    return _retrieval_heads(head_choice, per_layer, tuple(model_fingerprint(model_config).items()))


@functools.lru_cache(maxsize=8)
def _retrieval_heads(head_choice: str, per_layer: int, fingerprint: tuple) -> list[list[int]]:
    """Cached: every attention layer's impl asks at start-up, and the scores files are read once."""
    if head_choice == "first":
        layers = dict(fingerprint)["num_hidden_layers"]
        return [list(range(per_layer)) for _ in range(layers)]
    return retrieval_heads_by_layer(find_scores(dict(fingerprint)), per_layer)
