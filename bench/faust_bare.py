"""A Faust worker that does nothing with its records: the bench's reference rate.

One event per record (the shape Faust examples use), consumed by an agent that only
counts. ``GET /count`` answers how many records it has seen. Run as
``python -m bench.faust_bare worker`` with BARE_TOPIC, BARE_BROKER, BARE_PORT set.
"""

from __future__ import annotations

import os
from typing import Any

import faust

app = faust.App(
    "bench-faust-bare-" + os.environ.get("BARE_TOPIC", "bare"),
    broker="kafka://" + os.environ.get("BARE_BROKER", "127.0.0.1:9092"),
    store="memory://",
    web_port=int(os.environ.get("BARE_PORT", "6099")),
    web_host="127.0.0.1",
    consumer_auto_offset_reset="earliest",
    broker_session_timeout=6.0,
    broker_rebalance_timeout=3.0,
    topic_replication_factor=1,
)
topic = app.topic(
    os.environ.get("BARE_TOPIC", "bare"),
    key_type=bytes,
    value_type=bytes,
    key_serializer="raw",
    value_serializer="raw",
)
seen = [0]


@app.agent(topic)
async def count(stream: faust.StreamT[bytes]) -> Any:
    async for _ in stream:
        seen[0] += 1


@app.page("/count")
async def get_count(web: Any, request: Any) -> Any:
    return web.json({"records": seen[0]})


if __name__ == "__main__":
    app.main()
