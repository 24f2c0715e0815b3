"""The validator: the shipped playbooks pass; every kind of mistake is named by file, line
and field; ``churnguard playbooks validate`` prints them and fails."""

from __future__ import annotations

import shutil
import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner

from churnguard.cli.main import app
from churnguard.playbooks.loader import PlaybookSetInvalid, load_dir
from churnguard.playbooks.settings import SHIPPED_DIR
from churnguard.playbooks.spec import DunningSpec

GOOD = """\
name: good
trigger:
  signal: risk_tier_crossed
conditions:
  - tier: {in: [at_risk, critical]}
actions:
  - type: slack
    to: csm
    fallback: "#cs-alerts"
    template: risk_alert
    variables:
      previous_tier: $signal.from_tier
cooldown: 7d
"""


def folder_with(tmp_path: Path, **files: str) -> Path:
    for name, text in files.items():
        (tmp_path / name).write_text(textwrap.dedent(text))
    return tmp_path


def errors_of(folder: Path) -> list[str]:
    with pytest.raises(PlaybookSetInvalid) as caught:
        load_dir(folder)
    return [str(e) for e in caught.value.errors]


def test_shipped_playbooks_are_valid_and_cover_the_issue() -> None:
    loaded = load_dir(SHIPPED_DIR)
    by_trigger = {p.signal or f"renewal_in_{p.renewal_in_days}": p for p in loaded.playbooks}
    assert set(by_trigger) == {
        "risk_tier_crossed",
        "usage_dropped",
        "detractor_nps",
        "renewal_at_risk",
        "expansion_signal",
        "payment_failed",
        "milestone_reached",
        "renewal_in_90",
    }
    assert any(isinstance(a, DunningSpec) for a in by_trigger["payment_failed"].actions)
    assert [a.type for a in by_trigger["detractor_nps"].actions] == ["csm_task", "email"]


def test_a_good_folder_loads(tmp_path: Path) -> None:
    loaded = load_dir(folder_with(tmp_path, **{"good.yaml": GOOD}))
    (playbook,) = loaded.playbooks
    assert playbook.name == "good"
    assert loaded.for_signal("risk_tier_crossed") == (playbook,)
    assert loaded.for_signal("usage_dropped") == ()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            GOOD.replace("risk_tier_crossed", "risk_tier_crosed"),
            "bad.yaml:3: trigger.signal: unknown signal type 'risk_tier_crosed'",
        ),
        (
            GOOD.replace("tier: {in", "teir: {in"),
            "bad.yaml:5: conditions[0].teir: unknown field 'teir' (did you mean 'tier'?)",
        ),
        (
            GOOD.replace("at_risk, critical", "at_risk, critcal"),
            "bad.yaml:5: conditions[0].tier.in[1]: tier: 'critcal' is not one of healthy",
        ),
        (
            GOOD.replace("tier: {in: [at_risk, critical]}", "tier: {gt: 3}"),
            "bad.yaml:5: conditions[0].tier.gt: operator 'gt' does not apply to tier",
        ),
        (
            GOOD.replace("risk_alert", "risk_alrt"),
            "bad.yaml:10: actions[0].template: unknown template 'risk_alrt' "
            "(did you mean 'risk_alert'?)",
        ),
        (
            GOOD.replace("previous_tier: $signal", "from_tier: $signal"),
            "bad.yaml:12: actions[0].variables.from_tier: template 'risk_alert' takes no "
            "variable 'from_tier'",
        ),
        (
            GOOD.replace("type: slack", "type: email").replace("to: csm", "to: admins"),
            "bad.yaml:10: actions[0].template: template 'risk_alert' is for slack, csm_task, "
            "webhook, not email",
        ),
        (
            GOOD.replace("$signal.from_tier", "$signal.from_teir"),
            "bad.yaml:12: actions[0].variables.previous_tier: unknown field 'signal.from_teir'",
        ),
        (GOOD.replace("cooldown: 7d", "cooldown: 7"), "bad.yaml:13: cooldown: a duration is a"),
        (
            GOOD.replace("    to: csm\n", "    to: admins\n"),
            "bad.yaml:8: actions[0].to: 'admins' does not suit slack",
        ),
        (
            GOOD.replace("    to: csm\n", "    to: csm\n    too: x\n"),
            "bad.yaml:9: actions[0].too: unknown key",
        ),
        (
            GOOD.replace("type: slack", "type: sms"),
            "bad.yaml:7: actions[0].type: unknown action type 'sms'",
        ),
        (GOOD + "cooldown: 1d\n", "bad.yaml:14: cooldown: duplicate key"),
        (GOOD.replace("name: good", "name: Good One"), "bad.yaml:1: name: String should match"),
        (GOOD.replace("    to: csm\n", ""), "bad.yaml:7: actions[0].to: Field required"),
        ("name: x\ntrigger: [\n", "bad.yaml:3: invalid YAML"),
        (GOOD + "---\nname: second\n", "bad.yaml:14: one playbook per file"),
    ],
)
def test_each_mistake_is_named_by_file_line_and_field(
    tmp_path: Path, text: str, expected: str
) -> None:
    folder = folder_with(tmp_path, **{"bad.yaml": text})
    errors = errors_of(folder)
    assert any(e.startswith(f"{folder}/{expected}") for e in errors), errors


def test_every_error_of_every_file_is_reported_at_once(tmp_path: Path) -> None:
    folder = folder_with(
        tmp_path,
        **{
            "a.yaml": GOOD.replace("risk_alert", "nope"),
            "b.yaml": GOOD.replace("name: good", "name: other")
            .replace("teir", "x")
            .replace("signal: risk_tier_crossed", "signal: nope"),
            "c.yaml": GOOD,
        },
    )
    errors = errors_of(folder)
    assert [e.split(":")[0] for e in errors] == [f"{folder}/a.yaml", f"{folder}/b.yaml"]


def test_two_playbooks_with_one_name_are_refused(tmp_path: Path) -> None:
    folder = folder_with(tmp_path, **{"a.yaml": GOOD, "b.yaml": GOOD})
    assert errors_of(folder) == [
        f"{folder}/b.yaml:1: name: 'good' is already the name of {folder}/a.yaml"
    ]


def test_dunning_refuses_a_hard_decline_in_its_retry_schedule(tmp_path: Path) -> None:
    text = (
        (SHIPPED_DIR / "failed-payment-dunning.yaml")
        .read_text()
        .replace(
            "      default: [3d, 6d, 9d, 13d]",
            "      expired_card: [1d]\n      default: [3d, 6d, 9d, 13d]",
        )
    )
    folder = folder_with(tmp_path, **{"dunning.yaml": text})
    assert errors_of(folder) == [
        f"{folder}/dunning.yaml:21: actions[0].retry_schedule.expired_card: a hard decline is "
        "never retried (it gets the card_update message)"
    ]


def test_templates_yaml_extends_the_catalogue(tmp_path: Path) -> None:
    folder = folder_with(
        tmp_path,
        **{
            "good.yaml": GOOD.replace("risk_alert", "our_alert").replace(
                "      previous_tier: $signal.from_tier\n", "      coupon_code: SAVE20\n"
            ),
            "templates.yaml": (
                "templates:\n  our_alert:\n    channels: [slack]\n"
                "    variables: [account_name, coupon_code]\n"
            ),
        },
    )
    (playbook,) = load_dir(folder).playbooks
    assert playbook.actions[0].template == "our_alert"  # type: ignore[union-attr]
    # without the coupon code the template cannot be rendered: the validator says so
    (folder / "good.yaml").write_text(
        GOOD.replace("risk_alert", "our_alert").replace(
            "    variables:\n      previous_tier: $signal.from_tier\n", ""
        )
    )
    assert errors_of(folder) == [
        f"{folder}/good.yaml:10: actions[0].template: template 'our_alert' needs coupon_code; "
        "set them under variables (e.g. feature: $guide_feature)"
    ]


def test_cli_validate_lists_errors_and_fails(tmp_path: Path) -> None:
    folder = folder_with(
        tmp_path, **{"bad.yaml": GOOD.replace("teir", "x").replace("tier: {in", "teir: {in")}
    )
    result = CliRunner().invoke(app, ["playbooks", "validate", str(folder)], terminal_width=400)
    assert result.exit_code == 1
    assert (
        f"{folder}/bad.yaml:5: conditions[0].teir: unknown field 'teir'"
        in result.output.replace("\n", "")
    )


def test_cli_validate_passes_the_shipped_folder(tmp_path: Path) -> None:
    shutil.copytree(SHIPPED_DIR, tmp_path / "pb")
    result = CliRunner().invoke(
        app, ["playbooks", "validate", str(tmp_path / "pb")], terminal_width=200
    )
    assert result.exit_code == 0, result.output
    assert "8 playbooks valid" in result.output
