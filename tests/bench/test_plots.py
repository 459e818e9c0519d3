"""Figures: produced as PNG files from sample results, readable on their own."""

import json

from vllm_kvpress.bench import plots, results
from vllm_kvpress.bench.quality import load_quality

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _legend(fig) -> list[str]:
    return [t.get_text() for ax in fig.axes if ax.get_legend() for t in ax.get_legend().get_texts()]


def test_every_figure_is_written_as_png(offline_run, tmp_path):
    combined = results.load_combined(offline_run)
    paths = plots.write_plots(combined, combined["rows"], [], tmp_path)
    assert [p.name for p in paths] == [
        plots.CAPACITY_VS_QUALITY,
        plots.THROUGHPUT_VS_CONTEXT,
        plots.THROUGHPUT_BY_WORKLOAD,
    ]
    for path in paths:
        data = path.read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 10_000


def test_capacity_figure_without_quality_shows_capacity_per_configuration(offline_run):
    combined = results.load_combined(offline_run)
    fig = plots.capacity_vs_quality_figure(combined, combined["rows"], [])
    ax = fig.axes[0]
    assert "no quality results" in ax.get_title()
    assert "relative to bf16" in ax.get_xlabel()
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert labels[0] == "bf16 (auto) - vLLM baseline" and "gear:bits=2 (vllm-kvpress)" in labels
    assert "kivi:bits=2 (vllm-kvpress)" not in labels  # it failed: no capacity to show
    widths = {label: patch.get_width() for label, patch in zip(labels, ax.patches)}
    assert widths["fp8 - vLLM baseline"] == 2.0


def test_capacity_figure_with_quality_places_each_configuration(offline_run, tmp_path):
    combined = results.load_combined(offline_run)
    eval_dir = tmp_path / "smollm2-vllm-none+gear"
    eval_dir.mkdir()
    gear = next(r["config"]["method_settings"] for r in combined["rows"] if r["config"]["label"] == "gear")
    (eval_dir / "results.json").write_text(
        json.dumps(
            {
                "name": eval_dir.name,
                "runs": [
                    {
                        "method": "none",
                        "method_config": None,
                        "kv_cache_dtype": "auto",
                        "tasks": {"niah": {"accuracy": 100.0}},
                    },
                    {
                        "method": "none",
                        "method_config": None,
                        "kv_cache_dtype": "fp8",
                        "tasks": {"niah": {"accuracy": 99.0}},
                    },
                    {
                        "method": "gear",
                        "method_config": gear,
                        "kv_cache_dtype": "auto",
                        "tasks": {"niah": {"accuracy": 97.0}},
                    },
                ],
            }
        )
    )
    fig = plots.capacity_vs_quality_figure(combined, combined["rows"], load_quality([eval_dir]))
    ax = fig.axes[0]
    assert ax.get_ylabel() == "quality: mean task accuracy (%) (higher is better)"
    assert eval_dir.name in ax.get_title()  # where the quality numbers come from
    legend = _legend(fig)
    assert "bf16 (auto) - vLLM baseline" in legend and "gear (vllm-kvpress)" in legend
    assert "int4_per_token_head - vLLM baseline: quality not measured" in legend
    points = {tuple(c.get_offsets()[0]) for c in ax.collections}
    assert (1.0, 100.0) in points and (2.0, 99.0) in points


def test_throughput_figures_mark_baselines_and_label_axes_with_units(offline_run):
    combined = results.load_combined(offline_run)
    fig = plots.throughput_vs_context_figure(combined, combined["rows"])
    ax = fig.axes[0]
    assert "tokens/s" in ax.get_ylabel() and "tokens per request" in ax.get_xlabel()
    assert "bf16 (auto) - vLLM baseline" in _legend(fig)
    styles = {
        line.get_label(): (line.get_marker(), line.get_color(), line.get_linestyle())
        for line in ax.get_lines()
    }
    assert styles["bf16 (auto) - vLLM baseline"] == ("s", "black", "--")
    assert styles["int4_per_token_head - vLLM baseline"][:2] == ("D", "gray")
    assert styles["gear (vllm-kvpress)"][0] == "o" and styles["gear (vllm-kvpress)"][2] == "-"
    bars = plots.throughput_by_workload_figure(combined, combined["rows"])
    assert "relative to bf16" in bars.axes[0].get_ylabel()
    assert [t.get_text() for t in bars.axes[0].get_xticklabels()] == [
        "long-prompt",
        "decode-heavy",
        "multi-turn",
    ]
