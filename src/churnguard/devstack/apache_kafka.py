"""Apache Kafka from Maven Central: fetch the broker jars and run a single-node KRaft broker.

The embedded default broker (Tansu) keeps its data in memory only. For durability tests
(kill -9 and restart with acknowledged messages still there) and for checking behaviour
against the reference implementation, this module runs the real Apache Kafka broker as
a local child process, without Docker and without a Kafka distribution tarball:

* :func:`fetch_kafka_jars` asks Maven for ``org.apache.kafka:kafka_2.13`` and its runtime
  dependencies (plus an SLF4J binding, which the broker POM does not bring) and caches
  them under ``<cache_dir>/kafka-<version>/lib``;
* :class:`ApacheKafkaBroker` formats a KRaft log directory once and runs
  ``java -cp '<lib>/*' kafka.Kafka server.properties`` on loopback through
  :class:`~churnguard.devstack.process.ManagedProcess`.

Command line (CI warms the cache with it)::

    python -m churnguard.devstack.apache_kafka fetch --cache-dir DIR [--version 3.9.2]
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from churnguard.devstack.process import (
    ManagedProcess,
    StartupError,
    ensure_port_free,
    pid_alive,
    tcp_accepts,
    wait_until,
)

log = logging.getLogger(__name__)

KAFKA_VERSION = "3.9.2"
"""Default Apache Kafka version (the ``kafka_2.13`` artifact on Maven Central)."""

HOST = "127.0.0.1"

_MARKER = ".fetch-complete"
_SLF4J_RELOAD4J = ("org.slf4j", "slf4j-reload4j", "1.7.36")
_DEPENDENCY_PLUGIN_VERSION = "3.8.1"
_LOG4J_CORE_JAR = re.compile(r"^log4j-core-(\d[\w.\-]*)\.jar$")
_FETCH_TMP = re.compile(r"^\.kafka-.+\.(\d+)\.[^.]+\.tmp$")


class KafkaToolingMissingError(RuntimeError):
    """``java`` or ``mvn`` is not on PATH, so Apache Kafka can be neither fetched nor run."""

    def __init__(self, missing: Sequence[str]) -> None:
        names = " and ".join(f"`{name}`" for name in missing)
        super().__init__(
            f"Apache Kafka needs {names} on PATH (a JDK 17+ and Maven 3); install them "
            f"(e.g. `apt-get install openjdk-17-jdk-headless maven`, as .ci/run does) "
            f"or use the embedded Tansu broker instead"
        )
        self.missing = tuple(missing)


class KafkaFetchError(RuntimeError):
    """Maven could not resolve the Apache Kafka jars."""


def _missing_tools() -> list[str]:
    return [tool for tool in ("java", "mvn") if shutil.which(tool) is None]


def java_available() -> bool:
    """True when both ``java`` (to run the broker) and ``mvn`` (to fetch it) are on PATH."""
    return not _missing_tools()


def _require_tools() -> None:
    missing = _missing_tools()
    if missing:
        raise KafkaToolingMissingError(missing)


def _major(version: str) -> int:
    try:
        return int(version.split(".", 1)[0])
    except ValueError:
        raise ValueError(f"not an Apache Kafka version: {version!r}") from None


def _pom(version: str, extra: Sequence[tuple[str, str, str]]) -> str:
    deps = [("org.apache.kafka", "kafka_2.13", version), *extra]
    dependencies = "\n".join(
        "    <dependency>\n"
        f"      <groupId>{group}</groupId>\n"
        f"      <artifactId>{artifact}</artifactId>\n"
        f"      <version>{ver}</version>\n"
        "    </dependency>"
        for group, artifact, ver in deps
    )
    return f"""<?xml version="1.0" encoding="UTF-8"?>
<!-- Written by churnguard.devstack.apache_kafka: the runtime jars of an Apache Kafka broker. -->
<project xmlns="http://maven.apache.org/POM/4.0.0"
         xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"
         xsi:schemaLocation="http://maven.apache.org/POM/4.0.0 https://maven.apache.org/xsd/maven-4.0.0.xsd">
  <modelVersion>4.0.0</modelVersion>
  <groupId>churnguard.devstack</groupId>
  <artifactId>apache-kafka-broker-jars</artifactId>
  <version>{version}</version>
  <packaging>pom</packaging>
  <dependencies>
{dependencies}
  </dependencies>
  <build>
    <pluginManagement>
      <plugins>
        <plugin>
          <groupId>org.apache.maven.plugins</groupId>
          <artifactId>maven-dependency-plugin</artifactId>
          <version>{_DEPENDENCY_PLUGIN_VERSION}</version>
        </plugin>
      </plugins>
    </pluginManagement>
  </build>
</project>
"""


def _copy_dependencies(workdir: Path, pom: str, lib: Path) -> None:
    """Write ``pom`` into ``workdir`` and let Maven fill ``lib`` (emptied first)."""
    (workdir / "pom.xml").write_text(pom)
    # copy-dependencies never deletes: a jar of another version would stay on the classpath
    shutil.rmtree(lib, ignore_errors=True)
    lib.mkdir(parents=True)
    argv = [
        "mvn",
        "-q",
        "-B",
        "dependency:copy-dependencies",
        "-DincludeScope=runtime",
        f"-DoutputDirectory={lib}",
    ]
    fetch_log = workdir / "mvn.log"
    with fetch_log.open("ab") as out:
        result = subprocess.run(
            argv, cwd=workdir, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
    if result.returncode != 0:
        tail = "\n".join(fetch_log.read_text(errors="replace").splitlines()[-25:])
        raise KafkaFetchError(
            f"`{' '.join(argv)}` failed with exit code {result.returncode} "
            f"(is Maven Central reachable?):\n{tail}"
        )


def _log4j2_binding(lib: Path) -> tuple[str, str, str]:
    """Kafka 4.x logs through log4j 2: bind SLF4J at the log4j-core version it declares."""
    for jar in lib.iterdir():
        match = _LOG4J_CORE_JAR.match(jar.name)
        if match:
            return ("org.apache.logging.log4j", "log4j-slf4j-impl", match.group(1))
    raise KafkaFetchError(f"no log4j-core jar among the Kafka dependencies in {lib}")


def _remove_abandoned_fetches(cache_dir: Path) -> None:
    """Delete temporary fetch folders whose process died (a killed fetch cannot clean up)."""
    for tmp in cache_dir.glob(".kafka-*.tmp"):
        match = _FETCH_TMP.match(tmp.name)
        if match and not pid_alive(int(match.group(1))):
            shutil.rmtree(tmp, ignore_errors=True)


def fetch_kafka_jars(cache_dir: Path, version: str = KAFKA_VERSION) -> Path:
    """Fetch the broker's runtime jars into ``cache_dir/kafka-<version>/lib`` and return it.

    Cached: once a fetch has completed (marker file), later calls return at once without
    Maven. A fetch runs in a temporary folder next to the cache entry that is renamed into
    place only when complete, so an interrupted fetch never leaves a half-filled cache and
    two concurrent fetches cannot mix their jars. Maven's own repository (``~/.m2``) also
    caches the downloads.
    """
    major = _major(version)
    cache_dir = Path(cache_dir).resolve()
    target = cache_dir / f"kafka-{version}"
    lib = target / "lib"
    if (target / _MARKER).is_file():
        return lib
    _require_tools()
    cache_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    _remove_abandoned_fetches(cache_dir)
    workdir = Path(
        tempfile.mkdtemp(prefix=f".kafka-{version}.{os.getpid()}.", suffix=".tmp", dir=cache_dir)
    )
    try:
        work_lib = workdir / "lib"
        if major >= 4:
            _copy_dependencies(workdir, _pom(version, []), work_lib)
            _copy_dependencies(workdir, _pom(version, [_log4j2_binding(work_lib)]), work_lib)
        else:
            _copy_dependencies(workdir, _pom(version, [_SLF4J_RELOAD4J]), work_lib)
        jars = sorted(p.name for p in work_lib.glob("*.jar"))
        if not any(name.startswith(f"kafka_2.13-{version}") for name in jars):
            raise KafkaFetchError(f"Maven finished but kafka_2.13-{version}.jar is not in {lib}")
        (workdir / _MARKER).write_text("\n".join(jars) + "\n")
        if target.exists() and not (target / _MARKER).is_file():
            shutil.rmtree(target)  # an unfinished entry from an older layout: replace it
        try:
            workdir.rename(target)
        except OSError:
            if not (target / _MARKER).is_file():
                raise
            # another process completed the same fetch first; use its copy
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    log.info(
        "fetched Apache Kafka %s (%d jars) into %s in %.1f s",
        version,
        len(jars),
        lib,
        time.monotonic() - started,
    )
    return lib


def _server_properties(
    port: int, controller_port: int, log_dir: Path, extra: dict[str, str]
) -> str:
    props = {
        "process.roles": "broker,controller",
        "node.id": "1",
        "controller.quorum.voters": f"1@{HOST}:{controller_port}",
        "listeners": f"PLAINTEXT://{HOST}:{port},CONTROLLER://{HOST}:{controller_port}",
        "advertised.listeners": f"PLAINTEXT://{HOST}:{port}",
        "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
        "controller.listener.names": "CONTROLLER",
        "inter.broker.listener.name": "PLAINTEXT",
        "log.dirs": str(log_dir),
        # one replica: every internal topic must accept replication factor and ISR of 1
        "offsets.topic.replication.factor": "1",
        "offsets.topic.num.partitions": "1",
        "transaction.state.log.replication.factor": "1",
        "transaction.state.log.min.isr": "1",
        "default.replication.factor": "1",
        "min.insync.replicas": "1",
        "group.initial.rebalance.delay.ms": "0",
        # after kill -9 the restarted broker re-registers with the same node id; until the
        # old session expires the controller answers DUPLICATE_BROKER_REGISTRATION
        "broker.session.timeout.ms": "2000",
        "broker.heartbeat.interval.ms": "500",
        # Faust creates its internal (changelog, repartition) topics on first use
        "auto.create.topics.enable": "true",
        "num.partitions": "4",
    }
    props.update(extra)
    lines = ["# Written by churnguard.devstack.apache_kafka on every start; edits are lost."]
    lines += [f"{key}={value}" for key, value in props.items()]
    return "\n".join(lines) + "\n"


_LOG4J1_PROPERTIES = """\
# Written by churnguard.devstack.apache_kafka: everything to a file, nothing to the console.
log4j.rootLogger=INFO, file
log4j.appender.file=org.apache.log4j.RollingFileAppender
log4j.appender.file.File=${kafka.logs.dir}/${churnguard.kafka.log}
log4j.appender.file.MaxFileSize=20MB
log4j.appender.file.MaxBackupIndex=2
log4j.appender.file.layout=org.apache.log4j.PatternLayout
log4j.appender.file.layout.ConversionPattern=[%d] %p %m (%c)%n
log4j.logger.kafka.request.logger=WARN
log4j.logger.org.apache.kafka.clients=WARN
"""

_LOG4J2_PROPERTIES = """\
# Written by churnguard.devstack.apache_kafka: everything to a file, nothing to the console.
appender.file.type=RollingFile
appender.file.name=file
appender.file.fileName=${sys:kafka.logs.dir}/${sys:churnguard.kafka.log}
appender.file.filePattern=${sys:kafka.logs.dir}/${sys:churnguard.kafka.log}.%i
appender.file.layout.type=PatternLayout
appender.file.layout.pattern=[%d] %p %m (%c)%n
appender.file.policies.type=Policies
appender.file.policies.size.type=SizeBasedTriggeringPolicy
appender.file.policies.size.size=20MB
appender.file.strategy.type=DefaultRolloverStrategy
appender.file.strategy.max=2
rootLogger.level=INFO
rootLogger.appenderRef.file.ref=file
logger.request.name=kafka.request.logger
logger.request.level=WARN
logger.clients.name=org.apache.kafka.clients
logger.clients.level=WARN
"""


async def _serves_metadata(bootstrap: str, request_timeout_ms: int) -> bool:
    """One real Metadata round trip: brokers known and every partition has a leader."""
    from aiokafka.client import AIOKafkaClient
    from aiokafka.errors import KafkaError

    client = AIOKafkaClient(bootstrap_servers=bootstrap, request_timeout_ms=request_timeout_ms)
    try:
        await client.bootstrap()
        cluster = await client.fetch_all_metadata()
    except (TimeoutError, KafkaError, OSError):
        return False
    finally:
        await client.close()
    if not cluster.brokers():
        return False
    return all(
        cluster.available_partitions_for_topic(topic) == cluster.partitions_for_topic(topic)
        for topic in cluster.topics(exclude_internal_topics=False)
    )


def _cmdline(pid: int) -> str:
    try:
        return (
            Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        )
    except OSError:
        return ""


@dataclass
class ApacheKafkaBroker:
    """A single-node KRaft Apache Kafka broker (broker and controller in one JVM) on loopback.

    Why it is configured the way it is:

    * The log directory under ``data_dir`` is formatted once (``StorageTool format``) and
      reused by every later start, so acknowledged messages survive :meth:`stop`,
      :meth:`kill` (SIGKILL) and :meth:`restart`: that is what the durability tests check.
    * Broker session and heartbeat are short (2 s / 0.5 s): after a kill -9 the restarted
      broker registers again under the same node id, and the controller refuses it
      (DUPLICATE_BROKER_REGISTRATION) until the previous session has expired; the default
      (9 s) would make every crash-recovery test that much slower.
    * Replication factor and min ISR are 1 for the internal topics and the offsets topic
      has one partition: one replica is all there is, and one partition loads fastest.
    * ``group.initial.rebalance.delay.ms=0`` lets a consumer group's first join complete at
      once instead of waiting 3 s for more members; topics are auto-created with 4
      partitions, as Faust expects for its internal topics.
    * The JVM is tuned for start-up time, not throughput (C1 only, serial GC, small heap):
      this is a development and test broker. Its log goes to files under ``data_dir/logs``.

    :meth:`start` returns only once the broker answers a real Kafka Metadata request with
    itself as a broker and a leader for every partition, i.e. when it can serve clients.
    """

    data_dir: Path
    cache_dir: Path
    port: int
    controller_port: int
    version: str = KAFKA_VERSION
    heap_mb: int = 512
    extra_properties: dict[str, str] = field(default_factory=dict)
    """Extra or overriding ``server.properties`` entries."""
    stop_timeout: float = 30.0
    _process: ManagedProcess | None = field(default=None, init=False, repr=False)
    _last_pid: int | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.data_dir = Path(self.data_dir).resolve()
        self.cache_dir = Path(self.cache_dir)

    # -- layout ---------------------------------------------------------------------------

    @property
    def bootstrap(self) -> str:
        """``host:port`` of the PLAINTEXT listener, for ``bootstrap_servers``."""
        return f"{HOST}:{self.port}"

    @property
    def log_dir(self) -> Path:
        """The Kafka log directory (``log.dirs``): partitions and the KRaft metadata log."""
        return self.data_dir / "kraft-logs"

    @property
    def logs_dir(self) -> Path:
        """Where the broker's own logs go (server.log, the JVM's stdout and stderr)."""
        return self.data_dir / "logs"

    @property
    def config_path(self) -> Path:
        return self.data_dir / "config" / "server.properties"

    @property
    def _pid_file(self) -> Path:
        return self.data_dir / "broker.pid"

    @property
    def pid(self) -> int | None:
        """The broker JVM's pid while it runs, else None."""
        return self._process.pid if self._process is not None and self._process.alive() else None

    def alive(self) -> bool:
        return self._process is not None and self._process.alive()

    # -- lifecycle ------------------------------------------------------------------------

    def start(self, timeout: float = 60) -> None:
        """Start the broker and wait until it serves clients (``timeout`` s for readiness).

        Fetches the jars on first use (see :func:`fetch_kafka_jars`, not counted in
        ``timeout``) and formats the log directory if it has never been formatted.
        """
        if self.alive():
            return
        self._wait_for_previous_broker()
        ensure_port_free(f"Apache Kafka broker listener ({self.bootstrap})", HOST, self.port)
        ensure_port_free("Apache Kafka controller listener", HOST, self.controller_port)
        lib = fetch_kafka_jars(self.cache_dir, self.version)
        self._write_config()
        if not (self.log_dir / "meta.properties").is_file():
            self._format(lib)

        started = time.monotonic()
        process = ManagedProcess(
            name=f"apache-kafka-{self.version}",
            argv=[*self._java(lib, "server.log"), "kafka.Kafka", str(self.config_path)],
            log_path=self.logs_dir / "broker.out",
            cwd=self.data_dir,
            stop_signal=signal.SIGTERM,  # controlled shutdown
            stop_timeout=self.stop_timeout,
        )
        self._process = process
        pid = process.start()
        self._last_pid = pid
        self._pid_file.write_text(f"{pid}\n")
        try:
            wait_until(
                self._ready,
                timeout=timeout,
                interval=0.2,
                what=f"Apache Kafka {self.version} on {self.bootstrap}",
                alive=process.alive,
            )
        except StartupError as err:
            process.kill()
            raise StartupError(
                f"{err}\n--- {self.logs_dir / 'server.log'} ---\n{self.log_tail()}"
            ) from err
        log.info(
            "Apache Kafka %s ready on %s (pid %d) in %.1f s",
            self.version,
            self.bootstrap,
            pid,
            time.monotonic() - started,
        )

    def stop(self) -> None:
        """Controlled shutdown (SIGTERM), SIGKILL after ``stop_timeout`` seconds."""
        if self._process is not None:
            self._process.stop()
        self._pid_file.unlink(missing_ok=True)

    def kill(self) -> None:
        """SIGKILL the broker, as a crash would (for recovery tests); the log dir stays."""
        if self._process is not None:
            self._process.kill()

    def restart(self, timeout: float = 60) -> None:
        self.stop()
        self.start(timeout=timeout)

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = (self.logs_dir / "server.log").read_text(errors="replace")
        except FileNotFoundError:
            return self._process.log_tail(lines) if self._process is not None else ""
        return "\n".join(text.splitlines()[-lines:])

    def __enter__(self) -> ApacheKafkaBroker:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- internals ------------------------------------------------------------------------

    def _java(self, lib: Path, log_name: str) -> list[str]:
        if _major(self.version) >= 4:
            log_config = [
                f"-Dlog4j2.configurationFile={self.data_dir / 'config' / 'log4j2.properties'}"
            ]
        else:
            log_config = [
                f"-Dlog4j.configuration=file:{self.data_dir / 'config' / 'log4j.properties'}"
            ]
        return [
            "java",
            f"-Xmx{self.heap_mb}m",
            "-XX:TieredStopAtLevel=1",
            "-XX:+UseSerialGC",
            "-Djava.awt.headless=true",
            f"-Dkafka.logs.dir={self.logs_dir}",
            f"-Dchurnguard.kafka.log={log_name}",
            *log_config,
            "-cp",
            f"{lib}/*",
        ]

    def _write_config(self) -> None:
        config_dir = self.config_path.parent
        config_dir.mkdir(parents=True, exist_ok=True)
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(
            _server_properties(self.port, self.controller_port, self.log_dir, self.extra_properties)
        )
        (config_dir / "log4j.properties").write_text(_LOG4J1_PROPERTIES)
        (config_dir / "log4j2.properties").write_text(_LOG4J2_PROPERTIES)

    def _run_tool(self, lib: Path, args: Sequence[str]) -> str:
        argv = [*self._java(lib, "storage-tool.log"), "kafka.tools.StorageTool", *args]
        with (self.logs_dir / "storage-tool.out").open("ab") as err:
            result = subprocess.run(
                argv,
                stdout=subprocess.PIPE,
                stderr=err,
                stdin=subprocess.DEVNULL,
                cwd=self.data_dir,
                timeout=120,
            )
        if result.returncode != 0:
            raise StartupError(
                f"kafka.tools.StorageTool {args[0]} failed (exit {result.returncode}); "
                f"see {self.logs_dir / 'storage-tool.out'}:\n"
                f"{result.stdout.decode(errors='replace')[-2000:]}"
            )
        return result.stdout.decode(errors="replace")

    def _format(self, lib: Path) -> None:
        """Give the log directory a cluster id (once: a durable log dir is never reformatted)."""
        cluster_id = self._run_tool(lib, ["random-uuid"]).strip().splitlines()[-1].strip()
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._run_tool(lib, ["format", "-t", cluster_id, "-c", str(self.config_path)])
        log.info("formatted %s for Kafka cluster %s", self.log_dir, cluster_id)

    def _ready(self) -> bool:
        if not tcp_accepts(HOST, self.port):
            return False
        # aiokafka needs an event loop of its own: run it on a worker thread, since the
        # caller may itself be inside a running loop (an async test, the dev stack)
        with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
            return pool.submit(asyncio.run, _serves_metadata(self.bootstrap, 2000)).result()

    def _wait_for_previous_broker(self) -> None:
        """After kill -9 the old JVM may still be going away: wait for its pid to be gone.

        The pid file also covers a broker left by an earlier supervisor on this data dir.
        """
        pids: set[int] = set()
        if self._last_pid is not None:
            pids.add(self._last_pid)
        try:
            recorded = int(self._pid_file.read_text().strip())
        except (OSError, ValueError):
            pass
        else:
            if "kafka.Kafka" in _cmdline(recorded) and str(self.config_path) in _cmdline(recorded):
                pids.add(recorded)
        for pid in pids:

            def gone(pid: int = pid) -> bool:
                return not pid_alive(pid)

            try:
                wait_until(
                    gone,
                    timeout=self.stop_timeout,
                    what=f"previous Apache Kafka broker (pid {pid}) on {self.data_dir} to exit",
                )
            except StartupError as err:
                raise StartupError(
                    f"{err}: an earlier broker still uses this data dir; stop pid {pid} first"
                ) from None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m churnguard.devstack.apache_kafka",
        description="Apache Kafka broker jars from Maven Central (needs java and mvn).",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    fetch = commands.add_parser("fetch", help="fetch and cache the broker jars, print the lib dir")
    fetch.add_argument("--cache-dir", type=Path, required=True)
    fetch.add_argument("--version", default=KAFKA_VERSION, help="default: %(default)s")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        lib = fetch_kafka_jars(args.cache_dir, args.version)
    except (KafkaToolingMissingError, KafkaFetchError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(lib)
    return 0


if __name__ == "__main__":
    sys.exit(main())
