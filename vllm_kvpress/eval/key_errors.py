"""Owns `vllm-kvpress key-errors`: does a model need `tail_keys: exact`?

    vllm-kvpress key-errors qwen0.5b --bits 4

A block that is not yet full stores its keys per token (`tail_keys: staged`); a complete block
stores them per channel. Keys with a few channels of very large magnitude (Qwen2.5) survive the
second and not the first: a per-token scale that spans them rounds every other channel to zero.
This runs the model (transformers, CPU is enough) on the first `--tokens` tokens of the essay
corpus, keeps every layer's post-RoPE queries and keys, encodes the last block of keys of every KV
head both ways with the reference page codec (the kernels' oracle), and reports the error that
makes in the attention scores of the last query of each of the head's query heads, in logits
(scores times the attention scale): the median over heads and the worst head, per storage.
"""

import statistics
import sys

STAGED_WORST_LIMIT = 32.0
"""Logits: a worst head beyond this recommends `tail_keys: exact`. Measured on either side of it:
staged keys that answer (SmolLM2 at 4 bits, worst head 2.5; Qwen2.5-0.5B at 8 bits, 10.7, which
finds every needle at 16k through vLLM) and ones that do not (Qwen2.5-0.5B at 4 bits, about 280,
which finds none; docs/results/key_errors). Where between 10.7 and 280 answers start to fail is not
measured."""


def capture_queries_and_keys(model_path: str, tokens: int):
    """Per layer, (queries [num_heads, T, D], keys [num_kv_heads, T, D]) fp32 after RoPE, from one
    forward pass over the first `tokens` tokens of the essays."""
    import torch
    from transformers import AttentionInterface, AutoModelForCausalLM, AutoTokenizer
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from vllm_kvpress.eval.corpora import essays

    captured = {}

    def capture(module, query, key, value, attention_mask, **kwargs):
        captured[module.layer_idx] = (query[0].float(), key[0].float())
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("kvpress_capture", capture)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.bfloat16,
                                                 attn_implementation="kvpress_capture")
    ids = tokenizer(" ".join(essays()), return_tensors="pt").input_ids[:, :tokens]
    if ids.shape[1] < tokens:
        raise ValueError(f"--tokens {tokens}: the corpus has only {ids.shape[1]} tokens for this tokenizer")
    with torch.no_grad():
        model(ids)
    return [captured[layer] for layer in sorted(captured)]


def stored_block_keys(keys, layout, *, complete: bool):
    """One KV head's last block of keys [block_size, D] as the pages store them: encoded per channel
    (`complete`) or staged token by token, then decoded, with the reference page codec."""
    import torch

    from vllm_kvpress.reference import page_codec

    page = torch.zeros(layout.bytes_per_head, dtype=torch.uint8)
    if complete:
        page_codec.encode_complete(page, keys, True, layout, power_iters=1)
    else:
        for offset, key in enumerate(keys):
            page_codec.stage_token(page, offset, key, torch.zeros_like(key), layout)
    return page_codec.decode_block(page, layout, complete)[0]


def score_errors(per_layer, layout) -> dict[str, list[float]]:
    """Per storage ('per channel', 'staged per token'), every (layer, KV head)'s largest score error
    of its last block of keys, in logits."""
    bs = layout.block_size
    errors: dict[str, list[float]] = {"per channel (complete block)": [], "staged per token (partial block)": []}
    for queries, keys in per_layer:
        num_heads, _, head_size = queries.shape
        group = num_heads // keys.shape[0]
        for kv_head in range(keys.shape[0]):
            block = keys[kv_head, -bs:]
            last_queries = queries[kv_head * group:(kv_head + 1) * group, -1]  # [group, D]
            for name, complete in zip(errors, (True, False)):
                stored = stored_block_keys(block, layout, complete=complete)
                errors[name].append(float(((stored - block) @ last_queries.T).abs().max()) * head_size ** -0.5)
    return errors


def report(model: str, bits: int, tokens: int, errors: dict[str, list[float]]) -> tuple[str, bool]:
    """The printed table and whether the staged worst head recommends `tail_keys: exact`."""
    title = (f"{model}: largest attention-score error of a head's last block of keys, {bits}-bit codes, "
             f"last query over {tokens} tokens of the essays (logits)")
    lines = [title, "| keys stored | median head | worst head |", "|---|---:|---:|"]
    for name, values in errors.items():
        lines.append(f"| {name} | {statistics.median(values):.2f} | {max(values):.2f} |")
    needs_exact = max(errors["staged per token (partial block)"]) > STAGED_WORST_LIMIT
    lines.append(
        f"staged worst head {'>' if needs_exact else '<='} {STAGED_WORST_LIMIT:g} logits: "
        + ("this model needs tail_keys: exact" if needs_exact else "tail_keys: staged is enough")
    )
    return "\n".join(lines), needs_exact


def _run(args) -> int:
    from vllm_kvpress.config import load_method_config
    from vllm_kvpress.models import ensure_model

    if args.tokens < 2 * args.block_size:
        raise SystemExit(f"--tokens {args.tokens}: allowed: at least two blocks ({2 * args.block_size})")
    per_layer = capture_queries_and_keys(ensure_model(args.model), args.tokens)
    head_size = per_layer[0][1].shape[-1]
    settings = {"method": "kivi", "bits": args.bits, "block_size": args.block_size, "tail_keys": "staged"}
    layout = load_method_config(settings).page_layout(head_size)  # staged: the per-token stores are measured
    text, _ = report(args.model, args.bits, args.tokens, score_errors(per_layer, layout))
    text = f"{text}\ncommand: {' '.join(['vllm-kvpress', 'key-errors', *sys.argv[2:]])}"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


def add_parser(subparsers) -> None:
    from vllm_kvpress.methods.kivi import ALLOWED_BITS, ALLOWED_BLOCK_SIZES

    p = subparsers.add_parser(
        "key-errors",
        help="whether a model's keys need tail_keys: exact (score error of staged against per-channel keys)",
        description="Run the model on real text and report the attention-score error of a block of keys stored "
        "per channel (a complete block) and staged per token (a partial block, tail_keys: staged); a large "
        "staged error means the model needs tail_keys: exact."
    )
    p.add_argument("model", help="an embedded model (smollm2, qwen0.5b) or a Hugging Face checkpoint directory")
    p.add_argument("--bits", type=int, choices=ALLOWED_BITS, default=4, help="code width (default 4)")
    p.add_argument("--block-size", type=int, choices=ALLOWED_BLOCK_SIZES, default=64, help="tokens per block (64)")
    p.add_argument("--tokens", type=int, default=1024, help="prompt tokens of the forward pass (default 1024)")
    p.add_argument("--out", default=None, help="also write the table to this file")
    p.set_defaults(run=_run)
