"""`vllm-kvpress eval` flags: bad input fails before any model loads, naming the flag and what is allowed."""

import pytest

from vllm_kvpress.errors import KVCompressionConfigError, MethodNotImplementedError
from vllm_kvpress.eval import cli


def _parse_error(capsys, argv) -> str:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--engine", "hf", "--method", "none"], ["--engine", "invalid choice: 'hf'", "reference", "vllm"]),
        (
            ["--engine", "reference", "--method", "none,snapkw"],
            ["--method", "unknown snapkw", "none", "kivi", "gear", "snapkv"],
        ),
        (
            ["--engine", "reference", "--method", "none", "--tasks", "niah,longbench"],
            ["--tasks", "unknown longbench", "niah, ruler, multiturn, multiturn-position, ppl"],
        ),
        (
            ["--engine", "reference", "--method", "none", "--ruler-tasks", "qa_1"],
            ["--ruler-tasks", "niah_single_1"],
        ),
        (["--engine", "reference", "--method", "none", "--depths", "50,120"], ["--depths", "from 0 to 100"]),
        (
            ["--engine", "reference", "--method", "none", "--kv-cache-dtype", "int8"],
            ["--kv-cache-dtype", "fp8", "int4_per_token_head"],
        ),
    ],
    ids=["engine", "method", "tasks", "ruler-tasks", "depths", "kv-cache-dtype"],
)
def test_bad_flag_values_name_the_flag_and_allowed_values(capsys, argv, expected):
    err = _parse_error(capsys, argv)
    for text in expected:
        assert text in err, err


def test_vllm_kv_dtype_baseline_needs_the_vllm_engine_and_method_none():
    with pytest.raises(ValueError, match="--kv-cache-dtype fp8 .* needs --engine vllm and --method none"):
        cli.main(["--engine", "reference", "--method", "none", "--kv-cache-dtype", "fp8"])
    with pytest.raises(ValueError, match="needs --engine vllm and --method none"):
        cli.main(["--engine", "vllm", "--method", "none,kivi", "--kv-cache-dtype", "fp8"])


def test_decode_perplexity_needs_the_reference_engine():
    with pytest.raises(ValueError, match="--tasks decode-ppl .* allowed: --engine reference"):
        cli.main(["--engine", "vllm", "--method", "none", "--tasks", "niah,decode-ppl"])


def test_bad_method_settings_are_rejected_with_the_allowed_values():
    with pytest.raises(KVCompressionConfigError, match=r"bits=3 is not allowed; allowed: 2, 4, 8"):
        cli.main(["--engine", "reference", "--method", "kivi", "--config", '{"bits": 3}'])
    with pytest.raises(KVCompressionConfigError, match="unknown setting"):
        cli.main(["--engine", "reference", "--method", "kivi", "--config", '{"rank": 1}'])


def test_planned_method_says_it_is_not_implemented():
    with pytest.raises(MethodNotImplementedError, match="planned but not implemented"):
        cli.main(["--engine", "reference", "--method", "ems"])


def test_lengths_beyond_the_context_are_rejected(smollm2_path):
    with pytest.raises(ValueError, match="--lengths 9000 leave no room .* --max-model-len 8192"):
        cli.main(["--engine", "reference", "--model", "smollm2", "--method", "none", "--lengths", "9000"])


def test_quick_grid_and_explicit_flags_resolve_into_the_config(smollm2_path):
    parser_args = [
        "--engine",
        "reference",
        "--model",
        "smollm2",
        "--method",
        "none,kivi",
        "--quick",
        "--lengths",
        "1500",
        "--config",
        '{"bits": 2}',
    ]
    import argparse

    parser = argparse.ArgumentParser()
    cli.add_parser(parser.add_subparsers(dest="command"))
    config, method_configs = cli.build_config(parser.parse_args(["eval", *parser_args]))
    assert config.lengths == (1500,)  # an explicit flag wins over --quick
    assert config.depths == cli.QUICK["depths"] and config.prefill_chunk == cli.QUICK["prefill_chunk"]
    assert [r.label for r in config.runs] == ["none", "kivi_bits=2"]
    assert method_configs[0] is None and method_configs[1].bits == 2
    assert config.max_model_len == 8192 and config.model_path == smollm2_path
    assert config.directory_name() == "smollm2-reference-none+kivi_bits=2-quick"
