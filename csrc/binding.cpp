// The only translation unit that includes torch: tensor checks and op registration for the
// CUDA kernels in the torch-free .cu files. Python-side wrappers (spft_kernels/*.py) validate
// user input once; these checks guard the raw ops against misuse with clear errors.
#include <Python.h>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>

#include "spft_kernels.h"

namespace {

spft::DType float_dtype(const at::Tensor& t, const char* op, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return spft::DType::kFloat32;
    case at::kDouble: return spft::DType::kFloat64;
    case at::kHalf: return spft::DType::kFloat16;
    case at::kBFloat16: return spft::DType::kBFloat16;
    default:
      TORCH_CHECK_VALUE(false, op, ": ", name, " must be float32, float64, float16 or bfloat16, got ",
                        t.scalar_type());
  }
  return spft::DType::kFloat32;  // unreachable: TORCH_CHECK_VALUE(false, ...) throws
}

void check_cuda_on(const at::Tensor& t, const at::Tensor& ref, const char* op, const char* name) {
  TORCH_CHECK_VALUE(t.is_cuda(), op, ": ", name, " must be a CUDA tensor, got device ", t.device());
  TORCH_CHECK_VALUE(t.device() == ref.device(), op, ": ", name, " is on ", t.device(),
                    " but the other operands are on ", ref.device());
}

void check_index_vector(const at::Tensor& t, const at::Tensor& ref, const char* op, const char* name) {
  check_cuda_on(t, ref, op, name);
  TORCH_CHECK_VALUE(t.scalar_type() == at::kInt || t.scalar_type() == at::kLong, op, ": ", name,
                    " must be int32 or int64, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == 1 && t.is_contiguous(), op, ": ", name,
                    " must be a contiguous 1-D tensor, got shape ", t.sizes());
}

void check_launch(cudaError_t status, const char* op) {
  TORCH_CHECK(status == cudaSuccess, op, ": CUDA launch failed: ", cudaGetErrorString(status));
}

void scatter_delta_(at::Tensor weight, const at::Tensor& index, const std::optional<at::Tensor>& base,
                    const std::optional<at::Tensor>& delta, double alpha) {
  constexpr const char* op = "spft::cuda_scatter_delta_";
  TORCH_CHECK_VALUE(weight.is_cuda(), op, ": weight must be a CUDA tensor, got device ", weight.device());
  TORCH_CHECK_VALUE(weight.is_contiguous(), op, ": weight must be contiguous (its flat positions are indexed)");
  const spft::DType weight_dtype = float_dtype(weight, op, "weight");
  check_index_vector(index, weight, op, "index");
  const int64_t nnz = index.numel();
  if (base.has_value()) {
    check_cuda_on(*base, weight, op, "base");
    TORCH_CHECK_VALUE(base->scalar_type() == weight.scalar_type(), op, ": base must have the weight's dtype ",
                      weight.scalar_type(), ", got ", base->scalar_type());
    TORCH_CHECK_VALUE(base->is_contiguous() && base->numel() == nnz, op,
                      ": base must be contiguous with one value per index entry (", nnz, "), got shape ",
                      base->sizes());
  }
  spft::DType delta_dtype = spft::DType::kFloat32;
  if (delta.has_value()) {
    check_cuda_on(*delta, weight, op, "delta");
    delta_dtype = float_dtype(*delta, op, "delta");
    TORCH_CHECK_VALUE(delta->is_contiguous() && delta->numel() == nnz, op,
                      ": delta must be contiguous with one value per index entry (", nnz, "), got shape ",
                      delta->sizes());
  }
  const c10::cuda::CUDAGuard guard(weight.device());
  check_launch(spft::scatter_delta(weight.data_ptr(), weight_dtype, index.data_ptr(),
                                   index.scalar_type() == at::kLong, nnz,
                                   base.has_value() ? base->data_ptr() : nullptr,
                                   delta.has_value() ? delta->data_ptr() : nullptr, delta_dtype, alpha,
                                   c10::cuda::getCurrentCUDAStream(weight.device().index()).stream()),
               op);
}

at::Tensor row_gather(const at::Tensor& src, const at::Tensor& rows) {
  constexpr const char* op = "spft::cuda_row_gather";
  TORCH_CHECK_VALUE(src.is_cuda(), op, ": src must be a CUDA tensor, got device ", src.device());
  TORCH_CHECK_VALUE(src.dim() == 2, op, ": src must be 2-D [tokens, features], got shape ", src.sizes());
  TORCH_CHECK_VALUE(src.stride(1) == 1 || src.size(1) <= 1, op,
                    ": src rows must be contiguous (stride 1 along features), got strides ", src.strides());
  const spft::DType dtype = float_dtype(src, op, "src");
  check_index_vector(rows, src, op, "rows");
  const int64_t num_tokens = src.size(0);
  const int64_t num_rows = rows.numel();
  at::Tensor out = at::empty({num_tokens, num_rows}, src.options());
  const c10::cuda::CUDAGuard guard(src.device());
  check_launch(spft::row_gather(src.data_ptr(), src.stride(0), dtype, rows.data_ptr(),
                                rows.scalar_type() == at::kLong, num_tokens, num_rows, out.data_ptr(),
                                c10::cuda::getCurrentCUDAStream(src.device().index()).stream()),
               op);
  return out;
}

void row_scatter_add_(at::Tensor y, const at::Tensor& z, const at::Tensor& rows) {
  constexpr const char* op = "spft::cuda_row_scatter_add_";
  TORCH_CHECK_VALUE(y.is_cuda(), op, ": y must be a CUDA tensor, got device ", y.device());
  TORCH_CHECK_VALUE(y.dim() == 2, op, ": y must be 2-D [tokens, features], got shape ", y.sizes());
  TORCH_CHECK_VALUE(y.stride(1) == 1 || y.size(1) <= 1, op,
                    ": y rows must be contiguous (stride 1 along features), got strides ", y.strides());
  const spft::DType y_dtype = float_dtype(y, op, "y");
  check_cuda_on(z, y, op, "z");
  const spft::DType z_dtype = float_dtype(z, op, "z");
  check_index_vector(rows, y, op, "rows");
  const int64_t num_tokens = y.size(0);
  const int64_t num_rows = rows.numel();
  TORCH_CHECK_VALUE(z.dim() == 2 && z.size(0) == num_tokens && z.size(1) == num_rows, op,
                    ": z must have shape [", num_tokens, ", ", num_rows,
                    "] (y's tokens, one column per row), got shape ", z.sizes());
  TORCH_CHECK_VALUE(z.stride(1) == 1 || num_rows <= 1, op,
                    ": z rows must be contiguous (stride 1 along rows), got strides ", z.strides());
  const c10::cuda::CUDAGuard guard(y.device());
  check_launch(spft::row_scatter_add(y.data_ptr(), y.stride(0), y_dtype, z.data_ptr(), z.stride(0), z_dtype,
                                     rows.data_ptr(), rows.scalar_type() == at::kLong, num_tokens, num_rows,
                                     c10::cuda::getCurrentCUDAStream(y.device().index()).stream()),
               op);
}

}  // namespace

// FRAGMENT: the Python side defines further spft:: ops in the same namespace.
TORCH_LIBRARY_FRAGMENT(spft, m) {
  m.def("cuda_scatter_delta_(Tensor(a!) weight, Tensor index, Tensor? base, Tensor? delta, float alpha) -> ()");
  m.def("cuda_row_gather(Tensor src, Tensor rows) -> Tensor");
  m.def("cuda_row_scatter_add_(Tensor(a!) y, Tensor z, Tensor rows) -> ()");
}

TORCH_LIBRARY_IMPL(spft, CUDA, m) {
  m.impl("cuda_scatter_delta_", &scatter_delta_);
  m.impl("cuda_row_gather", &row_gather);
  m.impl("cuda_row_scatter_add_", &row_scatter_add_);
}

// A plain module so that `import spft_kernels._C` loads the library and runs the registrations.
static PyModuleDef spft_module = {PyModuleDef_HEAD_INIT, "_C", "spft_kernels CUDA kernels", -1, nullptr};
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&spft_module); }
