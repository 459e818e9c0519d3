"""Owns the PNG figure of one configuration's soak: the gauges over time, read without the text.

    gauges__<config>.png   four panels on one time axis: KV-cache usage (with each leak check's
                           verdict), requests running and waiting, preemptions since the start,
                           and GPU memory used; idle periods shaded grey, bursts as red dashed
                           lines, probe rounds as blue bands. GPU memory is the whole device's
                           (NVML): with servers side by side, the sum of all of them, and the
                           panel's label says so (`memory_label`)

Drawn with bench's matplotlib set-up (bench/plots.py: files only, its DPI).
"""

from collections.abc import Mapping
from pathlib import Path

from vllm_kvpress.bench.figures import KV_CACHE_USAGE, NUM_RUNNING, NUM_WAITING
from vllm_kvpress.bench.plots import DPI, pyplot
from vllm_kvpress.soak.sampler import GPU_MEMORY_USED, PREEMPTIONS_TOTAL
from vllm_kvpress.soak.summary import CLEAN, LEAKED

GIB = 1 << 30
MEMORY_LABEL = "GPU memory used (GiB)"
VERDICT_STYLES = {
    CLEAN: {"color": "green", "marker": "o"},
    LEAKED: {"color": "red", "marker": "X"},
}
INCONCLUSIVE_STYLE = {"color": "gray", "marker": "s"}


def plot_file_name(config_slug: str) -> str:
    return f"gauges__{config_slug}.png"


def _points(series: Mapping, name: str, scale: float = 1.0, offset: float = 0.0) -> tuple[list, list]:
    pairs = [(t, v) for t, v in zip(series.get("t_s") or [], series.get(name) or []) if v is not None]
    return [t for t, _ in pairs], [(v - offset) * scale for _, v in pairs]


def _mark_events(ax, events: list[Mapping], *, label: bool) -> None:
    """Idle periods, bursts and probe rounds on one panel; labelled once, on the top panel."""
    labelled: set[str] = set()

    def once(name: str) -> str | None:
        if not label or name in labelled:
            return None
        labelled.add(name)
        return name

    for event in events:
        if event["event"] == "idle":
            ax.axvspan(event["t_s"], event["end_s"], color="lightgray", alpha=0.6, label=once("idle period"))
        elif event["event"] == "burst":
            ax.axvline(event["t_s"], color="red", linestyle="--", linewidth=1, label=once("burst sent"))
        elif event["event"] == "probes":
            ax.axvspan(event["t_s"], event["end_s"], color="tab:blue", alpha=0.25, label=once("probe round"))


def gauges_figure(result: Mapping, *, title: str, memory_label: str | None = None):
    """The four panels of module docstring for one configuration's record."""
    plt = pyplot()
    series, events = result["series"], result["events"]
    fig, axes = plt.subplots(4, 1, figsize=(11, 10), sharex=True)
    usage, running, preempted, memory = axes

    usage.plot(*_points(series, KV_CACHE_USAGE, 100), color="black", linewidth=1, label="KV-cache usage")
    for check in result["summary"]["leak_checks"]["per_check"]:
        style = VERDICT_STYLES.get(check["verdict"], INCONCLUSIVE_STYLE)
        value = check["kv_cache_usage"]
        usage.scatter(
            check["t_s"], 0 if value is None else 100 * value, s=60, zorder=3, **style,
            label=f"leak check: {check['verdict']}",
        )
    usage.set_ylabel("vllm:kv_cache_usage_perc (%)")
    usage.set_ylim(-5, 105)

    running.plot(*_points(series, NUM_RUNNING), color="tab:green", linewidth=1, label="running")
    running.plot(*_points(series, NUM_WAITING), color="tab:orange", linewidth=1, label="waiting")
    running.set_ylabel("requests")

    times, totals = _points(series, PREEMPTIONS_TOTAL)
    if totals:
        preempted.plot(times, [v - totals[0] for v in totals], color="tab:red", linewidth=1)
    preempted.set_ylabel("preemptions since start")

    times, used = _points(series, GPU_MEMORY_USED, 1 / GIB)
    if used:
        memory.plot(times, used, color="tab:purple", linewidth=1)
    else:
        memory.text(0.5, 0.5, "no GPU memory readings (no NVML here)", transform=memory.transAxes, ha="center")
    memory.set_ylabel(memory_label or MEMORY_LABEL)
    memory.set_xlabel("time since the soak started (s)")

    for i, ax in enumerate(axes):
        _mark_events(ax, events, label=i == 0)
        ax.grid(alpha=0.3)
    for ax in (usage, running):
        handles, labels = ax.get_legend_handles_labels()
        unique = dict(zip(labels, handles))  # one legend entry per verdict, however many checks
        ax.legend(unique.values(), unique.keys(), fontsize=8, loc="upper right")
    usage.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig


def write_gauges_plot(
    result: Mapping, out_dir: Path, config_slug: str, *, title: str, memory_label: str | None = None
) -> Path:
    plt = pyplot()
    fig = gauges_figure(result, title=title, memory_label=memory_label)
    path = Path(out_dir) / plot_file_name(config_slug)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path
