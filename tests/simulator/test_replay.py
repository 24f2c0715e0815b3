"""`churnguard simulate --to http://...`: every event of the world arrives once, as documented."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import orjson

from churnguard.simulator.output import EVENTS, write_world
from churnguard.simulator.world import SimConfig, World
from tests.simulator.test_http_sink import (
    STRIPE_SECRET,
    WRITE_KEY,
    Receiver,
    receiver,
    receiver_server,
    wire_id,
)

__all__ = ["receiver", "receiver_server"]  # fixtures shared with test_http_sink


def test_cli_replays_the_whole_world_into_http(receiver: Receiver, tmp_path: Path) -> None:
    config = SimConfig(accounts=60, days=20, seed=4)
    write_world(World(config), tmp_path)
    expected = [orjson.loads(line) for line in (tmp_path / EVENTS).read_bytes().splitlines()]

    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "churnguard.cli.main",
            "simulate",
            "--accounts",
            "60",
            "--days",
            "20",
            "--seed",
            "4",
            "--to",
            receiver.url,
            "--write-key",
            WRITE_KEY,
            "--stripe-secret",
            STRIPE_SECRET,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr[-2000:]
    assert f"replayed {len(expected):,} events" in result.stdout
    rec = receiver.recorder
    assert rec.violations == []
    received = [i for r in rec.received for i in r.ids]
    assert sorted(received) == sorted(wire_id(e) for e in expected)
