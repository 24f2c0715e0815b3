"""docker-compose.yml and the Dockerfiles stay true to the code.

No Docker engine or compose tool runs here, so this checks what `docker compose config`
cannot: that every variable handed to a service is a setting the service reads, that
health-gated dependencies have health checks, that every Dockerfile's entry point is a
script the project installs, and that no secret has a default.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic_settings import BaseSettings

from churnguard.common.settings import PlatformSettings
from churnguard.ingest.settings import IngestSettings
from churnguard.notify.settings import NotifySettings
from churnguard.playbooks.settings import PlaybooksSettings
from churnguard.scoring.settings import ScoringSettings

REPO = Path(__file__).resolve().parents[2]
COMPOSE: dict[str, Any] = yaml.safe_load((REPO / "docker-compose.yml").read_text())


def env_names(settings: type[BaseSettings]) -> set[str]:
    prefix = settings.model_config.get("env_prefix", "")
    return {f"{prefix}{name}".upper() for name in settings.model_fields if name != "platform"}


KNOWN_VARIABLES = (
    env_names(PlatformSettings)
    | env_names(IngestSettings)
    | env_names(ScoringSettings)
    | env_names(NotifySettings)
    | env_names(PlaybooksSettings)
)


def project_scripts() -> set[str]:
    scripts: set[str] = set()
    for pyproject in [REPO / "pyproject.toml", *REPO.glob("services/*/pyproject.toml")]:
        scripts |= set(tomllib.loads(pyproject.read_text())["project"].get("scripts", {}))
    return scripts


@pytest.mark.parametrize("name", sorted(COMPOSE["services"]))
def test_every_churnguard_variable_is_a_setting(name: str) -> None:
    env = COMPOSE["services"][name].get("environment", {})
    unknown = {k for k in env if k.startswith("CHURNGUARD_") and k not in KNOWN_VARIABLES}
    assert not unknown, f"{name}: no setting reads {sorted(unknown)}"


@pytest.mark.parametrize("name", sorted(COMPOSE["services"]))
def test_health_gated_dependencies_have_health_checks(name: str) -> None:
    for dependency, rule in COMPOSE["services"][name].get("depends_on", {}).items():
        assert dependency in COMPOSE["services"], f"{name} depends on unknown {dependency}"
        if rule["condition"] == "service_healthy":
            assert "healthcheck" in COMPOSE["services"][dependency], dependency


def test_builds_point_at_dockerfiles_whose_entry_points_exist() -> None:
    scripts = project_scripts()
    builds = [s["build"] for s in COMPOSE["services"].values() if "build" in s]
    assert builds
    for build in builds:
        dockerfile = REPO / build["context"] / build["dockerfile"]
        text = dockerfile.read_text()
        entry = re.search(r'^ENTRYPOINT \["([^"]+)"', text, re.M)
        assert entry, f"{dockerfile}: no ENTRYPOINT"
        assert entry.group(1) in scripts, f"{dockerfile}: entry point not installed"
        package = re.search(r"--package (\S+)", text)
        assert package, f"{dockerfile} must install one workspace member"


def test_secrets_have_no_defaults_and_services_run_in_prod_mode() -> None:
    raw = (REPO / "docker-compose.yml").read_text()
    assert "${POSTGRES_PASSWORD:?" in raw
    assert not re.search(r"POSTGRES_PASSWORD:-", raw)
    for name, service in COMPOSE["services"].items():
        env = service.get("environment", {})
        if any(k.startswith("CHURNGUARD_") for k in env):
            assert env.get("CHURNGUARD_ENV") == "prod", name


def test_setup_runs_a_module_the_image_has() -> None:
    entry = COMPOSE["services"]["setup"]["entrypoint"]
    assert entry[:2] == ["python", "-m"]
    module = entry[2]
    assert (REPO / "libs/common/src" / (module.replace(".", "/") + ".py")).exists()
