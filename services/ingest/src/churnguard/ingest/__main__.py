"""``churnguard-ingest``: run the ingest API with uvicorn."""

from __future__ import annotations

import uvicorn

from churnguard.common.logs import configure_logging
from churnguard.ingest.app import create_app
from churnguard.ingest.settings import IngestSettings


def main() -> None:
    settings = IngestSettings()
    configure_logging("ingest", settings.platform.log_level, settings.platform.log_format)
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_config=None,
        access_log=False,
    )


if __name__ == "__main__":
    main()
