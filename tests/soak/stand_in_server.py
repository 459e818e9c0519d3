"""A stand-in for `vllm serve` in the soak's CPU tests: the endpoints and formats the soak uses, with
a small KV pool and faults on demand.

- GET /health; GET /metrics: Prometheus text made by prometheus_client, with vLLM 0.26.0's names
  and labels (`vllm:cache_config_info`, `vllm:num_preemptions`, `vllm:num_requests_running`,
  `vllm:num_requests_waiting`, `vllm:kv_cache_usage_perc`);
- POST /v1/completions as vLLM answers it with `return_token_ids`: streamed (one chunk per token,
  the first repeating the prompt ids, then a usage event and [DONE]) or not (one JSON answer with
  `token_ids`); 400 for `stream_options` on a request that is not streamed, as vLLM does.
Tokens depend on the prompt and their position only, so greedy answers repeat. At most
`max_running` requests run at once, the rest wait (the waiting gauge). A running request holds its
prompt and generated tokens in the pool; usage is their sum over the pool (capped at 1), a request
whose growth finds the pool full counts one preemption, and every request frees what it holds when
it ends, however it ends: a client that closed its stream is counted in `aborted`.
Faults:
    fail_modulus       a prompt whose id sum it divides gets HTTP 500 with a JSON error body
    leak_per_request   usage that every finished request leaves behind for good: a leak
    diverge_when_busy  a token changes when another request runs beside it (batch-dependent numerics)
`make_app(StandIn(...))` serves it in a test's thread; `python stand_in_server.py MODEL --port N ...`
serves it as `vllm serve` would (unknown flags are ignored; `--kv-compression kivi` exits at start,
any other `--kv-compression` serves a pool of `COMPRESSED_POOL_FACTOR` times the tokens, so servers
side by side can be told apart by their pools).
"""

import argparse
import asyncio
import json
import sys
from dataclasses import dataclass, field

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

INJECTED_FAILURE = "injected failure"
COMPRESSED_POOL_FACTOR = 2


@dataclass
class StandIn:
    capacity_tokens: int = 512
    block_size: int = 16
    max_running: int = 4
    token_delay_s: float = 0.004
    fail_modulus: int | None = None
    leak_per_request: float = 0.0
    diverge_when_busy: bool = False
    held: dict[int, int] = field(default_factory=dict)
    """Tokens each running request holds in the pool."""
    waiting: int = 0
    leaked: float = 0.0
    preemptions: int = 0
    aborted: int = 0
    served: int = 0

    @property
    def usage(self) -> float:
        return min(1.0, sum(self.held.values()) / self.capacity_tokens + self.leaked)

    def token(self, prompt: list[int], k: int) -> int:
        busy = self.diverge_when_busy and len(self.held) > 1
        return (sum(prompt) * 31 + k + (1 if busy else 0)) % 997 + 1


def make_app(stand_in: StandIn) -> web.Application:
    registry = CollectorRegistry()
    info = Gauge(
        "vllm:cache_config_info",
        "cache config",
        ["block_size", "num_gpu_blocks", "engine"],
        registry=registry,
    )
    info.labels(
        block_size=str(stand_in.block_size),
        num_gpu_blocks=str(stand_in.capacity_tokens // stand_in.block_size),
        engine="0",
    ).set(1)
    preemptions = Counter("vllm:num_preemptions", "preemptions", ["engine"], registry=registry)
    running = Gauge("vllm:num_requests_running", "running", ["model_name", "engine"], registry=registry)
    waiting = Gauge("vllm:num_requests_waiting", "waiting", ["model_name", "engine"], registry=registry)
    usage = Gauge("vllm:kv_cache_usage_perc", "usage", ["model_name", "engine"], registry=registry)
    reported_preemptions = [0]
    slots = asyncio.Semaphore(stand_in.max_running)
    request_ids = iter(range(1 << 62))

    async def health(request):
        return web.Response(text="")

    async def metrics(request):
        preemptions.labels(engine="0").inc(stand_in.preemptions - reported_preemptions[0])
        reported_preemptions[0] = stand_in.preemptions
        running.labels(model_name="bench", engine="0").set(len(stand_in.held))
        waiting.labels(model_name="bench", engine="0").set(stand_in.waiting)
        usage.labels(model_name="bench", engine="0").set(stand_in.usage)
        return web.Response(body=generate_latest(registry), content_type="text/plain")

    def grow(request_id: int, preempted: list[bool]) -> None:
        stand_in.held[request_id] += 1
        if sum(stand_in.held.values()) > stand_in.capacity_tokens and not preempted[0]:
            stand_in.preemptions += 1
            preempted[0] = True

    async def completions(request):
        body = await request.json()
        if body.get("stream_options") and not body.get("stream"):
            return web.json_response({"error": {"message": "Stream options can only be defined when `stream=True`."}},
                                     status=400)
        prompt, max_tokens = body["prompt"], body["max_tokens"]
        assert body["return_token_ids"] and body["ignore_eos"] and body["temperature"] == 0.0, body
        if stand_in.fail_modulus and sum(prompt) % stand_in.fail_modulus == 0:
            return web.json_response({"error": {"message": INJECTED_FAILURE, "code": 500}}, status=500)
        request_id = next(request_ids)
        stand_in.waiting += 1
        async with slots:
            stand_in.waiting -= 1
            stand_in.held[request_id] = len(prompt)
            try:
                if body["stream"]:
                    return await stream(request, request_id, prompt, max_tokens)
                return await answer(request_id, prompt, max_tokens)
            except ConnectionError:  # the client closed the stream
                stand_in.aborted += 1
                return web.Response(status=499)
            finally:
                del stand_in.held[request_id]
                stand_in.leaked += stand_in.leak_per_request

    async def answer(request_id: int, prompt: list[int], max_tokens: int):
        preempted, ids = [False], []
        for k in range(max_tokens):
            await asyncio.sleep(stand_in.token_delay_s)
            ids.append(stand_in.token(prompt, k))
            grow(request_id, preempted)
        stand_in.served += 1
        choice = {"index": 0, "text": "", "token_ids": ids, "finish_reason": "length"}
        usage_info = {"prompt_tokens": len(prompt), "completion_tokens": max_tokens}
        return web.json_response({"choices": [choice], "usage": usage_info})

    async def stream(request, request_id: int, prompt: list[int], max_tokens: int):
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        preempted = [False]
        for k in range(max_tokens):
            await asyncio.sleep(stand_in.token_delay_s)
            choice = {"index": 0, "text": "", "token_ids": [stand_in.token(prompt, k)], "finish_reason": None}
            if k == 0:
                choice["prompt_token_ids"] = prompt
            grow(request_id, preempted)
            await response.write(f"data: {json.dumps({'choices': [choice]})}\n\n".encode())
        usage_info = {"prompt_tokens": len(prompt), "completion_tokens": max_tokens}
        await response.write(f"data: {json.dumps({'choices': [], 'usage': usage_info})}\n\n".encode())
        await response.write(b"data: [DONE]\n\n")
        stand_in.served += 1
        return response

    app = web.Application(client_max_size=64 << 20)
    app.add_routes(
        [web.get("/health", health), web.get("/metrics", metrics), web.post("/v1/completions", completions)]
    )
    return app


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--kv-compression", default=None)
    parser.add_argument("--capacity-tokens", type=int, default=StandIn.capacity_tokens)
    parser.add_argument("--token-delay-s", type=float, default=StandIn.token_delay_s)
    args, _ = parser.parse_known_args()
    if args.kv_compression == "kivi":
        print("stand-in server: kivi fails to start", flush=True)
        sys.exit(1)
    capacity = args.capacity_tokens * (COMPRESSED_POOL_FACTOR if args.kv_compression else 1)
    stand_in = StandIn(capacity_tokens=capacity, token_delay_s=args.token_delay_s)
    web.run_app(make_app(stand_in), host=args.host, port=args.port, print=None)


if __name__ == "__main__":
    main()
