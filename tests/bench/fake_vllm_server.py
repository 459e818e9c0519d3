"""A stand-in for `vllm serve` in CPU tests of online mode: the same endpoints, the same stream.

Serves GET /health, GET /metrics (Prometheus text made by prometheus_client, as vLLM does) and
streamed POST /v1/completions whose events look like vLLM 0.26.0's with `return_token_ids`:
the first event repeats the prompt's ids, every event carries `token_ids`, a usage event and
`[DONE]` end the stream. `--kv-compression kivi` exits at start-up, as a server that fails would.
`vllm:num_requests_running` counts the completions in flight. While a client samples /metrics
(a read within the last second), each completion is held until /metrics has been read once after
it started (at most 2 s), so the sampler sees it without timing luck.
"""

import argparse
import asyncio
import json
import sys
import time

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

BLOCKS_PER_DTYPE = {"auto": 1000, "fp8": 2000, "int4_per_token_head": 3760}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--kv-cache-dtype", default="auto")
    parser.add_argument("--kv-compression", default=None)
    parser.add_argument("--max-model-len", type=int, required=True)
    args, _ = parser.parse_known_args()
    if args.kv_compression == "kivi":
        print("fake server: kivi fails to start", flush=True)
        sys.exit(1)
    blocks = 3280 if args.kv_compression else BLOCKS_PER_DTYPE[args.kv_cache_dtype]
    block_size = 64 if args.kv_compression else 16
    registry = CollectorRegistry()
    info = Gauge(
        "vllm:cache_config_info",
        "cache config",
        ["block_size", "num_gpu_blocks", "kv_cache_size_tokens", "kv_cache_max_concurrency", "engine"],
        registry=registry,
    )
    info.labels(
        block_size=str(block_size),
        num_gpu_blocks=str(blocks),
        kv_cache_size_tokens=str(blocks * block_size),
        kv_cache_max_concurrency=str(blocks * block_size / args.max_model_len),
        engine="0",
    ).set(1)
    preemptions = Counter("vllm:num_preemptions", "preemptions", ["engine"], registry=registry)
    queries = Counter("vllm:prefix_cache_queries", "queried tokens", ["engine"], registry=registry)
    hits = Counter("vllm:prefix_cache_hits", "hit tokens", ["engine"], registry=registry)
    preemptions.labels(engine="0").inc(0)
    running = Gauge("vllm:num_requests_running", "running", ["engine"], registry=registry)
    waiting = Gauge("vllm:num_requests_waiting", "waiting", ["engine"], registry=registry)
    running.labels(engine="0").set(0)
    waiting.labels(engine="0").set(0)
    scrapes = {"last": -1e9, "event": asyncio.Event()}
    delay_s = 2.0 / blocks  # more capacity, faster tokens

    async def health(request):
        return web.Response(text="")

    async def metrics(request):
        body = generate_latest(registry)
        scrapes["last"] = time.monotonic()
        scrapes["event"].set()
        scrapes["event"] = asyncio.Event()
        return web.Response(body=body, content_type="text/plain")

    async def wait_for_scrape():
        """Until /metrics has been read after this call began (at most 2 s), if anyone samples it."""
        if time.monotonic() - scrapes["last"] > 1.0:
            return
        event = scrapes["event"]
        try:
            await asyncio.wait_for(event.wait(), timeout=2.0)
        except TimeoutError:
            pass

    async def completions(request):
        body = await request.json()
        assert body["stream"] and body["return_token_ids"] and body["ignore_eos"], body
        prompt = body["prompt"]
        queries.labels(engine="0").inc(len(prompt))
        hits.labels(engine="0").inc(len(prompt) // 2)
        running.labels(engine="0").inc()
        try:
            await wait_for_scrape()
            return await stream(request, body, prompt)
        finally:
            running.labels(engine="0").dec()

    async def stream(request, body, prompt):
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for k in range(body["max_tokens"]):
            await asyncio.sleep(delay_s)
            choice = {"index": 0, "text": "", "token_ids": [(len(prompt) + k) % 1000], "finish_reason": None}
            if k == 0:
                choice["prompt_token_ids"] = prompt
            await response.write(f"data: {json.dumps({'choices': [choice]})}\n\n".encode())
        usage = {"prompt_tokens": len(prompt), "completion_tokens": body["max_tokens"]}
        await response.write(f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n".encode())
        await response.write(b"data: [DONE]\n\n")
        return response

    app = web.Application(client_max_size=64 << 20)
    app.add_routes(
        [web.get("/health", health), web.get("/metrics", metrics), web.post("/v1/completions", completions)]
    )
    web.run_app(app, host=args.host, port=args.port, print=None)


if __name__ == "__main__":
    main()
