"""Owns running a soak plan against one server: its phases in order, every request's outcome, the
probe rounds and the leak check after each idle period.

Each planned request is a task of its own, started at its offset in its traffic phase and never
waited for by the phase: traffic overlaps from one phase into the next, as it does in production.
A phase that needs quiet (an idle period, a probe round sent alone) first drains: it waits until
every request in flight has ended, for at most `drain_timeout_s`; what is still in flight then
is recorded (a hang) and the soak goes on.

The leak check after an idle period reads /metrics twice: once after the quiet, and once after a
one-token "nudge" request. vLLM's gauges hold the value of the last engine step, and a request
the client aborted while nothing else ran is freed without a step after it, so the first reading
may still count its blocks; the nudge's step runs after every free, so its reading is the verdict.
Times are seconds since `origin` (a `time.perf_counter()` value shared with the sampler).
"""

import asyncio
import time
from dataclasses import asdict, dataclass

from vllm_kvpress.bench.configs import SERVED_MODEL_NAME
from vllm_kvpress.soak.client import FAILED, OK, Reply, send_completion, soak_payload
from vllm_kvpress.soak.plan import BURST, STORM_ROUND, Idle, Plan, PlannedRequest, ProbeRound, Traffic
from vllm_kvpress.soak.probes import PROBE_MAX_TOKENS, Probe, ProbeSet, answer_ids
from vllm_kvpress.soak.sampler import read_server_metrics

DEFAULT_DRAIN_TIMEOUT_S = 600.0
"""Longer than any request of a healthy server takes (2,000 tokens behind a full queue)."""
NUDGE_PROMPT_IDS = tuple(range(1, 9))
"""The nudge: 8 ordinary token ids, one output token."""
GAUGE_SETTLE_S = 0.5
"""After the nudge's answer, before reading: vLLM records a step's stats just after sending its outputs."""
HUNG = "no answer within the drain timeout (hung)"


@dataclass
class SoakRecord:
    outcomes: list[dict]
    """One per planned request, in plan order: its shape, status, times (s since origin) and error."""
    probe_rounds: dict[str, list[dict]]
    leak_checks: list[dict]
    events: list[dict]
    wall_s: float

    def to_dict(self) -> dict:
        return asdict(self)


class Driver:
    """Runs one plan once (`await Driver(...).run()`); the probes go out as the plan's rounds say."""

    def __init__(
        self,
        base_url: str,
        plan: Plan,
        probes: ProbeSet,
        *,
        origin: float,
        drain_timeout_s: float = DEFAULT_DRAIN_TIMEOUT_S,
        model: str = SERVED_MODEL_NAME,
        on_request_done=None,
    ):
        self.base_url = base_url.rstrip("/")
        self.url = self.base_url + "/v1/completions"
        self.plan = plan
        self.probes = probes
        self.origin = origin
        self.drain_timeout_s = drain_timeout_s
        self.model = model
        self.on_request_done = on_request_done
        self.session = None
        self.in_flight: set[asyncio.Task] = set()
        self.requests_sent_unanswered = 0
        self.outcomes: dict[int, dict] = {}
        self.probe_rounds: dict[str, list[dict]] = {}
        self.leak_checks: list[dict] = []
        self.events: list[dict] = []

    def now(self) -> float:
        return time.perf_counter() - self.origin

    def _since_origin(self, t: float) -> float:
        return round(t - self.origin, 4)

    def _launch(self, coroutine) -> None:
        task = asyncio.create_task(coroutine)
        self.in_flight.add(task)
        task.add_done_callback(self.in_flight.discard)

    async def _drain(self) -> int:
        """Wait for every task in flight (at most drain_timeout_s); the number still running then."""
        pending = {t for t in self.in_flight if not t.done()}
        if pending:
            _, pending = await asyncio.wait(pending, timeout=self.drain_timeout_s)
        return len(pending)

    async def run(self) -> SoakRecord:
        import aiohttp

        start = self.now()
        # No connection cap and no client timeout: the server's queue, not the client, decides waiting.
        async with aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0), timeout=aiohttp.ClientTimeout(total=None)
        ) as self.session:
            for phase in self.plan.phases:
                if isinstance(phase, ProbeRound):
                    await self._probe_round(phase)
                elif isinstance(phase, Traffic):
                    await self._traffic(phase)
                elif isinstance(phase, Idle):
                    await self._idle(phase)
            if await self._drain():
                for task in list(self.in_flight):
                    task.cancel()
        outcomes = []
        for request in self.plan.requests:  # a request whose task was cancelled above never answered
            outcome = self.outcomes.get(request.index)
            outcomes.append(outcome or {**request.to_dict(), "status": FAILED, "http_status": None, "error": HUNG})
        return SoakRecord(outcomes, self.probe_rounds, self.leak_checks, self.events, self.now() - start)

    async def _traffic(self, phase: Traffic) -> None:
        start = self.now()
        for request in phase.requests:
            self._launch(self._planned(request, phase.cycle, request.offset_s))
        burst = [r for r in phase.requests if r.kind == BURST]
        self.events.append(
            {
                "event": "burst",
                "cycle": phase.cycle,
                "t_s": round(start + phase.burst_at_s, 3),
                "requests": len(burst),
                "tokens": self.plan.burst_tokens(phase),
            }
        )
        if phase.probe_round_at_s is not None:
            self._launch(self._delayed_probe_round(STORM_ROUND, phase.probe_round_at_s))
        await asyncio.sleep(max(0.0, start + phase.duration_s - self.now()))

    async def _planned(self, request: PlannedRequest, cycle: int, delay_s: float) -> None:
        await asyncio.sleep(delay_s)
        payload = soak_payload(self.model, self.plan.prompt_ids(request), request.output_len, stream=request.stream)
        self.requests_sent_unanswered += 1
        try:
            reply = await send_completion(
                self.session, self.url, payload, cancel_after_chunks=request.cancel_after_chunks
            )
        finally:
            self.requests_sent_unanswered -= 1
        self.outcomes[request.index] = {**request.to_dict(), "cycle": cycle, **self._reply_fields(reply)}
        if self.on_request_done is not None:
            self.on_request_done()

    def _reply_fields(self, reply: Reply) -> dict:
        return {
            "status": reply.status,
            "http_status": reply.http_status,
            "error": reply.error,
            "sent_at_s": self._since_origin(reply.sent_at),
            "output_tokens": len(reply.output_ids),
            "chunks": len(reply.token_times),
            "ttft_s": reply.ttft_s,
            "e2e_s": reply.e2e_s,
        }

    async def _delayed_probe_round(self, probe_round: ProbeRound, delay_s: float) -> None:
        await asyncio.sleep(delay_s)
        await self._probe_round(probe_round)

    async def _probe_round(self, probe_round: ProbeRound) -> None:
        if probe_round.alone:
            await self._drain()
        in_flight_before = self.requests_sent_unanswered
        start = self.now()
        if probe_round.alone:
            results = [await self._probe(p) for p in self.probes.probes]
        else:
            results = list(await asyncio.gather(*(self._probe(p) for p in self.probes.probes)))
        self.probe_rounds[probe_round.name] = results
        self.events.append(
            {
                "event": "probes",
                "round": probe_round.name,
                "t_s": round(start, 3),
                "end_s": round(self.now(), 3),
                "requests_in_flight": in_flight_before,
            }
        )

    async def _probe(self, probe: Probe) -> dict:
        payload = soak_payload(self.model, list(probe.prompt_ids), PROBE_MAX_TOKENS, stream=False)
        reply = await send_completion(self.session, self.url, payload)
        answer = answer_ids(reply.output_ids, self.probes.stop_token_ids) if reply.status == OK else None
        text = self.probes.decode(answer) if answer is not None and self.probes.decode is not None else None
        return {
            "name": probe.name,
            "status": reply.status,
            "http_status": reply.http_status,
            "error": reply.error,
            "sent_at_s": self._since_origin(reply.sent_at),
            "e2e_s": reply.e2e_s,
            "answer_ids": answer,
            "text": text,
            "found": None if text is None or probe.expected is None else probe.expected in text,
        }

    async def _read_metrics(self) -> dict | None:
        # on a thread: the server may share this event loop (the tests' stand-in does)
        return await asyncio.to_thread(read_server_metrics, self.base_url)

    async def _idle(self, phase: Idle) -> None:
        drain_start = self.now()
        still_in_flight = await self._drain()
        quiet_start = self.now()
        await asyncio.sleep(phase.duration_s)
        before = await self._read_metrics()
        nudge = await send_completion(
            self.session, self.url, soak_payload(self.model, list(NUDGE_PROMPT_IDS), 1, stream=False)
        )
        await asyncio.sleep(GAUGE_SETTLE_S)
        after = await self._read_metrics()
        self.events.append(
            {"event": "idle", "cycle": phase.cycle, "t_s": round(quiet_start, 3), "end_s": round(self.now(), 3)}
        )
        self.leak_checks.append(
            {
                "cycle": phase.cycle,
                "t_s": round(self.now(), 3),
                "drain_s": round(quiet_start - drain_start, 3),
                "quiet_s": phase.duration_s,
                "in_flight": still_in_flight,
                "before_nudge": before,
                "after_nudge": after,
                "nudge_status": nudge.status,
                "nudge_error": nudge.error,
            }
        )
