"""Keep the playbooks in force in step with their folder.

The folder is checked every ``reload_interval_s`` (a fingerprint of names and contents:
this works with editors that replace files, with Kubernetes ConfigMaps that swap a
symlink, and on filesystems without change notifications). A changed folder is loaded
in full; only a valid set is swapped in. A bad edit is logged with every file, line and
field, counted, and the last good set keeps running, until the folder changes again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path

from churnguard.playbooks import playbooks_metrics as pm
from churnguard.playbooks.loader import PlaybookSet, PlaybookSetInvalid, fingerprint, load_dir

log = logging.getLogger(__name__)


class PlaybookReloader:
    def __init__(self, directory: Path, initial: PlaybookSet, interval_s: float) -> None:
        self.directory = directory
        self.current = initial
        self.interval_s = interval_s
        self.last_errors: list[str] = []
        self._failed_fingerprint: str | None = None
        self._stopping = asyncio.Event()
        pm.PLAYBOOKS_LOADED.set(len(initial.playbooks))

    def get(self) -> PlaybookSet:
        return self.current

    async def check(self) -> bool:
        """Reload if the folder changed; True when a new set was swapped in."""
        seen = await asyncio.to_thread(fingerprint, self.directory)
        if seen in (self.current.fingerprint, self._failed_fingerprint):
            return False
        try:
            loaded = await asyncio.to_thread(load_dir, self.directory)
        except PlaybookSetInvalid as exc:
            self._failed_fingerprint = seen
            self.last_errors = [str(e) for e in exc.errors]
            pm.RELOADS.labels("error").inc()
            pm.RELOAD_ERRORS.inc(len(exc.errors))
            for error in exc.errors:
                log.error(
                    "playbook reload refused: %s",
                    error,
                    extra={"file": error.file, "line": error.line, "field": error.field},
                )
            log.error(
                "kept the last good playbooks (%d) after %d error(s) in %s",
                len(self.current.playbooks),
                len(exc.errors),
                self.directory,
            )
            return False
        previous = {p.name: p.version for p in self.current.playbooks}
        self.current = loaded
        self._failed_fingerprint = None
        self.last_errors = []
        pm.RELOADS.labels("ok").inc()
        pm.PLAYBOOKS_LOADED.set(len(loaded.playbooks))
        now = {p.name: p.version for p in loaded.playbooks}
        log.info(
            "playbooks reloaded: %d in force",
            len(loaded.playbooks),
            extra={
                "added": sorted(set(now) - set(previous)),
                "removed": sorted(set(previous) - set(now)),
                "changed": sorted(n for n in now if n in previous and previous[n] != now[n]),
            },
        )
        return True

    async def run(self) -> None:
        while not self._stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self.interval_s)
            if not self._stopping.is_set():
                try:
                    await self.check()
                except OSError as exc:  # the folder vanished for a moment (a deploy)
                    log.warning("playbook folder unreadable: %s", exc)

    def stop(self) -> None:
        self._stopping.set()
