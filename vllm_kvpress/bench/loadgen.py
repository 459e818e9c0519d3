"""Owns the streaming HTTP load generator of online mode, in the manner of `vllm bench serve`.

Each request is a streamed `/v1/completions` call with the prompt as token ids and
`return_token_ids: true` (the server runs without a tokenizer, so there is no text to count).
Timing per request, from the client's clock:
    TTFT = first chunk carrying a token - request sent
    ITL  = gaps between consecutive chunks carrying tokens
    TPOT = (last token - first token) / (output tokens - 1);   e2e = last token - request sent
Requests (conversations, for multi-turn) start at Poisson arrival times of `request_rate` per
second (inf = all at once, like the offline batch), at most `max_concurrency` in flight. A
conversation's turns run one after another, each resending the history (so the server's prefix
cache can serve it) plus the next user message.
"""

import asyncio
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from vllm_kvpress.bench.figures import RequestTiming
from vllm_kvpress.bench.workloads import Workload, WorkloadPrompts, next_turn_prompt


@dataclass
class StreamedCompletion:
    sent_at: float
    token_times: list[float] = field(default_factory=list)
    """Arrival time of each chunk that carried tokens."""
    output_ids: list[int] = field(default_factory=list)
    error: str | None = None

    def timing(self) -> RequestTiming:
        if not self.token_times:
            return RequestTiming(ttft_s=None, output_tokens=0)
        first, last = self.token_times[0], self.token_times[-1]
        gaps = tuple(b - a for a, b in zip(self.token_times, self.token_times[1:]))
        return RequestTiming(
            ttft_s=first - self.sent_at,
            output_tokens=len(self.output_ids),
            decode_s=last - first,
            itl_s=gaps,
            e2e_s=last - self.sent_at,
        )


def completion_payload(model: str, prompt_ids: list[int], max_tokens: int) -> dict:
    return {
        "model": model,
        "prompt": prompt_ids,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "ignore_eos": True,
        "stream": True,
        "return_token_ids": True,
        "stream_options": {"include_usage": True},
    }


def handle_stream_event(event: bytes, result: StreamedCompletion) -> bool:
    """Apply one server-sent event to `result`; True once the stream is over."""
    now = time.perf_counter()
    for line in event.splitlines():
        line = line.strip()
        if not line.startswith(b"data:"):
            continue
        data = line[len(b"data:") :].strip()
        if data == b"[DONE]":
            return True
        chunk = json.loads(data)
        if "error" in chunk:
            result.error = str(chunk["error"])[:500]
            return True
        for choice in chunk.get("choices") or []:
            token_ids = choice.get("token_ids") or []
            if token_ids:
                result.token_times.append(now)
                result.output_ids += token_ids
    return False


async def stream_completion(session, url: str, payload: dict) -> StreamedCompletion:
    """Send one streamed completion and record when each token-carrying chunk arrives."""
    result = StreamedCompletion(sent_at=time.perf_counter())
    try:
        async with session.post(url, json=payload) as response:
            if response.status != 200:
                result.error = f"HTTP {response.status}: {(await response.text())[:500]}"
                return result
            buffer = b""
            # Events are split by hand: with return_token_ids the first event repeats the whole
            # prompt's ids, longer than aiohttp's line-reader limit for long prompts.
            async for data in response.content.iter_any():
                buffer += data
                *events, buffer = buffer.split(b"\n\n")
                for event in events:
                    if handle_stream_event(event, result):
                        return result
    except Exception as e:  # a dropped connection fails this request, not the benchmark
        result.error = f"{type(e).__name__}: {e}"
    return result


def arrival_offsets(count: int, request_rate: float, seed: int) -> list[float]:
    """Start times (s) of `count` requests: a seeded Poisson process, or all 0 for rate inf."""
    if math.isinf(request_rate):
        return [0.0] * count
    gaps = np.random.default_rng(seed).exponential(1.0 / request_rate, size=count)
    return np.cumsum(gaps).tolist()


@dataclass
class LoadResult:
    wall_s: float
    timings: list[RequestTiming]
    prompt_tokens: int
    output_tokens: int
    num_requests: int
    errors: list[str]


async def run_load(
    base_url: str,
    model: str,
    workload: Workload,
    prompts: WorkloadPrompts,
    *,
    request_rate: float,
    max_concurrency: int | None,
    seed: int,
    on_request_done: Callable[[], None] | None = None,
) -> LoadResult:
    """Send every request (every turn of every conversation) of `workload` and time them."""
    import aiohttp

    url = base_url.rstrip("/") + "/v1/completions"
    limiter = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    timings: list[RequestTiming] = []
    errors: list[str] = []
    totals = {"prompt": 0, "output": 0, "requests": 0}

    async def conversation(session, index: int, delay: float) -> None:
        await asyncio.sleep(delay)
        history = prompts.first_prompts[index]
        for turn in range(workload.turns):
            payload = completion_payload(model, history, workload.output_len)
            if limiter is None:
                done = await stream_completion(session, url, payload)
            else:
                async with limiter:
                    done = await stream_completion(session, url, payload)
            if on_request_done is not None:
                on_request_done()
            if done.error is not None:
                errors.append(done.error)
                return  # the rest of this conversation would resend a broken history
            timings.append(done.timing())
            totals["prompt"] += len(history)
            totals["output"] += len(done.output_ids)
            totals["requests"] += 1
            if turn + 1 < workload.turns:
                history = next_turn_prompt(history, done.output_ids, prompts.follow_ups[index][turn])

    offsets = arrival_offsets(workload.num_requests, request_rate, seed)
    # No connection cap and no client timeout: the server's queue, not the client, decides waiting.
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(
        connector=connector, timeout=aiohttp.ClientTimeout(total=None)
    ) as session:
        start = time.perf_counter()
        await asyncio.gather(*(conversation(session, i, d) for i, d in enumerate(offsets)))
        wall_s = time.perf_counter() - start
    return LoadResult(
        wall_s=wall_s,
        timings=timings,
        prompt_tokens=totals["prompt"],
        output_tokens=totals["output"],
        num_requests=totals["requests"],
        errors=errors,
    )
