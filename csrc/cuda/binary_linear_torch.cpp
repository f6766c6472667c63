// Thin torch binding of the onebit CUDA kernels: checks tensors, allocates the output and
// the workspace on the current stream's device, calls the plain-CUDA launchers
// (binary_linear.cu). Built as the extension `onebit._C_cuda` (TORCH_EXTENSION_NAME).
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include <string>
#include <vector>

#include "binary_linear_api.h"

namespace {

int dtype_code(const torch::Tensor& t, const char* what) {
  switch (t.scalar_type()) {
    case torch::kFloat32: return onebit::kFloat32;
    case torch::kFloat16: return onebit::kFloat16;
    case torch::kBFloat16: return onebit::kBFloat16;
    default: TORCH_CHECK(false, what, " must be float32, float16 or bfloat16, got ", t.scalar_type());
  }
  return -1;
}

void check_tensor(const torch::Tensor& t, const torch::Tensor& like, const char* what) {
  TORCH_CHECK(t.is_cuda(), what, " must be a CUDA tensor");
  TORCH_CHECK(t.device() == like.device(), what, " is on ", t.device(), " but x is on ", like.device());
  TORCH_CHECK(t.is_contiguous(), what, " must be contiguous");
}

// y (M, N) fp32 = x (M, K) @ W^T, W given by the format-v1 tensors (see onebit/format.py).
torch::Tensor binary_linear(torch::Tensor x, torch::Tensor signs, c10::optional<torch::Tensor> groups,
                            torch::Tensor out_scale, torch::Tensor in_scale, c10::optional<torch::Tensor> mean,
                            std::vector<int64_t> term_planes, std::vector<int64_t> term_selects, int64_t in_features,
                            int64_t block_size, int64_t act_bits) {
  TORCH_CHECK(x.is_cuda() && x.dim() == 2, "x must be a 2-D CUDA tensor");
  TORCH_CHECK(x.size(1) == in_features, "x has ", x.size(1), " columns, in_features is ", in_features);
  TORCH_CHECK(act_bits == 16 || act_bits == 8, "act_bits must be 16 or 8, got ", act_bits);
  const int x_dtype = dtype_code(x, "x");
  if (x.stride(1) != 1) x = x.contiguous();
  check_tensor(signs, x, "signs");
  check_tensor(out_scale, x, "out_scale");
  check_tensor(in_scale, x, "in_scale");
  TORCH_CHECK(signs.scalar_type() == torch::kInt32 && signs.dim() == 3, "signs must be int32 (P, N, K_pad/32)");
  TORCH_CHECK(signs.size(0) >= 1 && signs.size(0) <= onebit::kMaxPlanes, "the CUDA kernels support 1..",
              onebit::kMaxPlanes, " sign planes, got ", signs.size(0));
  TORCH_CHECK(block_size > 0 && block_size % 32 == 0, "block_size must be a positive multiple of 32");
  const int64_t n = signs.size(1), kw = signs.size(2), k_pad = kw * 32;
  const int64_t n_terms = static_cast<int64_t>(term_planes.size());
  TORCH_CHECK(n_terms >= 1 && n_terms <= onebit::kMaxTerms, "1..", onebit::kMaxTerms, " terms supported");
  TORCH_CHECK(term_selects.size() == term_planes.size(), "term_planes and term_selects differ in length");
  TORCH_CHECK(k_pad % block_size == 0 && k_pad >= in_features && k_pad - in_features < block_size,
              "signs have K_pad=", k_pad, " which is not in_features=", in_features, " padded to block ", block_size);
  const int64_t n_blocks = k_pad / block_size;
  TORCH_CHECK(out_scale.sizes() == torch::IntArrayRef({n_terms, n, n_blocks}), "out_scale must be (T, N, n_blocks)");
  TORCH_CHECK(in_scale.sizes() == torch::IntArrayRef({n_terms, k_pad}), "in_scale must be (T, K_pad)");
  const int scale_dtype = dtype_code(out_scale, "out_scale");
  TORCH_CHECK(in_scale.scalar_type() == out_scale.scalar_type(), "all scales must share one dtype");

  onebit::BinaryLinearParams p{};
  p.signs = signs.data_ptr<int32_t>();
  p.groups = nullptr;
  p.mean = nullptr;
  bool needs_groups = false;
  for (int64_t t = 0; t < n_terms; ++t) {
    TORCH_CHECK(term_planes[t] >= 0 && term_planes[t] < signs.size(0), "term ", t, " reads a missing plane");
    TORCH_CHECK(term_selects[t] >= 0 && term_selects[t] <= 2, "term ", t, " has a bad selector");
    p.term_plane[t] = static_cast<int>(term_planes[t]);
    p.term_select[t] = static_cast<int>(term_selects[t]);
    needs_groups |= term_selects[t] != onebit::kAll;
  }
  if (groups.has_value()) {
    check_tensor(*groups, x, "groups");
    TORCH_CHECK(groups->scalar_type() == torch::kInt32 && groups->sizes() == torch::IntArrayRef({n, kw}),
                "groups must be int32 (N, K_pad/32)");
    p.groups = groups->data_ptr<int32_t>();
  }
  TORCH_CHECK(!needs_groups || p.groups, "the layout selects groups but no group bitmap was given");
  if (mean.has_value()) {
    check_tensor(*mean, x, "mean");
    TORCH_CHECK(mean->sizes() == out_scale.sizes() && mean->scalar_type() == out_scale.scalar_type(),
                "mean must match out_scale in shape and dtype");
    p.mean = mean->data_ptr();
  }
  p.out_scale = out_scale.data_ptr();
  p.in_scale = in_scale.data_ptr();
  p.scale_dtype = scale_dtype;
  p.n = static_cast<int>(n);
  p.k = static_cast<int>(in_features);
  p.k_pad = static_cast<int>(k_pad);
  p.kw = static_cast<int>(kw);
  p.block_size = static_cast<int>(block_size);
  p.n_blocks = static_cast<int>(n_blocks);
  p.n_terms = static_cast<int>(n_terms);
  p.n_planes = static_cast<int>(signs.size(0));

  const c10::cuda::CUDAGuard guard(x.device());
  const int m = static_cast<int>(x.size(0));
  auto y = torch::empty({m, n}, x.options().dtype(torch::kFloat32));
  if (m == 0) return y;
  const size_t ws_bytes = act_bits == 8 ? onebit_a8_workspace_bytes(p, m) : onebit_a16_workspace_bytes(p, m);
  auto ws = torch::empty({static_cast<int64_t>(ws_bytes)}, x.options().dtype(torch::kUInt8));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.device().index()).stream();
  const cudaError_t err =
      act_bits == 8
          ? onebit_binary_linear_a8(p, x.data_ptr(), x_dtype, x.stride(0), m, y.data_ptr<float>(), ws.data_ptr(), stream)
          : onebit_binary_linear_a16(p, x.data_ptr(), x_dtype, x.stride(0), m, y.data_ptr<float>(), ws.data_ptr(),
                                     stream);
  TORCH_CHECK(err == cudaSuccess, "onebit CUDA binary_linear failed: ", cudaGetErrorString(err));
  return y;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "onebit CUDA kernels: binary GEMV (A16) and popcount GEMV (W1A8) over packed format v1";
  m.def("binary_linear", &binary_linear, "y (M, N) fp32 = x @ W^T for a packed 1-bit W", py::arg("x"),
        py::arg("signs"), py::arg("groups"), py::arg("out_scale"), py::arg("in_scale"), py::arg("mean"),
        py::arg("term_planes"), py::arg("term_selects"), py::arg("in_features"), py::arg("block_size"),
        py::arg("act_bits"));
}
