"""``churnguard-playbooks``: run the playbooks service (consumers, timers, API) with uvicorn."""

from __future__ import annotations

import sys

import uvicorn

from churnguard.common.logs import configure_logging
from churnguard.playbooks.app import create_app
from churnguard.playbooks.loader import PlaybookSetInvalid, load_dir
from churnguard.playbooks.settings import PlaybooksSettings


def main() -> None:
    settings = PlaybooksSettings()
    configure_logging("playbooks", settings.platform.log_level, settings.platform.log_format)
    try:
        load_dir(settings.dir)  # fail before binding the port, with every error listed
    except PlaybookSetInvalid as exc:
        print(f"invalid playbooks in {settings.dir}:\n{exc}", file=sys.stderr)
        raise SystemExit(2) from None
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_config=None,
        access_log=False,
        # the lifespan stops consumers and flushes the outbox; give it time to
        timeout_graceful_shutdown=15,
    )


if __name__ == "__main__":
    main()
