"""Notify reads every checked-in example of the topics it consumes: each decodes as a
record of its topic, and each notification names a template of the catalogue with
variables it accepts, on a channel it is sent on."""

from __future__ import annotations

from pathlib import Path

import pytest

from churnguard.common.events.derived import NotificationRequested
from churnguard.common.topics import Topic
from churnguard.notify.templates import validate

EXAMPLES = Path(__file__).resolve().parents[2] / "libs/common/src/churnguard/common/events/examples"
FOLDERS = {
    Topic.NOTIFICATIONS: "churnguard.actions.notification_requested",
    Topic.PAYMENT_RETRIES: "churnguard.actions.payment_retry_requested",
}
CASES = [
    (topic, path)
    for topic, folder in FOLDERS.items()
    for path in sorted((EXAMPLES / folder).glob("*.json"))
]


def test_there_are_examples_of_both_topics() -> None:
    assert {topic for topic, _ in CASES} == set(FOLDERS)


@pytest.mark.parametrize(("topic", "path"), CASES, ids=[p.stem for _, p in CASES])
def test_example_is_a_command_notify_can_carry_out(topic: Topic, path: Path) -> None:
    raw = path.read_bytes()
    (single,) = topic.codec.decode(raw)
    (enveloped,) = topic.codec.decode(b"[" + raw + b"]")
    assert single == enveloped
    if isinstance(single, NotificationRequested):
        validate(single.data.template, single.data.channel, single.data.variables)
