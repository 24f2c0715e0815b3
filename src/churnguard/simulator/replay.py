"""Replaying a simulated world into ingest over HTTP (``churnguard simulate --to http://...``)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Mapping
from datetime import UTC, datetime
from typing import Any

import orjson

from churnguard.simulator.http_sink import HttpReplay, ReplayStats
from churnguard.simulator.world import DayOutput, World


async def _events(
    world: World, on_day: Callable[[int, DayOutput], None] | None
) -> AsyncIterator[Mapping[str, Any]]:
    # Days are made on demand: HttpReplay's bounded queues hold generation back to the
    # pace of sending (or of the simulated clock in real-time mode).
    total = 0
    for day in world.run():
        total += len(day.lines)
        if on_day is not None:
            on_day(total, day)
        for line in day.lines:
            yield orjson.loads(line)
        await asyncio.sleep(0)


def replay_world(
    world: World,
    url: str,
    *,
    write_key: str,
    stripe_secret: str,
    speed: float | None,
    on_day: Callable[[int, DayOutput], None] | None = None,
) -> ReplayStats:
    """Run the world to its end, sending each event as its producer would."""
    # the world's day 0 starts the clock; the subscriptions of earlier customers go at once
    day0 = datetime.combine(world.config.start, datetime.min.time(), UTC)
    replay = HttpReplay(
        url, write_key=write_key, stripe_secret=stripe_secret, speed=speed, paced_from=day0
    )
    return asyncio.run(replay.replay(_events(world, on_day)))
