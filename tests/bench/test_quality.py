"""Quality scores from eval result files, matched to bench configurations by the KV cache they denote."""

import json

import pytest

from vllm_kvpress.bench.configs import parse_config_spec
from vllm_kvpress.bench.quality import MEAN_ACCURACY, bench_config_key, load_quality, main_metric
from vllm_kvpress.config import load_method_config


def _key(spec: str) -> str:
    return bench_config_key(parse_config_spec(spec).to_dict())


def _eval_results(tmp_path, runs) -> object:
    """An eval run directory laid out as `vllm-kvpress eval` writes it (eval/results.py)."""
    run_dir = tmp_path / "smollm2-reference-none+gear"
    run_dir.mkdir()
    (run_dir / "results.json").write_text(json.dumps({"name": run_dir.name, "runs": runs}))
    return run_dir


def test_eval_harness_results_give_per_task_and_mean_accuracy(tmp_path):
    gear2 = load_method_config({"method": "gear", "bits": 2}).to_dict()
    run_dir = _eval_results(
        tmp_path,
        [
            {
                "label": "none",
                "method": "none",
                "method_config": None,
                "kv_cache_dtype": "auto",
                "tasks": {"niah": {"accuracy": 100.0, "correct": 8, "total": 8}, "ruler": {"accuracy": 90.0}},
            },
            {
                "label": "gear_bits=2",
                "method": "gear",
                "method_config": gear2,
                "kv_cache_dtype": "auto",
                "tasks": {"niah": {"accuracy": 75.0}, "ruler": {"accuracy": 85.0}},
            },
        ],
    )
    scores = {(s.config_key, s.metric): s for s in load_quality([run_dir])}
    assert scores[(_key("auto"), MEAN_ACCURACY)].score == pytest.approx(95.0)
    assert scores[(_key('gear:{"bits": 2}'), "niah accuracy (%)")].score == 75.0
    assert scores[(_key('gear:{"bits":2}'), MEAN_ACCURACY)].sources == (run_dir.name,)
    assert (_key("gear"), MEAN_ACCURACY) not in scores  # 4-bit gear was not evaluated
    assert main_metric(list(scores.values())) == MEAN_ACCURACY


def test_defaults_written_out_match_the_short_form():
    assert _key("gear") == _key('gear:{"bits": 4}')  # 4 is gear's default (configs/gear.yaml)
    assert _key("gear") != _key('gear:{"bits": 2}')
    assert _key("auto") != _key("fp8")


def test_plain_records_are_averaged_per_configuration_and_metric(tmp_path):
    (tmp_path / "a.json").write_text(
        json.dumps(
            {
                "results": [
                    {"config": 'kivi:{"bits": 2}', "metric": "passkey", "score": 0.8},
                    {"config": 'kivi:{"bits": 2}', "metric": "passkey", "score": 0.6},
                    {"config": "kivi", "note": "no score: skipped"},
                    {"config": "no-such-method", "score": 1.0},
                ]
            }
        )
    )
    (tmp_path / "b.json").write_text(json.dumps({"config": "fp8", "metric": "passkey", "score": 0.99}))
    scores = {(s.config_key, s.metric): s for s in load_quality([tmp_path / "a.json", tmp_path / "b.json"])}
    assert set(scores) == {(_key('kivi:{"bits":2}'), "passkey"), (_key("fp8"), "passkey")}
    assert scores[(_key('kivi:{"bits":2}'), "passkey")].score == pytest.approx(0.7)
    assert scores[(_key('kivi:{"bits":2}'), "passkey")].count == 2


def test_unreadable_files_are_named(tmp_path):
    bad = tmp_path / "eval_bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="eval_bad.json is not JSON"):
        load_quality([bad])
    with pytest.raises(ValueError, match="missing.json: cannot read"):
        load_quality([tmp_path / "missing.json"])
