"""Ops: one file per op (torch.library custom op, its backends and autograd together), the
reference math (``naive.py``), the index format, backend dispatch and the extension/Triton loaders.
Nothing here imports from the other folders of the package."""
