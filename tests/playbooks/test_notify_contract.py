"""Playbooks' template catalogue agrees with notify's, which refuses unknown variables.

Runs where notify is installed (the workspace once both services are in it)."""

from __future__ import annotations

import pytest

from churnguard.playbooks.loader import load_templates

notify_templates = pytest.importorskip("churnguard.notify.templates")


def test_shared_templates_take_the_same_variables_on_the_same_channels() -> None:
    ours, errors = load_templates(None)
    assert errors == []
    shared = set(ours) & set(notify_templates.CATALOGUE)
    assert shared, "no template in common with notify"
    for name in sorted(shared):
        theirs = notify_templates.CATALOGUE[name]
        fields = theirs.variables.model_fields
        required = {k for k, f in fields.items() if f.is_required()}
        assert ours[name].variables == required, name
        assert ours[name].accepted == set(fields), name
        assert set(ours[name].channels) <= set(theirs.channels), name
