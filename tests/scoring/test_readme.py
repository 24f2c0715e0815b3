"""services/scoring/README.md documents every feature and reason code, in the code's order."""

from __future__ import annotations

import re
from pathlib import Path

from churnguard.scoring.features import FEATURE_NAMES
from churnguard.scoring.reasons import REASON_GROUPS

README = Path(__file__).resolve().parents[2] / "services" / "scoring" / "README.md"


def test_feature_table_is_feature_names_in_order() -> None:
    rows = re.findall(r"^\| (\d+) \| `([a-z0-9_]+)` \|", README.read_text(), re.MULTILINE)
    assert [(int(i), name) for i, name in rows] == list(enumerate(FEATURE_NAMES))


def test_reason_table_lists_every_code() -> None:
    section = README.read_text().split("| code | features | raised when |")[1].split("\n\n")[0]
    codes = re.findall(r"^\| `([a-z0-9_]+)` \|", section, re.MULTILINE)
    assert codes == [group.code for group in REASON_GROUPS]
