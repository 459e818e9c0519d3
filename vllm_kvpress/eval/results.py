"""Owns the result directory of one `vllm-kvpress eval` run: its name, and every file written into it.

    <out>/<model>-<engine>-<method slugs>[-<kv dtype>][-quick][-N]/
        config.json       the resolved configuration (every method's full settings)
        command.txt       the exact command line
        environment.json  git commit, torch/transformers/vllm versions, device
        results.json      per method: compression ratio, per-task counts, perplexity
        results.md        the same as markdown tables
        predictions.jsonl every sample's prompt length, expected strings and completion

A directory is never overwritten: an existing name gets the next free `-N` suffix.
"""

import json
import math
import os
import re
from pathlib import Path
from typing import Any

from vllm_kvpress.provenance import git_state, package_version

PACKAGES = ("torch", "transformers", "vllm", "vllm-kvpress")


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+=-]+", "_", text).strip("_")


def run_slug(method: str, overrides: dict[str, Any]) -> str:
    """`kivi`, or `kivi_bits=2_block_size=32` when settings were overridden."""
    parts = [method] + [f"{k}={v}" for k, v in sorted(overrides.items())]
    return slug("_".join(parts))


def create_result_dir(out: str, name: str) -> str:
    """Make `<out>/<name>`, or `<out>/<name>-2`, -3, ...: the first that does not exist."""
    os.makedirs(out, exist_ok=True)
    for attempt in range(1, 10_000):
        path = os.path.join(out, name if attempt == 1 else f"{name}-{attempt}")
        try:
            os.makedirs(path)  # atomic: two runs never get the same directory
            return path
        except FileExistsError:
            continue
    raise RuntimeError(f"no free result directory name for {name} in {out}")


def environment(device_name: str) -> dict[str, Any]:
    versions = {package: package_version(package) for package in PACKAGES}
    # the repository holding this package (an editable install), not the directory run from
    repo = Path(__file__).resolve().parents[2]
    return {**git_state(repo), "versions": versions, "device": device_name}


def write_json(path: str, data: Any) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=2, sort_keys=False, default=str)
        f.write("\n")


def _fmt_pct(value: float | None) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.1f}"


def markdown_tables(results: dict[str, Any]) -> str:
    """Summary table (a row per method) and the NIAH grid (length x depth) of each method."""
    runs = results["runs"]
    tasks = list(dict.fromkeys(t for run in runs for t in run["tasks"]))
    has_ppl = any(run.get("ppl") for run in runs)
    has_decode_ppl = any(run.get("decode_ppl") for run in runs)
    header = ["method", "KV bytes vs bf16"] + [f"{t} (%)" for t in tasks]
    if has_ppl:
        header += ["ppl", "mean NLL", "ΔNLL vs none"]
    if has_decode_ppl:
        header += ["decode KV vs bf16", "decode ppl", "decode mean NLL", "decode ΔNLL vs none"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for run in runs:
        row = [run["label"], f"{run['compression_ratio']:.3f}" if run["compression_ratio"] else "-"]
        for task in tasks:
            score = run["tasks"].get(task)
            row.append(
                "-"
                if score is None
                else f"{_fmt_pct(score['accuracy'])} ({score['correct']}/{score['total']})"
            )
        for key, shown in (("ppl", has_ppl), ("decode_ppl", has_decode_ppl)):
            if not shown:
                continue
            ppl = run.get(key) or {}
            delta = ppl.get("delta_nll_vs_none")
            if key == "decode_ppl":
                row.append(f"{ppl['kv_vs_bf16']:.3f}" if "kv_vs_bf16" in ppl else "-")
            row += [
                f"{ppl['ppl']:.3f}" if ppl else "-",
                f"{ppl['mean_nll']:.4f}" if ppl else "-",
                "-" if delta is None else f"{delta:+.4f}",
            ]
        lines.append("| " + " | ".join(row) + " |")
    out = ["## Accuracy (correct/total) and perplexity", "", *lines, ""]
    out.append(
        "KV bytes vs bf16: stored bytes per token and head over bf16's (`1 / layout.compression_vs_bf16`); "
        "for an eviction method times the tokens kept after prefill over the prompt tokens of the "
        "generation tasks (`ppl` windows are not evicted). Decode KV vs bf16: the same for what the "
        "`decode-ppl` steps attend to, summed over its decode steps (its prompt is evicted, and so are "
        "the decoded tokens with decode_interval)."
    )
    out.append(
        "Accuracy: a sample is correct when every expected string is in the completion; RULER's "
        "string_match_all score is in results.json."
    )
    for run in runs:
        grid = run.get("niah_grid")
        if not grid:
            continue
        depths = sorted({d for cells in grid.values() for d in cells}, key=float)
        out += [
            "",
            f"## NIAH grid: {run['label']} (1 = found)",
            "",
            "| tokens \\ depth % | " + " | ".join(depths) + " |",
            "|" + "---|" * (len(depths) + 1),
        ]
        for length, cells in grid.items():
            out.append(f"| {length} | " + " | ".join(str(cells.get(d, "-")) for d in depths) + " |")
    for run in runs:
        shares = run.get("important_share_by_layer")
        if shares:
            out += [
                "",
                f"## Important share by layer: {run['label']}",
                "",
                "The share of the prompt each layer's selection rule asked for (zipvl: the tokens holding "
                "`tau` of the attention), mean over the generated samples:",
                "",
                "| layer | " + " | ".join(str(i) for i in range(len(shares))) + " |",
                "|" + "---|" * (len(shares) + 1),
                "| share | " + " | ".join(f"{share:.3f}" for share in shares) + " |",
            ]
    return "\n".join(out) + "\n"


def write_results(
    result_dir: str, config: dict, command: str, env: dict, results: dict, predictions: list[dict]
) -> None:
    write_json(os.path.join(result_dir, "config.json"), config)
    with open(os.path.join(result_dir, "command.txt"), "w") as f:
        f.write(command + "\n")
    write_json(os.path.join(result_dir, "environment.json"), env)
    write_json(os.path.join(result_dir, "results.json"), results)
    with open(os.path.join(result_dir, "results.md"), "w") as f:
        f.write(f"# {os.path.basename(result_dir)}\n\n`{command}`\n\n" + markdown_tables(results))
    with open(os.path.join(result_dir, "predictions.jsonl"), "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in predictions)
