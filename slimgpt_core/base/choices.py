"""Names the user lists (comma separated or as a list), checked against the known ones."""
from __future__ import annotations

from typing import Collection

from slimgpt_core.base.errors import SlimGPTError


def parse_choices(text: str | list[str], known: Collection[str], what: str) -> list[str]:
    """The names in `text`, each one of `known`; one sentence naming the choices otherwise (or when none is given)."""
    names = [t.strip() for t in (text.split(",") if isinstance(text, str) else text) if t.strip()]
    unknown = [t for t in names if t not in known]
    if unknown or not names:
        raise SlimGPTError(f"unknown {what}(s) {', '.join(unknown) or '(none)'}: choose from {', '.join(known)}")
    return names
