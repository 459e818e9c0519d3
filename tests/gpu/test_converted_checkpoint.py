"""A kv-head-compress checkpoint in vLLM 0.26.0 on the GPU: `vllm-kvpress convert` on the real model
(KVPRESS_MODEL, e.g. SmolLM2-135M-Instruct, 3 KV heads -> 1), then vLLM loads the result with its own
attention and with GEAR pages on top; its KV capacity in vLLM's own block count grows by the KV-head
ratio, and it still answers.

    KVPRESS_MODEL=/path/to/smollm2 pytest -m gpu tests/gpu/test_converted_checkpoint.py -s
"""

import json
import subprocess
import sys
import tempfile

import pytest
from helpers import run_script
from test_vllm_e2e import MODEL, OFFLINE, PROMPTS

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> str:
    assert MODEL, "set KVPRESS_MODEL to a Hugging Face checkpoint directory"
    out = tmp_path_factory.mktemp("converted") / "kv1"
    run = subprocess.run([sys.executable, "-m", "vllm_kvpress.cli", "convert", "kv-head-compress", MODEL, str(out),
                          "--kv-heads", "1", "--device", "cuda"], cwd=tempfile.gettempdir(), capture_output=True,
                         text=True, timeout=1200)  # (outside the checkout: see helpers.run_script)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return str(out)


def _blocks_and_texts(model: str, kwargs: dict) -> dict:
    return run_script(OFFLINE, model, json.dumps(kwargs), json.dumps(PROMPTS))[0]


def test_vllm_serves_the_converted_checkpoint_with_more_kv_capacity(converted):
    original = _blocks_and_texts(MODEL, {})
    merged = _blocks_and_texts(converted, {})
    with open(f"{converted}/kvpress_conversion.json") as f:
        ratio = (lambda b: b["before"] / b["after"])(json.load(f)["kv_bytes_per_token"])
    print("original", original, "\nconverted", merged)
    # the same memory holds `ratio` times the tokens (a little less: the weights shrank by far less)
    assert merged["blocks"] >= 0.95 * ratio * original["blocks"]
    assert "Paris" in merged["texts"][0]


def test_page_methods_stack_on_the_converted_checkpoint(converted):
    from vllm_kvpress.config import load_method_config

    gear = _blocks_and_texts(converted, {"additional_config": {"kv_compression": {"method": "gear"}}})
    plain = _blocks_and_texts(converted, {})
    print("gear", gear, "\nplain", plain)
    layout = load_method_config({"method": "gear"}).page_layout(64)
    ratio = layout.block_size * 64 * 2 * 2 / layout.bytes_per_head  # bf16 K and V bytes per page's bytes
    assert gear["blocks"] * gear["block_size"] >= 0.95 * ratio * plain["blocks"] * plain["block_size"]
    assert "Paris" in gear["texts"][0]
