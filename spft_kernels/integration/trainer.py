"""Adapter-sized checkpoints with the transformers ``Trainer`` (as peft's are).

A plain ``Trainer`` saves through the model's ``save_pretrained``, which on a converted model
writes the adapter folder (``pretrained.py``), not W0 (about 13 GB for Llama-2-7B at every
checkpoint, for a few hundred MB of deltas), but it cannot resume from that folder.
:class:`SpftTrainerMixin` changes only how the model is saved and loaded: ``save_model``
(every checkpoint, and ``trainer.save_model()``) writes ``spft_adapter.safetensors``
(``save_adapter``: deltas, positions, ``modules_to_save``; the base's fingerprint) plus the
model config, and resuming
(``train(resume_from_checkpoint=...)``, ``load_best_model_at_end``) loads it back with
``load_adapter``, which checks that the base is the same. Optimizer, scheduler and RNG states are
the Trainer's own, as before (its optimizer state is the deltas' only).

    from spft_kernels import SpftTrainer           # = SpftTrainerMixin + transformers.Trainer
    trainer = SpftTrainer(model=model, args=args, train_dataset=data)
    # a Trainer subclass (e.g. TRL's SFTTrainer): class MyTrainer(SpftTrainerMixin, SFTTrainer): pass
    # TRL's DPOTrainer with ref_model=None: the reference is the policy with its adapter disabled
    # (reference_model.py), as with peft: class DPO(SpftTrainerMixin, DPOTrainer): pass

Under FSDP the adapter is gathered on every rank and rank 0 writes it (``save_adapter``'s
contract); DeepSpeed ZeRO-3 is not supported (the deltas are partitioned there). Importing this
module imports transformers, so ``import spft_kernels`` does it only when ``SpftTrainer`` or
``SpftTrainerMixin`` is first used.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import transformers

from .adapter.load import load_adapter
from .adapter.save import save_adapter
from .reference_model import with_disabled_adapter_reference

ADAPTER_FILE = "spft_adapter.safetensors"


class SpftTrainerMixin:
    """Put before a ``transformers.Trainer`` (sub)class: checkpoints hold the adapter, not W0. For a
    trainer with a reference model (TRL's ``DPOTrainer``), ``ref_model=None`` means the policy with
    its adapter disabled, as with peft (``reference_model.py``)."""

    def __init__(self, *args, **kwargs) -> None:
        args, kwargs = with_disabled_adapter_reference(super().__init__, args, kwargs)
        super().__init__(*args, **kwargs)

    def save_model(self, output_dir: Optional[str] = None, _internal_call: bool = False) -> None:
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        model = self.accelerator.unwrap_model(self.model)
        if self.args.should_save:
            os.makedirs(output_dir, exist_ok=True)
        save_adapter(model, os.path.join(output_dir, ADAPTER_FILE))  # every rank: FSDP gathers
        if not self.args.should_save:
            return
        config = getattr(model, "config", None)
        if hasattr(config, "save_pretrained"):
            config.save_pretrained(output_dir)
        processing = self.processing_class
        if processing is not None and hasattr(processing, "save_pretrained"):
            processing.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, transformers.trainer.TRAINING_ARGS_NAME))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        path = os.path.join(resume_from_checkpoint, ADAPTER_FILE)
        if not os.path.isfile(path):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        load_adapter(self.accelerator.unwrap_model(model if model is not None else self.model), path)

    def _load_best_model(self) -> None:
        path = os.path.join(self.state.best_model_checkpoint or "", ADAPTER_FILE)
        if not os.path.isfile(path):
            return super()._load_best_model()
        load_adapter(self.accelerator.unwrap_model(self.model), path)


class SpftTrainer(SpftTrainerMixin, transformers.Trainer):
    """``transformers.Trainer`` with adapter-sized checkpoints (:class:`SpftTrainerMixin`)."""
