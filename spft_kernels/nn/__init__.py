"""Layers: drop-in ``nn.Linear`` replacements with a frozen W0 and something small that trains, one
file per position kind (``sparse_delta_linear.py`` entries, ``row_sparse_linear.py`` rows,
``block_sparse_linear.py`` blocks, ``pst_linear.py`` PST) on one base (``base.py``; the delta
kinds' modes in ``delta_layer.py``), the registry of kinds (``registry.py``) and the kinds of
frozen base (``frozen_base.py``: dense; ``bnb_base.py``: bitsandbytes 4-bit and 8-bit). Imports
only ``ops``.

Importing this package registers the built-in kinds, in this order (the default kind of a
conversion config is the first that serves it)."""

from . import sparse_delta_linear, row_sparse_linear, block_sparse_linear, pst_linear  # noqa: F401  (register)
from . import bnb_base  # noqa: F401  (registers the quantized base kinds)
