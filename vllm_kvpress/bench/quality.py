"""Owns reading quality scores from eval result files and matching them to bench configurations.

The bench measures speed and capacity only; quality comes from `vllm-kvpress eval` result files
(`--quality docs/results/eval_*.json`). What is read from each file: every JSON object, at the
top level, in a top-level list, or in a list under "results" or "rows", that has
    "config"   the configuration, written as on `--configs` ("gear", "gear:{\"bits\": 2}") or as
               its label ("gear:bits=2"); a nested {"label": ...} object also works
    "score"    a number, higher is better
and optionally "metric" (e.g. "ruler_niah_accuracy") and "task". Scores of one configuration and
metric are averaged over tasks. Objects without both keys are skipped, so a richer eval file
format can carry these keys alongside its own.
"""

import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from vllm_kvpress.bench.configs import parse_config_spec


@dataclass(frozen=True)
class QualityScore:
    config_label: str
    metric: str
    score: float
    """Mean over the tasks found for this configuration and metric."""
    num_tasks: int
    sources: tuple[str, ...]


def _records(data) -> list[dict]:
    if isinstance(data, list):
        return [r for r in data if isinstance(r, dict)]
    if isinstance(data, dict):
        for key in ("results", "rows"):
            if isinstance(data.get(key), list):
                return _records(data[key])
        return [data]
    return []


def canonical_label(config) -> str:
    """A config as written in an eval file -> the bench label it denotes (unparsable: as written)."""
    if isinstance(config, dict):
        config = config.get("label") or config.get("spec") or json.dumps(config, sort_keys=True)
    text = str(config)
    try:
        return parse_config_spec(text).label
    except (ValueError, NotImplementedError):
        return text


def load_quality(paths: list[Path]) -> list[QualityScore]:
    """All scores found in `paths`; a file that is not JSON raises ValueError naming it."""
    sums: dict[tuple[str, str], list[float]] = defaultdict(list)
    sources: dict[tuple[str, str], set[str]] = defaultdict(set)
    for path in paths:
        try:
            data = json.loads(Path(path).read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"--quality file {path} is not JSON ({e.msg})") from None
        for record in _records(data):
            score = record.get("score")
            if "config" not in record or not isinstance(score, (int, float)) or isinstance(score, bool):
                continue
            key = (canonical_label(record["config"]), str(record.get("metric", "score")))
            sums[key].append(float(score))
            sources[key].add(Path(path).name)
    return [
        QualityScore(label, metric, sum(values) / len(values), len(values), tuple(sorted(sources[(label, metric)])))
        for (label, metric), values in sums.items()
    ]


def main_metric(scores: list[QualityScore]) -> str | None:
    """The metric most configurations have a score for (the y axis of the quality plot)."""
    counts: dict[str, int] = defaultdict(int)
    for s in scores:
        counts[s.metric] += 1
    return max(counts, key=lambda m: (counts[m], m)) if counts else None
