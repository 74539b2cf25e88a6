"""Settings fields that are also command-line options. Every settings dataclass (a prune's, a method's, a training
run's) declares its fields with `option`, and the command line's parser builds its options from that metadata, so a
flag, its help and its default are written once, beside the field, in modules that import nothing heavy."""
from __future__ import annotations

from dataclasses import MISSING, field


def option(default, flag: str, help: str, kind: str | None = None, choices=None, negate: bool = False,
           aliases: tuple[str, ...] = (), metavar: str | None = None, flag_default=MISSING, read: str | None = None):
    """A settings field with a command-line flag. `kind` names the parser's converter (ratio, positive, floats, ints,
    float, int, align); a bool is a switch (`negate`: the flag turns the field off). `flag_default`: what the flag
    holds when not given, where that is text the field reads differently (e.g. "q,k,v" for a list); `read` names
    how the flag's value becomes the field's (names: a comma-separated list; name_or_none, names_or_none: "none"
    means no value). A list default is copied for each instance."""
    cli = {"flag": flag, "help": help, "kind": kind, "choices": choices, "negate": negate, "aliases": aliases,
           "metavar": metavar, "flag_default": flag_default, "read": read}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"cli": cli})
    return field(default=default, metadata={"cli": cli})
