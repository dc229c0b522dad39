"""Options declared once: each settings field carries its flags, its check and how its value is
read from the parsed flags; the `peer` parser and the settings are generated from them. Torch-free,
so that `peer --help` and the parse before torch loads stay fast."""

import argparse
import dataclasses
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

Check = Callable[[str, Any], None]  # (field name, value) -> None, or ValueError naming the value
Read = Callable[[argparse.Namespace], Any]  # the field's value from all the parsed flags


class FieldDefault:
    """A flag's default where the flag takes its field's (or, without a field, none)."""

    def __repr__(self) -> str:
        return "FIELD_DEFAULT"


FIELD_DEFAULT = FieldDefault()


@dataclass(frozen=True)
class Flag:
    """One command-line flag (or positional) as argparse takes it."""

    name: str  # "--port", or a positional's name
    help: str | None = None
    default: Any = FIELD_DEFAULT
    type: Callable[[str], Any] | None = None  # None: from the field's type (int, float), else text
    choices: Sequence[str] | None = None
    metavar: str | None = None
    nargs: str | None = None
    action: str | None = None
    const: Any = None

    @property
    def dest(self) -> str:
        return self.name.lstrip("-").replace("-", "_")

    @property
    def many(self) -> bool:
        """Whether the flag gathers a list (read into a tuple)."""
        return self.action == "append" or self.nargs in ("+", "*")

    def add_to(self, parser: argparse.ArgumentParser) -> None:
        kwargs = {
            "help": self.help,
            "type": self.type,
            "choices": list(self.choices) if self.choices is not None else None,
            "metavar": self.metavar,
            "nargs": self.nargs,
            "action": self.action,
            "const": self.const,
        }
        kwargs = {key: value for key, value in kwargs.items() if value is not None}
        if self.default is not FIELD_DEFAULT and self.action != "store_true":
            kwargs["default"] = self.default
        parser.add_argument(self.name, **kwargs)


def option(default: Any, *flags: Flag, check: Check | None = None, read: Read | None = None) -> Any:
    """A settings field with its flags (the first is its own, more are read by `read`), its
    check and its reading; a bool field defaulting to True is set off by a --no-... flag."""
    return dataclasses.field(default=default, metadata={"flags": flags, "check": check, "read": read})


def settings(factory: Callable[..., Any], flags: Mapping[str, Flag]) -> Any:
    """A field holding nested settings (another module's dataclass): `flags` maps its fields to
    flags, each declaring its default, so that building the parser never imports the dataclass."""
    return dataclasses.field(default_factory=factory, metadata={"settings": (factory, flags)})


def field_type(field: dataclasses.Field) -> type | None:
    """The argparse type of a field: int or float (optional or not), else None (text)."""
    kinds = [kind for kind in typing.get_args(field.type) or (field.type,) if kind is not type(None)]
    return kinds[0] if kinds and kinds[0] in (int, float) else None


def switch(field: dataclasses.Field) -> bool:
    """Whether a bool field is set by a flag alone (store_true, or --no-... for a True default)."""
    return field.type is bool


def own_flag(field: dataclasses.Field, flag: Flag) -> Flag:
    """A field's own flag completed from the field: a switch, or its type and default."""
    if switch(field):
        return dataclasses.replace(flag, action="store_true")
    changes = {}
    if flag.type is None and flag.action is None:
        changes["type"] = field_type(field)
    if flag.default is FIELD_DEFAULT and not flag.many:  # a list flag starts empty (None)
        changes["default"] = field.default
    return dataclasses.replace(flag, **changes)


def config_flags(cls: type) -> list[Flag]:
    """Every flag of a settings dataclass, in field order, those of nested settings inline."""
    flags = []
    for field in dataclasses.fields(cls):
        if "settings" in field.metadata:
            flags += field.metadata["settings"][1].values()
        for i, flag in enumerate(field.metadata.get("flags", ())):
            flags.append(own_flag(field, flag) if i == 0 else flag)
    return flags


def config_flag(cls: type, name: str) -> Flag:
    """The flag `name` of a settings dataclass, to share with another subcommand."""
    (flag,) = [flag for flag in config_flags(cls) if flag.name == name]
    return flag


def add_flags(parser: argparse.ArgumentParser, flags: Iterable[Flag]) -> None:
    """Add flags to a parser, in order."""
    for flag in flags:
        flag.add_to(parser)


def read_config(cls: type, args: argparse.Namespace) -> dict[str, Any]:
    """The keyword arguments of `cls` from the flags its fields declare."""
    values = {}
    for field in dataclasses.fields(cls):
        if "settings" in field.metadata:
            factory, flags = field.metadata["settings"]
            values[field.name] = factory(**{name: getattr(args, flag.dest) for name, flag in flags.items()})
        elif field.metadata.get("read"):
            values[field.name] = field.metadata["read"](args)
        elif field.metadata.get("flags"):
            flag = field.metadata["flags"][0]
            value = getattr(args, flag.dest)
            if switch(field) and field.default is True:
                value = not value  # --no-...
            values[field.name] = tuple(value or ()) if flag.many else value
    return values


def check_fields(settings_object: Any) -> None:
    """Run the check each field declares, in field order."""
    for field in dataclasses.fields(settings_object):
        check = field.metadata.get("check")
        if check is not None:
            check(field.name, getattr(settings_object, field.name))


def positive(name: str, value: float) -> None:
    if value <= 0:
        raise ValueError(f"{name} must be positive, got {value}")


def at_least(low: int) -> Check:
    """A count of at least `low` (None passes: chosen later)."""

    def check(name: str, value: int | None) -> None:
        if value is not None and value < low:
            raise ValueError(f"{name} must be >= {low}, got {value}")

    return check


def one_of(choices: Sequence[str]) -> Check:
    def check(name: str, value: str) -> None:
        if value not in choices:
            raise ValueError(f"{name} must be one of {', '.join(choices)}, got {value!r}")

    return check
