"""The runner writes results after every method, so a run cut short keeps what it measured; an
eviction method's compression ratio counts the tokens it keeps."""

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

    def run_method(config, run, method_config, samples, windows, head_size, num_kv_heads):
        if run.method == "kivi":
            raise RuntimeError("engine died")
        return dict(measured), []

    monkeypatch.setattr(runner, "run_method", run_method)
    with pytest.raises(RuntimeError, match="engine died"):
        runner.evaluate(_config(tmp_path, tmp_path), [None, None], "vllm-kvpress eval ...")
    (result_dir,) = [d for d in os.listdir(tmp_path) if os.path.isdir(tmp_path / d)]
    saved = json.loads((tmp_path / result_dir / "results.json").read_text())
    assert [row["method"] for row in saved["runs"]] == ["none"]


def test_an_eviction_methods_ratio_counts_the_kept_tokens():
    """Kept bytes over bf16 bytes of the full context: the page ratio times kept / prompt tokens.
    Prompts of 1000 and 300 tokens, budget 256 in blocks of 64: 256 + 40 and 256 + 44 tokens stay
    (kept blocks + the last partial block); 300 tokens keep 256 + 44 = all of them."""
    from vllm_kvpress.config import load_method_config
    from vllm_kvpress.eval.runner import MethodRun, compression_ratio

    config = load_method_config({"method": "snapkv", "budget": 256})
    run = MethodRun("snapkv", {"budget": 256}, config.to_dict())
    page_ratio = 1 / config.page_layout(64).compression_vs_bf16
    assert compression_ratio(run, config, 64, "auto", [1000, 300]) == pytest.approx(
        page_ratio * (296 + 300) / 1300
    )
    assert compression_ratio(run, config, 64, "auto", [200]) == pytest.approx(page_ratio)
    kivi = load_method_config({"method": "kivi"})
    assert compression_ratio(run, kivi, 64, "auto", [1000]) == pytest.approx(1 / kivi.page_layout(64).compression_vs_bf16)
