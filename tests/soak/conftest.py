"""Shared set-up of the soak tests: the stand-in server on a thread of its own, small plans and probes."""

import asyncio
import io
import json
import sys
import threading
import time
from pathlib import Path

import pytest

from vllm_kvpress.bench.gauges import PeakGaugeSampler
from vllm_kvpress.bench.online import free_port
from vllm_kvpress.soak.driver import Driver
from vllm_kvpress.soak.plan import TrafficSettings, make_plan
from vllm_kvpress.soak.probes import random_probes
from vllm_kvpress.soak.sampler import MetricsSeries

from .stand_in_server import StandIn, make_app

SMALL_CONTEXT = 256
VOCAB = 1000
STAND_IN = Path(__file__).parent / "stand_in_server.py"
STAND_IN_PREFIX = (sys.executable, str(STAND_IN))
"""`SoakRequest.serve_prefix` that starts the stand-in where `vllm serve` would start."""
SMALL_TRAFFIC = TrafficSettings(
    duration_s=3.0,
    request_rate=15.0,
    cycle_s=1.5,
    idle_s=0.3,
    burst_overcommit=6.0,
    cancel_share=0.2,
    max_output_len=40,
)
"""Two cycles of 1.5 s, each about 18 steady requests and a burst of about 20 that queues behind the
stand-in's 4 running slots and overfills its pool; a fifth of all requests cancelled."""


def small_soak_request(tmp_path, specs: list[str], command: str, **changes):
    """A 1.5-second soak of `specs` (and the bf16 baseline) on a tiny model, served by the stand-in,
    with two probe lengths and depths; `changes` replace any other field."""
    from dataclasses import replace

    from vllm_kvpress.bench.configs import resolve_configs
    from vllm_kvpress.soak.runner import SoakRequest
    from vllm_kvpress.soak.served_model import resolve_model

    request = SoakRequest(
        model=resolve_model(str(tiny_model_dir(tmp_path))),
        configs=resolve_configs(specs, baselines=["auto"]),
        traffic=replace(SMALL_TRAFFIC, duration_s=1.5),
        out=tmp_path / "out",
        max_model_len=SMALL_CONTEXT,
        probe_lengths=(64, 128),
        probe_depths=(10.0, 90.0),
        drain_timeout_s=30.0,
        start_timeout_s=60.0,
        sample_interval_s=0.05,
        memory_release_timeout_s=1.0,
        serve_prefix=STAND_IN_PREFIX,
        command=command,
        out_stream=io.StringIO(),
    )
    return replace(request, **changes)


class ServerThread:
    """Serves a StandIn on its own event loop and thread, so that the code under test may block
    (the gauge sampler and the leak check read /metrics with blocking calls) without stalling it."""

    def __init__(self, stand_in: StandIn):
        self.stand_in = stand_in
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="stand-in-server", daemon=True)

    def _serve(self) -> None:
        from aiohttp import web

        asyncio.set_event_loop(self.loop)
        runner = web.AppRunner(make_app(self.stand_in))
        self.loop.run_until_complete(runner.setup())
        self.loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", self.port).start())
        self._ready.set()
        self.loop.run_forever()
        self.loop.run_until_complete(runner.cleanup())
        self.loop.close()

    def __enter__(self) -> "ServerThread":
        self._thread.start()
        assert self._ready.wait(timeout=30), "the stand-in server did not start"
        return self

    def __exit__(self, *exc) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=30)


def tiny_model_dir(parent: Path) -> Path:
    """A Llama config without weights or tokenizer: served with dummy weights, probed with random ids."""
    model_dir = parent / "tiny-llama"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": VOCAB,
        "max_position_embeddings": 4096,
    }))
    return model_dir


def small_plan(traffic: TrafficSettings = SMALL_TRAFFIC, *, capacity_tokens: int = StandIn.capacity_tokens, seed=0):
    return make_plan(traffic, max_model_len=SMALL_CONTEXT, vocab_size=VOCAB, kv_capacity_tokens=capacity_tokens,
                     seed=seed)


def small_probes():
    return random_probes([64, 128], per_length=2, vocab_size=VOCAB, seed=0)


def drive(stand_in: StandIn, plan, probes, *, sample_interval_s: float = 0.05):
    """Run `plan` against a stand-in server with the gauge sampler on: (record, series columns)."""
    with ServerThread(stand_in) as server:
        origin = time.perf_counter()
        series = MetricsSeries(server.base_url, lambda: time.perf_counter() - origin)
        with PeakGaugeSampler(series, sample_interval_s):
            record = asyncio.run(Driver(server.base_url, plan, probes, origin=origin, drain_timeout_s=30).run())
    return record, series.columns()


@pytest.fixture
def tokenizer():
    """SmolLM2's tokenizer: the embedded checkpoint's, fetched once (tests/conftest.py marks its users)."""
    from transformers import AutoTokenizer

    from vllm_kvpress.models import ensure_model

    return AutoTokenizer.from_pretrained(ensure_model("smollm2"))
