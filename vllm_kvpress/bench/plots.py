"""Owns the PNG figures of a benchmark run; each one reads without the surrounding text.

    capacity_vs_quality.png     KV capacity (x bf16) against quality, one marker per configuration;
                                a bar chart of capacity alone when no quality score is known
    throughput_vs_context.png   output tokens/s against tokens per request, one line per configuration
    throughput_by_workload.png  output tokens/s relative to bf16, grouped by workload

vLLM's baselines always look the same (bf16 black squares, fp8 dark-grey triangles,
int4_per_token_head grey diamonds, dashed lines); plugin configurations are coloured circles.
"""

from collections import defaultdict
from pathlib import Path
from statistics import median

from vllm_kvpress.bench.quality import QualityScore, bench_config_key, main_metric

CAPACITY_VS_QUALITY = "capacity_vs_quality.png"
THROUGHPUT_VS_CONTEXT = "throughput_vs_context.png"
THROUGHPUT_BY_WORKLOAD = "throughput_by_workload.png"
BASELINE_STYLES = {
    "auto": {"color": "black", "marker": "s"},
    "fp8": {"color": "dimgray", "marker": "^"},
    "int4_per_token_head": {"color": "gray", "marker": "D"},
}
OTHER_BASELINE_STYLE = {"color": "silver", "marker": "X"}
DPI = 120


def pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; the GPU machine has no display
    import matplotlib.pyplot as plt

    return plt


def _ok(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r.get("status") == "ok"]


def _config_order(rows: list[dict]) -> list[dict]:
    seen: dict[str, dict] = {}
    for row in rows:
        seen.setdefault(row["config"]["label"], row["config"])
    return list(seen.values())


def _name(config: dict) -> str:
    label = config["label"]
    if label == "auto":
        return "bf16 (auto) - vLLM baseline"
    return f"{label} - vLLM baseline" if config.get("kind") == "baseline" else f"{label} (vllm-kvpress)"


def _style(config: dict, plugin_index: int) -> dict:
    if config.get("kind") == "baseline":
        return {**BASELINE_STYLES.get(config["label"], OTHER_BASELINE_STYLE), "linestyle": "--"}
    import matplotlib

    color = matplotlib.colormaps["tab10"](plugin_index % 10)
    return {"color": color, "marker": "o", "linestyle": "-"}


def _styles(configs: list[dict]) -> dict[str, dict]:
    styles, plugin_index = {}, 0
    for config in configs:
        styles[config["label"]] = _style(config, plugin_index)
        plugin_index += config.get("kind") != "baseline"
    return styles


def _subtitle(run: dict) -> str:
    env = (run.get("invocations") or [{}])[0].get("environment", {})
    models = ", ".join(sorted({w["model"] for w in run["workloads"]}))
    gpu_name = env.get("gpu_name") or "unknown GPU"
    # two lines: one line of all of it is wider than a one-workload figure
    return f"{models} (dummy weights), vLLM {env.get('vllm_version') or '?'}, {run['mode']} mode\n{gpu_name}"


def _capacities(rows: list[dict]) -> tuple[dict[str, float], bool]:
    """Per configuration: median capacity vs bf16 over its rows, or absolute tokens if no bf16 row."""
    ratios: dict[str, list[float]] = defaultdict(list)
    tokens: dict[str, list[float]] = defaultdict(list)
    for row in _ok(rows):
        label = row["config"]["label"]
        if (row.get("ratio_vs_bf16") or {}).get("kv_capacity") is not None:
            ratios[label].append(row["ratio_vs_bf16"]["kv_capacity"])
        tokens[label].append(row["capacity"]["kv_capacity_tokens"])
    if ratios:
        return {k: median(v) for k, v in ratios.items()}, True
    return {k: median(v) for k, v in tokens.items()}, False


def capacity_vs_quality_figure(run: dict, rows: list[dict], scores: list[QualityScore]):
    plt = pyplot()
    configs = _config_order(_ok(rows))
    styles = _styles(configs)
    capacity, relative = _capacities(rows)
    metric = main_metric(scores)
    by_key = {s.config_key: s for s in scores if s.metric == metric}
    quality = {
        c["label"]: by_key[bench_config_key(c)].score for c in configs if bench_config_key(c) in by_key
    }
    sources = sorted(
        {src for c in configs if bench_config_key(c) in by_key for src in by_key[bench_config_key(c)].sources}
    )
    x_label = (
        "KV-cache capacity (tokens, relative to bf16 = 1.0x)" if relative else "KV-cache capacity (tokens)"
    )
    fig, ax = plt.subplots(figsize=(8, 5.5))
    if any(c["label"] in quality for c in configs):
        for config in configs:
            label, style = config["label"], styles[config["label"]]
            if label not in capacity:
                continue
            if label in quality:
                ax.scatter(
                    capacity[label],
                    quality[label],
                    s=80,
                    color=style["color"],
                    marker=style["marker"],
                    label=_name(config),
                    zorder=3,
                )
            else:
                ax.axvline(
                    capacity[label],
                    color=style["color"],
                    linestyle=":",
                    label=f"{_name(config)}: quality not measured",
                )
        ax.set_xlabel(x_label)
        ax.set_ylabel(f"quality: {metric} (higher is better)")
        ax.set_title(
            f"KV-cache capacity vs quality\ncapacity: {_subtitle(run)}\nquality: eval {', '.join(sources)}",
            fontsize=9,
        )
        ax.legend(fontsize=8, loc="best")
        ax.grid(alpha=0.3)
    else:
        names = [c["label"] for c in configs if c["label"] in capacity]
        ax.barh(
            [_name(c) for c in configs if c["label"] in capacity],
            [capacity[n] for n in names],
            color=[styles[n]["color"] for n in names],
        )
        for i, n in enumerate(names):
            ax.text(
                capacity[n],
                i,
                f" {capacity[n]:.2f}x" if relative else f" {capacity[n]:,.0f}",
                va="center",
                fontsize=8,
            )
        ax.invert_yaxis()
        ax.set_xlabel(x_label)
        ax.set_title(
            f"KV-cache capacity per configuration (no quality results given)\n{_subtitle(run)}", fontsize=10
        )
        ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return fig


def throughput_vs_context_figure(run: dict, rows: list[dict]):
    plt = pyplot()
    ok = _ok(rows)
    models = sorted({r["workload"]["model"] for r in ok}) or ["-"]
    configs = _config_order(ok)
    styles = _styles(configs)
    fig, axes = plt.subplots(1, len(models), figsize=(8 * len(models), 5.5), squeeze=False)
    for ax, model in zip(axes[0], models):
        model_rows = [r for r in ok if r["workload"]["model"] == model]
        for config in configs:
            style = styles[config["label"]]
            families: dict[tuple, list[tuple[int, float]]] = defaultdict(list)
            for r in model_rows:
                if r["config"]["label"] == config["label"]:
                    w = r["workload"]
                    # Only workloads of one shape (a context sweep) are joined by a line; a line
                    # between differently shaped workloads would suggest a trend that is not there.
                    families[(w["num_requests"], w["output_len"], w["turns"])].append(
                        (w["max_context_len"], r["throughput"]["output_tokens_per_s"])
                    )
            for i, points in enumerate(families.values()):
                points.sort()
                ax.plot(
                    [p[0] for p in points],
                    [p[1] for p in points],
                    markersize=7,
                    label=_name(config) if i == 0 else None,
                    **{**style, "linestyle": style["linestyle"] if len(points) > 1 else "none"},
                )
        ticks = sorted({(r["workload"]["max_context_len"], r["workload"]["name"]) for r in model_rows})
        ax.set_xticks(
            [t[0] for t in ticks], [f"{t[0]:,} {t[1]}" for t in ticks], fontsize=8, rotation=30, ha="right"
        )
        ax.set_xlabel("tokens per request at its end (prompt + output; last turn for multi-turn)")
        ax.set_ylabel("output throughput (tokens/s, whole batch)")
        ax.set_ylim(bottom=0)
        ax.set_title(f"Output throughput vs context length\n{_subtitle(run)}", fontsize=10)
        ax.legend(fontsize=8, loc="best")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def throughput_by_workload_figure(run: dict, rows: list[dict]):
    plt = pyplot()
    ok = _ok(rows)
    configs = _config_order(ok)
    styles = _styles(configs)
    workloads = list(dict.fromkeys(r["workload"]["name"] for r in ok))
    relative = any((r.get("ratio_vs_bf16") or {}).get("output_tokens_per_s") for r in ok)
    value = {
        (r["config"]["label"], r["workload"]["name"]): r["ratio_vs_bf16"]["output_tokens_per_s"]
        if relative
        else r["throughput"]["output_tokens_per_s"]
        for r in ok
        if not relative or (r.get("ratio_vs_bf16") or {}).get("output_tokens_per_s")
    }
    fig, ax = plt.subplots(figsize=(max(6.0, 1.8 * len(workloads) + 3), 5.5))
    width = 0.8 / max(1, len(configs))
    for i, config in enumerate(configs):
        xs = [w + (i - (len(configs) - 1) / 2) * width for w in range(len(workloads))]
        heights = [value.get((config["label"], name), 0.0) for name in workloads]
        style = styles[config["label"]]
        ax.bar(
            xs,
            heights,
            width,
            label=_name(config),
            color=style["color"],
            hatch="//" if config.get("kind") == "baseline" else None,
            edgecolor="white",
        )
    if relative:
        ax.axhline(1.0, color="black", linewidth=1, linestyle="--")
    ax.set_xticks(range(len(workloads)), workloads)
    ax.set_xlabel("workload")
    ax.set_ylabel(
        "output tokens/s relative to bf16 (1.0 = bf16)" if relative else "output throughput (tokens/s)"
    )
    ax.set_title(f"Output throughput by workload\n{_subtitle(run)}", fontsize=10)
    ax.set_ylim(top=ax.get_ylim()[1] * 1.3)  # headroom, so the legend never covers a bar
    ax.legend(fontsize=8, loc="upper right")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


def write_plots(run: dict, rows: list[dict], scores: list[QualityScore], run_dir: Path) -> list[Path]:
    """Every figure of the run, into `run_dir`; none if no row succeeded."""
    if not _ok(rows):
        return []
    plt = pyplot()
    figures = {
        CAPACITY_VS_QUALITY: capacity_vs_quality_figure(run, rows, scores),
        THROUGHPUT_VS_CONTEXT: throughput_vs_context_figure(run, rows),
        THROUGHPUT_BY_WORKLOAD: throughput_by_workload_figure(run, rows),
    }
    paths = []
    for name, fig in figures.items():
        fig.savefig(run_dir / name, dpi=DPI)
        plt.close(fig)
        paths.append(run_dir / name)
    return paths
