"""Silences the warnings that spft-bench's own, deliberate calls trigger in other libraries, and
nothing else: each filter matches one message, and only inside ``known_noise()`` (never a global
filter, so a user's own code still sees every warning).

- torch: measuring a step under ``FakeTensorMode`` (``spft-bench --memory``) reads a fake
  tensor's data pointer where torch does so itself (``torch.utils._device``), which warns that
  this "will error in PyTorch 2.5"; the estimate is exact regardless (checked against real
  tensors by python_tests/bench/test_memory_estimate.py).
- transformers: peft's ``get_peft_model`` calls ``is_gradient_checkpointing``, deprecated in
  transformers 5 (a FutureWarning per LoRA baseline).
- torch, through peft's SHiRA baseline (``shira-peft``), which builds a sparse COO tensor each
  forward: "Sparse invariant checks are implicitly disabled" (once a process); the baseline is
  timed as peft ships it.
- bitsandbytes (imported by peft): logs at import that its optional CPU 4-bit kernel package
  ``kernels`` is missing; spft-bench never runs 4-bit kernels.
"""

from __future__ import annotations

import contextlib
import logging
import warnings

KNOWN_WARNINGS = (
    (UserWarning, r"Accessing the data pointer of FakeTensor is deprecated"),
    (FutureWarning, r"`is_gradient_checkpointing` is deprecated"),
    (UserWarning, r"Sparse invariant checks are implicitly disabled"),
)
QUIET_LOGGERS = ("bitsandbytes",)


@contextlib.contextmanager
def known_noise():
    with warnings.catch_warnings():
        for category, message in KNOWN_WARNINGS:
            warnings.filterwarnings("ignore", message=message, category=category)
        loggers = [logging.getLogger(name) for name in QUIET_LOGGERS]
        levels = [logger.level for logger in loggers]
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for logger, level in zip(loggers, levels):
                logger.setLevel(level)
