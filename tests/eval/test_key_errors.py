"""`vllm-kvpress key-errors`: staged against per-channel keys, on keys with and without huge channels."""

import torch
from helpers import layout_for

from vllm_kvpress.eval.key_errors import STAGED_WORST_LIMIT, report, score_errors


def _layer(huge: float, kv_heads=2, group=3, tokens=128, head_size=64):
    queries = torch.randn(kv_heads * group, tokens, head_size)
    keys = torch.randn(kv_heads, tokens, head_size)
    keys[:, :, [0, 32]] += huge  # a RoPE pair of channels far from zero, as Qwen2.5's keys have
    return queries * 4, keys


def test_huge_key_channels_break_staging_and_not_per_channel_keys():
    layout, _ = layout_for("kivi", 64, bits=4)
    plain = score_errors([_layer(0.0)], layout)
    huge = score_errors([_layer(200.0)], layout)
    staged, per_channel = "staged per token (partial block)", "per channel (complete block)"
    assert max(huge[staged]) > 10 * max(plain[staged])
    assert max(huge[per_channel]) < 2 * max(plain[per_channel]) + 0.1
    assert len(huge[staged]) == 2  # one per KV head
    assert report("m", 4, 128, huge)[1] and not report("m", 4, 128, plain)[1]
    assert f"> {STAGED_WORST_LIMIT:g} logits: this model needs tail_keys: exact" in report("m", 4, 128, huge)[0]


def test_the_command_is_registered():
    from vllm_kvpress.cli import build_parser

    args = build_parser().parse_args(["key-errors", "qwen0.5b", "--bits", "8"])
    assert (args.model, args.bits, args.block_size, args.tokens) == ("qwen0.5b", 8, 64, 1024)
