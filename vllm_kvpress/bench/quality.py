"""Owns reading quality scores from eval result files and matching them to bench configurations.

The bench measures speed and capacity only; quality comes from `vllm-kvpress eval`
(`--quality docs/results/<eval run>/results.json`, or the run's directory). Two layouts are read:

1. The eval harness's own `results.json`: `{"runs": [{"method", "method_config", "kv_cache_dtype",
   "tasks": {task: {"accuracy": percent, ...}}, "ppl": {...}}, ...]}`. Each run gives one score
   per task (`<task> accuracy (%)`) and their mean (`mean task accuracy (%)`).
2. Plain records, for scores from elsewhere: JSON objects (alone, in a list, or in a list under
   "results") with "config" (as typed on `--configs`, e.g. `gear:{"bits": 2}`), "score" (higher is
   better) and optionally "metric"; scores of one configuration and metric are averaged.

A score belongs to a bench configuration when both denote the same KV cache: for vLLM baselines
the same `kv_cache_dtype` with no plugin method, for plugin methods the same resolved settings
(`CompressionMethod.to_dict()`, read again through the method so that a file written before a
setting existed, such as an eviction method's `pages`, takes that setting's default), so `gear` and
`gear:{"bits": 4}` match each other when 4 is the default. The eval usually runs a smaller real
model than the bench's dummy-weight one: the figure names the eval runs it took scores from.
"""

import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from vllm_kvpress.bench.configs import parse_config_spec
from vllm_kvpress.config import load_method_config
from vllm_kvpress.errors import KVCompressionConfigError, MethodNotImplementedError

MEAN_ACCURACY = "mean task accuracy (%)"
UNCOMPRESSED_METHODS = (None, "none")
"""What the eval harness writes as `method` for a run without a plugin method."""


@dataclass(frozen=True)
class QualityScore:
    config_key: str
    """`config_key()` of the configuration the score belongs to."""
    metric: str
    score: float
    """Mean over the records found for this configuration and metric."""
    count: int
    sources: tuple[str, ...]
    """Names of the eval runs (or files) the score came from."""


def config_key(kv_cache_dtype: str, method_settings: dict | None) -> str:
    """What makes two configurations the same KV cache, as one comparable string."""
    if method_settings is None:
        return f"kv_cache_dtype={kv_cache_dtype}"
    try:
        method_settings = load_method_config(method_settings).to_dict()
    except (KVCompressionConfigError, MethodNotImplementedError):
        pass  # settings this version no longer takes: compared as written
    return "plugin=" + json.dumps(method_settings, sort_keys=True)


def bench_config_key(config: dict) -> str:
    """`config_key` of a bench row's "config" entry."""
    return config_key(config["kv_cache_dtype"], config.get("method_settings"))


def _spec_key(spec) -> str | None:
    try:
        config = parse_config_spec(str(spec))
    except (ValueError, NotImplementedError):
        return None
    return config_key(config.kv_cache_dtype, config.method_settings)


def _eval_run_scores(run: dict) -> list[tuple[str, str, float]]:
    if run.get("method") in UNCOMPRESSED_METHODS or not run.get("method_config"):
        key = config_key(run.get("kv_cache_dtype", "auto"), None)
    else:
        key = config_key("auto", run["method_config"])
    accuracies = {
        task: s["accuracy"]
        for task, s in (run.get("tasks") or {}).items()
        if isinstance(s, dict) and isinstance(s.get("accuracy"), (int, float))
    }
    scores = [(key, f"{task} accuracy (%)", float(a)) for task, a in accuracies.items()]
    if accuracies:
        scores.append((key, MEAN_ACCURACY, sum(accuracies.values()) / len(accuracies)))
    return scores


def _record_scores(data) -> list[tuple[str, str, float]]:
    if isinstance(data, dict):
        data = data.get("results", [data])
    scores = []
    for record in data if isinstance(data, list) else []:
        score = record.get("score") if isinstance(record, dict) else None
        if not isinstance(score, (int, float)) or isinstance(score, bool) or "config" not in record:
            continue
        key = _spec_key(record["config"])
        if key is not None:
            scores.append((key, str(record.get("metric", "score")), float(score)))
    return scores


def load_quality(paths: list[Path]) -> list[QualityScore]:
    """Every score in `paths` (files, or eval run directories holding results.json).

    Raises:
        ValueError: a path that is missing or not JSON, named in the message.
    """
    values: dict[tuple[str, str], list[float]] = defaultdict(list)
    sources: dict[tuple[str, str], set[str]] = defaultdict(set)
    for path in map(Path, paths):
        file = path / "results.json" if path.is_dir() else path
        try:
            data = json.loads(file.read_text())
        except OSError as e:
            raise ValueError(f"--quality {path}: cannot read it ({e.strerror})") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"--quality {file} is not JSON ({e.msg})") from None
        if isinstance(data, dict) and isinstance(data.get("runs"), list):
            found = [s for run in data["runs"] if isinstance(run, dict) for s in _eval_run_scores(run)]
            source = str(data.get("name") or file.parent.name)
        else:
            found, source = _record_scores(data), file.name
        for key, metric, score in found:
            values[(key, metric)].append(score)
            sources[(key, metric)].add(source)
    return [
        QualityScore(key, metric, sum(v) / len(v), len(v), tuple(sorted(sources[(key, metric)])))
        for (key, metric), v in values.items()
    ]


def main_metric(scores: list[QualityScore]) -> str | None:
    """The metric of the quality figure: mean task accuracy if present, else the most common."""
    counts: dict[str, int] = defaultdict(int)
    for s in scores:
        counts[s.metric] += 1
    if MEAN_ACCURACY in counts:
        return MEAN_ACCURACY
    return max(counts, key=lambda m: (counts[m], m)) if counts else None
