"""Prepare a deployment: the registry's topics, then each installed service's schema.

``python -m churnguard.common.setup`` is what docker-compose's one-shot ``setup`` service
and ``churnguard dev`` run before the services start. Both steps are idempotent: topics
that exist are left as they are, migrations already applied are skipped.
"""

from __future__ import annotations

import asyncio
import logging
from importlib import resources
from pathlib import Path

from churnguard.common.db import run_migrations
from churnguard.common.kafka import TopicReport, ensure_topics
from churnguard.common.logs import configure_logging
from churnguard.common.settings import PlatformSettings
from churnguard.common.topics import planned_topics

log = logging.getLogger(__name__)

SERVICES = ("ingest", "scoring", "playbooks", "notify", "console")
"""Each service owns the PostgreSQL schema of its own name."""


def installed_migrations() -> list[tuple[str, Path]]:
    """(schema, migrations folder) of every churnguard service installed here that has some."""
    found = []
    for service in SERVICES:
        try:
            location = resources.files(f"churnguard.{service}") / "migrations"
        except ModuleNotFoundError:
            continue
        if location.is_dir():
            found.append((service, Path(str(location))))
    return found


def migrate(database_url: str) -> list[str]:
    """Apply every installed service's migrations to its own schema; the schemas migrated."""
    done = []
    for schema, location in installed_migrations():
        run_migrations(database_url, schema, location)
        done.append(schema)
    return done


def create_topics(platform: PlatformSettings) -> TopicReport:
    return asyncio.run(
        ensure_topics(platform.kafka_bootstrap, planned_topics(platform.topic_prefix))
    )


def main() -> None:
    platform = PlatformSettings()
    configure_logging("setup", platform.log_level, platform.log_format)
    report = create_topics(platform)
    log.info(
        "topics ready: %d created, %d already existed", len(report.created), len(report.existing)
    )
    schemas = migrate(platform.database_url.get_secret_value())
    log.info("schemas migrated: %s", ", ".join(schemas) or "none installed")


if __name__ == "__main__":
    main()
