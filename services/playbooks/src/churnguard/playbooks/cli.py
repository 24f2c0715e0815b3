"""``churnguard playbooks``: validate a playbook folder; rank features by retention lift.

Registered on the main CLI with ``app.add_typer(playbooks, name="playbooks")``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

__all__ = ["playbooks"]

playbooks = typer.Typer(
    help="Playbooks: validate a folder, rank features by retention lift.", no_args_is_help=True
)


@playbooks.command()
def validate(
    directory: Annotated[
        Path | None,
        typer.Argument(
            help="Folder of playbook YAML files; default CHURNGUARD_PLAYBOOKS_DIR, else the "
            "shipped playbooks"
        ),
    ] = None,
) -> None:
    """Check every playbook of a folder; list each error with its file, line and field."""
    from churnguard.playbooks.loader import PlaybookSetInvalid, load_dir
    from churnguard.playbooks.settings import PlaybooksSettings

    folder = directory or PlaybooksSettings().dir
    try:
        loaded = load_dir(folder)
    except PlaybookSetInvalid as exc:
        err = Console(stderr=True, highlight=False)
        for error in exc.errors:
            # one line per error, never wrapped: editors and grep read file:line
            err.print(f"[red]error[/red] {escape(str(error))}", soft_wrap=True)
        err.print(f"{len(exc.errors)} error(s) in {escape(str(folder))}")
        raise typer.Exit(1) from None
    table = Table("playbook", "trigger", "priority", "cool-down", "holdout", "actions", "file")
    from churnguard.playbooks.spec import DunningSpec, format_duration

    for p in sorted(loaded.playbooks, key=lambda p: (-p.spec.priority, p.name)):
        trigger = p.signal or f"renewal in {p.renewal_in_days} d"
        actions = ", ".join(
            "dunning" if isinstance(a, DunningSpec) else f"{a.type}→{a.to}" for a in p.actions
        )
        table.add_row(
            p.name + ("" if p.spec.enabled else " (disabled)"),
            trigger,
            str(p.spec.priority),
            format_duration(p.spec.cooldown),
            f"{p.spec.holdout_percent:g}%",
            escape(actions),
            escape(Path(p.source).name),
        )
    out = Console()
    out.print(table)
    out.print(
        f"{len(loaded.playbooks)} playbooks valid in {escape(str(folder))} "
        f"({len(loaded.templates)} templates)"
    )


@playbooks.command()
def lift(
    data: Annotated[Path, typer.Option(help="A history folder (`churnguard simulate --to`)")],
    out: Annotated[
        Path | None,
        typer.Option(help="Write the ranking here (JSON), e.g. for CHURNGUARD_PLAYBOOKS_LIFT_PATH"),
    ] = None,
    follow_up_days: Annotated[
        int, typer.Option(help="Days of history an account needs after its adoption window")
    ] = 90,
) -> None:
    """Rank product features by the retention that comes with adopting them early."""
    from churnguard.playbooks.lift import compute_lift

    if not (data / "ground_truth.jsonl").exists():
        Console(stderr=True).print(
            f"[red]error:[/red] {escape(str(data))} has no ground_truth.jsonl "
            "(write one with `churnguard simulate --to DIR`)"
        )
        raise typer.Exit(1)
    report = compute_lift(data, follow_up_days=follow_up_days)
    table = Table(
        "feature",
        "adopters",
        "others",
        "churn adopters",
        "churn others",
        "lift (±95%)",
        title=f"{report.accounts:,} accounts, adoption in their first {report.window_days} days",
        title_justify="left",
    )
    for f in sorted(report.features, key=lambda f: -f.lift):
        table.add_row(
            f.feature,
            f"{f.adopters:,}",
            f"{f.non_adopters:,}",
            f"{f.churn_adopters:.1%}",
            f"{f.churn_non_adopters:.1%}",
            f"{f.lift:+.1%} ± {f.ci95:.1%}",
        )
    console = Console()
    console.print(table)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(report.as_json())
        console.print(f"wrote {escape(str(out))}")
