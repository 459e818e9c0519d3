"""Owns what `--model` names for a soak: the directory vLLM loads, whether its weights are real,
its context length, the token ids prompts may use, and whether it has a tokenizer.

    llama-3.1-8b, qwen2.5-7b    bench's config-only architectures (bench/models.py): dummy weights,
                                no tokenizer, prompts of ordinary token ids
    smollm2, qwen0.5b           the embedded checkpoints (models.py, converted once): real weights
                                and tokenizer, so the probes are needles in essays with checkable answers
    a directory                 a Hugging Face checkpoint; real weights if it holds any, else dummy

Every server runs with `skip_tokenizer_init` (bench's setting): prompts go out as token ids and
answers come back as token ids, decoded here with the checkpoint's tokenizer where it has one.
"""

import json
from dataclasses import dataclass
from pathlib import Path

from vllm_kvpress.bench.models import BENCH_MODELS
from vllm_kvpress.errors import InputError
from vllm_kvpress.models import MODELS, ensure_model, max_model_len

WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


@dataclass(frozen=True)
class ServedModel:
    name: str
    """As typed after `--model`."""
    path: str
    """The directory given to `vllm serve`."""
    real_weights: bool
    """False: `load_format=dummy` (random weights; speed, memory and determinism only)."""
    context_len: int
    vocab_size: int
    """Prompts draw token ids below this."""
    has_tokenizer: bool
    recorded_path: str
    """The directory as result files record it: bench's repository-relative path, the embedded
    model's name (`vllm-kvpress model NAME` prints its directory), or the directory as typed."""

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "path": self.recorded_path,
            "real_weights": self.real_weights,
            "context_len": self.context_len,
            "vocab_size": self.vocab_size,
            "has_tokenizer": self.has_tokenizer,
        }


def _config(path: str) -> dict:
    config = json.loads((Path(path) / "config.json").read_text())
    return config.get("text_config", config)


def known_model_names() -> list[str]:
    return [*BENCH_MODELS, *MODELS]


def check_model_name(name: str | None) -> None:
    """Raises InputError unless `name` is a bench model, an embedded model or a checkpoint directory."""
    if not name:
        raise InputError(f"--model is required; allowed: {', '.join(known_model_names())}, or a checkpoint directory")
    if name in known_model_names():
        return
    path = Path(name)
    if not path.is_dir() or not (path / "config.json").is_file():
        raise InputError(
            f"--model {name!r} is neither a known model nor a directory with a config.json; "
            f"allowed: {', '.join(known_model_names())}, or a Hugging Face checkpoint directory"
        )


def context_len_of(name: str) -> int:
    """The model's context length, without fetching an embedded model."""
    check_model_name(name)
    if name in BENCH_MODELS:
        return int(_config(str(BENCH_MODELS[name].config_dir))["max_position_embeddings"])
    return max_model_len(name)


def resolve_model(name: str) -> ServedModel:
    """The served model `name` stands for; an embedded model is downloaded and converted on first use."""
    check_model_name(name)
    if name in BENCH_MODELS:
        bench = BENCH_MODELS[name]
        return ServedModel(
            name=name,
            path=str(bench.config_dir),
            real_weights=False,
            context_len=context_len_of(name),
            vocab_size=bench.num_ordinary_tokens,
            has_tokenizer=False,
            recorded_path=bench.repo_config_dir,
        )
    path = ensure_model(name)
    directory = Path(path)
    return ServedModel(
        name=name,
        path=path,
        real_weights=any(any(directory.glob(pattern)) for pattern in WEIGHT_PATTERNS),
        context_len=context_len_of(name),
        vocab_size=int(_config(path)["vocab_size"]),
        has_tokenizer=any((directory / f).is_file() for f in TOKENIZER_FILES),
        recorded_path=name,
    )
