"""``churnguard``: one command line, one subcommand group per concern."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sys
import time
from collections.abc import Callable, Iterator
from datetime import date
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(
    name="churnguard",
    help="churnguard: real-time customer retention for B2B SaaS. "
    "Run `make demo` for the whole platform, `churnguard dev up` for the embedded stack.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)
dev = typer.Typer(
    help="The embedded stack: broker, PostgreSQL and the services.", no_args_is_help=True
)
topics = typer.Typer(help="Kafka topics from the topic registry.", no_args_is_help=True)
schemas = typer.Typer(help="JSON Schema of every event type.", no_args_is_help=True)
db = typer.Typer(help="PostgreSQL schemas and migrations of the services.", no_args_is_help=True)
app.add_typer(dev, name="dev")
app.add_typer(topics, name="topics")
app.add_typer(schemas, name="schemas")
app.add_typer(db, name="db")
model = typer.Typer(
    help="Churn models: train, evaluate, and the simulator's baseline.", no_args_is_help=True
)
app.add_typer(model, name="model")


def _register_service_commands() -> None:
    from churnguard.ingest.keys_cli import keys

    app.add_typer(keys, name="keys", help="Write keys of ingest's sources (hashed in PostgreSQL).")

    from churnguard.playbooks.cli import playbooks

    app.add_typer(playbooks, name="playbooks")


_register_service_commands()

console = Console()
err = Console(stderr=True)


def _platform_bootstrap(bootstrap: str | None) -> tuple[str, str]:
    from churnguard.common.settings import PlatformSettings

    platform = PlatformSettings()
    return bootstrap or platform.kafka_bootstrap, platform.topic_prefix


# ---- dev -------------------------------------------------------------------------------


@dev.command("up")
def dev_up() -> None:
    """Start the stack in the background and wait until every part is ready."""
    from churnguard.devstack import stack

    settings = stack.StackSettings()
    already = stack.running_supervisor(settings)
    started = time.monotonic()
    try:
        stack.up(settings)
    except Exception as exc:
        err.print(f"[red]dev up failed:[/] {exc}")
        raise typer.Exit(1) from None
    if already:
        console.print(f"A stack is already running (supervisor pid {already}).")
    else:
        console.print(f"Stack ready in {time.monotonic() - started:.1f} s.")
    _print_status(settings)


@dev.command("run")
def dev_run() -> None:
    """Run the stack in the foreground (Ctrl-C stops everything). `make demo` uses this."""
    from churnguard.common.logs import configure_logging
    from churnguard.devstack import stack

    configure_logging("dev", "INFO", "text")
    settings = stack.StackSettings()
    try:
        stack.Supervisor(settings).run()
    except KeyboardInterrupt:
        pass
    except Exception as exc:
        logging.getLogger("churnguard.dev").error("stack failed: %s", exc)
        raise typer.Exit(1) from None


@dev.command("down")
def dev_down() -> None:
    """Stop every process the stack started."""
    from churnguard.devstack import stack

    if stack.down(stack.StackSettings()):
        console.print("Stack stopped.")
    else:
        console.print("No stack is running.")


@dev.command("status")
def dev_status() -> None:
    """Each component: process, health, address and log file. Exit code 1 if any is unhealthy."""
    from churnguard.devstack import stack

    settings = stack.StackSettings()
    if not _print_status(settings):
        raise typer.Exit(1)


def _print_status(settings: object) -> bool:
    from churnguard.devstack import stack

    assert isinstance(settings, stack.StackSettings)
    rows = stack.component_health(settings)
    if not rows:
        console.print("No stack is running (`churnguard dev up` starts one).")
        return False
    table = Table("component", "state", "address", "pid", "log")
    for row in rows:
        state = (
            "[green]healthy[/]"
            if row["healthy"]
            else ("[yellow]not answering[/]" if row["alive"] else "[red]down[/]")
        )
        table.add_row(row["name"], state, row["address"], str(row["pid"]), row["log"])
    console.print(table)
    return all(r["healthy"] for r in rows)


@dev.command("logs")
def dev_logs(
    component: Annotated[
        str,
        typer.Argument(
            help="kafka, postgres, ingest, scoring, playbooks, mailbox, notify, supervisor"
        ),
    ],
    lines: Annotated[int, typer.Option("--lines", "-n")] = 50,
    follow: Annotated[bool, typer.Option("--follow", "-f")] = False,
) -> None:
    """Print the last lines of a component's log (and follow it with -f)."""
    from churnguard.devstack import stack

    path = stack.StackSettings().logs / f"{component}.log"
    if not path.exists():
        err.print(f"no log at {path}")
        raise typer.Exit(1)
    with path.open(errors="replace") as f:
        for line in f.readlines()[-lines:]:
            sys.stdout.write(line)
        while follow:
            line = f.readline()
            if line:
                sys.stdout.write(line)
                sys.stdout.flush()
            else:
                time.sleep(0.2)


# ---- topics ----------------------------------------------------------------------------


@topics.command("create")
def topics_create(
    bootstrap: Annotated[
        str | None, typer.Option(help="Defaults to CHURNGUARD_KAFKA_BOOTSTRAP")
    ] = None,
) -> None:
    """Create every registry topic and its dead-letter twin; existing ones are left as they are."""
    from churnguard.common.kafka import ensure_topics
    from churnguard.common.topics import planned_topics

    server, prefix = _platform_bootstrap(bootstrap)
    report = asyncio.run(ensure_topics(server, planned_topics(prefix)))
    for name in report.created:
        console.print(f"created  {name}")
    for name in report.existing:
        console.print(f"exists   {name}")
    console.print(
        f"{len(report.created)} created, {len(report.existing)} already existed on {server}"
    )


@topics.command("list")
def topics_list() -> None:
    """The topic registry: name, partitions, cleanup policy, dead-letter twin, event types."""
    from churnguard.common.topics import Topic

    table = Table("topic", "partitions", "cleanup", "key", "dead letters", "description")
    for t in Topic:
        table.add_row(
            t.topic,
            str(t.spec.partitions),
            t.spec.cleanup_policy,
            t.spec.key,
            t.dead_letter_in() if t.spec.dead_letter else "-",
            t.spec.description,
        )
    console.print(table)


# ---- schemas ---------------------------------------------------------------------------


@schemas.command("export")
def schemas_export(
    out: Annotated[Path | None, typer.Option(help="Folder; defaults to the checked-in one")] = None,
) -> None:
    """Write the JSON Schema of every event type and topic."""
    from churnguard.common.events import schemas as ev_schemas

    folder = out or ev_schemas.SCHEMA_DIR
    paths = ev_schemas.export_json_schemas(folder)
    console.print(f"wrote {len(paths)} schemas to {folder}")


@schemas.command("check")
def schemas_check() -> None:
    """Fail if the checked-in JSON Schemas differ from the models."""
    from churnguard.common.events import schemas as ev_schemas

    stale = ev_schemas.check_json_schemas(ev_schemas.SCHEMA_DIR)
    if stale:
        err.print("stale or missing: " + ", ".join(stale) + " (run `churnguard schemas export`)")
        raise typer.Exit(1)
    console.print("schemas up to date")


# ---- db --------------------------------------------------------------------------------


@db.command("migrate")
def db_migrate() -> None:
    """Create each service's schema and apply its migrations (CHURNGUARD_DATABASE_URL)."""
    from churnguard.common.settings import PlatformSettings
    from churnguard.common.setup import migrate

    schemas = migrate(PlatformSettings().database_url.get_secret_value())
    console.print(f"migrations applied to: {', '.join(schemas)}")


# ---- simulate --------------------------------------------------------------------------


@app.command("simulate")
def simulate(
    to: Annotated[str, typer.Option(help="A folder (events + ground truth) or http://HOST:PORT")],
    accounts: Annotated[int, typer.Option(help="Customers at the start")] = 2000,
    days: Annotated[int, typer.Option(help="Days to simulate")] = 365,
    seed: Annotated[int, typer.Option(help="Same seed, byte-identical output")] = 1,
    day_seconds: Annotated[
        float | None,
        typer.Option(
            help="HTTP only: real seconds per simulated day (e.g. 10); default: as fast as possible"
        ),
    ] = None,
    write_key: Annotated[
        str, typer.Option(envvar="CHURNGUARD_SIMULATOR_WRITE_KEY", help="Segment write key")
    ] = "dev-write-key",
    stripe_secret: Annotated[
        str,
        typer.Option(envvar="CHURNGUARD_SIMULATOR_STRIPE_SECRET", help="Webhook signing secret"),
    ] = "whsec_dev",
    parquet: Annotated[
        bool, typer.Option(help="Folder only: also write events.parquet when pyarrow is installed")
    ] = True,
) -> None:
    """Simulate a B2B SaaS customer base and write it to a folder or replay it into ingest."""
    from churnguard.simulator.world import SimConfig, World

    world = World(SimConfig(accounts=accounts, days=days, seed=seed))
    with _sim_progress(days) as on_day:
        if to.startswith(("http://", "https://")):
            from churnguard.simulator.replay import replay_world

            stats = replay_world(
                world,
                to,
                write_key=write_key,
                stripe_secret=stripe_secret,
                speed=None if day_seconds is None else 86400 / day_seconds,
                on_day=on_day,
            )
            console.print(
                f"replayed {stats.sent_events:,} events in {stats.elapsed_s:.1f} s "
                f"({stats.events_per_s:,.0f}/s); rejected {stats.rejected}, failed {stats.failed}"
            )
            if stats.rejected or stats.failed:
                raise typer.Exit(1)
            return
        from churnguard.simulator.output import write_world

        out = Path(to)
        written = write_world(world, out, on_day, parquet=parquet)
    summary = json.loads((out / "summary.json").read_text())
    r = summary["realism"]
    console.print(
        f"{written.events:,} events for {world.n:,} accounts in {written.elapsed_s:.1f} s → {out}\n"
        f"logo churn {r['monthly_logo_churn']:.1%}/month ({r['annual_logo_churn']:.0%}/year), "
        f"involuntary {r['involuntary_share']:.0%}, NPS {r['nps']:+.0f}, "
        f"NRR {r['nrr']:.0%}, GRR {r['grr']:.0%}"
    )


@model.command("baseline")
def model_baseline(
    train: Annotated[Path, typer.Option(help="A world written by `churnguard simulate --to`")],
    test: Annotated[Path, typer.Option(help="Another world (another seed)")],
    horizon: Annotated[int, typer.Option(help="Days after the cutoff a cancellation counts")] = 60,
) -> None:
    """Logistic regression on the 30-day activity trend, trained on one world, tested on another."""
    from churnguard.simulator.baseline import evaluate

    report = evaluate(train, test, horizon)
    table = Table("figure", "value")
    table.add_row("accounts train / test", f"{report.train_accounts} / {report.test_accounts}")
    table.add_row(
        f"churn within {horizon} d train / test",
        f"{report.train_churn_rate:.1%} / {report.test_churn_rate:.1%}",
    )
    table.add_row("AUC, trend logistic regression", f"{report.trend_auc:.3f}")
    table.add_row("AUC, all baseline features", f"{report.all_features_auc:.3f}")
    for name, value in sorted(report.single_feature_auc.items(), key=lambda kv: -kv[1]):
        table.add_row(f"AUC, {name} alone", f"{value:.3f}")
    console.print(table)


def _date_option(value: str | None) -> date | None:
    if value is None:
        return None
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise typer.BadParameter(f"{value!r} is not a date (YYYY-MM-DD)") from None


def _figures_table(evaluation: Any) -> Table:
    table = Table(
        "figure (held-out rows)",
        "model",
        "rules baseline",
        title=evaluation.data,
        title_justify="left",
    )
    model_figures, rules = evaluation.model.as_dict(), evaluation.rules_baseline.as_dict()
    better = {"roc_auc": max, "pr_auc": max, "brier": min, "top_decile_lift": max}
    labels = {
        "roc_auc": "ROC AUC",
        "pr_auc": "PR AUC (average precision)",
        "brier": "Brier score (lower is better)",
        "top_decile_lift": "lift in the top decile",
    }
    for key, label in labels.items():
        m, r = model_figures[key], rules[key]
        best = better[key](m, r)
        table.add_row(
            label,
            f"[bold]{m:.3f}[/]" if m == best else f"{m:.3f}",
            f"[bold]{r:.3f}[/]" if r == best else f"{r:.3f}",
        )
    return table


@model.command("train")
def model_train(
    train: Annotated[Path, typer.Option(help="A history folder (`churnguard simulate --to`)")],
    out: Annotated[Path, typer.Option(help="Where to write the ONNX artifact")],
    test: Annotated[
        Path | None,
        typer.Option(
            help="A folder to evaluate on (another seed); default: 25% of train's accounts"
        ),
    ] = None,
    test_since: Annotated[
        str | None,
        typer.Option(
            help="Test on snapshots from this date (YYYY-MM-DD) on: an out-of-time test "
            "(without --test, train also stops on the snapshots whose horizon ends by then)"
        ),
    ] = None,
    horizon: Annotated[int, typer.Option(help="Days after a snapshot a cancellation counts")] = 90,
    every: Annotated[int, typer.Option(help="Days between snapshots")] = 30,
    warmup: Annotated[int, typer.Option(help="Days of history before the first snapshot")] = 60,
) -> None:
    """Train the churn model on one history, evaluate it beside the rules baseline, write ONNX."""
    from churnguard.scoring.modeling import train as fit
    from churnguard.scoring.training import TrainingSet, build_training_set

    since = _date_option(test_since)

    def replay(folder: Path, since: date | None = None) -> TrainingSet:
        with err.status(f"replaying {folder} …"):
            return build_training_set(
                folder, horizon_days=horizon, every_days=every, warmup_days=warmup, since=since
            )

    train_set = replay(train)
    if test is None:
        train_set, test_set = train_set.split_by_account(since=since)
    else:
        test_set = replay(test, since)
    console.print(f"train: {train_set.describe()}\ntest:  {test_set.describe()}")
    with err.status("training …"):
        trained = fit(train_set, test_set)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".tmp")
    partial.write_bytes(trained.onnx)
    partial.replace(out)  # atomic: a ModelWatcher never reads half a file
    console.print(_figures_table(trained.evaluation))
    console.print(f"wrote {out} ({len(trained.onnx) / 1024:.0f} KiB), version {trained.version}")


@model.command("evaluate")
def model_evaluate(
    data: Annotated[Path, typer.Option(help="A history folder (`churnguard simulate --to`)")],
    model_path: Annotated[
        Path | None, typer.Option("--model", help="An ONNX artifact; default: the shipped one")
    ] = None,
    since: Annotated[
        str | None, typer.Option(help="Only snapshots from this date (YYYY-MM-DD) on")
    ] = None,
    every: Annotated[int, typer.Option(help="Days between snapshots")] = 30,
    warmup: Annotated[int, typer.Option(help="Days of history before the first snapshot")] = 60,
) -> None:
    """Evaluate a model and the rules baseline on any history (its horizon, its features)."""
    from churnguard.scoring.model import DEFAULT_MODEL_PATH, ChurnModel, ModelError
    from churnguard.scoring.modeling import evaluate
    from churnguard.scoring.training import build_training_set

    try:
        churn_model = ChurnModel.load(model_path or DEFAULT_MODEL_PATH)
    except ModelError as exc:
        err.print(f"[red]{exc}[/]")
        raise typer.Exit(1) from None
    with err.status(f"replaying {data} …"):
        data_set = build_training_set(
            data,
            horizon_days=churn_model.horizon_days or 90,
            every_days=every,
            warmup_days=warmup,
            since=_date_option(since),
        )
    if data_set.positives == 0:
        err.print(f"[red]no cancellations in {data_set.describe()}: nothing to evaluate[/]")
        raise typer.Exit(1)
    console.print(f"model {churn_model.version}: {churn_model.trained_on}")
    console.print(_figures_table(evaluate(churn_model, data_set)))


@contextlib.contextmanager
def _sim_progress(days: int) -> Iterator[Callable[[int, Any], None]]:
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    started = time.monotonic()
    with Progress(
        TextColumn("[bold]{task.fields[date]}"),
        BarColumn(),
        TextColumn("day {task.completed:.0f}/{task.total:.0f}"),
        TextColumn("{task.fields[events]:,} events · {task.fields[rate]:,.0f}/s"),
        TimeElapsedColumn(),
        console=err,
        transient=False,
    ) as progress:
        task = progress.add_task("simulate", total=days, date="", events=0, rate=0.0)

        def on_day(events: int, day: Any) -> None:
            rate = events / max(time.monotonic() - started, 1e-6)
            progress.update(
                task, completed=day.day + 1, date=day.date.isoformat(), events=events, rate=rate
            )

        yield on_day


def main() -> None:
    app()


if __name__ == "__main__":
    main()
