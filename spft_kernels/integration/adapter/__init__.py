"""Adapter files: saving (``save.py``), reading and checking (``read.py``), loading into a model
(``load.py``), summing several (``merge.py``), peft-style folders (``folder.py``), peft's SHiRA
format both ways (``peft_shira.py``, ``from_peft.py``), the file format itself (``format.py``) and
the file-system helpers they share (``files.py``). What each layer kind stores is the kind's own
(its ``adapter_payload`` / ``read_adapter_payload``, ``spft_kernels/nn``)."""
