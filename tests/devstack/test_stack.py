"""`churnguard dev up|status|down` as an operator runs them: real processes, real ports."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from churnguard.devstack.process import free_port, pid_alive, wait_until

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def stack_env() -> Iterator[dict[str, str]]:
    # under the repo, not pytest's tmp_path: PostgreSQL runs as another user when we are
    # root, and it must be able to enter every parent folder of its data dir
    home = REPO / ".dev" / "test" / f"stack-{uuid.uuid4().hex[:8]}"
    env = dict(os.environ)
    env.update(
        {
            "CHURNGUARD_DEV_HOME": str(home),
            "CHURNGUARD_DEV_KAFKA_PORT": str(free_port()),
            "CHURNGUARD_DEV_POSTGRES_PORT": str(free_port()),
            "CHURNGUARD_DEV_INGEST_PORT": str(free_port()),
            "CHURNGUARD_DEV_SCORING_PORT": str(free_port()),
            "CHURNGUARD_DEV_NOTIFY_PORT": str(free_port()),
            "CHURNGUARD_DEV_MAILBOX_PORT": str(free_port()),
            "CHURNGUARD_DEV_SMTP_PORT": str(free_port()),
            "CHURNGUARD_DEV_PLAYBOOKS_PORT": str(free_port()),
        }
    )
    yield env
    cli(env, "dev", "down")
    shutil.rmtree(home, ignore_errors=True)


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "churnguard.cli.main", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )


def test_up_twice_status_down_leaves_nothing_behind(stack_env: dict[str, str]) -> None:
    up = cli(stack_env, "dev", "up")
    assert up.returncode == 0, up.stdout + up.stderr
    state = json.loads((Path(stack_env["CHURNGUARD_DEV_HOME"]) / "stack.json").read_text())
    pids = [state["supervisor_pid"]] + [c["pid"] for c in state["components"].values()]
    assert set(state["components"]) == {
        "kafka",
        "postgres",
        "ingest",
        "scoring",
        "mailbox",
        "notify",
        "playbooks",
    }

    status = cli(stack_env, "dev", "status")
    assert status.returncode == 0, status.stdout
    for name in ("kafka", "postgres", "ingest", "scoring", "mailbox", "notify", "playbooks"):
        assert name in status.stdout
    assert status.stdout.count("healthy") == 7
    assert f"127.0.0.1:{stack_env['CHURNGUARD_DEV_KAFKA_PORT']}" in status.stdout

    again = cli(stack_env, "dev", "up")
    assert again.returncode == 0
    assert f"already running (supervisor pid {state['supervisor_pid']})" in again.stdout

    down = cli(stack_env, "dev", "down")
    assert down.returncode == 0, down.stderr
    wait_until(lambda: not any(pid_alive(p) for p in pids), timeout=30, what="all pids gone")
    assert cli(stack_env, "dev", "status").returncode == 1


def test_killed_supervisor_takes_its_children_with_it(stack_env: dict[str, str]) -> None:
    assert cli(stack_env, "dev", "up").returncode == 0
    state = json.loads((Path(stack_env["CHURNGUARD_DEV_HOME"]) / "stack.json").read_text())
    children = [c["pid"] for c in state["components"].values()]
    os.kill(state["supervisor_pid"], 9)
    wait_until(lambda: not any(pid_alive(p) for p in children), timeout=30, what="children gone")


def test_taken_port_is_named(stack_env: dict[str, str]) -> None:
    port = int(stack_env["CHURNGUARD_DEV_POSTGRES_PORT"])
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", port))
        holder.listen()
        up = cli(stack_env, "dev", "up")
    assert up.returncode == 1
    output = up.stdout + up.stderr
    assert f"port {port}" in output
    assert "CHURNGUARD_DEV_POSTGRES_PORT" in output
