"""The retention lift of features, on a history whose answer is known."""

from __future__ import annotations

import json
from pathlib import Path

import orjson

from churnguard.playbooks.lift import compute_lift


def write_history(folder: Path) -> None:
    folder.mkdir()
    (folder / "summary.json").write_text(
        json.dumps({"config": {"start": "2025-01-01", "days": 365}})
    )
    truth, events = [], []

    def account(i: int, *, api: bool, cancel: str | None, signup: str = "2024-06-01") -> None:
        acct = f"acct_{i}"
        truth.append({"account_id": acct, "signup_date": signup, "cancel_date": cancel})
        uses = ["reports"] + (["api"] if api else [])
        for feature in uses:
            events.append(
                {
                    "type": "churnguard.usage.feature_used",
                    "subject": acct,
                    "time": "2025-02-01T10:00:00Z",
                    "data": {"feature": feature},
                }
            )

    for i in range(20):  # adopters: 2 of 20 churn later
        account(i, api=True, cancel="2025-08-01" if i < 2 else None)
    for i in range(20, 40):  # others: 10 of 20 churn later
        account(i, api=False, cancel="2025-08-01" if i < 30 else None)
    account(40, api=True, cancel="2025-02-15")  # cancelled inside its window: left out
    account(41, api=False, cancel=None, signup="2025-11-01")  # too little follow-up: left out
    events.append(
        {
            "type": "churnguard.usage.feature_used",
            "subject": "acct_20",
            "time": "2025-06-01T10:00:00Z",
            "data": {"feature": "api"},
        }
    )  # too late
    (folder / "ground_truth.jsonl").write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in truth))
    (folder / "events.jsonl").write_bytes(b"".join(orjson.dumps(e) + b"\n" for e in events))


def test_lift_is_the_churn_gap_between_non_adopters_and_adopters(tmp_path: Path) -> None:
    write_history(tmp_path / "h")
    report = compute_lift(tmp_path / "h")
    assert report.accounts == 40
    (api,) = report.features  # reports: nobody left who did not use it
    assert (api.feature, api.adopters, api.non_adopters) == ("api", 20, 20)
    assert api.churn_adopters == 0.1
    assert api.churn_non_adopters == 0.5
    assert round(api.lift, 6) == 0.4
    written = json.loads(report.as_json())
    assert written["features"][0]["feature"] == "api"
    assert 0 < written["features"][0]["lift_ci95"] < 0.4
