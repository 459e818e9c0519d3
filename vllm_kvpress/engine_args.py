"""Owns the `--kv-compression` flags and the vLLM settings they imply, through three wraps of vLLM
0.26.0 `EngineArgs` (vllm_kvpress/vllm_patches.py):
- `add_cli_args` adds the flags in their own argument group (`vllm serve --help=KVCompression`);
- `fold_cli_settings` folds them into `additional_config["kv_compression"]`, which vLLM pickles to
  the engine core, every worker and every Ray actor;
- `prepare_engine_args` and `finish_engine_config` validate the settings and the vLLM flags they
  must agree with, before any GPU memory is touched. They also serve the flag-free forms
  (`--additional-config '{"kv_compression": {...}}'` and `LLM(..., additional_config=...)`).
"""

import argparse
from typing import Any

from vllm.logger import init_logger

from vllm_kvpress.backend.runner import runner_problems
from vllm_kvpress.config import (
    ADDITIONAL_CONFIG_KEY,
    ALLOW_UNVERIFIED_ENV,
    check_enabled_in_vllm,
    load_method_config,
    parse_config_argument,
)
from vllm_kvpress.errors import KVCompressionConfigError, MethodNotImplementedError
from vllm_kvpress.methods.base import CompressionMethod
from vllm_kvpress.methods.registry import method_table

logger = init_logger("vllm.kvpress")

CLI_GROUP = "KVCompression"
CUSTOM_BACKEND = "CUSTOM"
UNCOMPRESSED_CACHE_DTYPES = ("auto", "bfloat16", "float16")
"""Our pages hold their own codes; a second quantization by vLLM (fp8, int4...) cannot apply."""


def _method_help() -> str:
    listed = ", ".join(f"{m.name} ({m.status.value})" for m in method_table())
    return f"KV-cache compression method (vllm-kvpress). Methods: {listed}."


def add_cli_args(parser):
    """Add `--kv-compression` and `--kv-compression-config` to vLLM's engine-argument parser, and
    check them as soon as the parser has read them (`_checked_when_parsed`)."""
    group = parser.add_argument_group(CLI_GROUP, "KV-cache compression by the vllm-kvpress plugin.")
    group.add_argument(
        "--kv-compression", type=str, default=None, choices=[m.name for m in method_table()], metavar="NAME",
        help=_method_help(),
    )
    group.add_argument(
        "--kv-compression-config", type=str, default=None, metavar="JSON|FILE",
        help="Settings of the method as a JSON object (e.g. '{\"bits\": 2}') or a path to a "
        ".yaml/.json file; unset fields keep the method's defaults (vllm-kvpress methods lists them).",
    )
    _checked_when_parsed(parser)
    return parser


def _checked_when_parsed(parser) -> None:
    """Make `parser` validate our two flags right after parsing and report a bad one as argparse
    reports a bad flag: one line naming it and exit status 2 (`vllm serve --kv-compression-config
    '{"bits": 3}'`), instead of a traceback from engine creation. What needs the model (head size,
    context length) or other vLLM flags is still checked when the engine config is made.

    Wraps the instance's `parse_known_args`, which `parse_args` and argparse's subcommand dispatch
    (`vllm serve`) both call."""
    if getattr(parser, "_kvpress_checked", False):
        return
    parse_known_args = parser.parse_known_args

    def checked_parse_known_args(args=None, namespace=None):
        namespace, extras = parse_known_args(args, namespace)
        try:
            settings = settings_from_cli(namespace)
            if settings is not None:
                check_enabled_in_vllm(load_method_config(settings))
        except (KVCompressionConfigError, MethodNotImplementedError) as e:
            parser.error(str(e))
        return namespace, extras

    parser.parse_known_args = checked_parse_known_args
    parser._kvpress_checked = True


def settings_from_cli(args: argparse.Namespace) -> dict[str, Any] | None:
    """`{"method": ..., **overrides}` from the two flags, or None when neither is given."""
    method = vars(args).get("kv_compression")
    raw = vars(args).get("kv_compression_config")
    if method is None and raw is None:
        return None
    overrides = parse_config_argument(raw) if raw is not None else {}
    file_method = overrides.pop("method", None)
    if method is None and file_method is None:
        raise KVCompressionConfigError(
            "--kv-compression-config was given without --kv-compression; name the method with "
            "--kv-compression NAME (or a 'method' key in the config)"
        )
    if method is not None and file_method is not None and file_method != method:
        raise KVCompressionConfigError(
            f"--kv-compression {method} conflicts with method={file_method!r} in --kv-compression-config"
        )
    return {"method": method or file_method, **overrides}


def engine_args_problems(engine_args, method_config: CompressionMethod) -> list[str]:
    """Every vLLM setting that cannot be combined with compressed pages, named with its fix."""
    problems = []
    if engine_args.kv_cache_dtype not in UNCOMPRESSED_CACHE_DTYPES:
        problems.append(
            f"--kv-cache-dtype {engine_args.kv_cache_dtype} cannot be combined with --kv-compression "
            f"{method_config.method}, which stores its own packed codes; allowed: "
            f"{', '.join(UNCOMPRESSED_CACHE_DTYPES)}"
        )
    backend = engine_args.attention_backend or engine_args.attention_config.backend
    backend_name = getattr(backend, "name", backend)
    if backend_name not in (None, CUSTOM_BACKEND):
        problems.append(
            f"--attention-backend {backend_name} conflicts with --kv-compression, which serves "
            f"attention itself; allowed: {CUSTOM_BACKEND} or unset"
        )
    if engine_args.block_size not in (None, method_config.block_size):
        problems.append(
            f"--block-size {engine_args.block_size} differs from block_size={method_config.block_size} of "
            f"method '{method_config.method}'; drop --block-size or set the same block_size in "
            "--kv-compression-config"
        )
    if engine_args.speculative_config:
        problems.append("speculative decoding is not supported with --kv-compression yet; drop it")
    if getattr(engine_args, "kv_cache_dtype_skip_layers", None):
        problems.append("--kv-cache-dtype-skip-layers is not supported with --kv-compression; drop it")
    if not method_config.supports_tensor_parallel and (engine_args.tensor_parallel_size or 1) > 1:
        problems.append(
            f"--tensor-parallel-size {engine_args.tensor_parallel_size} is not supported by method "
            f"'{method_config.method}' (it chooses heads among all KV heads of a layer); allowed: 1"
        )
    for flag in ("decode_context_parallel_size", "prefill_context_parallel_size", "pipeline_parallel_size"):
        if (getattr(engine_args, flag, 1) or 1) > 1:
            problems.append(f"--{flag.replace('_', '-')} > 1 is not supported with --kv-compression yet")
    return problems


def model_problems(vllm_config, method_config: CompressionMethod) -> list[str]:
    model_config = vllm_config.model_config
    problems = method_config.problems_for_model(
        head_size=model_config.get_head_size(),
        num_kv_heads=model_config.get_total_num_kv_heads(),
        max_model_len=model_config.max_model_len,
    )
    from vllm_kvpress.backend.backend import KVPressBackend

    if model_config.dtype not in KVPressBackend.supported_dtypes:
        allowed = " or ".join(str(d).removeprefix("torch.") for d in KVPressBackend.supported_dtypes)
        problems.append(f"model dtype {model_config.dtype} is not supported; allowed: --dtype {allowed}")
    if model_config.use_mla:
        problems.append("MLA models (DeepSeek-V2/V3 style latent attention) are not supported")
    if model_config.get_sliding_window() is not None:
        problems.append("models with sliding-window attention layers are not supported yet")
    return problems


def resolve_for_engine(vllm_config, method_config: CompressionMethod) -> CompressionMethod:
    """Settings that depend on the engine vLLM built (`tail_keys: auto`), made concrete in the
    config every vLLM process reads."""
    resolved = method_config.for_engine(exact_tails_available=vllm_config.use_v2_model_runner)
    if resolved is not method_config:
        if not resolved.pages.exact_tail_keys:
            logger.warning(
                "tail_keys auto: vLLM runs its V1 model runner here, which does not hand over the request-state "
                "slots that exact tail keys are kept under; partial blocks' keys are staged per token in their "
                "pages, which loses accuracy on models with a few very large key channels (Qwen2.5: "
                "docs/quantized_pages.md). vLLM's V2 model runner (VLLM_USE_V2_MODEL_RUNNER unset or 1) keeps them "
                "exact; tail_keys staged silences this warning"
            )
        vllm_config.additional_config = {**vllm_config.additional_config, ADDITIONAL_CONFIG_KEY: resolved.to_dict()}
    return resolved


def prepare_engine_args(engine_args) -> CompressionMethod | None:
    """Validate our settings on `engine_args` and set the vLLM fields they imply, in place."""
    settings = (engine_args.additional_config or {}).get(ADDITIONAL_CONFIG_KEY)
    if settings is None:
        return None
    method_config = load_method_config(settings)
    check_enabled_in_vllm(method_config)
    if not method_config.runs_on_vllm:
        logger.warning("vllm-kvpress: serving method '%s', whose vLLM path has not passed its GPU tests (%s=1)",
                       method_config.method, ALLOW_UNVERIFIED_ENV)
    problems = engine_args_problems(engine_args, method_config)
    if problems:
        raise KVCompressionConfigError(problems)
    engine_args.additional_config = {**engine_args.additional_config, ADDITIONAL_CONFIG_KEY: method_config.to_dict()}
    if engine_args.attention_backend is None and engine_args.attention_config.backend is None:
        engine_args.attention_backend = CUSTOM_BACKEND
    engine_args.block_size = method_config.block_size
    if method_config.evicts_tokens and engine_args.enable_prefix_caching is not False:
        # a compacted block holds kept tokens under the hash of the tokens it held before, so a
        # prefix-cache hit on it would serve another request the wrong KV
        log = logger.warning if engine_args.enable_prefix_caching else logger.info
        log(
            "--kv-compression %s evicts prompt tokens: it rewrites the kept ones into a request's first "
            "blocks and frees the rest, so block hashes no longer match the tokens a block holds; "
            "prefix caching is switched off%s", method_config.method,
            " (--enable-prefix-caching is ignored)" if engine_args.enable_prefix_caching else "",
        )
        engine_args.enable_prefix_caching = False
    return method_config


def fold_cli_settings(engine_args, args: argparse.Namespace):
    """`engine_args` (what vLLM's `from_cli_args` made of `args`) with the flags folded into
    `additional_config["kv_compression"]`, which vLLM pickles to every process."""
    settings = settings_from_cli(args)
    if settings is not None:
        existing = engine_args.additional_config or {}
        if ADDITIONAL_CONFIG_KEY in existing:
            raise KVCompressionConfigError(
                f"--kv-compression and --additional-config '{{\"{ADDITIONAL_CONFIG_KEY}\": ...}}' "
                "both set the method; use one of them"
            )
        engine_args.additional_config = {**existing, ADDITIONAL_CONFIG_KEY: settings}
    return engine_args


def finish_engine_config(vllm_config, method: CompressionMethod) -> CompressionMethod:
    """Check the engine vLLM built against the method (model and model runner, before any model
    loads) and make the engine-dependent settings concrete in the config every process reads."""
    problems = model_problems(vllm_config, method) + runner_problems(vllm_config, method)
    if problems:
        raise KVCompressionConfigError(problems)
    method = resolve_for_engine(vllm_config, method)
    logger.info("kv-compression: %s with %s", method.method, method.to_dict())
    return method
