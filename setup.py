"""Build of spft_kernels: the Python package, plus the CUDA extension `spft_kernels._C` whenever a
CUDA toolkit is found (a GPU need not be present). See README.md for the environment variables."""

import glob
import os
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCH_LIST = "8.0;9.0a"


def _is_toolkit(path):
    return bool(path) and os.path.isfile(os.path.join(path, "bin", "nvcc")) and os.path.isfile(
        os.path.join(path, "include", "cuda_runtime.h")
    )


def find_cuda_home():
    """CUDA_HOME, CUDA_PATH, the toolkit of the nvcc on PATH, then /usr/local/cuda.

    A wrapper script named nvcc (as /usr/local/bin/nvcc here) is not a toolkit root, which is
    why torch's own guess fails on such machines: candidates must hold bin/nvcc and
    include/cuda_runtime.h."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates += ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for candidate in candidates:
        if _is_toolkit(candidate):
            return os.path.realpath(candidate)
    return None


def nvidia_pip_include_dirs():
    """Headers the toolkit may lack (cuBLAS, cuSPARSE) that pip's nvidia-* packages ship."""
    dirs = []
    for site in sys.path:
        dirs += glob.glob(os.path.join(site, "nvidia", "*", "include"))
    return sorted({d for d in dirs if os.path.isdir(d)})


def gencode_flags(arch_list):
    """'8.0;9.0a+PTX' -> nvcc -gencode flags (sm_90a needs its own 'a' target for wgmma/TMA)."""
    flags = []
    for arch in arch_list.replace(",", ";").replace(" ", ";").split(";"):
        if not arch:
            continue
        ptx = arch.endswith("+PTX")
        arch = arch[: -len("+PTX")] if ptx else arch
        number = arch.replace(".", "")
        flags.append(f"-gencode=arch=compute_{number},code=sm_{number}")
        if ptx:
            flags.append(f"-gencode=arch=compute_{number},code=compute_{number}")
    return flags


def default_max_jobs():
    # nvcc of one .cu peaks near 1 GiB here; one job per core and per 2 GiB of memory is safe.
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        mem_gib = 2 * cores
    return str(max(1, min(cores, int(mem_gib // 2))))


def cuda_extension_kwargs():
    if os.environ.get("SPFT_SKIP_CUDA_BUILD", "0") not in ("", "0"):
        print("spft_kernels: SPFT_SKIP_CUDA_BUILD is set, building without the CUDA extension")
        return {}
    cuda_home = find_cuda_home()
    if cuda_home is None:
        print("spft_kernels: no CUDA toolkit found, building without the CUDA extension "
              "(reference and Triton backends only); set CUDA_HOME to build it")
        return {}
    import torch

    if torch.version.cuda is None:
        print(f"spft_kernels: torch {torch.__version__} is a CPU-only build, which cannot build CUDA "
              "extensions; building without the CUDA extension (install a CUDA build of torch for it)")
        return {}
    # torch.utils.cpp_extension reads CUDA_HOME when imported.
    os.environ["CUDA_HOME"] = cuda_home
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCH_LIST)
    os.environ.setdefault("MAX_JOBS", default_max_jobs())
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    arch_list = os.environ["TORCH_CUDA_ARCH_LIST"]
    print(f"spft_kernels: building the CUDA extension with {cuda_home} for {arch_list}, "
          f"MAX_JOBS={os.environ['MAX_JOBS']}")
    sources = ["csrc/binding.cpp"] + sorted(glob.glob("csrc/*.cu"))
    extension = CUDAExtension(
        name="spft_kernels._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc")] + nvidia_pip_include_dirs(),
        extra_compile_args={
            # No -std: torch's BuildExtension picks the standard its headers need (C++17 for
            # torch 2.11, C++20 for newer releases).
            "cxx": ["-O3"],
            "nvcc": ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]
            + gencode_flags(arch_list),
        },
    )
    return {"ext_modules": [extension], "cmdclass": {"build_ext": BuildExtension.with_options(use_ninja=True)}}


setup(**cuda_extension_kwargs())
