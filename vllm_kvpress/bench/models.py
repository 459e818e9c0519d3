"""Owns the architectures we benchmark: config-only model directories shipped as package data.

vLLM builds a model from `config.json` alone when given `load_format="dummy"` (random weights) and
`skip_tokenizer_init=True` (prompts are token ids), which is all a throughput and capacity
measurement needs: speed and memory depend on shapes, not on weight values. The files hold the
public values of the Hugging Face checkpoints named in `hf_name`.
"""

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

CONFIG_PACKAGE = "vllm_kvpress.bench"
CONFIG_FOLDER = "model_configs"


@dataclass(frozen=True)
class BenchModel:
    name: str
    """What users type after `--model`; also the folder name under model_configs/."""
    hf_name: str
    """The checkpoint whose public config.json the folder holds."""
    num_ordinary_tokens: int
    """Token ids below this are ordinary text tokens; at and above it the tokenizer's special tokens
    (BOS/EOS, chat markers) and padding rows begin. Prompts draw only ordinary ids, so that no
    random prompt contains an end-of-text or chat-control token."""

    @property
    def config_dir(self) -> Path:
        """The directory to pass to vLLM as `model` (it holds only config.json)."""
        return Path(str(resources.files(CONFIG_PACKAGE).joinpath(CONFIG_FOLDER, self.name)))

    @property
    def repo_config_dir(self) -> str:
        """The same directory relative to the repository root: what result files record, since
        the installed copy's absolute path differs between machines."""
        return f"{CONFIG_PACKAGE.replace('.', '/')}/{CONFIG_FOLDER}/{self.name}"


_MODELS = (
    # Llama 3 tokenizer: 128,000 BPE tokens, then 256 reserved special tokens from 128000 (<|begin_of_text|>).
    BenchModel("llama-3.1-8b", "meta-llama/Llama-3.1-8B", num_ordinary_tokens=128000),
    # Qwen2.5 tokenizer: 151,643 BPE tokens, then specials from 151643 (<|endoftext|>); the
    # embedding has 152,064 rows, the rest padding.
    BenchModel("qwen2.5-7b", "Qwen/Qwen2.5-7B-Instruct", num_ordinary_tokens=151643),
)

BENCH_MODELS: dict[str, BenchModel] = {m.name: m for m in _MODELS}


def get_model(name: str) -> BenchModel:
    if name not in BENCH_MODELS:
        raise ValueError(f"--model {name!r} is unknown; allowed: {', '.join(BENCH_MODELS)}")
    return BENCH_MODELS[name]
