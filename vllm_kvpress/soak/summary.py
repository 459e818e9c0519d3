"""Owns the figures drawn from a soak's record and the markdown summary of a soak invocation.

Everything here is a pure function of the recorded data (no clock, no server), so every figure's
definition is tested on CPU from constructed records:

    failed, not cancelled  requests that failed and were not planned to be cancelled (a cancelled
                           one may fail before its cancel, e.g. with a 500): the soak's first criterion
    TTFT                   streamed requests that got a token, cancelled ones included
    e2e                    requests that ended ok; percentiles as bench's (`figures.summarize`)
    preemptions            growth of vllm:num_preemptions_total over the sampled series
    leak check             after each idle period and the nudge (driver.py): "clean" when KV usage
                           is back to exactly 0, "leaked" when it is not, "inconclusive" when requests
                           were still in flight, the nudge failed or /metrics did not answer
    divergence rate        probes whose answer differs from the "start" round's / probes answered in
                           both, over every later round (probes.compare_rounds)
    GPU memory spread      max - min of device memory after the first leak check (the warm-up:
                           one full cycle); "flat" within `MEMORY_FLAT_SLACK_BYTES`. The whole
                           device's: with servers side by side, the sum of all of them
"""

from collections import Counter
from collections.abc import Mapping, Sequence

from vllm_kvpress.bench.figures import KV_CACHE_USAGE, NUM_RUNNING, NUM_WAITING, summarize
from vllm_kvpress.soak.client import CANCELLED, FAILED, OK
from vllm_kvpress.soak.probes import REFERENCE_ROUND, compare_rounds
from vllm_kvpress.soak.sampler import GPU_MEMORY_USED, PREEMPTIONS_TOTAL

SCHEMA = "vllm-kvpress-soak/1"
CLEAN, LEAKED, INCONCLUSIVE = "clean", "leaked", "inconclusive"
LEAK_FREE_USAGE = 0.0
"""KV usage after an idle period; one leaked block of any pool reads above it."""
MEMORY_FLAT_SLACK_BYTES = 256 << 20
"""GPU memory may wander this much after warm-up (allocator slack, NCCL, logging) and still be flat."""
ERROR_GROUP_CHARS = 160
"""Failures are grouped by status and the start of their error text."""
MIB = 1 << 20


def outcome_figures(outcomes: Sequence[Mapping]) -> dict:
    statuses = Counter(o["status"] for o in outcomes)
    planned_cancels = [o for o in outcomes if o.get("cancel_after_chunks") is not None]
    failures = Counter(
        (o.get("http_status"), (o.get("error") or "")[:ERROR_GROUP_CHARS]) for o in outcomes if o["status"] == FAILED
    )
    return {
        "requests": len(outcomes),
        OK: statuses[OK],
        CANCELLED: statuses[CANCELLED],
        FAILED: statuses[FAILED],
        "failed_not_cancelled": sum(
            o["status"] == FAILED and o.get("cancel_after_chunks") is None for o in outcomes
        ),
        "cancel_planned": len(planned_cancels),
        "finished_before_cancel": sum(o["status"] == OK for o in planned_cancels),
        "streamed": sum(bool(o.get("stream")) for o in outcomes),
        "failures": [
            {"http_status": status, "error": error, "count": count}
            for (status, error), count in failures.most_common()
        ],
    }


def latency_figures(outcomes: Sequence[Mapping]) -> dict:
    return {
        "ttft_s": summarize(o.get("ttft_s") for o in outcomes),
        "e2e_s": summarize(o.get("e2e_s") for o in outcomes if o["status"] == OK),
    }


def leak_verdict(check: Mapping) -> str:
    after = check.get("after_nudge")
    if check.get("in_flight") or check.get("nudge_status") != OK or not after or KV_CACHE_USAGE not in after:
        return INCONCLUSIVE
    return LEAKED if after[KV_CACHE_USAGE] > LEAK_FREE_USAGE else CLEAN


def leak_figures(checks: Sequence[Mapping]) -> dict:
    per_check = []
    for check in checks:
        after = check.get("after_nudge") or {}
        per_check.append(
            {
                "cycle": check["cycle"],
                "t_s": check.get("t_s"),
                "verdict": leak_verdict(check),
                "kv_cache_usage": after.get(KV_CACHE_USAGE),
                "kv_cache_usage_before_nudge": (check.get("before_nudge") or {}).get(KV_CACHE_USAGE),
                "running": after.get(NUM_RUNNING),
                "waiting": after.get(NUM_WAITING),
                "in_flight": check.get("in_flight"),
            }
        )
    verdicts = Counter(c["verdict"] for c in per_check)
    return {
        "checks": len(per_check),
        CLEAN: verdicts[CLEAN],
        LEAKED: verdicts[LEAKED],
        INCONCLUSIVE: verdicts[INCONCLUSIVE],
        "per_check": per_check,
    }


def probe_figures(rounds: Mapping[str, Sequence[Mapping]]) -> dict:
    """Per round: answered, failed, needles found; every round but the reference compared with it."""
    answers = {name: {p["name"]: p.get("answer_ids") for p in probes} for name, probes in rounds.items()}
    reference = answers.get(REFERENCE_ROUND, {})
    figures: dict[str, dict] = {}
    compared = diverged = 0
    for name, probes in rounds.items():
        found = [p["found"] for p in probes if p.get("found") is not None]
        figures[name] = {
            "answered": sum(p["status"] == OK for p in probes),
            "failed": sum(p["status"] != OK for p in probes),
            "needles_found": sum(found) if found else None,
        }
        if name != REFERENCE_ROUND and reference:
            comparison = compare_rounds(reference, answers[name])
            figures[name].update(comparison)
            compared += comparison["compared"]
            diverged += comparison["diverged"]
    return {
        "reference_round": REFERENCE_ROUND,
        "rounds": figures,
        "compared": compared,
        "diverged": diverged,
        "divergence_rate": diverged / compared if compared else None,
    }


def _present(times: Sequence[float], values: Sequence[float | None]) -> list[tuple[float, float]]:
    return [(t, v) for t, v in zip(times, values) if v is not None]


def memory_figures(times: Sequence[float], used: Sequence[float | None], after_s: float | None) -> dict | None:
    """GPU memory over the samples taken after `after_s` (the warm-up); None without such samples."""
    if after_s is None:
        return None
    values = [v for t, v in _present(times, used) if t >= after_s]
    if not values:
        return None
    spread = max(values) - min(values)
    return {
        "after_s": after_s,
        "samples": len(values),
        "min_bytes": min(values),
        "max_bytes": max(values),
        "spread_bytes": spread,
        "flat": spread <= MEMORY_FLAT_SLACK_BYTES,
    }


def series_figures(series: Mapping[str, Sequence], warmup_end_s: float | None) -> dict:
    times = series.get("t_s") or []

    def peak(name: str) -> float | None:
        values = [v for _, v in _present(times, series.get(name) or [])]
        return max(values) if values else None

    preemptions = [v for _, v in _present(times, series.get(PREEMPTIONS_TOTAL) or [])]
    return {
        "samples": len(times),
        "max_kv_cache_usage": peak(KV_CACHE_USAGE),
        "max_running": peak(NUM_RUNNING),
        "max_waiting": peak(NUM_WAITING),
        "preemptions": preemptions[-1] - preemptions[0] if preemptions else None,
        "gpu_memory": memory_figures(times, series.get(GPU_MEMORY_USED) or [], warmup_end_s),
    }


def verdicts(summary: Mapping) -> dict[str, bool | None]:
    """The soak's criteria, each True (met), False (not met) or None (not measured)."""
    requests, leaks = summary["requests"], summary["leak_checks"]
    probes, series, server = summary["probes"], summary["series"], summary["server"]
    memory = series.get("gpu_memory")
    tracebacks = server["log_tracebacks"]
    return {
        "server_stayed_up": server["stayed_up"],
        "no_tracebacks_in_server_log": None if tracebacks is None else tracebacks == 0,
        "no_failed_requests": requests["failed_not_cancelled"] == 0,
        "kv_back_to_zero_after_idle": (leaks[LEAKED] == 0 and leaks[INCONCLUSIVE] == 0) if leaks["checks"] else None,
        "probes_identical": None if probes["divergence_rate"] is None else probes["divergence_rate"] == 0,
        "gpu_memory_flat": None if memory is None else memory["flat"],
        "preempted": None if series["preemptions"] is None else series["preemptions"] > 0,
    }


def summarize_record(record: Mapping) -> dict:
    """Every figure of one configuration's soak from its record (runner.py writes the record)."""
    checks = record.get("leak_checks") or []
    summary = {
        "requests": outcome_figures(record.get("outcomes") or []),
        "latency": latency_figures(record.get("outcomes") or []),
        "leak_checks": leak_figures(checks),
        "probes": probe_figures(record.get("probe_rounds") or {}),
        "series": series_figures(record.get("series") or {}, checks[0]["t_s"] if checks else None),
        "server": {
            "stayed_up": None if "server_exit_code" not in record else record["server_exit_code"] is None,
            "exit_code": record.get("server_exit_code"),
            "log_tracebacks": record.get("server_log_tracebacks"),
            "metrics_missed": record.get("metrics_missed"),
        },
    }
    summary["verdicts"] = verdicts(summary)
    return summary


def _pair(summary: Mapping | None, scale: float, fmt: str) -> str:
    if not summary:
        return "-"
    return f"{summary['p50'] * scale:{fmt}} / {summary['p99'] * scale:{fmt}}"


def _num(value, fmt: str = ",") -> str:
    return "-" if value is None else format(value, fmt)


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _mark(value: bool | None) -> str:
    return {True: "yes", False: "**no**", None: "-"}[value]


TABLE_HEADER = (
    "| configuration | requests: ok / cancelled / failed | failed, not cancelled | TTFT p50 / p99 (ms) "
    "| e2e p50 / p99 (s) | preemptions | max KV usage | max running / waiting | leak checks clean "
    "| probe divergence | needles found | GPU memory spread after warm-up (MiB) |"
)


def table_row(result: Mapping) -> str:
    label = result["config"]["label"]
    if result.get("status") != "ok":
        first_line = ((result.get("error") or "").splitlines() or ["no error recorded"])[0]
        return f"| {label} | {result.get('status')}: {first_line[:120]} |" + " |" * 10
    s = result["summary"]
    requests, leaks, probes, series = s["requests"], s["leak_checks"], s["probes"], s["series"]
    found = [r["needles_found"] for r in probes["rounds"].values() if r.get("needles_found") is not None]
    answered = sum(r["answered"] for r in probes["rounds"].values())
    memory = series.get("gpu_memory")
    cells = [
        label,
        f"{requests[OK]:,} / {requests[CANCELLED]:,} / {requests[FAILED]:,}",
        f"{requests['failed_not_cancelled']:,}",
        _pair(s["latency"]["ttft_s"], 1e3, ".0f"),
        _pair(s["latency"]["e2e_s"], 1, ".1f"),
        _num(series["preemptions"], ",.0f"),
        _rate(series["max_kv_cache_usage"]),
        f"{_num(series['max_running'], '.0f')} / {_num(series['max_waiting'], '.0f')}",
        f"{leaks[CLEAN]} / {leaks['checks']}",
        f"{_rate(probes['divergence_rate'])} ({probes['diverged']} of {probes['compared']})",
        f"{sum(found)} of {answered}" if found else "-",
        "-" if memory is None else f"{memory['spread_bytes'] / MIB:,.0f}",
    ]
    return "| " + " | ".join(cells) + " |"


def _config_section(result: Mapping) -> list[str]:
    label = result["config"]["label"]
    lines = [f"### {label}", ""]
    if result.get("status") != "ok":
        return [*lines, f"{result.get('status')}:", "", "```", result.get("error") or "", "```", ""]
    s = result["summary"]
    engine = result.get("engine") or {}
    lines.append(
        f"- KV pool: {_num(engine.get('kv_capacity_tokens'))} tokens "
        f"({_num(engine.get('num_gpu_blocks'))} blocks of {_num(engine.get('block_size'))}), "
        f"preemption {'possible' if engine.get('preemption_possible') else '**impossible**'} at this "
        f"max_num_seqs; tracebacks in the server log: {_num(s['server']['log_tracebacks'])}"
        + ("" if s["server"]["exit_code"] is None else f"; **the server exited with code {s['server']['exit_code']}**")
    )
    lines.append("- criteria: " + ", ".join(f"{k.replace('_', ' ')}: {_mark(v)}" for k, v in s["verdicts"].items()))
    if s["requests"]["failures"]:
        lines += ["", "| failures | HTTP status | error |", "|---:|---|---|"]
        lines += [
            f"| {f['count']:,} | {_num(f['http_status'], '')} | `{f['error'].replace('|', '/')}` |"
            for f in s["requests"]["failures"]
        ]
    lines += ["", "| leak check after cycle | verdict | KV usage after nudge | before nudge | running | waiting |",
              "|---:|---|---:|---:|---:|---:|"]
    lines += [
        f"| {c['cycle']} | {c['verdict']} | {_rate(c['kv_cache_usage'])} | {_rate(c['kv_cache_usage_before_nudge'])} "
        f"| {_num(c['running'], '.0f')} | {_num(c['waiting'], '.0f')} |"
        for c in s["leak_checks"]["per_check"]
    ]
    lines += ["", "| probe round | answered | failed | needles found | diverged from start |"]
    lines.append("|---|---:|---:|---:|---:|")
    for name, r in s["probes"]["rounds"].items():
        diverged = f"{r['diverged']} of {r['compared']}" if "compared" in r else "(reference)"
        lines.append(f"| {name} | {r['answered']} | {r['failed']} | {_num(r['needles_found'])} | {diverged} |")
    if result.get("plot"):
        lines += ["", f"![gauges over time: {label}]({result['plot']})"]
    return [*lines, ""]


def _totals_line(totals: Mapping | None) -> str:
    if not totals:
        return ""
    unmet = "; ".join(f"{label}: {', '.join(c.replace('_', ' ') for c in crit)}"
                      for label, crit in totals["unmet"].items() if crit)
    return (
        f"All criteria met: {_mark(totals['all_criteria_met'])} ({totals['ran']} of {totals['configurations']} "
        f"configurations ran{'; not met: ' + unmet if unmet else ''})."
    )


def _side_by_side_lines(side: Mapping | None) -> list[str]:
    """The settings line of a side-by-side soak (runner.py, side_by_side.py); none for one in turn."""
    if not side:
        return []
    pool = side.get("kv_cache_memory_bytes")
    return [
        f"- side by side on one GPU: {side['servers']} servers at once, started {side['start']}; "
        f"--gpu-memory-utilization {side['total_utilization']:g} split into {side['per_server_utilization']:g} "
        f"per server{'' if pool is None else f', KV pool {pool / MIB:,.0f} MiB each'}. GPU memory (column and "
        "plots) is the whole GPU's, the sum of all servers; KV usage, requests and preemptions are each "
        "server's own. Latencies are on a GPU the servers share: compare them within this soak only",
    ]


def markdown(soak: Mapping) -> str:
    """The summary of one soak invocation: settings, one row per configuration, then details."""
    env = soak.get("environment") or {}
    model = soak["model"]
    traffic = soak["traffic"]
    lines = [
        f"# Soak: {model['name']} ({'real' if model['real_weights'] else 'dummy'} weights), "
        f"max_model_len {soak['max_model_len']:,}",
        "",
        f"- command: `{soak.get('command', '')}`",
        f"- {env.get('gpu_name') or 'unknown GPU'}, vLLM {env.get('vllm_version') or '?'}, "
        f"commit {env.get('git_commit') or '?'}{' (dirty)' if env.get('git_dirty') else ''}, {env.get('date_utc', '')}",
        f"- traffic: {traffic['duration_s']:g} s in cycles of {traffic['cycle_s']:g} s (idle {traffic['idle_s']:g} s), "
        f"{traffic['request_rate']:g} requests/s between bursts of {traffic['burst_overcommit']:g} KV pools, "
        f"{_rate(traffic['cancel_share'])} cancelled, {_rate(traffic['stream_share'])} of the rest streamed, "
        f"prompts {traffic['min_prompt_len']}..{soak['max_model_len'] - 1:,} and outputs "
        f"1..{traffic['max_output_len']:,} tokens, seed {soak['seed']}",
        f"- probes: {soak['probes']['kind']}, {len(soak['probes']['probes'])} per round, "
        f"{soak['probes']['max_tokens']} greedy tokens, compared with the `{REFERENCE_ROUND}` round",
        *_side_by_side_lines(soak.get("side_by_side")),
        "",
        TABLE_HEADER,
        "|---|" + "---:|" * 11,
        *(table_row(r) for r in soak["results"]),
        "",
        "Divergence is read beside the bf16 (`auto`) row's: batch composition alone can change a "
        "kernel's split and with it a greedy answer. How to read the rest: docs/soak.md.",
        "",
        _totals_line(soak.get("totals")),
        "",
    ]
    for result in soak["results"]:
        lines += _config_section(result)
    return "\n".join(lines)


def totals(results: Sequence[Mapping], bf16_label: str) -> dict:
    """Whether every configuration ran and met every measured criterion. Probe answers count as
    met when identical, or when they diverge no more often than the bf16 row's do."""
    ok = [r for r in results if r.get("status") == "ok"]
    bf16 = next((r for r in ok if r["config"]["label"] == bf16_label), None)
    bf16_rate = bf16["summary"]["probes"]["divergence_rate"] if bf16 else None
    unmet = {}
    for result in ok:
        verdict = dict(result["summary"]["verdicts"])
        verdict.pop("preempted")  # a fact about the traffic, not a fault of the server
        rate = result["summary"]["probes"]["divergence_rate"]
        if verdict["probes_identical"] is False and bf16_rate is not None and rate <= bf16_rate:
            verdict["probes_identical"] = True
        unmet[result["config"]["label"]] = [k for k, v in verdict.items() if v is False]
    return {
        "configurations": len(results),
        "ran": len(ok),
        "bf16_divergence_rate": bf16_rate,
        "unmet": unmet,
        "all_criteria_met": len(ok) == len(results) and not any(unmet.values()),
    }
