"""`--kv-compression` through vLLM's own CLI parser and engine-config creation (CPU, no GPU memory)."""

import json
import os
import pickle
import subprocess
import sys

import pytest

from vllm_kvpress.errors import KVCompressionConfigError, MethodNotImplementedError


def _parse(cpu_platform_args: list[str]):
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.entrypoints.openai.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = make_arg_parser(FlexibleArgumentParser())
    return AsyncEngineArgs.from_cli_args(parser.parse_args(cpu_platform_args))


def test_serve_help_lists_the_flags_and_methods():
    code = (
        "import sys, vllm.platforms\n"
        "from vllm.platforms.cpu import CpuPlatform\n"
        "vllm.platforms.current_platform = CpuPlatform()\n"
        "sys.argv = ['vllm', 'serve', '--help=KVCompression']\n"
        "from vllm.entrypoints.cli.main import main\n"
        "main()\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    text = " ".join((out.stdout + out.stderr).split())  # argparse wraps lines
    assert "--kv-compression NAME" in text and "--kv-compression-config JSON|FILE" in text, text[-2000:]
    for name in ("gear (available)", "kivi (available)", "scissorhands (available)", "snapkv (available)",
                 "sub-moe (planned)", "head-compress (offline: vllm-kvpress convert)"):  # argparse may wrap at "kv-"
        assert name in text


def test_vllm_serve_reports_a_bad_setting_as_a_usage_error(tiny_llama_dir):
    """Through `vllm serve`'s own entry point (its subcommand parser): exit status 2 and argparse's
    one-line error, no traceback, before any engine starts."""
    code = (
        "import sys, vllm.platforms\n"
        "from vllm.platforms.cpu import CpuPlatform\n"
        "vllm.platforms.current_platform = CpuPlatform()\n"
        f"sys.argv = ['vllm', 'serve', {tiny_llama_dir!r}, '--kv-compression', 'kivi',"
        " '--kv-compression-config', '{\"bits\": 3}']\n"
        "from vllm.entrypoints.cli.main import main\n"
        "main()\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr[-3000:]
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    assert out.stderr.strip().splitlines()[-1].endswith("kv-compression: kivi: bits=3 is not allowed; allowed: 2, 4, 8")


def test_cli_flags_land_in_additional_config(cpu_platform, tiny_llama_dir):
    args = _parse([tiny_llama_dir, "--kv-compression", "gear", "--kv-compression-config", '{"bits": 2}'])
    assert args.additional_config == {"kv_compression": {"method": "gear", "bits": 2}}


def test_config_file_and_method_key(cpu_platform, tiny_llama_dir, tmp_path):
    path = tmp_path / "kivi2.yaml"
    path.write_text("method: kivi\nbits: 2\n")
    args = _parse([tiny_llama_dir, "--kv-compression-config", str(path)])
    assert args.additional_config == {"kv_compression": {"method": "kivi", "bits": 2}}


def test_engine_config_selects_backend_block_size_and_resolves_defaults(engine_config):
    cfg = engine_config(additional_config={"kv_compression": {"method": "gear", "bits": 2}})
    assert cfg.attention_config.backend.name == "CUSTOM"
    assert cfg.cache_config.block_size == 64
    assert cfg.additional_config["kv_compression"] == {
        "method": "gear", "bits": 2, "group_size": "head", "block_size": 64, "tail_keys": "staged", "rank": 1,
        "outliers": "auto", "power_iters": 3,
    }


def test_no_patch_form_works_the_same(engine_config):
    cfg = engine_config(attention_backend="CUSTOM", additional_config={"kv_compression": {"method": "kivi"}})
    assert cfg.attention_config.backend.name == "CUSTOM" and cfg.cache_config.block_size == 64


def test_settings_survive_pickling_into_a_spawned_worker(engine_config, tmp_path):
    """vLLM sends VllmConfig pickled to the engine core and workers; a fresh process must resolve
    the same method and page layout from it (the worker side of the plugin)."""
    cfg = engine_config(additional_config={"kv_compression": {"method": "kivi", "bits": 2}})
    path = tmp_path / "cfg.pkl"
    path.write_bytes(pickle.dumps(cfg))
    code = (
        "import pickle, sys, json\n"
        "from vllm.plugins import load_general_plugins\n"
        "load_general_plugins()\n"
        "from vllm_kvpress.backend.state import method_from_vllm_config\n"
        f"cfg = pickle.load(open({str(path)!r}, 'rb'))\n"
        "m = method_from_vllm_config(cfg)\n"
        "print(json.dumps({'method': m.method, 'bytes_per_head': m.page_layout(64).bytes_per_head}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {"method": "kivi", "bytes_per_head": 64 * 40}


FLAGS_PROBE = """
import json, sys, vllm.platforms
from vllm.platforms.cpu import CpuPlatform
vllm.platforms.current_platform = CpuPlatform()
from vllm.engine.arg_utils import EngineArgs
cfg = EngineArgs(model=sys.argv[1], skip_tokenizer_init=True, load_format="dummy").create_engine_config()
print(json.dumps({"hash": cfg.compute_hash(), "backend": str(cfg.attention_config.backend),
                  "block_size": cfg.cache_config.block_size, "additional": cfg.additional_config,
                  "prefix_caching": cfg.cache_config.enable_prefix_caching}))
"""


def test_without_the_flag_vllm_behaves_as_if_the_plugin_were_absent(tiny_llama_dir):
    def probe(env):
        out = subprocess.run([sys.executable, "-c", FLAGS_PROBE, tiny_llama_dir], capture_output=True, text=True,
                             env={**os.environ, **env}, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        return json.loads(out.stdout.strip().splitlines()[-1])

    with_plugin = probe({})
    without_plugin = probe({"VLLM_PLUGINS": "none-such"})
    assert with_plugin == without_plugin


@pytest.mark.parametrize("settings,kwargs,error,message", [
    ({"method": "foo"}, {}, KVCompressionConfigError,
     "method='foo' is unknown; allowed: ems, gear, kivi, kv-head-compress, kvcrush, lococo, loopserve"),
    ({"method": "ems"}, {}, MethodNotImplementedError,
     ("--kv-compression ems: EMS: adaptive evict-then-merge strategy for head-wise KV-cache compression is "
      "planned but not implemented yet in vllm-kvpress; available now: kivi, gear, mikv, zipvl, kvcrush, "
      "scissorhands, snapkv, razor")),
    ({"method": "kv-head-compress"}, {}, KVCompressionConfigError,
     ("--kv-compression kv-head-compress: it converts a checkpoint offline, it is not a run-time method; run "
      "`vllm-kvpress convert kv-head-compress MODEL OUT ...` and serve OUT")),
    ({"method": "kivi", "bits": 3}, {}, KVCompressionConfigError, "kivi: bits=3 is not allowed; allowed: 2, 4, 8"),
    ({"method": "gear", "rank": 9}, {}, KVCompressionConfigError,
     "gear: rank=9 is not allowed; allowed: an integer from 0 to 4"),
    ({"method": "kivi", "group_size": 48}, {}, KVCompressionConfigError,
     "group_size=48 is not allowed; allowed: 'head', 16, 32, 64, 128"),
    ({"method": "kivi", "group_size": 128}, {}, KVCompressionConfigError,
     "group_size=128 does not divide the model's head size 64"),
    ({"method": "kivi", "bitz": 2}, {}, KVCompressionConfigError,
     "unknown setting(s) bitz for method 'kivi'; allowed: bits, group_size, block_size"),
    ({"method": "kivi"}, {"kv_cache_dtype": "fp8"}, KVCompressionConfigError,
     "--kv-cache-dtype fp8 cannot be combined with --kv-compression kivi"),
    ({"method": "kivi"}, {"attention_backend": "FLASH_ATTN"}, KVCompressionConfigError,
     "--attention-backend FLASH_ATTN conflicts with --kv-compression"),
    ({"method": "kivi"}, {"block_size": 16}, KVCompressionConfigError,
     "--block-size 16 differs from block_size=64 of method 'kivi'"),
    ({"method": "snapkv", "budget": 8192}, {}, KVCompressionConfigError,
     "budget=8192 is larger than the model's max_model_len=4096, so nothing would ever be evicted"),
    ({"method": "snapkv", "budget": 1.5}, {}, KVCompressionConfigError,
     "budget=1.5 is not allowed; allowed: a fraction of the prompt in (0, 1) or a token count (integer)"),
])
def test_bad_settings_fail_before_the_engine_starts(engine_config, settings, kwargs, error, message):
    with pytest.raises(error) as info:
        engine_config(additional_config={"kv_compression": settings}, **kwargs)
    assert message in str(info.value)


def test_all_problems_are_reported_at_once(engine_config):
    with pytest.raises(KVCompressionConfigError) as info:
        engine_config(additional_config={"kv_compression": {"method": "gear", "bits": 5, "outliers": 7}})
    assert "2 problems" in str(info.value) and "bits=5" in str(info.value) and "outliers=7" in str(info.value)


@pytest.mark.parametrize(("flags", "message"), [
    (["--kv-compression", "kivi", "--kv-compression-config", "{bits: 2}"],
     "--kv-compression-config '{bits: 2}' is neither valid JSON"),
    (["--kv-compression", "kivi", "--kv-compression-config", '{"bits": 3}'],
     "kivi: bits=3 is not allowed; allowed: 2, 4, 8"),
    (["--kv-compression", "snapkv", "--kv-compression-config", '{"budget": -5}'], "snapkv: budget=-5 is not allowed"),
    (["--kv-compression", "kivi", "--kv-compression-config", "missing.yaml"],
     "--kv-compression-config file 'missing.yaml' does not exist"),
    (["--kv-compression", "ems"], "ems"),
    (["--kv-compression", "mikv"], "'mikv' is not enabled in vLLM yet"),  # held back: see below
])
def test_bad_settings_are_a_usage_error_when_parsed(cpu_platform, tiny_llama_dir, capsys, request, flags, message):
    """As argparse reports a bad flag: one line naming it on stderr, exit status 2, no traceback."""
    if "not enabled in vLLM" in message:
        request.getfixturevalue("held_back_mikv")
    with pytest.raises(SystemExit) as info:
        _parse([tiny_llama_dir, *flags])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert ": error: " in err.strip().splitlines()[-1], err  # argparse's form: usage, then `PROG: error: ...`


def test_unsupported_head_size_is_named(engine_config, tmp_path):
    model = tmp_path / "m96"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 768, "intermediate_size": 1024,
        "num_hidden_layers": 1, "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 96,
        "vocab_size": 1000, "max_position_embeddings": 2048, "torch_dtype": "bfloat16"}))
    with pytest.raises(KVCompressionConfigError,
                       match="head size 96 is not supported by method 'kivi'; supported head sizes: 64, 128"):
        engine_config(model=str(model), additional_config={"kv_compression": {"method": "kivi"}})


def test_unsupported_model_dtype_is_named(engine_config):
    with pytest.raises(KVCompressionConfigError,
                       match="model dtype torch.float32 is not supported; allowed: --dtype float16 or bfloat16"):
        engine_config(dtype="float32", additional_config={"kv_compression": {"method": "kivi"}})
