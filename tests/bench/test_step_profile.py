"""The step profile's kernel table (the engine run itself needs the GPU machine)."""

from types import SimpleNamespace

import pytest
from torch.autograd import DeviceType

from vllm_kvpress.bench.configs import ConfigSpecError
from vllm_kvpress.bench.step_profile import StepTimeline, kernel_table, main


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
