"""Shared set-up of the bench tests: small workloads, the fake vLLM worker and server, one fake run."""

import sys
from dataclasses import replace
from pathlib import Path

import pytest

from vllm_kvpress.bench.configs import resolve_configs
from vllm_kvpress.bench.runner import BenchRequest, run_bench
from vllm_kvpress.bench.workloads import resolve_workloads

HERE = Path(__file__).parent
FAKE_VLLM = HERE / "fake_vllm"
FAKE_SERVER = HERE / "fake_vllm_server.py"
PLUGIN_CONFIGS = ["gear", 'gear:{"bits": 2}', 'kivi:{"bits": 2}']
"""The configurations of the first GPU run; the fake engine fails kivi on purpose."""


def small(workloads):
    """The same workloads at a size a CPU test runs in milliseconds (same names, models, turns)."""
    return [
        replace(w, num_requests=3, prompt_len=48, output_len=6, follow_up_len=10 if w.turns > 1 else 0)
        for w in workloads
    ]


def _fake_worker_argv() -> tuple[str, ...]:
    code = (
        f"import sys; sys.path.insert(0, {str(FAKE_VLLM)!r}); "
        "from vllm_kvpress.bench.offline import main; sys.exit(main())"
    )
    return (sys.executable, "-c", code)


@pytest.fixture
def fake_worker_argv() -> tuple[str, ...]:
    """The offline worker with the fake `vllm` first on its path."""
    return _fake_worker_argv()


@pytest.fixture
def fake_serve_prefix() -> tuple[str, ...]:
    return (sys.executable, str(FAKE_SERVER))


def make_request(tmp_path: Path, worker_argv, **overrides) -> BenchRequest:
    fields = dict(
        workloads=small(resolve_workloads("A,B,multi-turn")),
        configs=resolve_configs(PLUGIN_CONFIGS),
        results_root=tmp_path / "results",
        command="vllm-kvpress bench --workloads A,B,multi-turn --configs ...",
        worker_argv=worker_argv,
        memory_release_timeout_s=1.0,
        sample_interval_s=0.01,  # the fake engine holds its gauges until sampled (fake_vllm/vllm)
    )
    fields.update(overrides)
    return BenchRequest(**fields)


@pytest.fixture(scope="session")
def offline_run(tmp_path_factory) -> Path:
    """One complete fake offline run (3 baselines + 3 plugin configs x 3 workloads), shared."""
    tmp_path = tmp_path_factory.mktemp("offline_run")
    with open(tmp_path / "stdout.txt", "w") as out:
        return run_bench(make_request(tmp_path, _fake_worker_argv(), out=out))


@pytest.fixture
def bench_request():
    """`bench_request(tmp_path, worker_argv, **fields)`: a small BenchRequest (see make_request)."""
    return make_request


@pytest.fixture
def small_workloads():
    """`small_workloads("A,B")`: those workloads at CPU-test size."""
    return lambda names: small(resolve_workloads(names))


@pytest.fixture
def vllm_cpu_platform(monkeypatch):
    """Let vLLM's CLI parser build on a machine without a GPU: its DeviceConfig default asks the
    platform for a device type, which is empty on vLLM's UnspecifiedPlatform."""
    from vllm.platforms import current_platform

    monkeypatch.setattr(type(current_platform), "device_type", "cpu")
