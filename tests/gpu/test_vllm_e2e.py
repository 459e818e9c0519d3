"""vLLM 0.26.0 end to end on the GPU with a real model (KVPRESS_MODEL: a Hugging Face checkpoint
directory, e.g. SmolLM2-135M-Instruct). Each engine runs in its own process.

    KVPRESS_MODEL=/path/to/smollm2 pytest -m gpu tests/gpu/test_vllm_e2e.py -s
"""

import json
import os
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from helpers import run_script

pytestmark = pytest.mark.gpu

MODEL = os.environ.get("KVPRESS_MODEL", "")
PROMPTS = ["The capital of France is", "Q: What is 12 + 30?\nA:", "The first president of the United States was"]

OFFLINE = """
import json, sys
from vllm import LLM, SamplingParams
kwargs = json.loads(sys.argv[2])
llm = LLM(model=sys.argv[1], max_model_len=4096, gpu_memory_utilization=0.5, seed=0, **kwargs)
outs = llm.generate(json.loads(sys.argv[3]), SamplingParams(temperature=0, max_tokens=24))
cfg = llm.llm_engine.vllm_config
print("RESULT " + json.dumps({"texts": [o.outputs[0].text for o in outs],
                              "backend": str(cfg.attention_config.backend),
                              "blocks": cfg.cache_config.num_gpu_blocks, "block_size": cfg.cache_config.block_size}))
"""


def _offline(kwargs: dict) -> tuple[dict, str]:
    return run_script(OFFLINE, MODEL, json.dumps(kwargs), json.dumps(PROMPTS))


@pytest.fixture(scope="module")
def baseline():
    assert MODEL, "set KVPRESS_MODEL to a Hugging Face checkpoint directory"
    return _offline({})


def test_plain_vllm_is_unaffected(baseline):
    result, log = baseline
    assert result["backend"] == "None" and "vllm-kvpress:" not in log
    assert "FLASH_ATTN" in log  # vLLM's own pick on Hopper
    assert "Paris" in result["texts"][0]


@pytest.mark.parametrize("settings", [{"method": "gear"}, {"method": "kivi", "bits": 2}, {"method": "gear", "bits": 2},
                                      {"method": "gear", "tail_keys": "exact"}])
def test_compressed_generation_with_cuda_graphs(baseline, settings):
    """The prompts are shorter than a block: every step reads a partial block (staged, or the exact tail)."""
    result, log = _offline({"additional_config": {"kv_compression": settings}})
    print(settings, result, "\nbaseline", baseline[0])
    assert "vllm-kvpress:" in log and result["backend"].endswith("CUSTOM")
    assert result["block_size"] == 64
    base_tokens = baseline[0]["blocks"] * 16
    assert result["blocks"] * 64 > 2.5 * base_tokens
    assert "Paris" in result["texts"][0]


def _post(url, payload):
    req = urllib.request.Request(url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return r.read().decode()


class Server:
    """`vllm serve MODEL *flags` on a free port, its output in a log file; stopped on exit."""

    def __init__(self, tmp_path, flags: list[str], port: int = 8123):
        self.log_path, self.base = tmp_path / "serve.log", f"http://127.0.0.1:{port}"
        self.argv = ["vllm", "serve", MODEL, "--port", str(port), "--max-model-len", "4096",
                     "--gpu-memory-utilization", "0.5", *flags]

    def __enter__(self):
        assert MODEL, "set KVPRESS_MODEL to a Hugging Face checkpoint directory"
        with open(self.log_path, "w") as log:
            # Outside the checkout: its source tree (no built kernels) would shadow the installed package.
            self.process = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT, cwd=self.log_path.parent)
        for _ in range(300):
            try:
                urllib.request.urlopen(self.base + "/health", timeout=2)
                return self
            except OSError:
                assert self.process.poll() is None, self.log()[-5000:]
                time.sleep(1)
        raise AssertionError("vllm serve did not come up in 300 s: " + self.log()[-3000:])

    def __exit__(self, *exc):
        self.process.terminate()
        self.process.wait(timeout=60)

    def log(self) -> str:
        return self.log_path.read_text()

    def chat(self, content: str, **extra) -> str:
        return _post(self.base + "/v1/chat/completions", {
            "model": MODEL, "temperature": 0, "max_tokens": 32, "messages": [{"role": "user", "content": content}],
            **extra})


def test_vllm_serve_answers_openai_requests_with_gear(tmp_path):
    with Server(tmp_path, ["--kv-compression", "gear", "--kv-compression-config", '{"bits": 4}']) as server:
        completion = json.loads(_post(server.base + "/v1/completions", {
            "model": MODEL, "prompt": PROMPTS[0], "max_tokens": 16, "temperature": 0}))
        assert "Paris" in completion["choices"][0]["text"]
        chat = json.loads(server.chat("What is the capital of France?"))
        assert "Paris" in chat["choices"][0]["message"]["content"]
        stream = server.chat("What is the capital of France?", stream=True)
        pieces = [json.loads(line[6:])["choices"][0]["delta"].get("content") or ""
                  for line in stream.splitlines() if line.startswith("data: {")]
        assert "Paris" in "".join(pieces)
        text = server.log()
        assert "vllm-kvpress: gear pages" in text, text[-3000:]
        print([row for row in text.splitlines() if "kvpress" in row or "CUSTOM" in row][:6])


def _ask_for_the_needle(tmp_path, flags: list[str]) -> tuple[str, int, str]:
    """One chat request of about 2,000 tokens (a secret code, filler, then the question: long enough
    to be compacted) to `vllm serve` with `flags`: (answer, prompt tokens, the server's log)."""
    filler = " ".join(f"Line {i}: the weather report says it is mild and calm today." for i in range(120))
    question = "The secret code is 4817. " + filler + " What is the secret code? Answer with the number."
    with Server(tmp_path, flags) as server:
        reply = json.loads(server.chat(question))
        text = server.log()
    answer, prompt_tokens = reply["choices"][0]["message"]["content"], reply["usage"]["prompt_tokens"]
    print(f"{prompt_tokens} prompt tokens; answer {answer!r}")
    print([row for row in text.splitlines() if "kvpress" in row][:6])
    return answer, prompt_tokens, text


def test_vllm_serve_runs_a_composition_kvcrush_on_gear_pages(tmp_path):
    """configs/kvcrush-gear4.yaml (KVCrush's selection, GEAR 4-bit pages, a quarter of every prompt
    kept): one OpenAI request whose prompt is long enough to be compacted."""
    preset = Path(__file__).parents[2] / "configs" / "kvcrush-gear4.yaml"
    answer, prompt_tokens, text = _ask_for_the_needle(tmp_path, ["--kv-compression", "kvcrush",
                                                                 "--kv-compression-config", str(preset)])
    assert prompt_tokens > 4 * 64 and answer.strip(), text[-3000:]
    assert "vllm-kvpress: kvcrush pages with" in text and "'pages': 'gear'" in text, text[-3000:]
    budget = -(-prompt_tokens // 4)  # a quarter of the prompt, rounded up
    kept = -(-budget // 64)  # in whole blocks
    compacted = f"vllm-kvpress: compacted a {prompt_tokens}-token prompt into {kept} blocks of 64 tokens (gear pages)"
    assert compacted in text, text[-3000:]


def test_vllm_serve_splits_a_prompt_into_two_precisions_with_mikv(tmp_path, monkeypatch):
    """`vllm serve --kv-compression mikv`: the prompt of one OpenAI request is split (its most
    attended 15% of tokens in 8-bit blocks, the rest in 2-bit units) and its answer decodes over
    both, with CUDA graphs; the blocks after them go back to vLLM."""
    answer, prompt_tokens, text = _ask_for_the_needle(tmp_path, ["--kv-compression", "mikv"])
    assert "vllm-kvpress: mikv pages with" in text and "triton kernel (the CUDA kernel does not read" in text, \
        text[-3000:]
    assert f"vllm-kvpress: compacted a {prompt_tokens}-token prompt into" in text, text[-3000:]
    assert answer.strip(), text[-3000:]


def test_vllm_serve_prefills_sparsely_and_splits_the_prompt_with_zipvl(tmp_path, monkeypatch):
    """`vllm serve --kv-compression zipvl` with the prompt prefilled in 512-token chunks and sparse
    prefill from 512 tokens: the later chunks attend to the context their probes pick (FlashAttention
    over the gathered keys), then the prompt is split into 4-bit and 2-bit pages."""
    answer, prompt_tokens, text = _ask_for_the_needle(tmp_path, [
        "--kv-compression", "zipvl", "--kv-compression-config", '{"sparse_prefill_from": 512, "tau": 0.99}',
        "--max-num-batched-tokens", "512"])
    assert "vllm-kvpress: sparse prefill: a chunk attended to" in text, text[-3000:]
    assert f"vllm-kvpress: compacted a {prompt_tokens}-token prompt into" in text, text[-3000:]
    assert answer.strip(), text[-3000:]
