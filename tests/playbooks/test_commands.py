"""Command ids derive from the decision; recipients follow the account's people."""

from __future__ import annotations

from datetime import UTC, datetime

from churnguard.common.topics import Topic
from churnguard.playbooks.commands import Contact, decision_id, notification, resolve_recipients

CONTACTS = [
    Contact("u_admin", "ada@acme.test", "admin"),
    Contact("u_member", "mo@acme.test", "member"),
    Contact("u_noemail", None, "member"),
    Contact("u_owner", "olu@acme.test", "owner"),
]


def resolve(to: str, channel: str, **kw: object) -> list[str]:
    args: dict[str, object] = {
        "csm": None,
        "owner": None,
        "contacts": CONTACTS,
        "respondent": None,
        "fallback": None,
        "limit": 3,
    }
    args.update(kw)
    return resolve_recipients(to, channel, **args)  # type: ignore[arg-type]


def test_decision_ids_are_deterministic_per_signal_and_playbook() -> None:
    assert decision_id("sig-1", "p") == decision_id("sig-1", "p")
    assert decision_id("sig-1", "p") != decision_id("sig-1", "q")
    assert decision_id("sig-1", "p") != decision_id("sig-2", "p")
    assert decision_id("sig-1", "p").startswith("dec_")


def test_recipients() -> None:
    assert resolve("admins", "email") == ["ada@acme.test", "olu@acme.test"]
    assert resolve("admins", "in_app") == ["u_admin", "u_owner"]
    assert resolve("contacts", "email", limit=5) == [
        "ada@acme.test",
        "olu@acme.test",
        "mo@acme.test",
    ]
    assert resolve("csm", "slack", csm="U0CSM") == ["U0CSM"]
    assert resolve("csm", "slack", fallback="#cs-alerts") == ["#cs-alerts"]
    assert resolve("owner", "slack", csm="U0CSM") == ["U0CSM"]
    assert resolve("owner", "slack", owner="U0AE", csm="U0CSM") == ["U0AE"]
    assert resolve("respondent", "email", respondent="u_member") == ["mo@acme.test"]
    assert resolve("respondent", "email", respondent="u_unknown") == [
        "ada@acme.test",
        "olu@acme.test",
    ]
    assert resolve("#exec-renewals", "slack") == ["#exec-renewals"]
    assert resolve("admins", "email", contacts=[]) == []
    # no admin known (traits often carry no role): the account's known users
    members = [Contact("u_1", "one@acme.test", None), Contact("u_2", None, "member")]
    assert resolve("admins", "email", contacts=members) == ["one@acme.test"]
    assert resolve("admins", "in_app", contacts=members) == ["u_1", "u_2"]


def test_a_notification_is_a_valid_event_with_the_decision_in_it() -> None:
    command = notification(
        command_id="dec_x.0.0",
        account_id="acct_1",
        at=datetime(2026, 3, 1, tzinfo=UTC),
        channel="slack",
        template="risk_alert",
        recipient="#cs",
        playbook="p",
        decision="dec_x",
        priority=80,
        variables={"account_name": "Acme"},
        received_at=None,
    )
    (event,) = Topic.NOTIFICATIONS.codec.decode(command.value)
    assert event.id == "dec_x.0.0"
    assert event.data.decision_id == "dec_x"
    assert event.data.variables == {"account_name": "Acme"}
