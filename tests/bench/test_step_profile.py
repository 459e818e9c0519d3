"""The step profile's tables and diagnostics (the engine run itself needs the GPU machine)."""

from types import SimpleNamespace

import pytest
from torch.autograd import DeviceType

from vllm_kvpress.bench.configs import ConfigSpecError
from vllm_kvpress.bench.step_profile import (
    CompileLog,
    StepTimeline,
    device_intervals,
    gpu_gaps,
    kernel_table,
    main,
    parser,
    print_summary,
    warm_up,
)


def _event(key, self_device_us, count, device_type=DeviceType.CUDA):
    return SimpleNamespace(key=key, self_device_time_total=self_device_us, count=count, device_type=device_type)


def test_kernels_are_per_step_largest_first_and_cpu_ops_do_not_count():
    events = [
        _event("aten::mm", 0.0, 40, DeviceType.CPU),  # a CPU op: its kernels carry the device time
        # a custom op launching Triton kernels reports their time as its own self device time
        _event("vllm::unified_kv_cache_update", 1000.0, 640, DeviceType.CPU),
        _event("Command Buffer Full", 2000.0, 40),  # the host waiting on the launch queue
        _event("kvpress_decode_split", 3000.0, 640),
        _event("nvjet_gemm", 5000.0, 2000),
        _event("_reduce_splits_kernel", 1000.0, 640),
    ]
    rows = kernel_table(events, num_steps=20)
    assert [r["kernel"] for r in rows] == ["nvjet_gemm", "kvpress_decode_split", "_reduce_splits_kernel"]
    assert rows[0]["us_per_step"] == 250.0 and rows[1]["launches_per_step"] == 32.0
    assert sum(r["share"] for r in rows) == pytest.approx(1.0)
    assert rows[2]["share"] == pytest.approx(1000 / 9000)


def test_the_older_cuda_time_attribute_is_read_too():
    rows = kernel_table([SimpleNamespace(key="k", self_cuda_time_total=50.0, count=5)], num_steps=5)
    assert rows == [{"kernel": "k", "us_per_step": 10.0, "launches_per_step": 1.0, "share": 1.0}]


def test_an_unknown_config_is_refused_before_any_engine_starts():
    with pytest.raises(ConfigSpecError, match="unknown"):
        main(["--config", "nosuchmethod"])


def test_an_unknown_workload_is_refused_with_the_allowed_names(capsys):
    with pytest.raises(SystemExit):
        main(["--config", "gear", "--workload", "nosuchworkload"])
    assert "long-prompt" in capsys.readouterr().err


def _scheduled(per_request):
    return SimpleNamespace(num_scheduled_tokens=per_request)


def test_the_timeline_splits_prompt_carrying_steps_from_decode_only_steps():
    timeline = StepTimeline()
    timeline.record(_scheduled({"a": 8000, "b": 1}), now=0.0)  # a prompt chunk next to a decode
    timeline.record(_scheduled({"a": 1, "b": 1}), now=0.5)
    timeline.record(_scheduled({"a": 1, "b": 1}), now=0.6)
    timeline.record(_scheduled({}), now=0.8)  # nothing scheduled: not a step
    timeline.profiling = True
    timeline.record(_scheduled({"a": 1, "b": 1}), now=0.9)  # profiled: slowed, left out
    timeline.profiling = False
    out = timeline.summary(end=5.0)
    assert out["prefill"]["steps"] == 1 and out["prefill"]["wall_s"] == pytest.approx(0.5)
    assert out["prefill"]["tokens"] == 8001
    assert out["decode"]["steps"] == 2 and out["decode"]["wall_s"] == pytest.approx(0.3)
    assert out["decode"]["ms_per_step"] == pytest.approx(150.0)
    assert out["decode"]["requests_per_step"] == 2.0


@pytest.mark.parametrize("profile_at", ["8,x", "-1", "8,12"])
def test_bad_profile_windows_are_refused(profile_at, capsys):
    with pytest.raises(SystemExit):
        main(["--config", "gear", "--profile-at", profile_at, "--profile-steps", "10"])
    assert "--profile-at" in capsys.readouterr().err


def test_slowest_steps_are_longest_first_without_profiled_or_empty_steps():
    timeline = StepTimeline()
    timeline.record(_scheduled({"a": 4000}), now=0.0)  # 0: 0.2 s
    timeline.record(_scheduled({"a": 1, "b": 1}), now=0.2)  # 1: 0.05 s
    timeline.record(_scheduled({}), now=0.25)  # 2: nothing scheduled, 1 s: not a step
    timeline.profiling = True
    timeline.record(_scheduled({"a": 1, "b": 1}), now=1.25)  # 3: profiled, 2 s: left out
    timeline.profiling = False
    timeline.record(_scheduled({"a": 1, "b": 1}), now=3.25)  # 4: 0.5 s, to the end
    rows = timeline.slowest(end=3.75)
    assert [r["step"] for r in rows] == [4, 0, 1]
    assert rows[0]["ms"] == pytest.approx(500.0)
    assert rows[1] == {"step": 0, "ms": pytest.approx(200.0), "tokens": 4000, "requests": 1}
    assert [r["step"] for r in timeline.slowest(end=3.75, n=2)] == [4, 0]
    assert timeline.current() == 4


def test_gpu_gaps_take_the_union_and_name_the_kernels_around_each_gap():
    intervals = [
        (100.0, 200.0, "b"),
        (0.0, 150.0, "a"),  # overlaps b (another stream): busy 0-200, b ends last
        (120.0, 180.0, "inside_a"),
        (500.0, 600.0, "c"),  # 300 us idle after b
        (600.0, 650.0, "d"),  # touches c: no gap
        (700.0, 1000.0, "e"),  # 50 us idle after d
    ]
    out = gpu_gaps(intervals, num_steps=2)
    assert out["busy_ms_per_step"] == pytest.approx((200 + 150 + 300) / 2 / 1e3)
    assert out["span_ms_per_step"] == pytest.approx(1000 / 2 / 1e3)
    assert out["largest_gaps"] == [{"us": 300.0, "after": "b", "before": "c"},
                                   {"us": 50.0, "after": "d", "before": "e"}]
    assert gpu_gaps(intervals, num_steps=2, top=1)["largest_gaps"] == [{"us": 300.0, "after": "b", "before": "c"}]


def test_gpu_gaps_of_nothing_are_zero():
    assert gpu_gaps([], num_steps=10) == {"busy_ms_per_step": 0.0, "span_ms_per_step": 0.0, "largest_gaps": []}


def test_device_intervals_keep_device_work_only():
    def event(name, device_type, time_range=(1.0, 2.0)):
        time_range = time_range and SimpleNamespace(start=time_range[0], end=time_range[1])
        return SimpleNamespace(name=name, device_type=device_type, time_range=time_range)

    events = [event("aten::mm", DeviceType.CPU), event("nvjet_gemm", DeviceType.CUDA),
              event("Command Buffer Full", DeviceType.CUDA), event("no_range", DeviceType.CUDA, None)]
    assert device_intervals(events) == [(1.0, 2.0, "nvjet_gemm")]


def _compile(listener, **overrides):
    kwargs = {"src": SimpleNamespace(name="src_name", fn=SimpleNamespace(__name__="fn_name")),
              "metadata": {"name": "kvpress_decode_split"}, "metadata_group": {},
              "times": SimpleNamespace(total=1_500_000), "cache_hit": False, **overrides}
    listener(**kwargs)


def test_the_compile_log_records_each_compile_with_its_step_and_chains_the_previous_listener(monkeypatch):
    from triton import knobs

    seen = []

    def previous(**kwargs):
        seen.append(kwargs["metadata"].get("name"))

    monkeypatch.setattr(knobs.compilation, "listener", previous)
    step = [3]
    log = CompileLog(lambda: step[0])
    with log.watching():
        assert knobs.compilation.listener is not previous
        _compile(knobs.compilation.listener)
        step[0] = 7
        _compile(knobs.compilation.listener, metadata={}, cache_hit=True)  # the name from the source
        _compile(knobs.compilation.listener, metadata={}, src=SimpleNamespace(fn=SimpleNamespace(__name__="fn")))
    assert knobs.compilation.listener is previous
    _compile(knobs.compilation.listener)  # after the block: not recorded
    assert log.compiles == [
        {"kernel": "kvpress_decode_split", "ms": 1500.0, "cache_hit": False, "step": 3},
        {"kernel": "src_name", "ms": 1500.0, "cache_hit": True, "step": 7},
        {"kernel": "fn", "ms": 1500.0, "cache_hit": False, "step": 7},
    ]
    assert seen == ["kvpress_decode_split", None, None, "kvpress_decode_split"]


def test_the_compile_log_restores_no_listener_even_when_the_block_fails(monkeypatch):
    from triton import knobs

    monkeypatch.setattr(knobs.compilation, "listener", None)
    log = CompileLog(lambda: 0)
    with pytest.raises(RuntimeError), log.watching():
        _compile(knobs.compilation.listener)
        raise RuntimeError("engine failed")
    assert knobs.compilation.listener is None
    assert len(log.compiles) == 1


def test_warmup_is_on_unless_no_warmup_is_given():
    assert parser().parse_args(["--config", "gear"]).warmup is True
    assert parser().parse_args(["--config", "gear", "--no-warmup"]).warmup is False


def test_no_warmup_still_refuses_a_bad_workload_before_any_engine_starts(capsys):
    with pytest.raises(SystemExit):
        main(["--config", "gear", "--no-warmup", "--workload", "nosuchworkload"])
    assert "long-prompt" in capsys.readouterr().err


def test_warm_up_generates_the_bench_warmup_batch_for_the_workload_engine():
    from vllm_kvpress.bench.workloads import WORKLOADS, warmup_for

    calls = []
    llm = SimpleNamespace(generate=lambda prompts, params, **kw: calls.append((prompts, params)))
    workload = WORKLOADS["long-prompt"]
    warm_up(llm, workload, seed=0)
    expected = warmup_for(workload.model, workload.max_model_len)
    [(prompts, params)] = calls
    assert len(prompts) == expected.num_requests
    assert all(len(p["prompt_token_ids"]) == expected.prompt_len for p in prompts)
    assert params.max_tokens == expected.output_len and params.ignore_eos and params.temperature == 0.0


def test_the_summary_prints_compiles_slowest_steps_and_gaps(capsys):
    run = {
        "wall_s": 10.0, "engine_steps": 40,
        "timeline": {"decode": {"steps": 30, "wall_s": 0.9, "ms_per_step": 30.0, "requests_per_step": 4.0}},
        "jit_compiles": [{"kernel": "kvpress_decode_split", "ms": 1500.0, "cache_hit": False, "step": 12},
                         {"kernel": "_reduce_splits_kernel", "ms": 500.0, "cache_hit": True, "step": 12}],
        "slowest_steps": [{"step": 12, "ms": 2100.0, "tokens": 4, "requests": 4}],
        "windows": [{"from_step": 8, "steps": 10, "scheduled_tokens_per_step": 4.0, "kernels": [],
                     "gpu_timeline": {"busy_ms_per_step": 20.0, "span_ms_per_step": 30.0,
                                      "largest_gaps": [{"us": 900.0, "after": "k1", "before": "k2"}]}}],
    }
    print_summary("gear", "long-prompt", False, run)
    out = capsys.readouterr().out
    assert "no warm-up" in out
    assert "2 Triton compiles during the measured run (1 from the disk cache), 2.0 s" in out
    assert "kvpress_decode_split" in out and "step    12" in out
    assert "2100.00 ms" in out
    assert "GPU busy 20.00 of 30.00 ms/step" in out and "900.0 us after k1 before k2" in out
