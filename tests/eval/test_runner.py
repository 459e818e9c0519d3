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
    monkeypatch.setattr(runner, "model_geometry", lambda path: (64, 2, 4))
    monkeypatch.setattr(runner, "build_samples", lambda config, tokenizer: [])
    monkeypatch.setattr("transformers.AutoTokenizer.from_pretrained", lambda path: None)
    measured = {"method": "none", "label": "none", "device": "cpu", "tasks": {}, "compression_ratio": 1.0}

    def run_method(config, run, method_config, samples, windows, head_size, num_kv_heads, decode_windows,
                   num_layers):
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
    expected = 1 / kivi.page_layout(64).compression_vs_bf16
    assert compression_ratio(run, kivi, 64, "auto", [1000]) == pytest.approx(expected)


def test_decode_perplexity_is_summarised_against_none(tmp_path, monkeypatch):
    """`decode-ppl` rows: the decoded half's mean NLL, and its change against `none` of the same run."""
    from vllm_kvpress.eval import results

    rows = [{"method": "none", "label": "none", "device": "cpu", "tasks": {}, "compression_ratio": 1.0,
             "decode_ppl": {"mean_nll": 2.0, "ppl": 7.389}},
            {"method": "snapkv", "label": "snapkv", "device": "cpu", "tasks": {}, "compression_ratio": 0.1,
             "decode_ppl": {"mean_nll": 2.5, "ppl": 12.18}}]
    monkeypatch.setattr(results, "environment", lambda device: {})
    runner._write(str(tmp_path), _config(tmp_path, tmp_path), "cmd", rows, [])
    assert rows[1]["decode_ppl"]["delta_nll_vs_none"] == 0.5 and "ppl" not in rows[1]
    table = results.markdown_tables({"runs": rows})
    assert "| snapkv | 0.100 | - | 12.180 | 2.5000 | +0.5000 |" in table and "decode ΔNLL vs none" in table


def test_decoded_kv_counts_what_each_decode_step_reads():
    from vllm_kvpress.config import load_method_config

    kept_once = load_method_config({"method": "snapkv", "budget": 64, "block_size": 16, "window": 16})
    rounds = load_method_config({"method": "snapkv", "budget": 64, "block_size": 16, "window": 16,
                                 "decode_interval": 32,
                                 "decode_observation_window": 8})
    # prompt 160 (10 blocks, 4 kept), 64 decoded tokens: steps read seq - 96 tokens once compacted
    seq = list(range(161, 224))
    assert runner.decoded_kv_fraction(kept_once, 160, 224) == pytest.approx(sum(n - 96 for n in seq) / sum(seq))
    # rounds at 192 and 224 tokens: the steps after 192 read 32 more freed tokens fewer
    freed = [96 + (32 if n - 1 >= 192 else 0) for n in seq]
    assert runner.decoded_kv_fraction(rounds, 160, 224) == pytest.approx(
        sum(n - f for n, f in zip(seq, freed)) / sum(seq))
    assert runner.decoded_kv_fraction(load_method_config({"method": "kivi"}), 160, 224) == 1.0


def test_decode_perplexity_windows_split_prompt_and_decode(monkeypatch):
    from vllm_kvpress.eval import corpora, perplexity

    monkeypatch.setattr(corpora, "perplexity_text", lambda: ("words", "\n\n".join(["word " * 500] * 10)))

    class Tokens:
        def encode(self, text, add_special_tokens=False):
            return list(range(len(text.split())))

    windows = perplexity.build_windows(Tokens(), 200, 64, 2, decode=True)
    assert [(w.prompt_len, w.first_scored, len(w.token_ids)) for w in windows] == [(100, 100, 200)] * 2
    assert all(w.prompt_len is None for w in perplexity.build_windows(Tokens(), 200, 64, 2))
