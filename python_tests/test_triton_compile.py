"""Every Triton kernel compiles to a cubin for sm_80 and sm_90 (Triton's own ptxas; no GPU
needed), in every dtype it takes: catches what the interpreter accepts but the compiler rejects."""

import os
import subprocess
import sys
import textwrap

import pytest

import spft_kernels as spft

COMPILE_ALL = textwrap.dedent(
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from spft_kernels.sddmm import _sddmm_gather_dot_kernel, _sddmm_tile_kernel
    from spft_kernels.spmm import _spmm_kernel
    from spft_kernels.row_gather import _row_gather_kernel
    from spft_kernels.row_scatter_add import _row_scatter_add_kernel

    def compile(fn, types, constants, capability):
        signature = {name: "constexpr" if name in constants else types[name] for name in fn.arg_names}
        source = ASTSource(fn=fn, signature=signature, constexprs=constants)
        assert "cubin" in triton.compile(source, target=GPUTarget("cuda", capability, 32)).asm

    for capability in (80, 90):
        for dtype in ("fp32", "fp16", "bf16"):
            for index in ("i32", "i64"):
                compile(_sddmm_gather_dot_kernel, dict(
                    x_ptr=f"*{dtype}", dy_ptr=f"*{dtype}", flat_ptr=f"*{index}", partial_ptr="*fp32",
                    num_tokens="i32", nnz="i32", in_features="i32", stride_x="i32", stride_dy="i32",
                    tokens_per_split="i32"), dict(ACC_FP64=False, BLOCK_E=64, BLOCK_T=32), capability)
                compile(_sddmm_tile_kernel, dict(
                    x_ptr=f"*{dtype}", dy_ptr=f"*{dtype}", flat_ptr=f"*{index}", tile_ptr_ptr="*i32",
                    grad_ptr="*fp32", num_tokens="i32", out_features="i32", in_features="i32", stride_x="i32",
                    stride_dy="i32", tile_ptr_stride="i32"),
                    dict(BLOCK_N=64, BLOCK_K=64, BLOCK_T=32, TILE=64), capability)
                for transposed in (False, True):
                    compile(_spmm_kernel, dict(
                        base_ptr=f"*{dtype}", src_ptr=f"*{dtype}", out_ptr=f"*{dtype}", pointers_ptr="*i32",
                        perm_ptr="*i32", flat_ptr=f"*{index}", delta_ptr="*fp32", num_tokens="i32",
                        in_features="i32", stride_base="i32", stride_src="i32", stride_out="i32"),
                        dict(TRANSPOSED=transposed, ACC_FP64=False, BLOCK_T=64, BLOCK_E=32), capability)
            for rows in ("i32", "i64"):
                compile(_row_gather_kernel, dict(
                    src_ptr=f"*{dtype}", rows_ptr=f"*{rows}", out_ptr=f"*{dtype}", num_tokens="i32", num_rows="i32",
                    stride_src="i32"), dict(BLOCK_T=32, BLOCK_R=64), capability)
                compile(_row_scatter_add_kernel, dict(
                    y_ptr=f"*{dtype}", z_ptr="*fp32", rows_ptr=f"*{rows}", num_tokens="i32", num_rows="i32",
                    stride_y="i32", stride_z="i32"), dict(ACC_FP64=False, BLOCK_T=32, BLOCK_R=64), capability)
    print("compiled")
    """
)


@pytest.mark.skipif("triton" not in spft.available_backends(), reason="triton is not installed")
def test_triton_kernels_compile_for_sm80_and_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    result = subprocess.run([sys.executable, "-c", COMPILE_ALL], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 and "compiled" in result.stdout, result.stderr[-3000:]
