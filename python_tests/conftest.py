import math
import os

import torch

# Without a GPU the Triton kernels run in Triton's interpreter; it must be chosen before
# spft_kernels (and so triton.jit) is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# The CUDA extension fills the outputs it allocates with NaN before its kernels run (read once,
# at the first op), so a kernel that leaves part of its output unwritten fails the comparisons
# instead of passing on a recycled allocator block that happened to hold the right values.
os.environ.setdefault("SPFT_POISON_OUTPUTS", "1")

import pytest  # noqa: E402

import spft_kernels as spft  # noqa: E402
from spft_kernels.ops._triton import interpreter_enabled  # noqa: E402
from spft_kernels.ops.backends import implemented_backends  # noqa: E402

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def pytest_report_header(config):
    return (
        f"torch {torch.__version__} (CUDA {torch.version.cuda}), spft backends {spft.available_backends()}, "
        f"GPU: {torch.cuda.is_available()}"
    )


@pytest.fixture(autouse=True)
def poison_empty(monkeypatch):
    """torch.empty & co. return NaN-filled floating tensors, so a kernel that leaves part of its
    output unwritten fails the comparisons instead of passing on lucky zeros."""
    real_empty, real_empty_like, real_new_empty = torch.empty, torch.empty_like, torch.Tensor.new_empty

    def poison(tensor):
        if tensor.is_floating_point() and tensor.device.type != "meta":
            # no_grad: a fresh leaf that requires grad (torch 2.11's checkpoint makes
            # torch.empty((0,), requires_grad=True)) refuses an in-place fill otherwise.
            with torch.no_grad():
                tensor.fill_(math.nan)
        return tensor

    monkeypatch.setattr(torch, "empty", lambda *a, **k: poison(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poison(real_empty_like(*a, **k)))
    monkeypatch.setattr(torch.Tensor, "new_empty", lambda self, *a, **k: poison(real_new_empty(self, *a, **k)))


@pytest.fixture(autouse=True)
def seeded():
    torch.manual_seed(0)


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def cuda_extension_required() -> bool:
    """SPFT_REQUIRE_CUDA_EXT=1 (CI's build job, the GPU session): a missing extension is a failure."""
    return os.environ.get("SPFT_REQUIRE_CUDA_EXT", "0") not in ("", "0")


def extension_or_skip():
    """Skips (fails under SPFT_REQUIRE_CUDA_EXT=1) when the CUDA extension did not load, so a
    broken build cannot pass as a run of skips."""
    if "cuda" not in spft.available_backends():
        if cuda_extension_required():
            pytest.fail("the CUDA extension is not built, and SPFT_REQUIRE_CUDA_EXT=1 requires it")
        pytest.skip("the CUDA extension is not built")


def cuda_extension_or_skip():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")  # a skip even when the extension is required: CI has no GPU
    extension_or_skip()


def cuda_backend_expected(device: torch.device) -> bool:
    """Whether tests on ``device`` include the cuda backend: when it loaded, and on a GPU under
    SPFT_REQUIRE_CUDA_EXT=1 even when it did not (those cases then fail instead of vanishing)."""
    return device.type == "cuda" and ("cuda" in spft.available_backends() or cuda_extension_required())


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def usable_backends(device: torch.device, ops: tuple = ()) -> list[str]:
    """Backends that can run spft ops on tensors of ``device`` here; with ``ops`` named, also the
    cuda backend (on a GPU, with the extension built) when it implements all of them."""
    backends = ["reference"]
    if "triton" in spft.available_backends() and (device.type == "cuda" or interpreter_enabled()):
        backends.append("triton")
    if ops and cuda_backend_expected(device) and all("cuda" in implemented_backends(op) for op in ops):
        backends.append("cuda")
    return backends


def kernel_dtypes(device: torch.device) -> list[torch.dtype]:
    """bf16 tl.dot is wrong in Triton's interpreter, so CPU runs test fp32/fp16 (and fp64)."""
    dtypes = [torch.float32, torch.float16, torch.float64]
    return dtypes + [torch.bfloat16] if device.type == "cuda" else dtypes
