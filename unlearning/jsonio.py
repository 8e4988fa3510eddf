"""JSON read strictly, without torch (the service's settings and API import it too)."""
from __future__ import annotations

import json
import math
from typing import Any


class RepeatedName(ValueError):
    """A JSON object that gives a name twice (:func:`no_repeated_names`)."""


def no_repeated_names(pairs: list[tuple[str, object]]) -> dict:
    """``json.loads``' ``object_pairs_hook`` for objects whose names are unique: it keeps the
    last of a repeated name, while another reader may keep the first. An UNLEARND_API_KEYS
    naming a key twice lost the first entry (its token a 401) silently; a request body with
    two ``instance_id`` values, a manifest with two ``sha256`` fields or a certificate with
    two ``model`` fields would be read otherwise elsewhere."""
    seen: dict[str, object] = {}
    for name, value in pairs:
        if name in seen:
            raise RepeatedName(f"the name {name!r} is given twice in one object; give each name once")
        seen[name] = value
    return seen


def loads_strict(text: str | bytes) -> Any:
    """``json.loads`` with :func:`no_repeated_names` (a :class:`RepeatedName`, a ValueError)."""
    return json.loads(text, object_pairs_hook=no_repeated_names)


def finite_json(value: Any) -> Any:
    """``value`` as strict JSON can carry it: NaN and infinities (a degenerate evaluation, a
    diverged head), also inside dicts, lists and tuples, become None."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_json(v) for v in value]
    return value
