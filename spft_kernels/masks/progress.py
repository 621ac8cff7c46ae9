"""Progress bars for long work (calibration, selection, conversion), shown where someone watches.

``progress=None`` (every public default) resolves to: the ``SPFT_PROGRESS`` environment variable
when set (``1`` always, ``0`` never: CI logs and tests stay clean unless asked), else a bar when
stderr is a terminal or the code runs in a Jupyter kernel (where stderr is no terminal but the
bar renders as a widget). Such bars appear only after ``DELAY_S`` seconds, so quick work on a
small model prints nothing at all; ``progress=True`` shows one at once.
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Callable, Iterable, Optional

# A bar for anything that takes longer than this; the 189 s calibration of a 22M-parameter
# encoder that ran silently shows one, a 0.1 s selection on a test model does not.
DELAY_S = 2.0


def wanted(progress: Optional[bool]) -> bool:
    """Resolves a ``progress`` argument (``None``: environment, terminal or notebook)."""
    if progress is not None:
        return bool(progress)
    setting = os.environ.get("SPFT_PROGRESS", "").strip()
    if setting in ("0", "1"):
        return setting == "1"
    if "ipykernel" in sys.modules:
        return True
    stream = sys.stderr
    return stream is not None and hasattr(stream, "isatty") and stream.isatty()


def _delay(progress: Optional[bool]) -> float:
    """Seconds before a bar shows: none when asked for explicitly."""
    return 0.0 if progress is True else DELAY_S


def progress_bar(iterable: Iterable, *, desc: str, unit: str, total: Optional[int] = None,
                 progress: Optional[bool] = None):
    """``tqdm(iterable)`` when wanted (see ``wanted``), else ``iterable`` itself."""
    if not wanted(progress):
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, unit=unit, delay=_delay(progress), file=sys.stderr,
                dynamic_ncols=True)


class ProgressCounter:
    """Advances a bar (or nothing): ``tick()`` once per step, ``wrap(fn)`` once per call of ``fn``."""

    def __init__(self, bar=None):
        self.bar = bar

    def tick(self, steps: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(steps)

    def wrap(self, fn: Callable) -> Callable:
        if self.bar is None:
            return fn

        def counted(*args, **kwargs):
            result = fn(*args, **kwargs)
            self.tick()
            return result

        return counted


@contextlib.contextmanager
def counting(total: int, *, desc: str, unit: str, progress: Optional[bool] = None):
    """A bar of ``total`` steps, advanced by the yielded counter's ``tick()`` or ``wrap(fn)``
    (e.g. the layer maker of a conversion)."""
    if not wanted(progress) or total <= 0:
        yield ProgressCounter()
        return
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=desc, unit=unit, delay=_delay(progress), file=sys.stderr, dynamic_ncols=True)
    try:
        yield ProgressCounter(bar)
    finally:
        bar.close()
