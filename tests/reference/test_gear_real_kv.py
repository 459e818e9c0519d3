"""GEAR's error correction against plain KIVI quantization on real keys and values: SmolLM2-135M
(the embedded model) reading a Paul Graham essay, complete blocks of several layers and every head."""

import pytest
import torch
from helpers import layout_for

from vllm_kvpress.reference.page_codec import decode_block, encode_complete

pytestmark = pytest.mark.downloads  # the embedded SmolLM2 and the essays
TOKENS = 512
LAYERS = (0, 9, 19, 29)


@pytest.fixture(scope="module")
def real_kv():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vllm_kvpress.eval.corpora import essays
    from vllm_kvpress.models import ensure_model

    path = ensure_model("smollm2")
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    ids = tokenizer(essays()[0], return_tensors="pt").input_ids[:, :TOKENS]
    with torch.no_grad():
        cache = model(ids, use_cache=True).past_key_values
    # post-RoPE keys and values, [kv_heads, tokens, head_dim], as vLLM caches them
    return [(cache.layers[i].keys[0], cache.layers[i].values[0]) for i in LAYERS]


def _mean_relative_error(real_kv, method: str, bits: int, **settings) -> tuple[float, float]:
    layout, iters = layout_for(method, 64, bits=bits, **settings)
    errors = {True: [], False: []}
    for keys, values in real_kv:
        for head in range(keys.shape[0]):
            for start in range(0, TOKENS, layout.block_size):
                for is_key, x in ((True, keys[head, start:start + 64]), (False, values[head, start:start + 64])):
                    page = torch.zeros(layout.bytes_per_head, dtype=torch.uint8)
                    encode_complete(page, x, is_key, layout, iters)
                    decoded = decode_block(page, layout, complete=True)[0 if is_key else 1]
                    errors[is_key].append(((decoded - x).norm() / x.norm()).item())
    return sum(errors[True]) / len(errors[True]), sum(errors[False]) / len(errors[False])


@pytest.mark.parametrize("bits,settings,k_ratio,v_ratio", [
    (4, {"outliers": 16}, 0.97, 0.95),  # measured: K 0.046 -> 0.042, V 0.111 -> 0.093
    (4, {}, 0.97, 0.98),  # the default, low rank only: K 0.046 -> 0.044, V 0.111 -> 0.106
    (2, {}, 0.97, 0.95),  # the default, 16 outlier slots: K 0.23 -> 0.21, V 0.56 -> 0.47
])
def test_gear_reduces_the_error_of_plain_quantization_on_smollm2(real_kv, bits, settings, k_ratio, v_ratio):
    kivi_k, kivi_v = _mean_relative_error(real_kv, "kivi", bits)
    gear_k, gear_v = _mean_relative_error(real_kv, "gear", bits, **settings)
    # a correction that does nothing would leave the ratios at 1
    assert gear_k < k_ratio * kivi_k and gear_v < v_ratio * kivi_v, (kivi_k, gear_k, kivi_v, gear_v)
