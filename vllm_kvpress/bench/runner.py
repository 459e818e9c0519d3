"""Owns one benchmark invocation: every (configuration, engine) in a fresh process, one after the
other, each failure recorded while the others still run; then rows, tables and figures.

Why a process per configuration: vLLM frees its GPU memory reliably only when its processes
exit, and the next configuration's memory profiling must see an empty GPU. Offline mode runs
`python -m vllm_kvpress.bench.offline PLAN.json` (full log in logs/, its `[bench]` lines echoed);
online mode runs `vllm serve` (online.py). After each, the runner waits until device memory is
back to where it was before, then rewrites results.json and results.md, so an invocation killed
from outside still leaves every finished row on disk.

`deadline_s` is this invocation's time budget (the GPU machine kills commands after 10 minutes):
no engine is started with less time left than the quickest configuration so far took (at least
`MIN_START_S`), a running one is stopped at the deadline, and the output ends with the table and
the `--resume` command for what is left.
"""

import math
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TextIO

from tqdm import tqdm

from vllm_kvpress.bench import gpu, plots, results
from vllm_kvpress.bench.configs import BenchConfig, EngineOptions, engine_settings, serve_argv
from vllm_kvpress.bench.environment import describe_environment
from vllm_kvpress.bench.figures import capacity_figures
from vllm_kvpress.bench.models import get_model
from vllm_kvpress.bench.offline import ECHO_PREFIX, PROGRESS_INTERVAL_S
from vllm_kvpress.bench.online import ServerError, free_port, log_tail, run_online_config, stop_process_group
from vllm_kvpress.bench.quality import load_quality
from vllm_kvpress.bench.report import run_markdown
from vllm_kvpress.bench.tables import failure_notes, terminal_table
from vllm_kvpress.bench.workloads import Workload, group_by_engine

MIN_START_S = 150.0
"""Engine start alone takes 1-2 minutes on an H100; with less time left nothing useful fits."""
FINAL_RESERVE_S = 30.0
"""Kept back from the deadline for stopping the running engine (online.STOP_GRACE_S) and writing
results, tables and plots."""
WORKER_MODULE = "vllm_kvpress.bench.offline"
ECHO_BYTES = ECHO_PREFIX.encode()


class RunMismatchError(ValueError):
    """`--resume` was combined with settings that differ from the run's."""


@dataclass(frozen=True)
class BenchRequest:
    workloads: list[Workload]
    configs: list[BenchConfig]
    engine: EngineOptions = EngineOptions()
    mode: str = "offline"
    request_rate: float = math.inf
    """Online mode: requests (conversations) started per second; inf = all at once."""
    max_concurrency: int | None = None
    """Online mode: cap on requests in flight; None = no cap beyond the server's."""
    results_root: Path = Path("docs/results")
    resume: Path | None = None
    deadline_s: float | None = None
    retry_failed: bool = False
    """With `resume`: also rerun configurations whose rows failed (timeouts are always rerun)."""
    quality_files: tuple[Path, ...] = ()
    device_index: int = 0
    warmup: bool = True
    command: str = ""
    # -P: the children import the installed package, never a source tree in the working directory
    # (a non-editable install run from the repository root would otherwise import its bare
    # `vllm_kvpress/`, which lacks the `triton_kernels` and `configs` it installs as subpackages)
    worker_argv: tuple[str, ...] = (sys.executable, "-P", "-m", WORKER_MODULE)
    serve_prefix: tuple[str, ...] = (sys.executable, "-P", "-m", "vllm.entrypoints.cli.main", "serve")
    """How `vllm serve` is started; the same interpreter as this process, whatever PATH says."""
    memory_release_timeout_s: float = 90.0
    sample_interval_s: float = gpu.SAMPLE_INTERVAL_S
    """How often device memory and vLLM's running / waiting gauges are sampled during a workload."""
    out: TextIO | None = field(default=None, compare=False)
    """Where progress and the final table go; None = sys.stdout at call time."""


def settings_record(req: BenchRequest) -> dict:
    """What must be equal for two invocations to add rows to the same run."""
    return {
        "workloads": [w.to_dict() for w in req.workloads],
        "engine": asdict(req.engine),
        "mode": req.mode,
        "request_rate": None if math.isinf(req.request_rate) else req.request_rate,
        "max_concurrency": req.max_concurrency,
    }


def open_run(req: BenchRequest) -> tuple[Path, dict]:
    settings = settings_record(req)
    if req.resume is None:
        run_dir = results.new_run_dir(
            req.results_root, results.run_name(req.workloads, req.configs, req.mode)
        )
        run = {"schema": results.SCHEMA, "name": run_dir.name, **settings, "configs": [], "invocations": []}
    else:
        run_dir = Path(req.resume)
        run = results.read_json(run_dir / results.RUN_FILE)
        differences = [k for k, v in settings.items() if run.get(k) != v]
        if differences:
            raise RunMismatchError(
                f"--resume {run_dir}: settings differ from the run's ({', '.join(differences)}); "
                "start a new run, or resume without changing them"
            )
    known = {c["label"] for c in run["configs"]}
    run["configs"] += [c.to_dict() for c in req.configs if c.label not in known]
    return run_dir, run


def run_bench(req: BenchRequest) -> Path:
    """Run every configuration not yet measured in the run; return the run directory."""
    req = replace(req, out=req.out or sys.stdout)
    start = time.monotonic()
    deadline = None if req.deadline_s is None else start + req.deadline_s
    run_dir, run = open_run(req)
    run["invocations"].append(
        {
            "command": req.command,
            "environment": describe_environment(req.device_index),
            "started_utc": datetime.now(UTC).isoformat(timespec="seconds"),
        }
    )
    invocation = len(run["invocations"]) - 1
    if req.quality_files:
        run["quality_files"] = [str(p) for p in req.quality_files]
    results.write_json(run_dir / results.RUN_FILE, run)
    configs = [BenchConfig.from_dict(c) for c in run["configs"]]
    workloads = [Workload.from_dict(w) for w in run["workloads"]]
    # A failure is usually deterministic (an unsupported setting, a bug): rerun it only on request;
    # a timeout only ran out of time.
    finished = ("ok",) if req.retry_failed else ("ok", "failed")
    done = {results.row_key(r) for r in results.load_rows(run_dir) if r.get("status") in finished}
    tasks = []  # (configuration, engine key, the workloads of that engine still to measure)
    for config in configs:
        for key, group in group_by_engine(workloads).items():
            todo = [w for w in group if (config.label, w.name) not in done]
            if todo:
                tasks.append((config, key, todo))
    print(f"[bench] run directory {run_dir}: {len(tasks)} engine start(s) to do", file=req.out, flush=True)
    baseline_memory = gpu.memory_used_bytes(req.device_index)
    not_run: list[str] = []
    durations: list[float] = []
    for number, (config, (model, max_model_len), group) in enumerate(tasks, 1):
        left = None if deadline is None else deadline - time.monotonic()
        # A configuration cut off by the deadline costs its whole engine start and yields no row.
        needed_s = max(MIN_START_S, min(durations, default=0.0))
        if left is not None and left < needed_s:
            not_run.append(config.label)
            continue
        # The previous configuration's processes are gone (stop_process_group); the driver may
        # still be returning their memory, which this configuration's profiling would miss.
        release_timeout_s = (
            req.memory_release_timeout_s if left is None else min(req.memory_release_timeout_s, left)
        )
        gpu.wait_for_memory_release(
            baseline_memory, device_index=req.device_index, timeout_s=release_timeout_s
        )
        print(
            f"[bench] ({number}/{len(tasks)}) {config.label} on {model}, max_model_len {max_model_len}: "
            f"{', '.join(w.name for w in group)}",
            file=req.out,
            flush=True,
        )
        task_start = time.monotonic()
        settings = engine_settings(
            config,
            model_dir=str(get_model(model).config_dir),
            max_model_len=max_model_len,
            options=req.engine,
        )
        _forget_previous_attempt(run_dir, config, group, max_model_len)
        status, error, launch = _run_task(req, run_dir, config, group, settings, deadline)
        _record_rows(run_dir, run, invocation, config, group, settings, launch, status, error)
        took_s = time.monotonic() - task_start
        if status == "ok":
            durations.append(took_s)
        print(
            f"[bench] ({number}/{len(tasks)}) {config.label}: {status} after {took_s:.0f} s",
            file=req.out,
            flush=True,
        )
        _write_outputs(run_dir, run, plots_too=False)
    combined = _write_outputs(run_dir, run, plots_too=True)
    notes = failure_notes(combined["rows"])
    if notes:
        print(
            "\n[bench] failures (full logs under logs/):\n" + "\n".join(f"  {n}" for n in notes), file=req.out
        )
    print("\n" + terminal_table(combined["rows"]), file=req.out)
    if not_run:
        print(
            f"\n[bench] deadline: not started: {', '.join(dict.fromkeys(not_run))}. Continue with:\n"
            f"  vllm-kvpress bench --resume {run_dir} --deadline-s {int(req.deadline_s)}",
            file=req.out,
        )
    print(f"[bench] results: {run_dir / results.TABLE_FILE}", file=req.out, flush=True)
    return run_dir


def _run_task(
    req: BenchRequest,
    run_dir: Path,
    config: BenchConfig,
    group: list[Workload],
    settings: dict,
    deadline: float | None,
) -> tuple[str, str | None, dict]:
    """Run one (configuration, engine); returns (status, error, how it was launched)."""
    engine_name = f"{config.slug}__{group[0].model}-{settings['max_model_len']}"
    log_path = run_dir / results.LOGS_DIR / f"{engine_name}.log"
    rows_dir = run_dir / results.ROWS_DIR
    recorded = {**settings, "model": get_model(group[0].model).repo_config_dir}
    if req.mode == "online":
        port = free_port()
        argv = [*req.serve_prefix, *serve_argv(settings, port=port)]
        launch = {
            "log": str(log_path.relative_to(run_dir)),
            "vllm_serve_argv": ["vllm", "serve", *serve_argv(recorded, port=port)],
        }
        total = sum(w.num_requests * w.turns for w in group)
        bar = tqdm(
            total=total,
            desc=f"{config.label} requests",
            file=req.out,
            mininterval=PROGRESS_INTERVAL_S,
            ncols=120,
        )
        try:
            run_online_config(
                serve_argv=argv,
                config_slug=config.slug,
                workloads=group,
                max_model_len=settings["max_model_len"],
                rows_dir=rows_dir,
                log_path=log_path,
                base_url=f"http://127.0.0.1:{port}",
                seed=req.engine.seed,
                request_rate=req.request_rate,
                max_concurrency=req.max_concurrency,
                device_index=req.device_index,
                deadline=None if deadline is None else deadline - FINAL_RESERVE_S,
                warmup=req.warmup,
                on_request_done=bar.update,
                max_num_seqs=settings.get("max_num_seqs"),
                sample_interval_s=req.sample_interval_s,
            )
        except TimeoutError:
            return "timeout", "deadline reached while this configuration ran", launch
        except ServerError as e:
            return "failed", str(e), launch
        except Exception as e:  # one configuration's failure must not end the benchmark
            return "failed", f"{type(e).__name__}: {e}", launch
        finally:
            bar.close()
        return "ok", None, launch

    plan = {
        "config_slug": config.slug,
        "engine_settings": settings,
        "workloads": [w.to_dict() for w in group],
        "seed": req.engine.seed,
        "rows_dir": str(rows_dir.resolve()),
        "device_index": req.device_index,
        "warmup": req.warmup,
        "sample_interval_s": req.sample_interval_s,
    }
    plan_path = run_dir / results.LOGS_DIR / f"plan__{engine_name}.json"
    results.write_json(plan_path, plan)
    launch = {"log": str(log_path.relative_to(run_dir)), "vllm_llm_kwargs": recorded}
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            [*req.worker_argv, str(plan_path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        echo = threading.Thread(target=_tee, args=(process.stdout, log, req.out), daemon=True)
        echo.start()
        timeout = None if deadline is None else max(1.0, deadline - FINAL_RESERVE_S - time.monotonic())
        try:
            code = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            code = None
        # Also after a clean exit: an engine-core process that outlives the worker would hold GPU
        # memory (and the pipe) into the next configuration.
        stop_process_group(process)
        echo.join(timeout=30)
    if code is None:
        return "timeout", "deadline reached while this configuration ran", launch
    if code != 0:
        return "failed", f"worker exited with code {code}:\n{log_tail(log_path)}", launch
    return "ok", None, launch


def _tee(stream, log, out: TextIO) -> None:
    """Copy the worker's output to its log; echo our own progress lines to the terminal."""
    for line in iter(stream.readline, b""):
        log.write(line)
        if line.startswith(ECHO_BYTES):
            print(line.decode(errors="replace").rstrip(), file=out, flush=True)
    log.flush()


def _forget_previous_attempt(
    run_dir: Path, config: BenchConfig, group: list[Workload], max_model_len: int
) -> None:
    """Delete what an earlier, unsuccessful attempt left, so that no stale figure survives this one."""
    rows_dir = run_dir / results.ROWS_DIR
    stale = [results.engine_file_name(config.slug, group[0].model, max_model_len)]
    stale += [results.row_file_name(w.name, config.slug) for w in group]
    for name in stale:
        (rows_dir / name).unlink(missing_ok=True)


def _record_rows(
    run_dir: Path,
    run: dict,
    invocation: int,
    config: BenchConfig,
    group: list[Workload],
    settings: dict,
    launch: dict,
    status: str,
    error: str | None,
) -> None:
    """Turn what the task left in rows/ into complete rows; workloads without one get `status`."""
    rows_dir = run_dir / results.ROWS_DIR
    engine_path = rows_dir / results.engine_file_name(config.slug, group[0].model, settings["max_model_len"])
    engine = results.read_json(engine_path) if engine_path.exists() else {}
    for workload in group:
        name = results.row_file_name(workload.name, config.slug)
        path = rows_dir / name
        measured = results.read_json(path) if path.exists() else {}
        if not measured:
            measured = {
                "status": "failed" if status == "ok" else status,
                "error": error or "the worker wrote no result for this workload",
            }
        if "capacity" not in measured and engine.get("num_gpu_blocks") and engine.get("block_size"):
            measured["capacity"] = capacity_figures(
                num_gpu_blocks=engine["num_gpu_blocks"],
                block_size=engine["block_size"],
                max_context_len=workload.max_context_len,
            )
        row = {
            **measured,
            "schema": results.SCHEMA,
            "file": name,
            "config": config.to_dict(),
            "workload": workload.to_dict(),
            "mode": run["mode"],
            "engine": {**engine, **launch},
            "invocation": invocation,
            "command": run["invocations"][invocation]["command"],
            "environment": run["invocations"][invocation]["environment"],
        }
        results.write_json(path, row)


def _write_outputs(run_dir: Path, run: dict, *, plots_too: bool) -> dict:
    combined = results.write_combined(run_dir, run, results.load_rows(run_dir))
    (run_dir / results.TABLE_FILE).write_text(run_markdown(combined, figures=plots_too) + "\n")
    if plots_too:
        scores = load_quality([Path(p) for p in run.get("quality_files", [])])
        plots.write_plots(combined, combined["rows"], scores, run_dir)
    return combined
