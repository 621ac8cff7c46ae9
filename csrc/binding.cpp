// The only translation unit that includes torch: tensor checks and op registration for the
// CUDA kernels in the torch-free .cu files. Python-side wrappers (spft_kernels/*.py) validate
// user input once; these checks guard the raw ops against misuse with clear errors.
#include <Python.h>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/fill.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <limits>
#include <optional>
#include <utility>

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

// --- checks of the sparse-delta ops: structure first, devices last -------------------------
// (The ops are registered for the CPU key too, so a CPU tensor gets a clear error, and every
// check below can be exercised on a machine without a GPU.)

void check_float_matrix(const at::Tensor& t, const char* op, const char* name) {
  float_dtype(t, op, name);
  TORCH_CHECK_VALUE(t.dim() == 2, op, ": ", name, " must be 2-D [tokens, features], got shape ", t.sizes());
  TORCH_CHECK_VALUE(t.stride(1) == 1 || t.size(1) <= 1, op, ": ", name,
                    " rows must be contiguous (stride 1 along features), got strides ", t.strides());
}

void check_int_vector(const at::Tensor& t, const char* op, const char* name, int64_t numel) {
  TORCH_CHECK_VALUE(t.scalar_type() == at::kInt || t.scalar_type() == at::kLong, op, ": ", name,
                    " must be int32 or int64, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == 1 && t.is_contiguous(), op, ": ", name,
                    " must be a contiguous 1-D tensor, got shape ", t.sizes());
  if (numel >= 0) {
    TORCH_CHECK_VALUE(t.numel() == numel, op, ": ", name, " must have ", numel, " entries, got ", t.numel());
  }
}

void check_values(const at::Tensor& delta, const char* op, int64_t nnz) {
  float_dtype(delta, op, "delta");
  TORCH_CHECK_VALUE(delta.dim() == 1 && delta.numel() == nnz, op,
                    ": delta must be 1-D with one value per index entry (", nnz, "), got shape ", delta.sizes());
}

void check_pointer_dtypes(const at::Tensor& index, const at::Tensor& pointers, const char* op, const char* name) {
  // Pointers are int64 only for nnz >= 2^31, which needs int64 positions (index.py).
  TORCH_CHECK_VALUE(!(pointers.scalar_type() == at::kLong && index.scalar_type() == at::kInt), op, ": ", name,
                    " is int64 but index is int32; build the index with SparseIndex");
}

// Every tensor on the first one's CUDA device; null entries (absent optional tensors) are skipped.
void check_same_cuda_device(std::initializer_list<std::pair<const at::Tensor*, const char*>> tensors,
                            const char* op) {
  const at::Tensor& first = *tensors.begin()->first;
  for (const auto& [tensor, name] : tensors) {
    if (tensor != nullptr) check_cuda_on(*tensor, first, op, name);
  }
}

const at::Tensor* or_null(const std::optional<at::Tensor>& t) { return t.has_value() ? &*t : nullptr; }

bool is_int64(const at::Tensor& t) { return t.scalar_type() == at::kLong; }

cudaStream_t stream_of(const at::Tensor& t) { return c10::cuda::getCurrentCUDAStream(t.device().index()).stream(); }

void check_tensor_cores(const at::Tensor& t, const char* op) {
  if (t.scalar_type() != at::kHalf && t.scalar_type() != at::kBFloat16) return;
  int major = 0;
  const cudaError_t status = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, t.device().index());
  check_launch(status, op);
  TORCH_CHECK_VALUE(major >= 8, op, ": the fp16/bf16 kernels use sm_80 tensor-core instructions; ", t.device(),
                    " has compute capability ", major, ".x (use the reference or triton backend)");
}

// SPFT_POISON_OUTPUTS=1 (the tests set it): every output and scratch buffer allocated here is
// filled with NaN before the kernel runs, so a kernel that leaves part of it unwritten fails the
// comparisons instead of passing on a recycled allocator block that held the right values. Read
// once, at the first allocation; off in normal use (one extra fill per output).
bool poison_outputs() {
  static const bool poison = [] {
    const char* value = std::getenv("SPFT_POISON_OUTPUTS");
    return value != nullptr && value[0] != '\0' && std::strcmp(value, "0") != 0;
  }();
  return poison;
}

at::Tensor new_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor out = at::empty(sizes, options);
  if (poison_outputs()) at::fill_(out, std::numeric_limits<double>::quiet_NaN());
  return out;
}

// The accumulate dtype's copy of delta (fp32, or fp64 when told): O(nnz), only if it differs.
at::Tensor delta_in(const at::Tensor& delta, bool fp64) {
  return delta.to(fp64 ? at::kDouble : at::kFloat).contiguous();
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
  at::Tensor out = new_output({num_tokens, num_rows}, src.options());
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

// base + src Δᵀ (CSR, transposed = false) or base + src Δ (CSC, transposed = true).
at::Tensor spmm_add_impl(const at::Tensor& base, const at::Tensor& src, const at::Tensor& delta,
                         const at::Tensor& index, const at::Tensor& pointers, const at::Tensor* perm,
                         bool transposed, const char* op) {
  check_float_matrix(base, op, "base");
  check_float_matrix(src, op, transposed ? "dy" : "x");
  TORCH_CHECK_VALUE(src.scalar_type() == base.scalar_type(), op, ": base and ", transposed ? "dy" : "x",
                    " must share a dtype, got ", base.scalar_type(), " and ", src.scalar_type());
  TORCH_CHECK_VALUE(src.size(0) == base.size(0), op, ": base has ", base.size(0), " tokens but ",
                    transposed ? "dy" : "x", " has ", src.size(0));
  check_int_vector(index, op, "index", -1);
  const int64_t nnz = index.numel();
  check_values(delta, op, nnz);
  const int64_t num_outputs = base.size(1);
  check_int_vector(pointers, op, transposed ? "col_ptr" : "row_ptr", num_outputs + 1);
  check_pointer_dtypes(index, pointers, op, transposed ? "col_ptr" : "row_ptr");
  if (perm != nullptr) {
    check_int_vector(*perm, op, "csc_perm", nnz);
    TORCH_CHECK_VALUE(perm->scalar_type() == pointers.scalar_type(), op,
                      ": csc_perm and col_ptr must share a dtype, got ", perm->scalar_type(), " and ",
                      pointers.scalar_type());
  }
  // x Δᵀ gathers columns of x: in = x's width; dy Δ writes columns of base: in = base's width.
  const int64_t in_features = transposed ? base.size(1) : src.size(1);
  // Index contents are trusted (validated once when the SparseIndex was built for this shape);
  // a shape without entries must still not reach a division by zero.
  TORCH_CHECK_VALUE(nnz == 0 || (base.size(1) > 0 && src.size(1) > 0), op, ": ", nnz,
                    " entries but a zero-width operand (base ", base.sizes(), ", ", transposed ? "dy " : "x ",
                    src.sizes(), ")");
  check_same_cuda_device({{&base, "base"}, {&src, transposed ? "dy" : "x"}, {&delta, "delta"}, {&index, "index"},
                          {&pointers, transposed ? "col_ptr" : "row_ptr"}, {perm, "csc_perm"}}, op);
  const bool fp64 = base.scalar_type() == at::kDouble || delta.scalar_type() == at::kDouble;
  const c10::cuda::CUDAGuard guard(base.device());
  const at::Tensor values = delta_in(delta, fp64);
  at::Tensor out = new_output(base.sizes(), base.options().memory_format(at::MemoryFormat::Contiguous));
  check_launch(spft::spmm_add(base.data_ptr(), base.stride(0), src.data_ptr(), src.stride(0),
                              float_dtype(base, op, "base"), values.data_ptr(), fp64, index.data_ptr(),
                              is_int64(index), pointers.data_ptr(), perm != nullptr ? perm->data_ptr() : nullptr,
                              is_int64(pointers), in_features, base.size(0), num_outputs, transposed,
                              out.data_ptr(), stream_of(base)),
               op);
  return out;
}

at::Tensor spmm_add(const at::Tensor& base, const at::Tensor& x, const at::Tensor& delta, const at::Tensor& index,
                    const at::Tensor& row_ptr) {
  return spmm_add_impl(base, x, delta, index, row_ptr, nullptr, false, "spft::cuda_spmm_add");
}

at::Tensor spmm_t_add(const at::Tensor& base, const at::Tensor& dy, const at::Tensor& delta, const at::Tensor& index,
                      const at::Tensor& col_ptr, const at::Tensor& csc_perm) {
  return spmm_add_impl(base, dy, delta, index, col_ptr, &csc_perm, true, "spft::cuda_spmm_t_add");
}

// Partial sums of the token splits are at most this many values (64 MiB in fp32), as in sddmm.py.
constexpr int64_t kMaxPartials = int64_t{1} << 24;

at::Tensor sddmm(const at::Tensor& x, const at::Tensor& dy, const at::Tensor& index,
                 const std::optional<at::Tensor>& tile_ptr) {
  constexpr const char* op = "spft::cuda_sddmm";
  check_float_matrix(x, op, "x");
  check_float_matrix(dy, op, "dy");
  TORCH_CHECK_VALUE(x.scalar_type() == dy.scalar_type(), op, ": x and dy must share a dtype, got ",
                    x.scalar_type(), " and ", dy.scalar_type());
  TORCH_CHECK_VALUE(x.size(0) == dy.size(0), op, ": x has ", x.size(0), " tokens but dy has ", dy.size(0));
  check_int_vector(index, op, "index", -1);
  const int64_t num_tokens = x.size(0);
  const int64_t out_features = dy.size(1);
  const int64_t in_features = x.size(1);
  // Index contents are trusted (validated once when the SparseIndex was built for this shape).
  TORCH_CHECK_VALUE(index.numel() == 0 || (out_features > 0 && in_features > 0), op, ": ", index.numel(),
                    " entries but a zero-width operand (x ", x.sizes(), ", dy ", dy.sizes(), ")");
  if (tile_ptr.has_value()) {
    const int64_t tiles = (in_features + 63) / 64 + 1;
    TORCH_CHECK_VALUE(tile_ptr->scalar_type() == at::kInt || tile_ptr->scalar_type() == at::kLong, op,
                      ": tile_ptr must be int32 or int64, got ", tile_ptr->scalar_type());
    TORCH_CHECK_VALUE(tile_ptr->dim() == 2 && tile_ptr->size(0) == out_features && tile_ptr->size(1) == tiles &&
                          tile_ptr->is_contiguous(),
                      op, ": tile_ptr must be contiguous with shape [", out_features, ", ", tiles,
                      "] (SparseIndex.tile_ptr), got shape ", tile_ptr->sizes());
    check_pointer_dtypes(index, *tile_ptr, op, "tile_ptr");
  }
  check_same_cuda_device({{&x, "x"}, {&dy, "dy"}, {&index, "index"}, {or_null(tile_ptr), "tile_ptr"}}, op);
  const int64_t nnz = index.numel();
  const bool fp64 = x.scalar_type() == at::kDouble;
  const c10::cuda::CUDAGuard guard(x.device());
  const auto grad_options = x.options().dtype(fp64 ? at::kDouble : at::kFloat);
  if (nnz == 0 || num_tokens == 0) return at::zeros({nnz}, grad_options);
  at::Tensor grad = new_output({nnz}, grad_options);
  const bool tensor_cores = x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16;
  // The tile grid puts 64-row tiles on grid.y (at most 65535): beyond that the gather-dot runs.
  if (tile_ptr.has_value() && tensor_cores && out_features <= int64_t{65535} * 64) {
    check_tensor_cores(x, op);
    check_launch(spft::sddmm_tiles(x.data_ptr(), x.stride(0), dy.data_ptr(), dy.stride(0), float_dtype(x, op, "x"),
                                   index.data_ptr(), is_int64(index), tile_ptr->data_ptr(), is_int64(*tile_ptr),
                                   out_features, in_features, num_tokens, grad.data_ptr<float>(), stream_of(x)),
                 op);
    return grad;
  }
  // The split count depends on the shapes only, never on the device: same inputs, same bits.
  const int64_t wanted = std::min<int64_t>({64, (num_tokens + 511) / 512, std::max<int64_t>(1, kMaxPartials / nnz)});
  const int64_t tokens_per_split = (num_tokens + std::max<int64_t>(1, wanted) - 1) / std::max<int64_t>(1, wanted);
  const int64_t splits = (num_tokens + tokens_per_split - 1) / tokens_per_split;
  at::Tensor partials = splits > 1 ? new_output({splits, nnz}, grad_options) : grad;
  check_launch(spft::sddmm_gather_dot(x.data_ptr(), x.stride(0), dy.data_ptr(), dy.stride(0), float_dtype(x, op, "x"),
                                      index.data_ptr(), is_int64(index), nnz, in_features, num_tokens, splits,
                                      partials.data_ptr(), grad.data_ptr(), stream_of(x)),
               op);
  return grad;
}

at::Tensor fused_delta_linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& delta,
                              const at::Tensor& index, const at::Tensor& row_ptr, const std::optional<at::Tensor>& bias) {
  constexpr const char* op = "spft::cuda_fused_delta_linear";
  check_float_matrix(x, op, "x");
  float_dtype(weight, op, "weight");
  TORCH_CHECK_VALUE(weight.dim() == 2 && weight.is_contiguous(), op,
                    ": weight must be a contiguous 2-D [out, in] tensor, got shape ", weight.sizes(), " and strides ",
                    weight.strides());
  TORCH_CHECK_VALUE(weight.scalar_type() == x.scalar_type(), op, ": x and weight must share a dtype, got ",
                    x.scalar_type(), " and ", weight.scalar_type());
  const int64_t out_features = weight.size(0);
  const int64_t in_features = weight.size(1);
  TORCH_CHECK_VALUE(x.size(1) == in_features, op, ": x must have ", in_features, " features to match weight ",
                    weight.sizes(), ", got ", x.sizes());
  if (bias.has_value()) {
    TORCH_CHECK_VALUE(bias->scalar_type() == x.scalar_type(), op, ": bias must have x's dtype ", x.scalar_type(),
                      ", got ", bias->scalar_type());
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->numel() == out_features && bias->is_contiguous(), op,
                      ": bias must be contiguous with shape [", out_features, "], got shape ", bias->sizes());
  }
  check_int_vector(index, op, "index", -1);
  check_values(delta, op, index.numel());
  check_int_vector(row_ptr, op, "row_ptr", out_features + 1);
  check_pointer_dtypes(index, row_ptr, op, "row_ptr");
  check_same_cuda_device({{&x, "x"}, {&weight, "weight"}, {&delta, "delta"}, {&index, "index"},
                          {&row_ptr, "row_ptr"}, {or_null(bias), "bias"}}, op);
  // Output-row blocks go on grid.y (at most 65535 blocks of 64 rows, 128 for fp16/bf16).
  TORCH_CHECK_VALUE(out_features <= int64_t{65535} * 64, op, ": at most ", int64_t{65535} * 64,
                    " output features, got ", out_features);
  check_tensor_cores(x, op);
  const c10::cuda::CUDAGuard guard(x.device());
  // fp32 delta, fp64 when the weight or the master is fp64: W0 + delta then rounds exactly as the
  // merged mode's re-sync (scatter_delta.cu sums in fp64 when either operand is fp64; an fp64
  // master rounded to fp32 first gave another weight).
  const bool delta_fp64 = x.scalar_type() == at::kDouble || delta.scalar_type() == at::kDouble;
  const at::Tensor values = delta_in(delta, delta_fp64);
  at::Tensor y = new_output({x.size(0), out_features}, x.options().memory_format(at::MemoryFormat::Contiguous));
  check_launch(spft::fused_delta_linear(x.data_ptr(), x.stride(0), weight.data_ptr(),
                                        bias.has_value() ? bias->data_ptr() : nullptr, float_dtype(x, op, "x"),
                                        values.data_ptr(), delta_fp64, index.data_ptr(), is_int64(index),
                                        row_ptr.data_ptr(),
                                        is_int64(row_ptr), x.size(0), out_features, in_features, y.data_ptr(),
                                        stream_of(x)),
               op);
  return y;
}

}  // namespace

// FRAGMENT: the Python side defines further spft:: ops in the same namespace.
TORCH_LIBRARY_FRAGMENT(spft, m) {
  m.def("cuda_scatter_delta_(Tensor(a!) weight, Tensor index, Tensor? base, Tensor? delta, float alpha) -> ()");
  m.def("cuda_row_gather(Tensor src, Tensor rows) -> Tensor");
  m.def("cuda_row_scatter_add_(Tensor(a!) y, Tensor z, Tensor rows) -> ()");
  m.def("cuda_spmm_add(Tensor base, Tensor x, Tensor delta, Tensor index, Tensor row_ptr) -> Tensor");
  m.def("cuda_spmm_t_add(Tensor base, Tensor dy, Tensor delta, Tensor index, Tensor col_ptr, Tensor csc_perm) -> Tensor");
  m.def("cuda_sddmm(Tensor x, Tensor dy, Tensor index, Tensor? tile_ptr) -> Tensor");
  m.def("cuda_fused_delta_linear(Tensor x, Tensor weight, Tensor delta, Tensor index, Tensor row_ptr, Tensor? bias) -> Tensor");
}

TORCH_LIBRARY_IMPL(spft, CUDA, m) {
  m.impl("cuda_scatter_delta_", &scatter_delta_);
  m.impl("cuda_row_gather", &row_gather);
  m.impl("cuda_row_scatter_add_", &row_scatter_add_);
  m.impl("cuda_spmm_add", &spmm_add);
  m.impl("cuda_spmm_t_add", &spmm_t_add);
  m.impl("cuda_sddmm", &sddmm);
  m.impl("cuda_fused_delta_linear", &fused_delta_linear);
}

// CPU tensors reach the same checks and get "must be a CUDA tensor" (or the first structural
// problem) instead of the dispatcher's generic "could not run with arguments from the CPU backend".
TORCH_LIBRARY_IMPL(spft, CPU, m) {
  m.impl("cuda_spmm_add", &spmm_add);
  m.impl("cuda_spmm_t_add", &spmm_t_add);
  m.impl("cuda_sddmm", &sddmm);
  m.impl("cuda_fused_delta_linear", &fused_delta_linear);
}

// A plain module so that `import spft_kernels._C` loads the library and runs the registrations.
static PyModuleDef spft_module = {PyModuleDef_HEAD_INIT, "_C", "spft_kernels CUDA kernels", -1, nullptr};
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&spft_module); }
