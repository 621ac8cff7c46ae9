"""JSON read from files (adapter configs, adapter metadata): any nesting gives a ``ValueError``,
never a ``RecursionError`` from the decoder or from whatever walks the result afterwards."""

from __future__ import annotations

import json
from typing import Any

# The configs spft and peft write nest 3 levels (config -> field -> list of names); 64 leaves
# room for hand-written ones and stays far below Python's recursion limit (1000 frames).
MAX_DEPTH = 64


def loads_json(text) -> Any:
    """``json.loads(text)``; ``ValueError`` for invalid JSON and for nesting deeper than
    ``MAX_DEPTH`` levels of arrays and objects."""
    try:
        data = json.loads(text)
    except RecursionError:
        data = None
        too_deep = True
    else:
        too_deep = _deeper_than(data, MAX_DEPTH)
    if too_deep:
        raise ValueError(f"JSON nested deeper than {MAX_DEPTH} levels of arrays and objects")
    return data


def _deeper_than(data: Any, limit: int) -> bool:
    """Whether arrays and objects nest more than ``limit`` levels (walked without recursion)."""
    stack = [(data, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, (dict, list)):
            if depth > limit:
                return True
            stack.extend((child, depth + 1) for child in (value.values() if isinstance(value, dict) else value))
    return False
