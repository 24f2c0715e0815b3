"""``churnguard-notify``: the consumer, the delivery workers and the HTTP API in one process."""

from __future__ import annotations

import logging

import uvicorn

from churnguard.common.logs import configure_logging
from churnguard.notify.app import create_app
from churnguard.notify.settings import NotifySettings


def main() -> None:
    settings = NotifySettings()
    configure_logging("notify", settings.platform.log_level, settings.platform.log_format)
    # the stripe library logs every request at INFO; the attempt rows have what matters
    logging.getLogger("stripe").setLevel(logging.WARNING)
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_config=None,
        access_log=False,
        # SSE streams are open connections: do not wait for them on shutdown
        timeout_graceful_shutdown=5,
    )


if __name__ == "__main__":
    main()
