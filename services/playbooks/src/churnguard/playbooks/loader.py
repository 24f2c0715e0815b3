"""Load a folder of playbooks: YAML with line numbers, then every check, then one set.

Every problem is a :class:`PlaybookError` naming the file, the line and the field
(``high-risk.yaml:14: actions[0].template: unknown template 'csm_alrt'``), and loading
collects all of them rather than stopping at the first, so one run of
``churnguard playbooks validate`` shows everything to fix. A set is all or nothing: the
service swaps in a new set only when every file of it is valid.

Files: every ``*.yaml`` / ``*.yml`` in the folder holds one playbook, except
``templates.yaml``, which adds to (or overrides) the shipped template catalogue.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import yaml
from pydantic import ValidationError

from churnguard.playbooks import catalogue
from churnguard.playbooks.catalogue import (
    CHANNELS,
    DUNNING_VARIABLES,
    MESSAGE_VARIABLES,
    RECIPIENTS,
    SIGNALS,
    Template,
    TemplateCatalogue,
    fields_for,
)
from churnguard.playbooks.conditions import ALWAYS, Condition, ConditionError, parse
from churnguard.playbooks.spec import (
    Action,
    DunningMessageSpec,
    DunningSpec,
    MessageSpec,
    Playbook,
    PlaybookSpec,
)

TEMPLATES_FILE: Final = "templates.yaml"
SHIPPED_TEMPLATES: Final = Path(__file__).resolve().parent / "shipped" / TEMPLATES_FILE

Loc = tuple[str | int, ...]

# which recipient keywords suit which channel (anything else in `to` is a literal)
KEYWORDS_BY_CHANNEL: Final[Mapping[str, frozenset[str]]] = {
    "slack": frozenset({"csm", "owner"}),
    "csm_task": frozenset({"csm", "owner"}),
    "email": frozenset({"admins", "contacts", "respondent"}),
    "in_app": frozenset({"admins", "contacts", "respondent"}),
    "webhook": frozenset(),
}
_POINTED = re.compile(r"^([a-z_][a-z0-9_]*(?:\.[a-z0-9_]+)*): (.+)$", re.S)
_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
_SLACK_LITERAL = re.compile(r"^(#[a-z0-9][a-z0-9_.-]*|@[\w.-]+|[CGDUW][A-Z0-9]{6,})$")


@dataclass(frozen=True)
class PlaybookError:
    """One problem in one file: where (line, field) and why."""

    file: str
    line: int | None
    field: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        return (
            f"{where}: {self.field}: {self.message}" if self.field else f"{where}: {self.message}"
        )


class PlaybookSetInvalid(ValueError):
    """The folder does not make a valid set; ``errors`` says every reason."""

    def __init__(self, errors: list[PlaybookError]) -> None:
        super().__init__("\n".join(str(e) for e in errors))
        self.errors = errors


@dataclass(frozen=True)
class PlaybookSet:
    """The playbooks in force: looked up by trigger, highest priority first."""

    playbooks: tuple[Playbook, ...]
    templates: TemplateCatalogue
    fingerprint: str
    directory: str
    _by_signal: dict[str, tuple[Playbook, ...]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        by_signal: dict[str, list[Playbook]] = {}
        for p in self.playbooks:
            if p.spec.enabled and p.signal is not None:
                by_signal.setdefault(p.signal, []).append(p)
        for name, items in by_signal.items():
            items.sort(key=lambda p: (-p.spec.priority, p.name))
            self._by_signal[name] = tuple(items)

    def for_signal(self, signal: str) -> tuple[Playbook, ...]:
        return self._by_signal.get(signal, ())

    def scheduled(self) -> tuple[Playbook, ...]:
        return tuple(p for p in self.playbooks if p.spec.enabled and p.renewal_in_days is not None)

    def get(self, name: str) -> Playbook | None:
        return next((p for p in self.playbooks if p.name == name), None)

    def dunning(self) -> tuple[Playbook, ...]:
        return tuple(p for p in self.playbooks if p.is_dunning)


# -- YAML with positions ----------------------------------------------------------------


class _Located:
    """Plain Python data from a YAML document plus the line of every path in it."""

    def __init__(self) -> None:
        self.lines: dict[Loc, int] = {}

    def line_of(self, loc: Loc) -> int | None:
        """The line of ``loc``, or of its nearest enclosing path that has one."""
        for end in range(len(loc), -1, -1):
            line = self.lines.get(loc[:end])
            if line is not None:
                return line
        return None


class _YamlProblem(ValueError):
    def __init__(self, line: int | None, loc: Loc, message: str) -> None:
        super().__init__(message)
        self.line, self.loc, self.message = line, loc, message


def _read_yaml(text: str) -> tuple[Any, _Located]:
    located = _Located()
    loader = yaml.SafeLoader(text)
    try:
        try:
            node = loader.get_single_node()
        except yaml.MarkedYAMLError as exc:
            if "another document" in str(exc.problem):
                raise _YamlProblem(
                    exc.problem_mark.line + 1 if exc.problem_mark else None,
                    (),
                    "one playbook per file: found a second YAML document",
                ) from None
            mark = exc.problem_mark or exc.context_mark
            problem = exc.problem or str(exc)
            raise _YamlProblem(
                mark.line + 1 if mark else None, (), f"invalid YAML: {problem}"
            ) from None
        if node is None:
            return None, located

        def build(n: yaml.Node, loc: Loc) -> Any:
            located.lines.setdefault(loc, n.start_mark.line + 1)
            if isinstance(n, yaml.MappingNode):
                out: dict[str, Any] = {}
                for key_node, value_node in n.value:
                    key = loader.construct_object(key_node, deep=True)
                    if not isinstance(key, str):
                        raise _YamlProblem(
                            key_node.start_mark.line + 1, loc, f"key {key!r} is not a string"
                        )
                    if key in out:
                        raise _YamlProblem(
                            key_node.start_mark.line + 1,
                            (*loc, key),
                            "duplicate key (YAML would keep only the last)",
                        )
                    located.lines[(*loc, key)] = key_node.start_mark.line + 1
                    out[key] = build(value_node, (*loc, key))
                return out
            if isinstance(n, yaml.SequenceNode):
                return [build(item, (*loc, i)) for i, item in enumerate(n.value)]
            return loader.construct_object(n, deep=True)

        return build(node, ()), located
    finally:
        loader.dispose()


def format_loc(loc: Iterable[str | int]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + part
    return out


# -- one file -------------------------------------------------------------------------


class _FileChecker:
    """Checks one playbook file, collecting errors with their lines."""

    def __init__(self, path: Path, display: str, templates: TemplateCatalogue) -> None:
        self.path = path
        self.display = display
        self.templates = templates
        self.errors: list[PlaybookError] = []
        self.located = _Located()

    def error(self, loc: Loc, message: str, line: int | None = None) -> None:
        self.errors.append(
            PlaybookError(self.display, line or self.located.line_of(loc), format_loc(loc), message)
        )

    def pydantic_errors(self, exc: ValidationError, prefix: Loc = ()) -> None:
        for err in exc.errors():
            loc: Loc = (*prefix, *err["loc"])
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                msg = "unknown key"
            # a model's own checks say which of its fields they mean ("retry_schedule.x: ...")
            pointed = _POINTED.match(msg) if err["type"] == "value_error" else None
            if pointed is not None:
                loc = (*loc, *pointed.group(1).split("."))
                msg = pointed.group(2)
            self.error(loc, msg)

    def check(self, text: str) -> Playbook | None:
        try:
            raw, self.located = _read_yaml(text)
        except _YamlProblem as exc:
            self.error(exc.loc, exc.message, line=exc.line)
            return None
        if not isinstance(raw, dict):
            self.error((), "a playbook file holds one mapping (name, trigger, actions, ...)")
            return None
        try:
            spec = PlaybookSpec.model_validate(raw)
        except ValidationError as exc:
            self.pydantic_errors(exc)
            return None
        signal = spec.trigger.signal
        if signal is not None and signal not in SIGNALS:
            self.error(
                ("trigger", "signal"),
                f"unknown signal type {signal!r}; known: {', '.join(sorted(SIGNALS))}",
            )
            return None
        known = fields_for(signal)
        try:
            conditions = parse(spec.conditions, known)
        except ConditionError as exc:
            self.error(exc.path, exc.message)
            conditions = ALWAYS
        for i, name in enumerate(spec.dedupe_by):
            if name not in known:
                self.error(("dedupe_by", i), f"unknown field {name!r}")
        actions: list[Action] = []
        action_conditions = []
        refs: list[dict[str, str]] = []
        for i, raw_action in enumerate(spec.actions):
            parsed = self._action(i, raw_action, known)
            if parsed is None:
                continue
            action, condition, action_refs = parsed
            actions.append(action)
            action_conditions.append(condition)
            refs.append(action_refs)
        dunning = [a for a in actions if isinstance(a, DunningSpec)]
        if dunning and signal != "payment_failed":
            self.error(
                ("trigger", "signal"), "a dunning action needs trigger signal payment_failed"
            )
        if len(dunning) > 1:
            self.error(("actions",), "at most one dunning action per playbook")
        if self.errors:
            return None
        return Playbook(
            spec=spec,
            conditions=conditions,
            actions=tuple(actions),
            action_conditions=tuple(action_conditions),
            source=self.display,
            version=hashlib.sha256(text.encode()).hexdigest()[:12],
            variable_refs=tuple(refs),
        )

    def _action(
        self, i: int, raw: dict[str, Any], known: Mapping[str, Any]
    ) -> tuple[Action, Any, dict[str, str]] | None:
        loc: Loc = ("actions", i)
        kind = raw.get("type")
        if kind not in (*CHANNELS, "dunning"):
            self.error(
                (*loc, "type"),
                f"unknown action type {kind!r}; one of {', '.join((*CHANNELS, 'dunning'))}",
            )
            return None
        try:
            action: Action = (
                DunningSpec.model_validate(raw)
                if kind == "dunning"
                else MessageSpec.model_validate(raw)
            )
        except ValidationError as exc:
            self.pydantic_errors(exc, loc)
            return None
        if isinstance(action, DunningSpec):
            for key in ("notice", "card_update", "final_notice"):
                message = getattr(action, key)
                if message is not None:
                    self._message(
                        (*loc, key), message, message.type, message.template, {}, dunning=True
                    )
            return action, ALWAYS, {}
        condition: Condition = ALWAYS
        try:
            condition = parse(action.if_, known, (*loc, "if"))
        except ConditionError as exc:
            self.error(exc.path, exc.message)
        refs: dict[str, str] = {}
        for name, value in action.variables.items():
            if isinstance(value, str) and value.startswith("$"):
                ref = value[1:]
                if ref not in known:
                    self.error((*loc, "variables", name), f"unknown field {ref!r} in {value!r}")
                refs[name] = ref
        self._message(loc, action, action.type, action.template, action.variables, dunning=False)
        return action, condition, refs

    def _message(
        self,
        loc: Loc,
        message: MessageSpec | DunningMessageSpec,
        channel: str,
        template_name: str,
        variables: Mapping[str, Any],
        *,
        dunning: bool,
    ) -> None:
        template = self.templates.get(template_name)
        if template is None:
            self.error(
                (*loc, "template"),
                f"unknown template {template_name!r}"
                + catalogue_hint(template_name, self.templates),
            )
        else:
            if channel not in template.channels:
                self.error(
                    (*loc, "template"),
                    f"template {template_name!r} is for {', '.join(template.channels)}, "
                    f"not {channel}",
                )
            filled = set(MESSAGE_VARIABLES) | (set(DUNNING_VARIABLES) if dunning else set())
            missing = sorted(template.variables - filled - set(variables))
            if missing:
                # at the action's variables if it has some, else at its template
                at = (*loc, "variables")
                self.error(
                    at if at in self.located.lines else (*loc, "template"),
                    f"template {template_name!r} needs {', '.join(missing)}; "
                    "set them under variables (e.g. feature: $guide_feature)",
                )
            for name in sorted(set(variables) - template.accepted):
                self.error(
                    (*loc, "variables", name),
                    f"template {template_name!r} takes no variable {name!r} (it takes "
                    f"{', '.join(sorted(template.accepted))})",
                )
        self._recipient((*loc, "to"), channel, message.to)
        if message.fallback is not None:
            self._recipient((*loc, "fallback"), channel, message.fallback, literal_only=True)

    def _recipient(self, loc: Loc, channel: str, to: str, literal_only: bool = False) -> None:
        keywords = KEYWORDS_BY_CHANNEL[channel]
        if to in RECIPIENTS:
            if literal_only:
                self.error(loc, "a fallback is a literal recipient, not a keyword")
            elif to not in keywords:
                suits = ", ".join(sorted(keywords)) or "no keyword"
                self.error(loc, f"{to!r} does not suit {channel} (takes {suits}, or a literal)")
            return
        if channel == "email" and not _EMAIL.match(to):
            self.error(
                loc, f"{to!r} is neither an email address nor one of admins, contacts, respondent"
            )
        if channel == "slack" and not _SLACK_LITERAL.match(to):
            self.error(
                loc,
                f"{to!r} is not a Slack recipient (#channel, @user or an id) nor csm/owner",
            )


def catalogue_hint(name: str, templates: Mapping[str, Any]) -> str:
    import difflib

    close = difflib.get_close_matches(name, list(templates), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


# -- templates ---------------------------------------------------------------------------


def _load_templates(path: Path, display: str, into: dict[str, Template]) -> list[PlaybookError]:
    errors: list[PlaybookError] = []
    try:
        raw, located = _read_yaml(path.read_text())
    except _YamlProblem as exc:
        return [PlaybookError(display, exc.line, format_loc(exc.loc), exc.message)]
    if (
        not isinstance(raw, dict)
        or not isinstance(raw.get("templates"), dict)
        or set(raw) != {"templates"}
    ):
        return [PlaybookError(display, 1, "templates", "expected `templates:` mapping name → spec")]
    for name, spec in raw["templates"].items():
        loc: Loc = ("templates", name)
        if not isinstance(spec, dict):
            errors.append(
                PlaybookError(display, located.line_of(loc), format_loc(loc), "a mapping")
            )
            continue
        unknown = set(spec) - {"channels", "variables", "optional", "description"}
        for key in sorted(unknown):
            errors.append(
                PlaybookError(
                    display, located.line_of((*loc, key)), format_loc((*loc, key)), "unknown key"
                )
            )
        channels = spec.get("channels")
        if (
            not isinstance(channels, list)
            or not channels
            or any(c not in CHANNELS for c in channels)
        ):
            errors.append(
                PlaybookError(
                    display,
                    located.line_of((*loc, "channels")),
                    format_loc((*loc, "channels")),
                    f"a list of channels out of {', '.join(CHANNELS)}",
                )
            )
            continue
        names: dict[str, list[str]] = {}
        for key in ("variables", "optional"):
            value = spec.get(key, [])
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                errors.append(
                    PlaybookError(
                        display,
                        located.line_of((*loc, key)),
                        format_loc((*loc, key)),
                        "a list of variable names",
                    )
                )
                value = []
            names[key] = value
        into[name] = Template(
            name,
            tuple(channels),
            frozenset(names["variables"]),
            frozenset(names["optional"]),
            str(spec.get("description", "")),
        )
    return errors


def load_templates(directory: Path | None) -> tuple[dict[str, Template], list[PlaybookError]]:
    """The shipped templates, plus (overridden by) the folder's ``templates.yaml``."""
    templates: dict[str, Template] = {}
    errors = _load_templates(SHIPPED_TEMPLATES, str(SHIPPED_TEMPLATES.name), templates)
    if directory is not None:
        own = directory / TEMPLATES_FILE
        if own.exists() and own.resolve() != SHIPPED_TEMPLATES:
            errors += _load_templates(own, _display(own, directory), templates)
    return templates, errors


# -- the folder ---------------------------------------------------------------------------


def playbook_files(directory: Path) -> list[Path]:
    files = [*directory.glob("*.yaml"), *directory.glob("*.yml")]
    return sorted(p for p in files if p.name != TEMPLATES_FILE and not p.name.startswith("."))


def _display(path: Path, directory: Path) -> str:
    return str(directory / path.name) if path.parent == directory else str(path)


def fingerprint(directory: Path) -> str:
    """Changes when any playbook or template file is added, removed or edited."""
    digest = hashlib.sha256()
    for path in sorted([*playbook_files(directory), directory / TEMPLATES_FILE]):
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            continue
        digest.update(path.name.encode() + b"\0" + hashlib.sha256(data).digest())
    return digest.hexdigest()


def load_dir(directory: Path) -> PlaybookSet:
    """Every playbook of the folder, validated; :class:`PlaybookSetInvalid` lists all errors."""
    if not directory.is_dir():
        raise PlaybookSetInvalid(
            [PlaybookError(str(directory), None, "", "not a folder of playbook YAML files")]
        )
    before = fingerprint(directory)
    templates, errors = load_templates(directory)
    playbooks: list[Playbook] = []
    seen: dict[str, str] = {}
    for path in playbook_files(directory):
        display = _display(path, directory)
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            errors.append(PlaybookError(display, None, "", f"cannot read: {exc}"))
            continue
        checker = _FileChecker(path, display, templates)
        playbook = checker.check(text)
        errors += checker.errors
        if playbook is None:
            continue
        if playbook.name in seen:
            errors.append(
                PlaybookError(
                    display,
                    checker.located.line_of(("name",)),
                    "name",
                    f"{playbook.name!r} is already the name of {seen[playbook.name]}",
                )
            )
            continue
        seen[playbook.name] = display
        playbooks.append(playbook)
    if errors:
        raise PlaybookSetInvalid(errors)
    if not playbooks:
        raise PlaybookSetInvalid(
            [PlaybookError(str(directory), None, "", "no playbooks (*.yaml) in the folder")]
        )
    return PlaybookSet(tuple(playbooks), templates, before, str(directory))


__all__ = [
    "PlaybookError",
    "PlaybookSet",
    "PlaybookSetInvalid",
    "catalogue",
    "fingerprint",
    "load_dir",
]
