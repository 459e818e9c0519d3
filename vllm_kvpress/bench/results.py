"""Owns the result files of a benchmark run and the run directory that holds them.

    <results-root>/<model>__<workloads>__<configs>[__online][-N]/
        run.json       settings, configurations, and every invocation (command, environment)
        results.json   the combined file: run.json's content + every row, ratios filled in
        rows/<workload>__<config>.json   one row per (configuration, workload), self-contained
        rows/engine__<config>__<model>-<max_model_len>.json   capacity right after engine start
        results.md     the table;  *.png  the figures (plots.py)
        logs/          full worker / server logs (ignored by git through the run's .gitignore)

A run directory is never overwritten: a second run with the same name gets `-2`, `-3`, ...
`--resume DIR` adds configurations to an existing run, or reruns the ones that failed, under
the same settings (the GPU command limit may not fit every configuration into one command).
"""

import hashlib
import json
from pathlib import Path
from typing import Any

from vllm_kvpress.bench.configs import BenchConfig
from vllm_kvpress.bench.figures import add_ratios_vs_bf16
from vllm_kvpress.bench.workloads import Workload

SCHEMA = "vllm-kvpress-bench/1"
RUN_FILE = "run.json"
COMBINED_FILE = "results.json"
TABLE_FILE = "results.md"
ROWS_DIR = "rows"
LOGS_DIR = "logs"
MAX_NAME_CHARS = 140


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


def run_name(workloads: list[Workload], configs: list[BenchConfig], mode: str) -> str:
    models = sorted({w.model for w in workloads})
    parts = ["+".join(models), "+".join(w.name for w in workloads), "+".join(c.slug for c in configs)]
    if mode != "offline":
        parts.append(mode)
    name = "__".join(parts)
    if len(name) > MAX_NAME_CHARS:
        # Keep the readable start; the digest keeps different config sets apart.
        digest = hashlib.sha1(name.encode()).hexdigest()[:8]
        name = f"{name[: MAX_NAME_CHARS - 10]}..{digest}"
    return name


def new_run_dir(results_root: Path, name: str) -> Path:
    """Create `<results_root>/<name>`, or `<name>-2`, `-3`, ... if taken; never reuse one."""
    results_root.mkdir(parents=True, exist_ok=True)
    suffix = 1
    while True:
        candidate = results_root / (name if suffix == 1 else f"{name}-{suffix}")
        try:
            candidate.mkdir()
        except FileExistsError:
            suffix += 1
            continue
        (candidate / ROWS_DIR).mkdir()
        (candidate / LOGS_DIR).mkdir()
        # Logs are for debugging the run, too large for the repository.
        (candidate / ".gitignore").write_text(f"{LOGS_DIR}/\n*.tmp\nplan__*.json\n")
        return candidate


def row_file_name(workload_name: str, config_slug: str) -> str:
    return f"{workload_name}__{config_slug}.json"


def engine_file_name(config_slug: str, model: str, max_model_len: int) -> str:
    return f"engine__{config_slug}__{model}-{max_model_len}.json"


def row_key(row: dict) -> tuple[str, str]:
    return (row["config"]["label"], row["workload"]["name"])


def load_rows(run_dir: Path) -> list[dict]:
    """Every complete row of the run (files written by `assemble_rows`)."""
    rows = []
    for path in sorted((run_dir / ROWS_DIR).glob("*.json")):
        if path.name.startswith("engine__"):
            continue
        row = read_json(path)
        if "config" in row and "workload" in row:
            rows.append(row)
    return rows


def load_combined(run_dir: Path) -> dict:
    return read_json(run_dir / COMBINED_FILE)


def sort_rows(rows: list[dict], run: dict) -> list[dict]:
    """Rows in the run's order: workloads as requested, configurations as requested."""
    workload_order = {w["name"]: i for i, w in enumerate(run["workloads"])}
    config_order = {c["label"]: i for i, c in enumerate(run["configs"])}
    return sorted(
        rows,
        key=lambda r: (
            workload_order.get(r["workload"]["name"], 1 << 20),
            config_order.get(r["config"]["label"], 1 << 20),
        ),
    )


def write_combined(run_dir: Path, run: dict, rows: list[dict]) -> dict:
    """Fill in the ratios vs bf16, rewrite every row file and results.json; return the combined data."""
    rows = sort_rows(rows, run)
    add_ratios_vs_bf16(rows)
    for row in rows:
        write_json(run_dir / ROWS_DIR / row["file"], row)
    combined = {**run, "schema": SCHEMA, "rows": rows}
    write_json(run_dir / COMBINED_FILE, combined)
    return combined


def find_runs(results_dir: Path) -> list[Path]:
    """Bench run directories under `results_dir`, by name. Eval runs keep a results.json of their
    own there too: the schema tells them apart."""
    runs = []
    for path in sorted(Path(results_dir).glob(f"*/{COMBINED_FILE}")):
        try:
            data = read_json(path)
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(data, dict) and data.get("schema") == SCHEMA:
            runs.append(path.parent)
    return runs
