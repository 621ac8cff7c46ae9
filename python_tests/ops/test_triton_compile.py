"""Every Triton kernel compiles to a cubin for sm_80 and sm_90 (Triton's own ptxas; no GPU
needed), in every dtype it takes: catches what the interpreter accepts but the compiler rejects."""

import os
import subprocess
import sys
import textwrap

import pytest

import spft_kernels as spft

PRELUDE = textwrap.dedent(
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    def compile(fn, types, constants, capability):
        signature = {name: "constexpr" if name in constants else types[name] for name in fn.arg_names}
        source = ASTSource(fn=fn, signature=signature, constexprs=constants)
        assert "cubin" in triton.compile(source, target=GPUTarget("cuda", capability, 32)).asm
    """
)

COMPILE_ALL = PRELUDE + textwrap.dedent(
    """
    from spft_kernels.ops.row_gather import _row_gather_kernel
    from spft_kernels.ops.row_scatter_add import _row_scatter_add_kernel
    from spft_kernels.ops.sddmm import _sddmm_gather_dot_kernel, _sddmm_tile_kernel
    from spft_kernels.ops.spmm import _spmm_kernel

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
                        in_features="i32", stride_base_t="i32", stride_base_f="i32", stride_src="i32",
                        stride_out="i32"),
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


def compile_in_subprocess(script):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 and "compiled" in result.stdout, result.stderr[-3000:]


@pytest.mark.skipif("triton" not in spft.available_backends(), reason="triton is not installed")
def test_triton_kernels_compile_for_sm80_and_sm90():
    compile_in_subprocess(COMPILE_ALL)


COMPILE_PST = PRELUDE + textwrap.dedent(
    """
    from spft_kernels.ops import pst_kernels as K

    def score(w):
        pointers = {name: "*fp32" for name in ("u_ptr", "v_ptr", "a_ptr", "b_ptr", "r_ptr", "c_ptr")}
        return dict(pointers, w0_ptr=f"*{w}", n="i32", k="i32", stride_wn="i32", stride_wk="i32",
                    beta="fp32", alpha1="fp32", alpha2="fp32")

    def gemms(w, capability, ranks=dict(R1=8, R2=8)):
        precision = "ieee" if w == "fp32" else "tf32"
        tokens = dict(num_tokens="i32", thr_ptr="*i64")
        compile(K._pst_forward_kernel, dict(score(w), **tokens, x_ptr=f"*{w}", bias_ptr=f"*{w}", y_ptr=f"*{w}",
                stride_x="i32", stride_y="i32"),
                dict(HAS_BIAS=True, DOT_PRECISION=precision, BLOCK_T=64, BLOCK_N=64, BLOCK_K=32, **ranks), capability)
        compile(K._pst_grad_rows_kernel, dict(score(w), **tokens, dy_ptr=f"*{w}", x_ptr=f"*{w}", du_ptr="*fp32",
                da_ptr="*fp32", dr_ptr="*fp32", stride_dy="i32", stride_x="i32", tokens_per_split="i32"),
                dict(ABS_GRAD=True, DOT_PRECISION=precision, R1_PAD=16, R2_PAD=16, BLOCK_T=32, BLOCK_N=64,
                     BLOCK_K=64, **ranks), capability)

    # Every kernel once per capability (bf16 weights on sm_80, fp16 on sm_90), plus the fp32
    # ("ieee") GEMMs; the full dtype x capability matrix takes over a minute on two cores.
    for capability, w in ((80, "bf16"), (90, "fp16")):
        for row_counts in (False, True):
            compile(K._pst_select_kernel, dict(score(w), state_ptr="*i64", hist_ptr="*i64", row_count_ptr="*i64"),
                    dict(SHIFT=16, ROW_COUNTS=row_counts, DIGIT_BITS=8, R1=8, R2=8, BLOCK_N=32, BLOCK_K=64), capability)
        compile(K._pst_radix_descend_kernel, dict(hist_ptr="*i64", state_ptr="*i64"), dict(NUM_BINS=256), capability)
        compile(K._pst_tie_kernel, dict(score(w), state_ptr="*i64", row_count_ptr="*i64", out_ptr="*i64"),
                dict(R1=8, R2=8, BLOCK_R=256, BLOCK_K=128), capability)
        compile(K._pst_dx_kernel, dict(score(w), dy_ptr=f"*{w}", thr_ptr="*i64", dx_ptr=f"*{w}", num_tokens="i32",
                stride_dy="i32", stride_dx="i32"),
                dict(DOT_PRECISION="tf32", R1=8, R2=8, BLOCK_T=64, BLOCK_N=32, BLOCK_K=64), capability)
        compile(K._pst_grad_cols_kernel, dict(score(w), dy_ptr=f"*{w}", x_ptr=f"*{w}", thr_ptr="*i64",
                dv_ptr="*fp32", db_ptr="*fp32", dc_ptr="*fp32", num_tokens="i32", stride_dy="i32", stride_x="i32",
                tokens_per_split="i32"),
                dict(ABS_GRAD=False, DOT_PRECISION="tf32", R1=8, R2=8, R1_PAD=16, R2_PAD=16, BLOCK_T=32, BLOCK_N=64,
                     BLOCK_K=64), capability)
        compile(K._pst_dense_kernel, dict(score(w), thr_ptr="*i64", weight_out_ptr="*fp32", mask_out_ptr="*i8"),
                dict(R1=8, R2=8, BLOCK_N=32, BLOCK_K=64), capability)
        gemms(w, capability)
    gemms("fp32", 90, dict(R1=0, R2=3))
    print("compiled")
    """
)


@pytest.mark.skipif("triton" not in spft.available_backends(), reason="triton is not installed")
def test_pst_triton_kernels_compile_for_sm80_and_sm90():
    compile_in_subprocess(COMPILE_PST)
