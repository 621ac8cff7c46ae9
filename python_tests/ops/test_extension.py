import subprocess
import sys

import pytest
import torch

import spft_kernels as spft
from conftest import cuda_backend_expected, cuda_extension_required, extension_or_skip


def test_import_does_not_initialise_cuda():
    code = (
        "import torch, spft_kernels as s; s.available_backends(); "
        "import sys; sys.exit(1 if torch.cuda.is_initialized() else 0)"
    )
    assert subprocess.run([sys.executable, "-c", code], timeout=300).returncode == 0


def test_reference_backend_is_always_available():
    assert spft.available_backends()[0] == "reference"
    assert ("triton" in spft.available_backends()) == (spft.ops._triton.triton is not None)


@pytest.mark.skipif(not cuda_extension_required(), reason="SPFT_REQUIRE_CUDA_EXT is not set")
def test_cuda_extension_was_built():
    """CI sets SPFT_REQUIRE_CUDA_EXT=1: the nvcc build must have produced a loadable extension."""
    from spft_kernels.ops._extension import cuda_extension_error, load_cuda_extension

    assert load_cuda_extension() is not None, cuda_extension_error()
    assert "cuda" in spft.available_backends()
    for op in ("cuda_scatter_delta_", "cuda_row_gather"):
        assert hasattr(torch.ops.spft, op)


def test_a_missing_extension_fails_the_tests_under_spft_require_cuda_ext(monkeypatch):
    """With SPFT_REQUIRE_CUDA_EXT=1 a broken build cannot look green: the tests that would skip
    for the missing extension fail, and the cuda cases of the backend lists stay (and fail)."""
    monkeypatch.setattr(spft, "available_backends", lambda: ["reference", "triton"])
    monkeypatch.setenv("SPFT_REQUIRE_CUDA_EXT", "1")
    with pytest.raises(pytest.fail.Exception, match="SPFT_REQUIRE_CUDA_EXT=1 requires it"):
        extension_or_skip()
    assert cuda_backend_expected(torch.device("cuda")) and not cuda_backend_expected(torch.device("cpu"))
    monkeypatch.setenv("SPFT_REQUIRE_CUDA_EXT", "0")
    with pytest.raises(pytest.skip.Exception, match="the CUDA extension is not built"):
        extension_or_skip()
    assert not cuda_backend_expected(torch.device("cuda"))


def test_cuda_backend_refuses_cpu_tensors_or_reports_it_missing():
    weight = torch.zeros(4, 3)
    index = torch.tensor([1, 5], dtype=torch.int32)
    if "cuda" in spft.available_backends():
        with pytest.raises(ValueError, match="needs CUDA tensors"):
            spft.scatter_delta_(weight, index, delta=torch.ones(2), backend="cuda")
    else:
        with pytest.raises(RuntimeError, match="not available"):
            spft.scatter_delta_(weight, index, delta=torch.ones(2), backend="cuda")


def test_scatter_delta_reference_semantics():
    weight = torch.arange(12, dtype=torch.bfloat16).view(3, 4)
    index = torch.tensor([1, 6, 11], dtype=torch.int32)
    base = torch.tensor([10.0, 20.0, 30.0], dtype=torch.bfloat16)
    spft.scatter_delta_(weight, index, delta=torch.tensor([0.5, -1.0, 0.25]))
    assert weight.view(-1)[[1, 6, 11]].tolist() == [1.5, 5.0, 11.25]
    spft.scatter_delta_(weight, index, base=base, delta=torch.tensor([1.0, 1.0, 1.0]), alpha=-2.0)
    assert weight.view(-1)[[1, 6, 11]].tolist() == [8.0, 18.0, 28.0]
    spft.scatter_delta_(weight, index, base=base)
    assert weight.view(-1)[[1, 6, 11]].tolist() == [10.0, 20.0, 30.0]
    assert weight.view(-1)[[0, 2, 5, 10]].tolist() == [0.0, 2.0, 5.0, 10.0]


def test_scatter_delta_checks():
    weight = torch.zeros(4, 3)
    with pytest.raises(ValueError, match="contiguous"):
        spft.scatter_delta_(weight.t(), torch.tensor([1]), delta=torch.ones(1))
    with pytest.raises(ValueError, match=r"delta must have shape \(1,\)"):
        spft.scatter_delta_(weight, torch.tensor([1]), delta=torch.ones(2))
    with pytest.raises(ValueError, match="base must have the weight's dtype"):
        spft.scatter_delta_(weight, torch.tensor([1]), base=torch.ones(1, dtype=torch.float64))


def test_row_gather_reference_and_checks():
    src = torch.randn(2, 3, 7)
    rows = torch.tensor([6, 0, 3], dtype=torch.int32)
    assert torch.equal(spft.row_gather(src, rows), src[..., [6, 0, 3]])
    assert spft.row_gather(src, rows[:0]).shape == (2, 3, 0)
    with pytest.raises(ValueError, match="out of range"):
        spft.row_gather(src, torch.tensor([7]))
    with pytest.raises(ValueError, match="1-D int32 or int64"):
        spft.row_gather(src, torch.tensor([1.0]))
    torch.library.opcheck(torch.ops.spft.row_gather.default, (src, rows, "reference"))


def test_opcheck_scatter_delta():
    weight = torch.randn(5, 4)
    index = torch.tensor([0, 7, 19], dtype=torch.int32)
    torch.library.opcheck(
        torch.ops.spft.scatter_delta_.default, (weight, index, torch.randn(3), torch.randn(3), 1.0, "reference")
    )


def test_a_broken_extension_warns_once_and_falls_back(monkeypatch):
    import importlib

    from spft_kernels.ops import _extension, backends

    real_import = importlib.import_module

    def broken_import(name, *args, **kwargs):
        if name == "spft_kernels._C":
            raise ImportError("spft_kernels/_C.so: undefined symbol: _ZN3c1017RegisterOperators")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(_extension.importlib, "import_module", broken_import)
    monkeypatch.setattr(backends, "_warned_cuda_missing", False)
    _extension.load_cuda_extension.cache_clear()
    try:
        with pytest.warns(spft.SpftExtensionWarning, match="failed to load, probably built against another torch"):
            assert "cuda" not in spft.available_backends()
        with pytest.raises(RuntimeError, match="backend 'cuda' is not available: .*undefined symbol"):
            spft.scatter_delta_(torch.zeros(3), torch.tensor([1]), delta=torch.ones(1), backend="cuda")
        # auto on CUDA tensors warns once more (the fallback), then never again
        with pytest.warns(spft.SpftExtensionWarning, match="fall back"):
            backends._warn_once_if_cuda_missing("scatter_delta")
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("error")
            backends._warn_once_if_cuda_missing("row_gather")
    finally:
        monkeypatch.undo()
        _extension.load_cuda_extension.cache_clear()


def _embedded_cubins(library_path):
    """(sm number, cubin bytes) of every ELF cubin in the library's .nv_fatbin section (the section
    is parsed by hand: no CUDA tools needed)."""
    import struct

    data = open(library_path, "rb").read()
    section_offset = struct.unpack_from("<Q", data, 0x28)[0]
    entry_size, count, names_index = struct.unpack_from("<HHH", data, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", data, section_offset + i * entry_size) for i in range(count)]
    names_at = sections[names_index][4]

    def section_name(offset):
        return data[names_at + offset : data.index(b"\0", names_at + offset)].decode()

    (fatbin,) = [s for s in sections if section_name(s[0]) == ".nv_fatbin"]
    blob = data[fatbin[4] : fatbin[4] + fatbin[5]]
    starts = [i for i in range(len(blob)) if blob.startswith(b"\x7fELF", i)]
    cubins = []
    for start, end in zip(starts, starts[1:] + [len(blob)]):
        flags = struct.unpack_from("<I", blob, start + 0x30)[0]
        cubins.append(((flags >> 8) & 0xFF, blob[start:end]))
    return cubins


def test_every_kernel_is_compiled_for_sm80_and_sm90():
    """The fatbin holds machine code of every kernel for sm_80 and sm_90(a), so no kernel depends
    on the driver's JIT (CI builds the extension without a GPU; this checks what it built)."""
    from spft_kernels.ops._extension import load_cuda_extension

    extension_or_skip()
    module = load_cuda_extension()
    cubins = _embedded_cubins(module.__file__)
    kernels = (
        "scatter_delta_kernel", "row_gather_kernel", "row_scatter_add_kernel", "spmm_add_kernel",
        "sddmm_gather_dot_kernel", "sum_splits_kernel", "sddmm_tile_kernel", "fused_delta_linear_tc_kernel",
        "fused_delta_linear_simt_kernel",
    )
    for kernel in kernels:
        archs = {sm for sm, cubin in cubins if kernel.encode() in cubin}
        assert {80, 90} <= archs, f"{kernel}: machine code for sm {sorted(archs)}"
