"""The READMEs stay true: every playbooks setting, shipped playbook, template and metric
is documented where a user looks for it."""

from __future__ import annotations

import re
from pathlib import Path

from prometheus_client import Counter, Gauge, Histogram

from churnguard.playbooks import playbooks_metrics
from churnguard.playbooks.loader import load_dir
from churnguard.playbooks.settings import SHIPPED_DIR, PlaybooksSettings

REPO = Path(__file__).resolve().parents[2]
MAIN = (REPO / "README.md").read_text()
SERVICE = (REPO / "services" / "playbooks" / "README.md").read_text()


def test_every_setting_is_in_the_configuration_table() -> None:
    rows = [line for line in MAIN.splitlines() if "CHURNGUARD_PLAYBOOKS_" in line]
    documented = set()
    for row in rows:
        documented |= set(re.findall(r"`(?:CHURNGUARD_PLAYBOOKS)?_([A-Z0-9_]+)`", row))
    fields = {name.upper() for name in PlaybooksSettings.model_fields if name != "platform"}
    assert fields - documented == set()


def test_every_shipped_playbook_and_template_is_in_the_service_readme() -> None:
    loaded = load_dir(SHIPPED_DIR)
    for playbook in loaded.playbooks:
        assert f"| `{playbook.name}` (" in SERVICE, playbook.name
    for template in loaded.templates:
        assert f"`{template}`" in SERVICE, template


def test_every_metric_is_in_the_service_readme() -> None:
    metrics = [
        m for m in vars(playbooks_metrics).values() if isinstance(m, Counter | Gauge | Histogram)
    ]
    assert len(metrics) >= 10
    for metric in metrics:
        name = metric._name + ("_total" if isinstance(metric, Counter) else "")
        short = "`_" + name.removeprefix("churnguard_playbooks_")
        assert f"`{name}" in SERVICE or short in SERVICE, name
