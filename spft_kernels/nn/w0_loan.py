"""A merged layer's state dict without a copy of the weight: W0 is *lent* from the weight itself.

A merged layer's weight holds ``W_eff = W0 + Δ``, but its state dict must hold W0 (the contract:
the state dict does not depend on the mode). Cloning the weight to rebuild W0 allocates a whole
out x in tensor per layer: 12.06 GiB for Llama-2-7B, at every checkpoint the Trainer writes.
Instead, ``state_dict()`` writes W0 back into the trained positions of the weight (O(nnz), exact:
W0 at those positions is kept aside) and hands out a detached view of the weight. While any such
view is alive the layer is *on loan*: it stays merged (W0 at the positions stays aside) but
never writes ``W0 + Δ`` into the weight, and its forward computes the split form
``x W0ᵀ + x Δᵀ`` (exact; the same values up to rounding). When the last view is freed (the
Trainer drops its state dict right after writing it) a finalizer ends the loan and the next
forward re-syncs the positions (O(nnz)). Until then the weight itself (and the linear the layer
was built from, which shares it) holds W0 at the trained positions: ``merged_weight()``,
``to_linear()``, ``merge()`` and every forward see W0 + Δ as before. A layer not merged yet that
would merge at its next forward (mode merged, or auto) lends its weight the same way, so that a
state dict taken right after conversion and held across the first steps keeps W0.

Why this and not the alternatives:

- unmerge on save and re-merge on the next forward would leave a ``torch.compile``d model in the
  split form for good (merging installs module state, which a traced graph must not do), and the
  re-merge would overwrite a state dict that is still held;
- writing ``W0 + Δ`` back right after saving (or lazily, under the caller's feet) would change a
  state dict that the caller still holds, silently;
- a tensor subclass or a lazily materialised W0 breaks every consumer that reads storage directly
  (safetensors, ``torch.save``, FSDP's state-dict hooks).

The finalizer only flips a counter and a flag (safe at any point, even inside a forward); the
writes happen in the layer's own forward or merge. The loan is what a compiled forward sees (a
counter Dynamo guards on); the eager forward also asks the base whether anything else holds the
weight's storage before it writes (``frozen_base.py``, ``observers``), which covers what outlives
the state dict's tensors: a numpy array, a storage object, a view. A state dict taken between a forward and its
backward bumps the weight's version counter, so that backward fails loudly instead of computing
dx with the wrong weight. Under FSDP the merged mode is off (``auto`` computes split), so
nothing is lent. A deep copy or pickle of a layer does not inherit the loan.
"""

from __future__ import annotations

import weakref

import torch


# Loans made / loans after which the garbage collector ran (see W0Loans.settled).
_lent = 0
_collected_after = -1


class W0Loans:
    """Counts the live tensors that share a merged layer's weight while it holds W0."""

    def __init__(self) -> None:
        self._live = 0

    @property
    def active(self) -> bool:
        return self._live > 0

    def settled(self) -> bool:
        """``active``, after one garbage collection per new loan, process-wide: a state dict left in
        a reference cycle (transformers' saving code leaves some) would otherwise keep every layer
        in the split form until the collector happens to run. One ``gc.collect()`` per
        ``state_dict()`` call, at the first forward after it; never while tracing."""
        global _collected_after
        if self._live > 0 and _collected_after != _lent and not torch.compiler.is_compiling():
            import gc

            _collected_after = _lent
            gc.collect()
        return self._live > 0

    def lend(self, weight: torch.Tensor) -> torch.Tensor:
        """A detached view of ``weight`` (which must hold W0 now); the loan lasts while it lives."""
        global _lent
        view = weight.detach()
        self._live += 1
        _lent += 1
        weakref.finalize(view, W0Loans._return, weakref.ref(self))
        return view

    @staticmethod
    def _return(loans_ref) -> None:
        loans = loans_ref()
        if loans is not None:
            loans._live -= 1

    def __deepcopy__(self, memo) -> "W0Loans":
        # A copied layer owns a new weight that no state dict shares.
        return W0Loans()

    def __getstate__(self) -> dict:
        return {"_live": 0}
