"""The runner end to end with a fake vLLM: one process per configuration, failures isolated,
results never overwritten, `--resume`, and the deadline."""

import io
import json
import subprocess
import sys
import time

import pytest

from vllm_kvpress.bench import results, runner
from vllm_kvpress.bench.configs import resolve_configs
from vllm_kvpress.bench.report import run_markdown
from vllm_kvpress.bench.tables import SATURATED_NOTE, markdown_table, terminal_table
from vllm_kvpress.bench.workloads import LLAMA, SHORT_CONTEXT, Workload

CONFIG_LABELS = ["auto", "fp8", "int4_per_token_head", "gear", "gear:bits=2", "kivi:bits=2"]
WORKLOAD_NAMES = ["long-prompt", "decode-heavy", "multi-turn"]


def test_every_configuration_gets_a_row_per_workload_and_a_failure_stays_local(offline_run):
    combined = results.load_combined(offline_run)
    rows = {(r["config"]["label"], r["workload"]["name"]): r for r in combined["rows"]}
    assert sorted(rows) == sorted((c, w) for c in CONFIG_LABELS for w in WORKLOAD_NAMES)
    for (label, _), row in rows.items():
        assert row["status"] == ("failed" if label.startswith("kivi") else "ok"), (label, row.get("error"))
    kivi = rows[("kivi:bits=2", "long-prompt")]
    assert "kivi fails to start" in kivi["error"]
    assert "capacity" not in kivi  # the engine never started
    # each row file on disk is the same self-contained row
    for row in combined["rows"]:
        assert json.loads((offline_run / results.ROWS_DIR / row["file"]).read_text()) == row


def test_rows_record_where_and_how_they_ran(offline_run):
    row = results.load_combined(offline_run)["rows"][0]
    assert set(row["environment"]) >= {"gpu_name", "vllm_version", "torch_version", "git_commit", "date_utc"}
    assert row["environment"]["vllm_version"] == "0.26.0"
    assert row["command"].startswith("vllm-kvpress bench")
    kwargs = row["engine"]["vllm_llm_kwargs"]
    assert kwargs["model"] == "vllm_kvpress/bench/model_configs/llama-3.1-8b"  # no machine path
    assert kwargs["gpu_memory_utilization"] == 0.9 and kwargs["load_format"] == "dummy"
    assert row["engine"]["log"].startswith(results.LOGS_DIR + "/")
    assert (offline_run / row["engine"]["log"]).exists()
    assert ".gitignore" in {p.name for p in offline_run.iterdir()}
    assert "logs/" in (offline_run / ".gitignore").read_text()


def test_capacity_and_ratios_come_from_each_engine(offline_run):
    rows = {
        (r["config"]["label"], r["workload"]["name"]): r for r in results.load_combined(offline_run)["rows"]
    }
    # the fake engine allocates 1000 / 2000 / 3760 blocks of 16 tokens and 3280 of 64 for the plugin
    assert rows[("auto", "long-prompt")]["capacity"]["kv_capacity_tokens"] == 16000
    assert rows[("fp8", "decode-heavy")]["ratio_vs_bf16"]["kv_capacity"] == pytest.approx(2.0)
    assert rows[("int4_per_token_head", "multi-turn")]["ratio_vs_bf16"]["kv_capacity"] == pytest.approx(3.76)
    assert rows[("gear", "long-prompt")]["capacity"]["block_size"] == 64
    multi_turn = rows[("gear", "multi-turn")]
    assert multi_turn["throughput"]["num_requests"] == 3 * 4  # 3 conversations x 4 turns
    assert multi_turn["counters"]["prefix_cache_hit_rate"] > 0.5  # later turns resend their history
    assert rows[("gear", "long-prompt")]["counters"]["prefix_cache_hit_rate"] == 0.0


def test_observed_concurrency_is_sampled_while_each_workload_runs(offline_run):
    for row in results.load_combined(offline_run)["rows"]:
        if row["status"] != "ok":
            assert "concurrency" not in row
            continue
        concurrency = row["concurrency"]
        # 3 small requests fit in every fake engine: all of them ran at once, none waited
        assert concurrency["max_running_requests"] == 3, (row["config"]["label"], concurrency)
        assert concurrency["request_limit"] == 3 and concurrency["saturated"] is True
        assert concurrency["max_waiting_requests"] == 0
        assert 0 < concurrency["max_kv_cache_usage"] < 1
        assert concurrency["num_samples"] >= 3 and "sampler_error" not in concurrency
        assert row["ratio_vs_bf16"]["max_running_requests"] == pytest.approx(1.0)


EVICTION_WORKLOAD = Workload(
    "long-evict", LLAMA, num_requests=64, prompt_len=4000, output_len=6, max_model_len=SHORT_CONTEXT
)


def test_eviction_shows_in_observed_concurrency_not_in_capacity(tmp_path, fake_worker_argv, bench_request):
    """The fake engine holds what vLLM's scheduler would: 1000 blocks of 16 tokens hold 3 requests
    of 4,006 tokens; gear's 3280 blocks of 64 hold 52; snapkv keeps 128 prompt tokens per request,
    so all 64 run at once (`*`, a floor), more than its KV capacity's quotient says."""
    out = io.StringIO()
    run_dir = runner.run_bench(
        bench_request(
            tmp_path,
            fake_worker_argv,
            workloads=[EVICTION_WORKLOAD],
            configs=resolve_configs(["gear", 'snapkv:{"budget": 128}'], baselines=["auto"]),
            warmup=False,
            out=out,
        )
    )
    combined = results.load_combined(run_dir)
    rows = {r["config"]["label"]: r for r in combined["rows"]}
    running = {label: r["concurrency"]["max_running_requests"] for label, r in rows.items()}
    assert running == {"auto": 3, "gear": 52, "snapkv:budget=128": 64}
    assert {label: r["concurrency"]["saturated"] for label, r in rows.items()} == {
        "auto": False,
        "gear": False,
        "snapkv:budget=128": True,
    }
    assert rows["auto"]["concurrency"]["max_waiting_requests"] == 61
    snapkv = rows["snapkv:budget=128"]
    # capacity counts stored tokens: the same pages for gear and snapkv, eviction not included
    assert snapkv["capacity"] == rows["gear"]["capacity"]
    assert snapkv["capacity"]["max_concurrency"] == pytest.approx(3280 * 64 / 4006)
    assert running["snapkv:budget=128"] > snapkv["capacity"]["max_concurrency"]
    assert snapkv["ratio_vs_bf16"]["max_running_requests"] == pytest.approx(64 / 3)
    assert rows["gear"]["ratio_vs_bf16"]["max_running_requests"] == pytest.approx(52 / 3)

    md = markdown_table(combined["rows"])
    header = [cell.strip() for cell in md.splitlines()[0].strip("|").split("|")]
    at = header.index("max running (observed)")
    assert header[at - 1] == "max concurrency (KV capacity)" and header[at + 1] == "max running vs bf16"
    cells = {
        line.split("|")[2].strip(): [c.strip() for c in line.strip("|").split("|")]
        for line in md.splitlines()[2:]
    }
    assert cells["bf16 (auto)"][at : at + 2] == ["3", "1.00x"]
    assert cells["gear"][at : at + 2] == ["52", "17.33x"]
    assert cells["snapkv:budget=128"][at : at + 2] == ["64*", ">=21.33x"]
    assert SATURATED_NOTE in run_markdown(combined)
    assert SATURATED_NOTE in (run_dir / results.TABLE_FILE).read_text()
    snapkv_line = next(line for line in terminal_table(combined["rows"]).splitlines() if "snapkv" in line)
    assert "64*" in snapkv_line and ">=21.33x" in snapkv_line
    assert "at most 64 requests running" in out.getvalue()  # the worker's progress line


def test_the_terminal_table_is_printed_last(offline_run):
    out = (offline_run.parent.parent / "stdout.txt").read_text().rstrip().splitlines()
    assert out[-1].startswith("[bench] results:")
    table_end = out[-2]
    assert table_end.startswith("multi-turn") and "kivi:bits=2" in table_end and "failed" in table_end
    assert any("kivi:bits=2: failed" in line and "kivi fails to start" in line for line in out)
    # the worker's progress bars reach the terminal as lines
    progress = [line for line in out if line.startswith("[bench] multi-turn turn 4/4: Processed prompts")]
    assert progress and "3/3" in progress[-1]


def test_a_run_directory_is_never_overwritten(tmp_path, fake_worker_argv, bench_request, small_workloads):
    request = bench_request(
        tmp_path,
        fake_worker_argv,
        workloads=small_workloads("A"),
        configs=resolve_configs([], baselines=["auto"]),
        out=io.StringIO(),
    )
    first = runner.run_bench(request)
    before = (first / results.COMBINED_FILE).read_text()
    second = runner.run_bench(request)
    assert second.name == first.name + "-2"
    assert (first / results.COMBINED_FILE).read_text() == before


def test_resume_adds_configurations_under_the_same_settings(
    tmp_path, fake_worker_argv, bench_request, small_workloads
):
    workloads = small_workloads("A")
    first = runner.run_bench(
        bench_request(
            tmp_path,
            fake_worker_argv,
            workloads=workloads,
            configs=resolve_configs([], baselines=["auto"]),
            out=io.StringIO(),
        )
    )
    auto_row = (first / results.ROWS_DIR / "long-prompt__auto.json").read_text()
    resumed = runner.run_bench(
        bench_request(
            tmp_path,
            fake_worker_argv,
            workloads=workloads,
            resume=first,
            configs=resolve_configs(["fp8"], baselines=["auto"]),
            out=io.StringIO(),
        )
    )
    assert resumed == first
    combined = results.load_combined(first)
    assert [r["config"]["label"] for r in combined["rows"]] == ["auto", "fp8"]
    assert [r["invocation"] for r in combined["rows"]] == [0, 1]
    assert combined["rows"][1]["ratio_vs_bf16"]["kv_capacity"] == pytest.approx(2.0)
    assert len(combined["invocations"]) == 2
    # auto was measured already: not run again, its measurement untouched
    assert json.loads(auto_row)["throughput"] == combined["rows"][0]["throughput"]
    with pytest.raises(runner.RunMismatchError, match="workloads"):
        runner.run_bench(
            bench_request(
                tmp_path,
                fake_worker_argv,
                workloads=small_workloads("B"),
                resume=first,
                configs=[],
                out=io.StringIO(),
            )
        )


def test_deadline_stops_a_running_configuration_and_skips_the_rest(
    tmp_path, monkeypatch, bench_request, small_workloads
):
    monkeypatch.setattr(runner, "MIN_START_S", 2.0)
    monkeypatch.setattr(runner, "FINAL_RESERVE_S", 0.5)
    sleeper = (sys.executable, "-c", "import time; time.sleep(120)")
    out = io.StringIO()
    start = time.monotonic()
    run_dir = runner.run_bench(
        bench_request(
            tmp_path,
            sleeper,
            workloads=small_workloads("A"),
            configs=resolve_configs(["fp8"], baselines=["auto"]),
            deadline_s=3.0,
            out=out,
        )
    )
    assert time.monotonic() - start < 60
    rows = results.load_combined(run_dir)["rows"]
    assert [(r["config"]["label"], r["status"]) for r in rows] == [("auto", "timeout")]
    assert f"--resume {run_dir}" in out.getvalue()
    assert "not started: fp8" in out.getvalue()


def test_resume_reruns_failures_only_when_asked(tmp_path, fake_worker_argv, bench_request, small_workloads):
    def run(**fields):
        out = io.StringIO()
        run_dir = runner.run_bench(
            bench_request(tmp_path, fake_worker_argv, workloads=small_workloads("A"), out=out, **fields)
        )
        return run_dir, out.getvalue()

    run_dir, _ = run(configs=resolve_configs(["kivi"], baselines=["auto"]))
    _, output = run(configs=[], resume=run_dir)
    assert "0 engine start(s) to do" in output
    _, output = run(configs=[], resume=run_dir, retry_failed=True)
    assert "1 engine start(s) to do" in output and "kivi: failed" in output
    kivi = json.loads((run_dir / results.ROWS_DIR / "long-prompt__kivi.json").read_text())
    assert kivi["invocation"] == 2 and kivi["status"] == "failed"


def test_resume_measures_only_the_workloads_still_missing(
    tmp_path, fake_worker_argv, bench_request, small_workloads
):
    request = dict(workloads=small_workloads("A,B"), configs=resolve_configs([], baselines=["auto"]))
    run_dir = runner.run_bench(bench_request(tmp_path, fake_worker_argv, out=io.StringIO(), **request))
    cut_off = run_dir / results.ROWS_DIR / "decode-heavy__auto.json"
    cut_off.write_text(json.dumps({**json.loads(cut_off.read_text()), "status": "timeout"}))
    out = io.StringIO()
    runner.run_bench(bench_request(tmp_path, fake_worker_argv, out=out, resume=run_dir, **request))
    assert "auto on llama-3.1-8b, max_model_len 8704: decode-heavy\n" in out.getvalue()
    rows = {r["workload"]["name"]: r for r in results.load_combined(run_dir)["rows"]}
    assert (rows["long-prompt"]["invocation"], rows["decode-heavy"]["invocation"]) == (0, 1)
    assert rows["decode-heavy"]["status"] == "ok"


def test_workers_import_the_installed_package_not_the_working_directory(tmp_path):
    """A `vllm_kvpress/` source folder in the working directory (the repository root, say) must not
    shadow the installed package in the engine processes."""
    shadow = tmp_path / "vllm_kvpress"
    shadow.mkdir()
    (shadow / "__init__.py").write_text("raise ImportError('the working directory shadowed the package')")
    done = subprocess.run(list(runner.BenchRequest([], []).worker_argv), cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert "shadowed" not in done.stderr
    assert done.returncode == 2 and "usage: python -m vllm_kvpress.bench.offline" in done.stderr
