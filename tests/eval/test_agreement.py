"""`vllm-kvpress agree`: agreement figures of two eval runs."""

import json

import pytest

from vllm_kvpress.cli import main
from vllm_kvpress.errors import InputError
from vllm_kvpress.eval.agreement import compare, load_predictions


def _write_run(path, rows):
    path.mkdir()
    (path / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def _row(task, sample, completion, correct, method="none"):
    return {"method": method, "task": task, "sample_id": sample, "completion": completion, "correct": correct}


def test_agreement_counts_grades_and_identical_completions(tmp_path, capsys):
    _write_run(tmp_path / "a", [_row("niah", "1", " 42.", True), _row("niah", "2", " 7", False),
                                _row("vt", "1", "X = 1", True), _row("niah", "1", " 0", False, method="kivi")])
    _write_run(tmp_path / "b", [_row("niah", "1", " 42. It is", True), _row("niah", "2", " 7", False),
                                _row("vt", "1", "Y = 2", False)])
    figures = compare(load_predictions(tmp_path / "a", "none"), load_predictions(tmp_path / "b", "none"))
    assert figures["samples"] == 3 and figures["same_grade"] == 2 and figures["identical_completions"] == 1
    assert figures["differing"] == ["vt/1"] and (figures["correct_a"], figures["correct_b"]) == (2, 1)
    assert main(["agree", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "out")]) == 0
    assert "| none | 3 | 2 (66.7%) | 1 (33.3%) | 2 | 1 |" in capsys.readouterr().out
    assert json.loads((tmp_path / "out" / "agreement.json").read_text())["same_grade"] == 2


def test_runs_with_different_samples_are_refused(tmp_path):
    _write_run(tmp_path / "a", [_row("niah", "1", "x", True)])
    _write_run(tmp_path / "b", [_row("niah", "2", "x", True)])
    with pytest.raises(ValueError, match="not given the same samples"):
        compare(load_predictions(tmp_path / "a", "none"), load_predictions(tmp_path / "b", "none"))
    with pytest.raises(InputError, match="predictions.jsonl does not exist"):
        load_predictions(tmp_path / "missing", "none")
