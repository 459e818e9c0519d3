"""Owns one soak request on the wire: a `/v1/completions` call, streamed or not, that the client may
close after a set number of chunks, and what came of it.

The payload is bench's (`loadgen.completion_payload`: token-id prompt, greedy, `ignore_eos`,
`return_token_ids`) and streamed events go through bench's event parser, so the soak speaks to
the server exactly as the benchmarks do. Outcomes:

    ok         HTTP 200 and the whole completion: exactly `max_tokens` tokens, then [DONE]
    cancelled  the client closed the stream on purpose, after `cancel_after_chunks` token chunks
    failed     anything else, kept with its reason: an HTTP status other than 200 (with the body),
               an error event in the stream, a stream that ended before [DONE], a completion
               shorter or longer than asked, a dropped connection

Times are `time.perf_counter()` seconds; TTFT only for streamed requests (first token chunk).
"""

import time
from dataclasses import dataclass, field

from vllm_kvpress.bench.loadgen import StreamedCompletion, completion_payload, handle_stream_event

OK, CANCELLED, FAILED = "ok", "cancelled", "failed"
ERROR_BODY_CHARS = 500
"""Of an error body kept per failed request: enough for vLLM's JSON error and its message."""


@dataclass
class Reply:
    status: str
    sent_at: float
    done_at: float
    http_status: int | None = None
    error: str | None = None
    output_ids: list[int] = field(default_factory=list)
    token_times: list[float] = field(default_factory=list)
    """Arrival time of each chunk that carried tokens (streamed requests)."""

    @property
    def ttft_s(self) -> float | None:
        return self.token_times[0] - self.sent_at if self.token_times else None

    @property
    def e2e_s(self) -> float | None:
        return self.done_at - self.sent_at if self.status == OK else None


def soak_payload(model: str, prompt_ids: list[int], max_tokens: int, *, stream: bool) -> dict:
    payload = completion_payload(model, prompt_ids, max_tokens)
    if not stream:
        # vLLM answers 400 to stream_options on a request that is not streamed
        payload.pop("stream_options", None)
        payload["stream"] = False
    return payload


def _finished(streamed: StreamedCompletion, max_tokens: int, http_status: int) -> Reply:
    now = time.perf_counter()
    reply = Reply(OK, streamed.sent_at, now, http_status, None, streamed.output_ids, streamed.token_times)
    if streamed.error is not None:
        reply.status, reply.error = FAILED, f"error event: {streamed.error}"
    elif len(streamed.output_ids) != max_tokens:
        reply.status, reply.error = FAILED, f"returned {len(streamed.output_ids)} of {max_tokens} tokens"
    return reply


async def send_completion(session, url: str, payload: dict, *, cancel_after_chunks: int | None = None) -> Reply:
    """Send one completion; with `cancel_after_chunks`, close the stream after that many token chunks."""
    streamed = StreamedCompletion(sent_at=time.perf_counter())
    max_tokens = payload["max_tokens"]

    def reply(status: str, http_status: int | None, error: str | None = None) -> Reply:
        return Reply(
            status, streamed.sent_at, time.perf_counter(), http_status, error, streamed.output_ids, streamed.token_times
        )

    try:
        async with session.post(url, json=payload) as response:
            if response.status != 200:
                body = (await response.text())[:ERROR_BODY_CHARS]
                return reply(FAILED, response.status, f"HTTP {response.status}: {body}")
            if not payload["stream"]:
                choices = (await response.json()).get("choices") or [{}]
                streamed.output_ids = list(choices[0].get("token_ids") or [])
                return _finished(streamed, max_tokens, response.status)
            if cancel_after_chunks == 0:
                response.close()  # drops the connection: vLLM aborts the request wherever it is
                return reply(CANCELLED, response.status)
            buffer = b""
            # Events are split by hand, as in bench's load generator (the first one repeats the prompt).
            async for data in response.content.iter_any():
                buffer += data
                *events, buffer = buffer.split(b"\n\n")
                for event in events:
                    if handle_stream_event(event, streamed):
                        return _finished(streamed, max_tokens, response.status)
                    if cancel_after_chunks is not None and len(streamed.token_times) >= cancel_after_chunks:
                        response.close()
                        return reply(CANCELLED, response.status)
            return reply(FAILED, response.status, "the stream ended before [DONE]")
    except Exception as e:  # a dropped connection or a malformed answer fails this request, not the soak
        return reply(FAILED, None, f"{type(e).__name__}: {e}"[:ERROR_BODY_CHARS])
