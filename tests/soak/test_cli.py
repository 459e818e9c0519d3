"""`vllm-kvpress soak` flags: registered where the top-level command looks, defaults and flags reach
the request, and every bad flag is one usage error (exit status 2) before anything is written."""

import subprocess
import sys

import pytest

from vllm_kvpress import cli as top_level_cli
from vllm_kvpress.soak import cli as soak_cli
from vllm_kvpress.soak.plan import DEFAULT_CANCEL_SHARE, DEFAULT_CYCLE_S
from vllm_kvpress.soak.probes import default_lengths


def test_soak_is_registered_where_the_top_level_cli_looks():
    assert top_level_cli.SUBCOMMAND_MODULES["soak"] == "vllm_kvpress.soak.cli"


def test_help_builds_without_vllm_torch_or_an_http_client():
    code = (
        "import sys; from vllm_kvpress.cli import main\n"
        "try:\n    main(['soak', '--help'])\nexcept SystemExit as e:\n    assert e.code == 0\n"
        "heavy = [m for m in ('vllm', 'torch', 'transformers', 'aiohttp', 'matplotlib') if m in sys.modules]\n"
        "assert not heavy, heavy"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "--duration-s" in done.stdout and "--cancel-share" in done.stdout and "docs/soak.md" in done.stdout


def _args(*argv: str):
    return top_level_cli.build_parser().parse_args(["soak", *argv])


def test_defaults_and_flags_reach_the_request(tmp_path):
    request = soak_cli.build_request(_args(
        "--model", "llama-3.1-8b", "--max-model-len", "16384", "--configs", "gear", 'kivi:{"bits":2}',
        "--duration-s", "300", "--kv-cache-memory-bytes", "8G", "--seed", "3", "--out", str(tmp_path / "o"),
    ))
    assert [c.label for c in request.configs] == ["auto", "gear", "kivi:bits=2"]  # bf16 first, the reference
    assert request.traffic.duration_s == 300 and request.traffic.cancel_share == DEFAULT_CANCEL_SHARE
    assert request.traffic.cycle_s == DEFAULT_CYCLE_S
    assert request.engine.kv_cache_memory_bytes == 8 * 2**30 and request.engine.seed == 3
    assert (request.model.real_weights, request.model.has_tokenizer, request.max_model_len) == (False, False, 16384)
    assert request.model.recorded_path == "vllm_kvpress/bench/model_configs/llama-3.1-8b"
    assert request.probe_lengths == tuple(default_lengths(16384)) and len(request.probe_lengths) == 3
    assert not (tmp_path / "o").exists()  # nothing is written before the run
    assert request.side_by_side is False


def test_side_by_side_reaches_the_request_with_the_total_share(tmp_path):
    request = soak_cli.build_request(_args(
        "--model", "smollm2", "--configs", "gear", "snapkv", "--side-by-side", "--gpu-memory-utilization", "0.6",
        "--kv-cache-memory-bytes", "1G", "--out", str(tmp_path / "o"),
    ))
    assert request.side_by_side is True and len(request.configs) == 3
    assert request.engine.gpu_memory_utilization == 0.6  # the servers' total; the runner splits it
    assert request.engine.kv_cache_memory_bytes == 2**30


def _usage_error(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as info:
        top_level_cli.main(["soak", *argv])
    assert info.value.code == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert last.startswith("vllm-kvpress soak: error: ") and "Traceback" not in err, err
    return last


MODEL = ["--model", "llama-3.1-8b"]


@pytest.mark.parametrize(
    "argv, message",
    [
        ([], "--model is required; allowed: llama-3.1-8b, qwen2.5-7b, smollm2, qwen0.5b"),
        (["--model", "foo"], "--model 'foo' is neither a known model nor a directory with a config.json"),
        ([*MODEL, "--configs", "gaer"], "'gaer' is unknown; allowed:"),
        ([*MODEL, "--baselines", "none"], "no configuration to run"),
        ([*MODEL, "--duration-s", "0"], "--duration-s 0: allowed: more than 0 seconds"),
        ([*MODEL, "--duration-s", "-5"], "--duration-s -5: allowed: more than 0 seconds"),
        ([*MODEL, "--cancel-share", "1"], "--cancel-share 1: allowed: from 0 up to, not including, 1"),
        ([*MODEL, "--cancel-share", "-0.1"], "--cancel-share -0.1: allowed: from 0 up to, not including, 1"),
        ([*MODEL, "--cancel-share", "nan"], "--cancel-share nan: allowed"),
        ([*MODEL, "--stream-share", "1.5"], "--stream-share 1.5: allowed: from 0 to 1"),
        ([*MODEL, "--idle-s", "120"], "--idle-s 120: allowed: 0 seconds or more, less than --cycle-s"),
        ([*MODEL, "--request-rate", "inf"], "--request-rate inf: allowed: more than 0 per second"),
        ([*MODEL, "--max-output-len", "0"], "--max-output-len 0: allowed: 1 token or more"),
        ([*MODEL, "--max-model-len", "200000"], "--max-model-len 200000: allowed: 52 to the model's context, 131072"),
        ([*MODEL, "--max-model-len", "8192", "--probe-lengths", "8170"], "--probe-lengths 8170: allowed: 1 to 8160"),
        ([*MODEL, "--probe-depths", "150"], "--probe-depths '150': allowed: numbers from 0 to 100"),
        ([*MODEL, "--drain-timeout-s", "0"], "--drain-timeout-s 0: allowed: more than 0 seconds"),
        ([*MODEL, "--side-by-side", "--gpu-memory-utilization", "1"],
         "--gpu-memory-utilization 1 with --side-by-side: allowed: more than 0, less than 1"),
        ([*MODEL, "--side-by-side", "--configs", "gear", "snapkv", "--gpu-memory-utilization", "0.05"],
         "--side-by-side with 3 configurations: --gpu-memory-utilization 0.05 leaves each server 0.0166 of the GPU; "
         "allowed: at least 0.02 each, so --gpu-memory-utilization 0.06 or more (less than 1), or fewer --configs"),
        ([*MODEL, "--side-by-side", "--tensor-parallel-size", "2"],
         "--side-by-side puts every server on one GPU: --tensor-parallel-size 2 is not allowed with it"),
    ],
)
def test_bad_flags_are_usage_errors_that_write_nothing(capsys, tmp_path, argv, message):
    out = tmp_path / "out"
    assert message in _usage_error(capsys, [*argv, "--out", str(out)])
    assert not out.exists()


def test_results_never_overwrite_others(capsys, tmp_path):
    (tmp_path / "earlier.json").write_text("{}")
    assert f"--out {tmp_path} is not empty" in _usage_error(capsys, [*MODEL, "--out", str(tmp_path)])
    assert "--out is required" in _usage_error(capsys, MODEL)
