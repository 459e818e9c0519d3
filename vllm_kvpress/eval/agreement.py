"""Owns `vllm-kvpress agree`: do two eval runs (e.g. `--engine vllm` and `--engine reference`) give
the same greedy answers on the same prompts?

    vllm-kvpress agree RUN_A RUN_B [--method none]

Both directories are `vllm-kvpress eval` results (`predictions.jsonl`). Samples are matched by
(task, sample id); a run that lacks the other's samples is an error, since the prompts must be the
same. Two figures per method: the share of samples graded the same (correct in both or wrong in
both), which is what the eval reports, and the share of byte-identical completions, which is
stricter: two bf16 engines with different attention kernels may pick a different token where two
logits nearly tie, and greedy decoding then follows a different but equally valid path.
"""

import argparse
import json
from pathlib import Path

from vllm_kvpress.errors import InputError


def load_predictions(run_dir: str | Path, method: str) -> dict[tuple[str, str], dict]:
    path = Path(run_dir) / "predictions.jsonl"
    if not path.is_file():
        raise InputError(f"{path} does not exist; pass the directory of a `vllm-kvpress eval` run")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {(r["task"], r["sample_id"]): r for r in rows if r["method"] == method}


def compare(a: dict[tuple[str, str], dict], b: dict[tuple[str, str], dict]) -> dict:
    """Agreement figures of two runs' predictions (the same sample keys)."""
    if a.keys() != b.keys():
        only = sorted(a.keys() ^ b.keys())[:5]
        raise InputError(f"the runs were not given the same samples (e.g. {only}); rerun with the same grid and seed")
    if not a:
        raise InputError("no samples of this method in the runs; --method names a method label of both runs")
    same_grade = sum(a[k]["correct"] == b[k]["correct"] for k in a)
    identical = sum(a[k]["completion"].strip() == b[k]["completion"].strip() for k in a)
    return {
        "samples": len(a),
        "same_grade": same_grade,
        "identical_completions": identical,
        "correct_a": sum(r["correct"] for r in a.values()),
        "correct_b": sum(r["correct"] for r in b.values()),
        "differing": sorted(f"{task}/{sample}" for (task, sample) in a
                            if a[(task, sample)]["correct"] != b[(task, sample)]["correct"]),
    }


def format_agreement(name_a: str, name_b: str, method: str, figures: dict) -> str:
    n = figures["samples"]
    return "\n".join([
        f"| method | samples | same grade | identical completions | correct ({name_a}) | correct ({name_b}) |",
        "|---|---|---|---|---|---|",
        (
            f"| {method} | {n} | {figures['same_grade']} ({100 * figures['same_grade'] / n:.1f}%) | "
            f"{figures['identical_completions']} ({100 * figures['identical_completions'] / n:.1f}%) | "
            f"{figures['correct_a']} | {figures['correct_b']} |"
        ),
    ])


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("agree", help="compare the greedy answers of two eval runs on the same prompts")
    p.add_argument("run_a", help="a `vllm-kvpress eval` result directory")
    p.add_argument("run_b", help="another one, made with the same grid and seed")
    p.add_argument("--method", default="none", help="method label to compare (default none)")
    p.add_argument("--out", default=None, help="also write agreement.json and agreement.md into this directory")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    figures = compare(load_predictions(args.run_a, args.method), load_predictions(args.run_b, args.method))
    table = format_agreement(Path(args.run_a).name, Path(args.run_b).name, args.method, figures)
    print(table)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "agreement.json").write_text(json.dumps(
            {"run_a": str(args.run_a), "run_b": str(args.run_b), "method": args.method, **figures}, indent=2) + "\n")
        (out / "agreement.md").write_text(table + "\n")
    return 0
