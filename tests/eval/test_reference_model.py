"""The reference engine on the real SmolLM2: chunked prefill and decode steps give the model's own
predictions, and compressed pages change exactly the positions that read them."""

import pytest
import torch

from vllm_kvpress.config import load_method_config
from vllm_kvpress.eval.engines.reference import ReferenceEngine

CHUNK = 96
NUM_TOKENS = 3 * CHUNK + 17
"""Three full chunks and a partial one; block_size 64 blocks end inside chunks."""


@pytest.fixture(scope="module")
def token_ids(tokenizer):
    from vllm_kvpress.eval import niah

    return niah.haystack_token_ids(tokenizer, NUM_TOKENS)[:NUM_TOKENS]


@pytest.fixture(scope="module")
def nll_none(smollm2_path, token_ids):
    engine = ReferenceEngine(smollm2_path, None, prefill_chunk=CHUNK, max_model_len=8192, device="cpu")
    return engine.token_nll(token_ids)


def test_uncompressed_chunked_nll_matches_one_plain_forward(smollm2_path, token_ids):
    """Same model through transformers' own sdpa attention in one forward pass, no chunks. In fp32,
    so that a wrong position, cache step or chunk boundary shows above rounding (measured max
    difference 1.4e-5 nats; in bf16 rounding alone gives 0.05 on average)."""
    from transformers import AutoModelForCausalLM

    engine = ReferenceEngine(
        smollm2_path, None, prefill_chunk=CHUNK, max_model_len=8192, device="cpu", dtype="float32"
    )
    chunked = torch.tensor(engine.token_nll(token_ids))
    model = AutoModelForCausalLM.from_pretrained(
        smollm2_path, dtype=torch.float32, attn_implementation="sdpa"
    )
    with torch.inference_mode():
        logits = model(torch.tensor([token_ids])).logits[0, :-1]
    plain = -logits.log_softmax(-1).gather(1, torch.tensor(token_ids[1:])[:, None])[:, 0]
    assert chunked.shape == plain.shape == (len(token_ids) - 1,)
    torch.testing.assert_close(chunked, plain, rtol=0, atol=2e-4)


def _nll(smollm2_path, token_ids, bits: int) -> list[float]:
    kivi = load_method_config({"method": "kivi", "bits": bits})
    return ReferenceEngine(
        smollm2_path, kivi, prefill_chunk=CHUNK, max_model_len=8192, device="cpu"
    ).token_nll(token_ids)


def test_compressed_pages_change_only_positions_that_read_them(smollm2_path, token_ids, nll_none):
    """Measured mean NLL change after the first chunk: 8-bit -0.002, 4-bit +0.022, 2-bit +1.84 nats
    (block and V group of 64 with no full-precision window is coarse for a 135M model at 2 bits)."""
    delta = {}
    for bits in (8, 4, 2):
        nll = _nll(smollm2_path, token_ids, bits)
        # positions of the first chunk attend to their own fresh K/V only: bit-identical
        assert nll[:CHUNK] == nll_none[:CHUNK], f"{bits}-bit changed the first chunk"
        later = torch.tensor(nll[CHUNK:]) - torch.tensor(nll_none[CHUNK:])
        assert later.abs().max() > 1e-3, f"{bits}-bit pages had no effect after the first chunk"
        delta[bits] = later.mean().item()
    assert abs(delta[8]) < 0.01 and 0 < delta[4] < 0.1 and delta[2] > 2 * delta[4], delta


def test_greedy_generation_answers_and_stops_at_eos(smollm2_path, tokenizer):
    # Uncompressed: the first answer token is a near tie ("The" 0.161, "L" 0.142), which even
    # 8-bit pages flip into a French answer, so a compressed run is no fixed-text oracle here.
    engine = ReferenceEngine(smollm2_path, None, prefill_chunk=16, max_model_len=8192, device="cpu")
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        tokenize=False,
    )
    ids = tokenizer.encode(prompt, add_special_tokens=False)
    (answer,) = engine.generate([ids], [24])
    assert answer == "The capital of France is Paris."  # ended by <|im_end|>, not by the 24-token limit
    with pytest.raises(ValueError, match="exceeds --max-model-len 8192"):
        engine.generate([ids], [8192])


def test_decode_nll_feeds_one_token_per_step_after_the_prompt(smollm2_path, token_ids):
    """decode-ppl in fp32: with every token kept, one token per step after a prompt gives the NLL
    of chunked teacher forcing (only rounding differs). With snapkv the prompt is evicted after its
    last chunk, so the decoded positions change and the prompt's do not; decode_interval evicts
    again during decoding, which changes the positions after its first round and none before."""
    prompt = 2 * CHUNK
    plain = ReferenceEngine(smollm2_path, None, prefill_chunk=CHUNK, max_model_len=8192, device="cpu",
                            dtype="float32")
    decoded = torch.tensor(plain.decode_nll(token_ids, prompt))
    forced = torch.tensor(plain.token_nll(token_ids))
    assert decoded.shape == forced.shape == (len(token_ids) - 1,)
    torch.testing.assert_close(decoded, forced, rtol=0, atol=2e-4)

    def evicting(**settings):
        config = load_method_config({"method": "snapkv", "budget": 64, "window": 16, "observation_window": 8,
                                     **settings})
        return torch.tensor(ReferenceEngine(smollm2_path, config, prefill_chunk=CHUNK, max_model_len=8192,
                                            device="cpu", dtype="float32").decode_nll(token_ids, prompt))

    once, rounds = evicting(), evicting(decode_interval=64, decode_observation_window=8)
    # staged tail keys, as every evicting method stores them
    kept_pages = load_method_config({"method": "kivi", "bits": 8, "group_size": "head", "tail_keys": "staged"})
    kivi = torch.tensor(ReferenceEngine(smollm2_path, kept_pages, prefill_chunk=CHUNK, max_model_len=8192,
                                        device="cpu", dtype="float32").decode_nll(token_ids, prompt))
    # the prompt's own positions (and the first decoded token, predicted by its last chunk) are kivi's
    assert torch.equal(once[:prompt], kivi[:prompt]) and torch.equal(rounds[:prompt], kivi[:prompt])
    assert (once[prompt:] - kivi[prompt:]).abs().max() > 1e-3
    # the first decode round is at (3 + 1) * 64 = 256 tokens: the NLL of token 257 on reads it
    first_round = (prompt // 64 + 1) * 64
    assert torch.equal(rounds[:first_round], once[:first_round])
    assert (rounds[first_round:] - once[first_round:]).abs().max() > 1e-3
