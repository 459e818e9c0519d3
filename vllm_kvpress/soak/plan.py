"""Owns the soak's traffic plan: what is sent when, as a pure function of (settings, server, seed).

A plan is a list of phases that the driver runs in order (driver.py):

    ProbeRound "start"   the correctness probes, one at a time, nothing else in flight
    per cycle:
      Traffic            steady Poisson arrivals over the cycle's busy part, plus one burst in its
                         middle: requests whose prompt + output tokens add up to `burst_overcommit`
                         times the KV pool, all sent at once, so that vLLM must preempt running
                         requests and recompute them later. The middle cycle also carries the
                         "storm" probe round, a few seconds after its burst.
      Idle               nothing new is sent: the driver waits for every request in flight, stays
                         quiet, then checks that KV usage is back to 0 (a leak check)
    ProbeRound "end"     the probes again, alone

The cycles split `duration_s` evenly; the time the driver spends waiting for requests to finish
comes on top. Request shapes:
- prompt lengths log-uniform from `min_prompt_len` to the context (every scale equally often),
  output lengths log-uniform from 1 to `max_output_len`, prompt + output within `max_model_len`;
  burst requests draw their output from the upper half, so that decoding grows past the pool;
- streamed with probability `stream_share`; a `cancel_share` of all requests is streamed and
  closed by the client after a random number of chunks (0: before the first token, i.e. while
  the request waits or is in prefill);
- the first traffic phase starts with the edge shapes: the shortest prompt with one output token,
  the longest prompt, and the longest output.
Prompt token ids are not stored: `Plan.prompt_ids(request)` draws them from the request's own seed.
"""

import math
from dataclasses import dataclass

import numpy as np

MIN_PROMPT_LEN = 50
MAX_OUTPUT_LEN = 2000
DEFAULT_REQUEST_RATE = 2.0
"""Steady arrivals per second, between bursts."""
DEFAULT_CYCLE_S = 120.0
DEFAULT_IDLE_S = 15.0
MAX_IDLE_SHARE = 0.5
"""An idle period takes at most this share of its cycle (short soaks scale it down)."""
DEFAULT_BURST_OVERCOMMIT = 1.5
"""A burst's prompt + output tokens, in KV pools: above 1, its requests cannot all finish without preemption."""
MAX_BURST_REQUESTS = 1024
"""Caps a burst whatever the pool holds; the summary says when the cap kept a burst under the pool."""
DEFAULT_CANCEL_SHARE = 0.1
DEFAULT_STREAM_SHARE = 0.5
STORM_PROBE_DELAY_S = 2.0
"""The storm probe round goes out this long after the middle burst (at most a quarter of the busy
part, for short soaks): behind a full queue and among requests that are being preempted."""

STEADY, BURST, EDGE = "steady", "burst", "edge"


@dataclass(frozen=True)
class TrafficSettings:
    """What the user chooses about the traffic; the server's side (context, pool) comes at plan time."""

    duration_s: float
    request_rate: float = DEFAULT_REQUEST_RATE
    cycle_s: float = DEFAULT_CYCLE_S
    idle_s: float = DEFAULT_IDLE_S
    burst_overcommit: float = DEFAULT_BURST_OVERCOMMIT
    cancel_share: float = DEFAULT_CANCEL_SHARE
    stream_share: float = DEFAULT_STREAM_SHARE
    min_prompt_len: int = MIN_PROMPT_LEN
    max_output_len: int = MAX_OUTPUT_LEN
    max_burst_requests: int = MAX_BURST_REQUESTS


@dataclass(frozen=True)
class PlannedRequest:
    index: int
    """Position in the plan; also the seed of the request's prompt ids."""
    offset_s: float
    """Send time, from the start of its traffic phase."""
    prompt_len: int
    output_len: int
    """max_tokens; with `ignore_eos` a request that is not cancelled returns exactly this many."""
    stream: bool
    cancel_after_chunks: int | None
    """Close the stream after this many token-carrying chunks (0: before the first); None: never."""
    kind: str
    """STEADY, BURST or EDGE."""

    def to_dict(self) -> dict:
        return {
            "index": self.index,
            "kind": self.kind,
            "prompt_len": self.prompt_len,
            "output_len": self.output_len,
            "stream": self.stream,
            "cancel_after_chunks": self.cancel_after_chunks,
        }


@dataclass(frozen=True)
class ProbeRound:
    name: str
    alone: bool
    """True: one probe at a time once nothing else is in flight; False: all at once, amid traffic."""


@dataclass(frozen=True)
class Traffic:
    cycle: int
    duration_s: float
    requests: tuple[PlannedRequest, ...]
    burst_at_s: float
    probe_round_at_s: float | None = None
    """Offset of the storm probe round within this phase, if it carries it."""


@dataclass(frozen=True)
class Idle:
    cycle: int
    duration_s: float


START_ROUND = ProbeRound("start", alone=True)
STORM_ROUND = ProbeRound("storm", alone=False)
END_ROUND = ProbeRound("end", alone=True)


@dataclass(frozen=True)
class Plan:
    phases: tuple[ProbeRound | Traffic | Idle, ...]
    seed: int
    vocab_size: int
    max_model_len: int
    kv_capacity_tokens: int

    @property
    def requests(self) -> list[PlannedRequest]:
        return [r for p in self.phases if isinstance(p, Traffic) for r in p.requests]

    def prompt_ids(self, request: PlannedRequest) -> list[int]:
        """The request's prompt: random token ids, a pure function of (plan seed, request index)."""
        rng = np.random.default_rng([self.seed, request.index])
        return rng.integers(0, self.vocab_size, size=request.prompt_len).tolist()

    def burst_tokens(self, phase: Traffic) -> int:
        return sum(r.prompt_len + r.output_len for r in phase.requests if r.kind == BURST)

    def to_dict(self) -> dict:
        """The plan's shape for the record (each request's shape is in its outcome)."""
        requests = self.requests
        traffic = [p for p in self.phases if isinstance(p, Traffic)]
        return {
            "seed": self.seed,
            "max_model_len": self.max_model_len,
            "kv_capacity_tokens": self.kv_capacity_tokens,
            "num_requests": len(requests),
            "num_streamed": sum(r.stream for r in requests),
            "num_cancel_planned": sum(r.cancel_after_chunks is not None for r in requests),
            "cycles": [
                {
                    "busy_s": p.duration_s,
                    "requests": len(p.requests),
                    "burst_requests": sum(r.kind == BURST for r in p.requests),
                    "burst_tokens": self.burst_tokens(p),
                    "burst_pools": self.burst_tokens(p) / self.kv_capacity_tokens,
                }
                for p in traffic
            ],
            "idle_s": [p.duration_s for p in self.phases if isinstance(p, Idle)],
        }


def log_uniform_int(rng: np.random.Generator, low: int, high: int) -> int:
    """An integer in [low, high] whose logarithm is uniform: 50-100 is as likely as 4000-8000."""
    if high <= low:
        return low
    value = math.exp(rng.uniform(math.log(low), math.log(high + 1)))
    return min(high, max(low, int(value)))


def _shape(
    rng: np.random.Generator, settings: TrafficSettings, max_model_len: int, *, burst: bool
) -> tuple[int, int, bool, int | None]:
    """(prompt_len, output_len, stream, cancel_after_chunks) of one request."""
    prompt_len = log_uniform_int(rng, settings.min_prompt_len, max_model_len - 1)
    most = min(settings.max_output_len, max_model_len - prompt_len)
    if burst:
        output_len = int(rng.integers((most + 1) // 2, most + 1))
    else:
        output_len = log_uniform_int(rng, 1, most)
    if rng.random() < settings.cancel_share and most >= 2:
        output_len = max(2, output_len)  # one chunk at least must be left unread
        return prompt_len, output_len, True, int(rng.integers(0, output_len))
    return prompt_len, output_len, bool(rng.random() < settings.stream_share), None


def _edge_requests(settings: TrafficSettings, max_model_len: int) -> list[tuple[int, int, bool]]:
    longest_output = min(settings.max_output_len, max_model_len - settings.min_prompt_len)
    return [
        (settings.min_prompt_len, 1, False),
        (max_model_len - 1, 1, True),
        (settings.min_prompt_len, longest_output, True),
    ]


def make_plan(
    settings: TrafficSettings, *, max_model_len: int, vocab_size: int, kv_capacity_tokens: int, seed: int
) -> Plan:
    """The whole plan; equal arguments give an equal plan."""
    if max_model_len < settings.min_prompt_len + 2:
        raise ValueError(f"max_model_len {max_model_len} leaves no room above {settings.min_prompt_len} prompt tokens")
    rng = np.random.default_rng([seed, kv_capacity_tokens, max_model_len])
    num_cycles = max(1, int(settings.duration_s // settings.cycle_s))
    cycle_s = settings.duration_s / num_cycles
    idle_s = min(settings.idle_s, cycle_s * MAX_IDLE_SHARE)
    busy_s = cycle_s - idle_s
    storm_cycle = num_cycles // 2
    phases: list[ProbeRound | Traffic | Idle] = [START_ROUND]
    index = 0

    def planned(offset_s: float, kind: str, shape: tuple[int, int, bool, int | None]) -> PlannedRequest:
        nonlocal index
        index += 1
        prompt_len, output_len, stream, cancel = shape
        return PlannedRequest(index - 1, offset_s, prompt_len, output_len, stream, cancel, kind)

    for cycle in range(num_cycles):
        requests: list[PlannedRequest] = []
        if cycle == 0:
            requests += [planned(0.0, EDGE, (*edge, None)) for edge in _edge_requests(settings, max_model_len)]
        # Poisson arrivals; three times the expected count, so the busy part is always filled
        gaps = rng.exponential(1.0 / settings.request_rate, size=1 + int(3 * busy_s * settings.request_rate))
        arrivals = np.cumsum(gaps)
        burst_at_s = busy_s / 2
        burst_added = False
        for offset in arrivals:
            if offset >= busy_s:
                break
            if not burst_added and offset >= burst_at_s:
                requests += _burst(rng, settings, max_model_len, kv_capacity_tokens, burst_at_s, planned)
                burst_added = True
            requests.append(planned(float(offset), STEADY, _shape(rng, settings, max_model_len, burst=False)))
        if not burst_added:
            requests += _burst(rng, settings, max_model_len, kv_capacity_tokens, burst_at_s, planned)
        storm_at_s = burst_at_s + min(STORM_PROBE_DELAY_S, busy_s / 4) if cycle == storm_cycle else None
        phases.append(Traffic(cycle, busy_s, tuple(requests), burst_at_s, storm_at_s))
        phases.append(Idle(cycle, idle_s))
    phases.append(END_ROUND)
    return Plan(tuple(phases), seed, vocab_size, max_model_len, kv_capacity_tokens)


def _burst(rng, settings, max_model_len, kv_capacity_tokens, at_s, planned) -> list[PlannedRequest]:
    """Requests sent at once until their tokens reach `burst_overcommit` KV pools (or the cap)."""
    burst, tokens = [], 0
    while tokens < settings.burst_overcommit * kv_capacity_tokens and len(burst) < settings.max_burst_requests:
        request = planned(at_s, BURST, _shape(rng, settings, max_model_len, burst=True))
        burst.append(request)
        tokens += request.prompt_len + request.output_len
    return burst
