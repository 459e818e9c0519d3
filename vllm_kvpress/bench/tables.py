"""Owns how benchmark rows are shown as tables: markdown for the docs, plain text for the terminal.

A missing figure prints as "-"; a row that failed shows its status in place of its figures.
Columns of a figure no row has (ITL offline; observed concurrency in runs from before it was
measured) are left out.
"""

from collections.abc import Callable

GIB = 1 << 30


def _get(row: dict, *path: str):
    value = row
    for key in path:
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value


def _num(value, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _pair(row: dict, section: str, scale: float, fmt: str) -> str:
    summary = _get(row, "latency", section)
    if not summary:
        return "-"
    return f"{summary['p50'] * scale:{fmt}} / {summary['p99'] * scale:{fmt}}"


def _ratio(row: dict, name: str) -> str:
    value = _get(row, "ratio_vs_bf16", name)
    return "-" if value is None else f"{value:.2f}x"


def _saturated(row: dict) -> bool:
    return bool(_get(row, "concurrency", "saturated"))


def _max_running(row: dict) -> str:
    """Observed peak of requests running at once; `*` where every request the workload (or
    `max_num_seqs`) allows ran at once, so the figure is a floor."""
    value = _get(row, "concurrency", "max_running_requests")
    return "-" if value is None else f"{value:.0f}" + ("*" if _saturated(row) else "")


def _running_ratio(row: dict) -> str:
    ratio = _ratio(row, "max_running_requests")
    return ">=" + ratio if ratio != "-" and _saturated(row) else ratio


SATURATED_NOTE = (
    "`*`: every request the workload (or `max_num_seqs`) allows was running at once, so the "
    "observed maximum and its ratio (`>=`) are floors: a workload with more requests could show more."
)


def _config_name(row: dict) -> str:
    label = row["config"]["label"]
    return "bf16 (auto)" if label == "auto" else label


MARKDOWN_COLUMNS: list[tuple[str, Callable[[dict], str]]] = [
    ("workload", lambda r: r["workload"]["name"]),
    ("config", _config_name),
    ("status", lambda r: r.get("status", "-")),
    ("KV capacity (tokens)", lambda r: _num(_get(r, "capacity", "kv_capacity_tokens"), ",")),
    ("capacity vs bf16", lambda r: _ratio(r, "kv_capacity")),
    ("max concurrency (KV capacity)", lambda r: _num(_get(r, "capacity", "max_concurrency"), ".1f")),
    ("max running (observed)", _max_running),
    ("max running vs bf16", _running_ratio),
    ("output tok/s", lambda r: _num(_get(r, "throughput", "output_tokens_per_s"), ",.0f")),
    ("output tok/s vs bf16", lambda r: _ratio(r, "output_tokens_per_s")),
    ("total tok/s", lambda r: _num(_get(r, "throughput", "total_tokens_per_s"), ",.0f")),
    ("TTFT p50 / p99 (s)", lambda r: _pair(r, "ttft_s", 1.0, ".2f")),
    ("TPOT p50 / p99 (ms)", lambda r: _pair(r, "tpot_s", 1e3, ".1f")),
    ("ITL p50 / p99 (ms)", lambda r: _pair(r, "itl_s", 1e3, ".1f")),
    ("preemptions", lambda r: _num(_get(r, "counters", "num_preemptions"), ".0f")),
    ("prefix-cache hit rate", lambda r: _num(_get(r, "counters", "prefix_cache_hit_rate"), ".1%")),
    ("peak GPU memory (GiB)", lambda r: _num(_scaled(_get(r, "memory", "peak_used_bytes"), GIB), ".1f")),
    ("wall time (s)", lambda r: _num(_get(r, "throughput", "wall_s"), ".1f")),
]


def _scaled(value, unit: float):
    return None if value is None else value / unit


_RUNNING_CELLS = (_max_running, _running_ratio)


def _has_observed_concurrency(rows: list[dict]) -> bool:
    return any(_get(r, "concurrency", "max_running_requests") is not None for r in rows)


def markdown_table(rows: list[dict]) -> str:
    columns = MARKDOWN_COLUMNS
    if not any(_get(r, "latency", "itl_s") for r in rows):
        columns = [c for c in columns if not c[0].startswith("ITL")]  # offline mode measures no ITL
    if not _has_observed_concurrency(rows):  # result files from before it was measured
        columns = [c for c in columns if c[1] not in _RUNNING_CELLS]
    lines = [
        "| " + " | ".join(name for name, _ in columns) + " |",
        "|" + "|".join("---" if i < 3 else "---:" for i in range(len(columns))) + "|",
    ]
    for row in rows:
        lines.append("| " + " | ".join(cell(row) for _, cell in columns) + " |")
    return "\n".join(lines)


TERMINAL_COLUMNS: list[tuple[str, Callable[[dict], str]]] = [
    ("workload", lambda r: r["workload"]["name"]),
    ("config", _config_name),
    ("status", lambda r: r.get("status", "-")),
    ("KV tokens", lambda r: _num(_get(r, "capacity", "kv_capacity_tokens"), ",")),
    ("xbf16", lambda r: _ratio(r, "kv_capacity")),
    ("out tok/s", lambda r: _num(_get(r, "throughput", "output_tokens_per_s"), ",.0f")),
    ("xbf16", lambda r: _ratio(r, "output_tokens_per_s")),
    ("max run", _max_running),
    ("xbf16", _running_ratio),
    ("TPOT p50 ms", lambda r: _num(_scaled(_get(r, "latency", "tpot_s", "p50"), 1e-3), ".1f")),
    ("wall s", lambda r: _num(_get(r, "throughput", "wall_s"), ".0f")),
]


def terminal_table(rows: list[dict]) -> str:
    """A compact fixed-width table: the GPU machine returns only the tail of the output."""
    columns = TERMINAL_COLUMNS
    if not _has_observed_concurrency(rows):
        columns = [c for c in columns if c[1] not in _RUNNING_CELLS]
    cells = [[name for name, _ in columns]]
    cells += [[cell(row) for _, cell in columns] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    text = []
    for n, line in enumerate(cells):
        text.append(
            "  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths)))
        )
        if n == 0:
            text.append("  ".join("-" * w for w in widths))
    return "\n".join(text)


def failure_notes(rows: list[dict]) -> list[str]:
    """One line per configuration and status that did not succeed: the error's last line, the log."""
    notes: dict[tuple[str, str], str] = {}
    for row in rows:
        if row.get("status") == "ok":
            continue
        key = (row["config"]["label"], row.get("status", "-"))
        error_lines = [line.strip() for line in str(row.get("error") or "").splitlines() if line.strip()]
        reason = error_lines[-1] if error_lines else "no error recorded"
        log = (row.get("engine") or {}).get("log")
        notes.setdefault(key, f"{key[0]}: {key[1]}: {reason}" + (f" (log: {log})" if log else ""))
    return list(notes.values())
