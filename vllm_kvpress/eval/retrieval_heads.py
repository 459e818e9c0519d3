"""Owns `vllm-kvpress retrieval-heads`: measuring which KV heads of a model are retrieval heads
(RazorAttention, arXiv 2407.15891), once per model, into the scores file in configs/razor/ that
methods/retrieval_heads.py reads.

    vllm-kvpress retrieval-heads smollm2 --out configs/razor/smollm2-135m-instruct.json

RazorAttention calls a head a retrieval head when it copies from far context: an *induction* head
attends from a token to the token that followed that token's earlier occurrence, an *echo* head to
the earlier occurrence itself. Both are measured on `--repeats` copies of one random sequence of
`--tokens` token ids: for every query in the copies after the first, the attention weight on the
position one period back (echo) and one period back plus one (induction), averaged over those
queries. The paper keeps the query heads with the top 14% induction and top 1% echo scores; pages
here are per KV head, and one block table serves every layer, so the file keeps the scores per KV
head (the highest of its query heads: the KV head holds their cache, and one retrieving query
head is enough to need it whole) and the method keeps the same number of KV heads in every layer,
the highest-scoring ones (`retrieval_heads_by_layer`).
"""

import json
import re
import sys
from pathlib import Path

from vllm_kvpress.methods.retrieval_heads import (
    SCORE_FORMAT,
    default_heads_per_layer,
    model_fingerprint,
    retrieval_heads_by_layer,
)


def copy_scores(attentions, period: int):
    """Per layer, the (induction, echo) score of every query head.

    Args:
        attentions: per layer, attention weights [num_heads, seq, seq] (one sequence, softmaxed)
            of `seq // period` copies of one `period`-token sequence.
        period: length of the repeated sequence.
    Returns:
        (induction, echo): float tensors [num_layers, num_heads].
    """
    import torch

    induction, echo = [], []
    for weights in attentions:
        seq = weights.shape[-1]
        queries = torch.arange(period, seq)  # every query with an earlier occurrence of its token
        heads = weights[:, queries, :]  # [heads, queries, keys]
        echo.append(heads[:, torch.arange(len(queries)), queries - period].mean(-1))
        induction.append(heads[:, torch.arange(len(queries)), queries - period + 1].mean(-1))
    return torch.stack(induction), torch.stack(echo)


def kv_head_scores(query_scores, num_kv_heads: int):
    """[layers, num_heads] query-head scores -> [layers, num_kv_heads]: the highest of each KV
    head's query heads (grouped as vLLM and transformers group them: consecutive query heads)."""
    layers, heads = query_scores.shape
    return query_scores.reshape(layers, num_kv_heads, heads // num_kv_heads).amax(-1)


def measure(model_path: str, *, tokens: int, repeats: int, seed: int) -> dict:
    """Run the model on the repeated random sequence and return the scores file's contents."""
    import torch
    from transformers import AutoModelForCausalLM

    with open(Path(model_path) / "config.json") as f:
        config = json.load(f)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32, attn_implementation="eager")
    model.eval()
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(seed)
    # ids from the upper part of the vocabulary: ordinary tokens, not the special ones at its start
    pattern = torch.randint(vocab // 10, vocab, (tokens,), generator=gen)
    ids = pattern.repeat(repeats)[None]
    with torch.no_grad():
        out = model(input_ids=ids, output_attentions=True)
    induction, echo = copy_scores([a[0].float() for a in out.attentions], tokens)
    num_kv_heads = model.config.num_key_value_heads
    return {
        "format": SCORE_FORMAT,
        "method": "razor",
        "model": Path(model_path).name,
        "fingerprint": model_fingerprint(config),
        "probe": {"tokens": tokens, "repeats": repeats, "seed": seed},
        "induction": [[round(x, 5) for x in row] for row in kv_head_scores(induction, num_kv_heads).tolist()],
        "echo": [[round(x, 5) for x in row] for row in kv_head_scores(echo, num_kv_heads).tolist()],
    }


def format_scores(scores: dict) -> str:
    """The scores file's text: indented, one line per layer's list of head scores."""
    text = json.dumps(scores, indent=1)
    return re.sub(r"\[\s+([-+0-9.e,\s]+?)\s+\]", lambda m: "[" + " ".join(m.group(1).split()) + "]", text) + "\n"


def _run(args) -> int:
    from vllm_kvpress.models import ensure_model

    if args.tokens < 16 or args.repeats < 2:
        raise SystemExit(f"--tokens {args.tokens} --repeats {args.repeats}: allowed: tokens >= 16, repeats >= 2")
    scores = measure(ensure_model(args.model), tokens=args.tokens, repeats=args.repeats, seed=args.seed)
    scores["command"] = " ".join(["vllm-kvpress", "retrieval-heads", *sys.argv[2:]])
    text = format_scores(scores)
    if args.out:
        Path(args.out).write_text(text)
    per_layer = default_heads_per_layer(scores["fingerprint"]["num_key_value_heads"])
    print(f"retrieval KV heads per layer (top {per_layer} by induction + echo):")
    for layer, heads in enumerate(retrieval_heads_by_layer(scores, per_layer)):
        print(f"  layer {layer:2d}: {heads}  induction {scores['induction'][layer]}  echo {scores['echo'][layer]}")
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "retrieval-heads",
        help="score every KV head of a model as a retrieval head (RazorAttention), once per model",
    )
    p.add_argument("model", help="an embedded model name (smollm2, qwen0.5b) or a Hugging Face checkpoint directory")
    p.add_argument("--tokens", type=int, default=256, help="length of the random sequence (default 256)")
    p.add_argument("--repeats", type=int, default=4, help="copies of it in the probe (default 4)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the scores file here (configs/razor/NAME.json)")
    p.set_defaults(run=_run)
