"""Local child processes for the embedded stack and the test fixtures.

Every server the dev stack or a test starts (Tansu, PostgreSQL, Apache Kafka, the
services) goes through :class:`ManagedProcess`, so they share one behaviour:

* output goes to a log file, never to the caller's terminal;
* the child gets ``PR_SET_PDEATHSIG`` (SIGTERM) so it dies with the process that started it
  when that process is a test run or a foreground ``make demo`` (the signal follows the
  *thread* that forked it, so start children from the main thread);
* ``stop()`` sends the server's preferred shutdown signal, waits, then SIGKILLs;
* a port that is already taken is reported by name before anything starts.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

_PR_SET_PDEATHSIG = 1


class PortInUseError(RuntimeError):
    """A port the stack needs is already bound by another process."""

    def __init__(self, what: str, host: str, port: int) -> None:
        super().__init__(
            f"{what}: port {port} on {host} is already in use; stop whatever holds it "
            f"or choose another port (see README, Configuration)"
        )
        self.port = port


class StartupError(RuntimeError):
    """A child process exited or did not become ready in time."""


def port_is_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def ensure_port_free(what: str, host: str, port: int) -> None:
    if not port_is_free(host, port):
        raise PortInUseError(what, host, port)


def free_port(host: str = "127.0.0.1") -> int:
    """A port the kernel considers free right now (for tests; racy by nature)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def tcp_accepts(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def wait_until(
    condition: Callable[[], bool],
    *,
    timeout: float,
    interval: float = 0.05,
    what: str = "condition",
    alive: Callable[[], bool] | None = None,
) -> None:
    """Poll ``condition`` until it is true; raise StartupError on timeout or if ``alive`` fails."""
    deadline = time.monotonic() + timeout
    while True:
        if condition():
            return
        if alive is not None and not alive():
            raise StartupError(f"{what}: the process exited before it was ready")
        if time.monotonic() > deadline:
            raise StartupError(f"{what}: not ready after {timeout:.0f} s")
        time.sleep(interval)


def _die_with_parent() -> None:
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclass
class ManagedProcess:
    """One supervised child process with its own log file."""

    name: str
    argv: Sequence[str]
    log_path: Path
    env: dict[str, str] | None = None
    cwd: Path | None = None
    stop_signal: signal.Signals = signal.SIGTERM
    stop_timeout: float = 15.0
    die_with_parent: bool = True
    user: str | None = None
    """Run as this user (only meaningful when we are root, e.g. PostgreSQL refuses uid 0)."""
    popen: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)

    def start(self) -> int:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        preexec: Callable[[], None] | None = _die_with_parent if self.die_with_parent else None
        env = dict(os.environ) if self.env is None else self.env
        try:
            self.popen = subprocess.Popen(
                list(self.argv),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                cwd=self.cwd,
                preexec_fn=preexec,
                user=self.user,
                # a new session so Ctrl-C in a terminal reaches the supervisor only, which
                # then stops the children in order
                start_new_session=True,
            )
        finally:
            log.close()
        return self.popen.pid

    @property
    def pid(self) -> int | None:
        return self.popen.pid if self.popen else None

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def stop(self) -> None:
        if self.popen is None:
            return
        stop_pid(self.popen.pid, self.stop_signal, self.stop_timeout, popen=self.popen)

    def kill(self) -> None:
        """SIGKILL and reap, as a crash would (used by recovery tests)."""
        if self.popen is None:
            return
        with contextlib.suppress(ProcessLookupError):
            self.popen.kill()
        self.popen.wait()

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie child still answers kill(0); treat it as gone
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def stop_pid(
    pid: int,
    sig: signal.Signals = signal.SIGTERM,
    timeout: float = 15.0,
    *,
    popen: subprocess.Popen[bytes] | None = None,
) -> None:
    """Signal ``pid``, wait up to ``timeout`` for it to exit, then SIGKILL it."""

    def gone() -> bool:
        if popen is not None:
            return popen.poll() is not None
        return not pid_alive(pid)

    if gone():
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)
    deadline = time.monotonic() + timeout
    while not gone() and time.monotonic() < deadline:
        time.sleep(0.05)
    if not gone():
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        while not gone():
            time.sleep(0.05)
