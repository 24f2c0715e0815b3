"""Load generator for the ingest benchmark, run as its own process (the other core).

Bodies are built before the clock starts, so the generator spends its time sending.
``batch`` mode: closed loop, ``concurrency`` connections posting pre-built batches as fast
as ingest answers. ``single`` mode: open loop at a fixed request rate, one event per
request, each latency recorded from its scheduled send time (no coordinated omission).
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from typing import Any

import aiohttp
import orjson


def segment_batch(run: int, n: int, size: int) -> bytes:
    messages = [
        {
            "type": "track",
            "event": "Feature Used",
            "userId": f"u{i % 40}",
            "messageId": f"r{run}-b{n}-{i}",
            "timestamp": "2026-11-20T09:30:00.000Z",
            "properties": {"feature": "dashboards", "count": 1 + i % 5},
            "context": {"groupId": f"acct_{(n * size + i) % 5000:05d}"},
        }
        for i in range(size)
    ]
    return orjson.dumps({"batch": messages, "sentAt": "2026-11-20T09:30:00.000Z"})


def native_event(run: int, n: int, i: int, account: int) -> dict[str, Any]:
    return {
        "specversion": "1.0",
        "id": f"r{run}-n{n}-{i}",
        "source": "/bench",
        "type": "churnguard.usage.feature_used",
        "time": "2026-11-20T09:30:00Z",
        "subject": f"acct_{account:05d}",
        "schemaversion": 1,
        "data": {"user_id": f"u{i % 40}", "feature": "dashboards", "count": 1},
    }


def native_batch(run: int, n: int, size: int) -> bytes:
    return orjson.dumps(
        {"events": [native_event(run, n, i, (n * size + i) % 5000) for i in range(size)]}
    )


async def closed_loop(
    url: str, auth: tuple[str, str], path: str, bodies: list[bytes], concurrency: int
) -> dict[str, Any]:
    queue: asyncio.Queue[bytes] = asyncio.Queue()
    for body in bodies:
        queue.put_nowait(body)
    failures = 0
    headers = {"content-type": "application/json"}
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(
        url, auth=aiohttp.BasicAuth(*auth), connector=connector
    ) as session:

        async def worker() -> None:
            nonlocal failures
            while not queue.empty():
                body = queue.get_nowait()
                async with session.post(path, data=body, headers=headers) as response:
                    await response.read()
                    failures += response.status >= 300

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    return {"elapsed_s": elapsed, "failures": failures}


async def open_loop(
    url: str, auth: tuple[str, str], rate: float, seconds: float, run: int
) -> dict[str, Any]:
    latencies: list[float] = []
    failures = 0
    total = int(rate * seconds)
    bodies = [orjson.dumps(native_event(run, 0, i, i % 5000)) for i in range(total)]
    headers = {"content-type": "application/json"}
    async with aiohttp.ClientSession(
        url, auth=aiohttp.BasicAuth(*auth), connector=aiohttp.TCPConnector(limit=256)
    ) as session:

        async def one(i: int, scheduled: float) -> None:
            nonlocal failures
            try:
                async with session.post("/v1/events/usage", data=bodies[i], headers=headers) as r:
                    await r.read()
                    ok = r.status < 300
            except aiohttp.ClientError:
                ok = False
            latencies.append(time.perf_counter() - scheduled)
            failures += not ok

        start = time.perf_counter()
        tasks = []
        for i in range(total):
            # each request starts at its scheduled time; latency counts from that time, so
            # a slow server cannot hide queueing delay (no coordinated omission)
            scheduled = start + i / rate
            await asyncio.sleep(max(0.0, scheduled - time.perf_counter()))  # pacing, by design
            tasks.append(asyncio.create_task(one(i, scheduled)))
        await asyncio.gather(*tasks)
    latencies.sort()
    return {
        "p50_ms": 1000 * statistics.median(latencies),
        "p99_ms": 1000 * latencies[int(0.99 * (len(latencies) - 1))],
        "requests": total,
        "failures": failures,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--mode", choices=["segment", "native", "single"], required=True)
    parser.add_argument("--run", type=int, default=0)
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--rate", type=float, default=200)
    parser.add_argument("--seconds", type=float, default=10)
    args = parser.parse_args()
    auth = (args.key, "")
    if args.mode == "single":
        result = asyncio.run(open_loop(args.url, auth, args.rate, args.seconds, args.run))
    else:
        build = segment_batch if args.mode == "segment" else native_batch
        path = "/v1/batch" if args.mode == "segment" else "/v1/events/usage/batch"
        bodies = [build(args.run, n, args.batch_size) for n in range(args.batches)]
        result = asyncio.run(closed_loop(args.url, auth, path, bodies, args.concurrency))
        result["events"] = args.batches * args.batch_size
    print(orjson.dumps(result).decode())


if __name__ == "__main__":
    main()
