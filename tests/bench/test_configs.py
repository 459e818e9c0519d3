"""Configuration specs: parsing, errors that name the allowed values, and the vLLM settings they
imply, checked against vLLM 0.26.0's own EngineArgs and `vllm serve` parser."""

import typing

import pytest

from vllm_kvpress.bench.configs import (
    BASELINE_KV_CACHE_DTYPES,
    DEFAULT_BASELINES,
    ConfigSpecError,
    EngineOptions,
    engine_settings,
    offline_engine_kwargs,
    parse_config_spec,
    resolve_configs,
    serve_argv,
    split_config_specs,
)
from vllm_kvpress.bench.models import get_model
from vllm_kvpress.config import load_method_config
from vllm_kvpress.errors import MethodNotImplementedError

FIRST_GPU_RUN = ["auto", "fp8", "int4_per_token_head", "gear", 'gear:{"bits": 2}', 'kivi:{"bits":2}']
EVICTION_SPECS = ['snapkv:{"budget":2048,"bits":4}', "scissorhands", 'kvcrush:{"budget": 0.25}']
"""Token-eviction methods: their gain is in observed concurrency, not in capacity (bench.md)."""


def test_split_keeps_commas_inside_json():
    assert split_config_specs(["auto,fp8", 'gear:{"bits":2,"rank":0},kivi', " gear "]) == [
        "auto",
        "fp8",
        'gear:{"bits":2,"rank":0}',
        "kivi",
        "gear",
    ]


def test_baseline_spec():
    config = parse_config_spec("int4_per_token_head")
    assert (config.label, config.kv_cache_dtype, config.is_baseline) == (
        "int4_per_token_head",
        "int4_per_token_head",
        True,
    )
    assert config.method_settings is None


def test_plugin_spec_is_validated_and_resolved_by_the_plugin():
    config = parse_config_spec('gear:{"bits": 2}')
    assert config.label == "gear:bits=2" and config.slug == "gear-bits2"
    assert config.kv_cache_dtype == "auto" and not config.is_baseline
    assert config.method_settings == load_method_config({"method": "gear", "bits": 2}).to_dict()
    assert config.method_settings["bits"] == 2
    plain = parse_config_spec("gear")
    assert plain.label == "gear" and plain.method_settings == load_method_config({"method": "gear"}).to_dict()


@pytest.mark.parametrize(
    "spec, fragments",
    [
        ("gaer", ["'gaer' is unknown", "auto", "int4_per_token_head", "gear", "kivi"]),
        ("fp9", ["'fp9' is unknown", "fp8"]),
        ('fp8:{"bits": 2}', ["takes no settings"]),
        ("gear:{bits: 2}", ["not valid JSON", 'gear:{"bits": 2}']),
        ("gear:[2]", ["must be a JSON object"]),
        ("gear:", ["nothing after ':'"]),
        ('gear:{"bits": 3}', ["bits=3 is not allowed", "allowed: 2, 4, 8"]),
        ('gear:{"bitz": 2}', ["unknown setting(s) bitz", "allowed: bits"]),
        ('gear:{"method": "kivi"}', ['drop "method"']),
    ],
)
def test_bad_specs_fail_with_what_is_allowed(spec, fragments):
    with pytest.raises(ConfigSpecError) as info:
        parse_config_spec(spec)
    message = str(info.value)
    assert message.startswith(f"--configs {spec!r}")
    for fragment in fragments:
        assert fragment in message


def test_eviction_spec_with_settings():
    config = parse_config_spec('snapkv:{"budget":2048,"bits":4}')
    assert config.label == "snapkv:bits=4,budget=2048" and config.slug == "snapkv-bits4-budget2048"
    assert config.overrides == {"budget": 2048, "bits": 4}
    assert config.kv_cache_dtype == "auto" and not config.is_baseline
    resolved = load_method_config({"method": "snapkv", "budget": 2048, "bits": 4}).to_dict()
    assert config.method_settings == resolved
    assert resolved["bits"] == 4 and resolved["budget"] == 2048 and resolved["block_size"] == 64
    # the defaults the user did not type are filled in (configs/snapkv.yaml)
    assert {"window", "sink", "observation_window", "kernel_size", "group_size"} <= set(resolved)
    both = resolve_configs(['auto,snapkv:{"budget":2048,"bits":4},kvcrush:{"budget":0.25}'], baselines=[])
    assert [c.label for c in both] == ["auto", "snapkv:bits=4,budget=2048", "kvcrush:budget=0.25"]
    for name in ("snapkv", "scissorhands", "kvcrush"):
        assert parse_config_spec(name).method_settings == load_method_config({"method": name}).to_dict()


@pytest.mark.parametrize(
    "spec, fragments",
    [
        ('snapkv:{"kernel_size": 4}', ["kernel_size=4 is not allowed", "allowed: 1, 3, 5"]),
        ('snapkv:{"budget": 16}', ["budget=16 is not allowed", "at least one block"]),
        ('kvcrush:{"budget": 1.5}', ["budget=1.5 is not allowed", "(0, 1)"]),
        ('scissorhands:{"budgt": 2048}', ["unknown setting(s) budgt", "budget"]),
    ],
)
def test_bad_eviction_settings_fail_with_what_is_allowed(spec, fragments):
    with pytest.raises(ConfigSpecError) as info:
        parse_config_spec(spec)
    for fragment in fragments:
        assert fragment in str(info.value)


def test_planned_method_is_not_implemented():
    with pytest.raises(MethodNotImplementedError, match="ems.*planned"):
        parse_config_spec("ems")


def test_a_method_not_enabled_in_vllm_is_refused_before_any_engine_starts(monkeypatch, held_back_mikv):
    with pytest.raises(MethodNotImplementedError, match="'mikv' is not enabled in vLLM yet.*--engine reference"):
        parse_config_spec("mikv")
    monkeypatch.setenv("KVPRESS_ALLOW_UNVERIFIED_METHODS", "1")
    assert parse_config_spec("mikv").method_settings["low_bits"] == 2


def test_baselines_are_vllm_cache_dtypes():
    from vllm.config.cache import CacheDType

    assert set(BASELINE_KV_CACHE_DTYPES) <= set(typing.get_args(CacheDType))
    assert set(DEFAULT_BASELINES) == {"auto", "fp8", "int4_per_token_head"}


def test_resolve_puts_baselines_first_once():
    configs = resolve_configs(["fp8,gear", 'gear:{"bits":2}'])
    assert [c.label for c in configs] == ["auto", "fp8", "int4_per_token_head", "gear", "gear:bits=2"]
    with pytest.raises(ConfigSpecError, match="no configuration"):
        resolve_configs([], baselines=[])


def _settings(spec: str, options: EngineOptions | None = None) -> dict:
    return engine_settings(
        parse_config_spec(spec),
        model_dir=str(get_model("llama-3.1-8b").config_dir),
        max_model_len=8704,
        options=options or EngineOptions(),
    )


@pytest.mark.parametrize("spec", FIRST_GPU_RUN + EVICTION_SPECS)
def test_offline_kwargs_are_accepted_by_vllm_engine_args(spec):
    from vllm.engine.arg_utils import EngineArgs

    from vllm_kvpress.engine_args import prepare_engine_args

    kwargs = offline_engine_kwargs(_settings(spec))
    engine_args = EngineArgs(**kwargs)  # a TypeError here means vLLM renamed a field
    for name, value in kwargs.items():
        assert getattr(engine_args, name) == value, name
    assert engine_args.disable_log_stats is False  # RequestOutput.metrics needs it
    method_config = prepare_engine_args(engine_args)  # what the plugin does in create_engine_config
    if spec in DEFAULT_BASELINES:
        assert method_config is None and engine_args.kv_cache_dtype == spec
    else:
        assert method_config.to_dict() == parse_config_spec(spec).method_settings
        assert engine_args.attention_backend == "CUSTOM"
        assert engine_args.block_size == method_config.block_size
        # evicted tokens cannot be shared: eviction runs without prefix caching (bench.md)
        assert (engine_args.enable_prefix_caching is False) == method_config.evicts_tokens


def test_same_settings_for_every_configuration():
    options = EngineOptions(
        gpu_memory_utilization=0.85,
        max_num_seqs=128,
        max_num_batched_tokens=4096,
        enable_prefix_caching=False,
        kv_cache_memory_bytes=20 * 2**30,
    )
    shared = [
        {k: v for k, v in _settings(s, options).items() if k not in ("kv_cache_dtype", "additional_config")}
        for s in FIRST_GPU_RUN
    ]
    assert all(s == shared[0] for s in shared)
    assert shared[0]["gpu_memory_utilization"] == 0.85 and shared[0]["enable_prefix_caching"] is False
    assert shared[0]["kv_cache_memory_bytes"] == 20 * 2**30
    from vllm.engine.arg_utils import EngineArgs

    assert EngineArgs(**offline_engine_kwargs(shared[0])).kv_cache_memory_bytes == 20 * 2**30
    assert "kv_cache_memory_bytes" not in _settings(FIRST_GPU_RUN[0])  # default: vLLM's profiling
    assert shared[0]["seed"] == 0 and shared[0]["enforce_eager"] is False  # CUDA graphs on


@pytest.mark.parametrize("spec", FIRST_GPU_RUN + EVICTION_SPECS)
def test_serve_flags_parse_to_the_same_settings(spec, vllm_cpu_platform):
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.entrypoints.openai.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    from vllm_kvpress.plugin import register

    register()  # the plugin's --kv-compression flags, as `vllm serve` loads them
    settings = _settings(spec, EngineOptions(enable_prefix_caching=False))
    args = make_arg_parser(FlexibleArgumentParser()).parse_args(serve_argv(settings, port=8123))
    assert args.model_tag == settings["model"] and args.port == 8123
    args.model = args.model_tag  # what `vllm serve` does with the positional model
    engine_args = AsyncEngineArgs.from_cli_args(args)
    for name, value in settings.items():
        if name == "additional_config":
            continue
        assert getattr(engine_args, name) == value, name
    expected = settings.get("additional_config", {}).get("kv_compression")
    if expected is None:
        assert not (engine_args.additional_config or {}).get("kv_compression")
    else:
        # the flags carry the resolved settings; the plugin validates them to the same config
        assert load_method_config(engine_args.additional_config["kv_compression"]).to_dict() == expected
