"""A bad input to a `vllm-kvpress` command is reported as argparse reports a bad flag: the
command's usage, then one `vllm-kvpress CMD: error: ...` line naming the input and what is
allowed, exit status 2; no traceback, and nothing written."""

import json

import pytest

from vllm_kvpress.cli import main


def _usage_error(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"vllm-kvpress {argv[0]}: error: ") and "Traceback" not in err, err
    return last


def test_agree_names_a_run_directory_that_is_not_there(capsys, tmp_path):
    last = _usage_error(capsys, ["agree", str(tmp_path / "nowhere"), str(tmp_path)])
    assert "nowhere/predictions.jsonl does not exist; pass the directory of a `vllm-kvpress eval` run" in last


def test_agree_names_a_method_the_runs_do_not_have(capsys, tmp_path):
    for run in ("a", "b"):
        (tmp_path / run).mkdir()
        row = {"task": "niah", "sample_id": "0", "method": "none", "correct": True, "completion": "42"}
        (tmp_path / run / "predictions.jsonl").write_text(json.dumps(row) + "\n")
    last = _usage_error(capsys, ["agree", str(tmp_path / "a"), str(tmp_path / "b"), "--method", "gear"])
    assert "no samples of this method in the runs; --method names a method label of both runs" in last


def test_model_names_what_is_allowed(capsys):
    last = _usage_error(capsys, ["model", "foo"])
    assert "model 'foo' is neither an embedded model nor an existing checkpoint directory" in last
    assert "--model" not in last  # the command has no such flag


def test_eval_on_vllm_without_a_gpu_writes_nothing(capsys, tmp_path, monkeypatch):
    import os

    import torch

    # torch's own check initializes CUDA unless it is told to ask NVML (vLLM's import tells it), and
    # vLLM's engine process, forked after such a check, cannot use the GPU. So the GPU check must
    # come after vLLM is imported, or go through vLLM's platform.
    monkeypatch.delenv("PYTORCH_NVML_BASED_CUDA_CHECK", raising=False)

    def cuda_check():
        assert os.environ.get("PYTORCH_NVML_BASED_CUDA_CHECK") == "1", "CUDA checked by initializing it"
        return False  # the CPU machine this case is about

    monkeypatch.setattr(torch.cuda, "is_available", cuda_check)
    last = _usage_error(capsys, ["eval", "--engine", "vllm", "--method", "gear", "--tasks", "niah",
                                 "--lengths", "500", "--out", str(tmp_path / "out")])
    assert "--engine vllm needs a CUDA GPU" in last
    assert not (tmp_path / "out").exists()


def test_eval_settings_errors_name_its_own_flag(capsys, tmp_path):
    last = _usage_error(capsys, ["eval", "--engine", "reference", "--method", "snapkv", "--config", "{budget: 1}",
                                 "--out", str(tmp_path)])
    assert "--config '{budget: 1}' is neither valid JSON" in last and "--kv-compression-config" not in last


def test_a_negative_budget_is_one_problem(capsys, tmp_path):
    last = _usage_error(capsys, ["eval", "--engine", "reference", "--method", "snapkv", "--config", '{"budget": -5}',
                                 "--out", str(tmp_path)])
    assert last.endswith("kv-compression: snapkv: budget=-5 is not allowed; allowed: at least one block "
                         "(block_size=64) of tokens, or a fraction in (0, 1)")


def test_report_outside_the_repository_writes_nothing(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    last = _usage_error(capsys, ["report"])
    assert "--results-dir docs/results is not a directory here" in last
    assert list(tmp_path.iterdir()) == []
