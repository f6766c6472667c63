// Dense linear with narrow weights (fp16 / bf16, or int8 with scales per row and group) and fp32
// accumulation, for the float layers a quantized model keeps: the lm_head above all
// (SmolLM2-135M's tied 49152 x 576 head is larger than all its 1-bit layers together). See dense.cpp.
#pragma once

#include <torch/extension.h>

#include <optional>

namespace onebit_cpu {

// y (M, N) in x's dtype = x (M, K) @ w (N, K)^T. x float32 / float16 / bfloat16; w float16,
// bfloat16, or int8 standing for w[n, k] * scale[n, k / group], with scale (N, ceil(K / group))
// float32 given exactly when w is int8 and group a multiple of 16 or >= K (one scale per row);
// all contiguous CPU tensors. isa: 0 scalar, 1 avx2, 2 avx512 (the caller checks the CPU can
// run it).
at::Tensor dense_forward(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& scale, int64_t group, int isa);

}  // namespace onebit_cpu
