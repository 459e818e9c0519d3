"""The runner writes results after every method, so a run cut short keeps what it measured."""

import json
import os

import pytest

from vllm_kvpress.eval import runner


def _config(tmp_path, model_dir) -> runner.EvalConfig:
    runs = (runner.MethodRun("none", {}, None), runner.MethodRun("kivi", {}, {"method": "kivi"}))
    return runner.EvalConfig(
        engine="reference", model="tiny", model_path=str(model_dir), runs=runs, kv_cache_dtype="auto",
        tasks=("niah",), ruler_tasks=(), lengths=(64,), depths=(50.0,), samples_per_length=1, ppl_tokens=0,
        ppl_windows=0, prefill_chunk=0, max_model_len=128, seed=0, quick=True, out=str(tmp_path),
    )


def test_a_failing_second_method_keeps_the_first_methods_results(tmp_path, monkeypatch):
    monkeypatch.setattr(runner, "model_geometry", lambda path: (64, 2))
    monkeypatch.setattr(runner, "build_samples", lambda config, tokenizer: [])
    monkeypatch.setattr("transformers.AutoTokenizer.from_pretrained", lambda path: None)
    measured = {"method": "none", "label": "none", "device": "cpu", "tasks": {}, "compression_ratio": 1.0}

    def run_method(config, run, method_config, samples, windows, head_size):
        if run.method == "kivi":
            raise RuntimeError("engine died")
        return dict(measured), []

    monkeypatch.setattr(runner, "run_method", run_method)
    with pytest.raises(RuntimeError, match="engine died"):
        runner.evaluate(_config(tmp_path, tmp_path), [None, None], "vllm-kvpress eval ...")
    (result_dir,) = [d for d in os.listdir(tmp_path) if os.path.isdir(tmp_path / d)]
    saved = json.loads((tmp_path / result_dir / "results.json").read_text())
    assert [row["method"] for row in saved["runs"]] == ["none"]
