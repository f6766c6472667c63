// Dense linear with 16-bit (fp16 / bf16) weights and fp32 accumulation, for the float layers a
// quantized model keeps (the lm_head above all: SmolLM2-135M's tied 49152 x 576 head is larger
// than all its 1-bit layers together). See dense16.cpp.
#pragma once

#include <torch/extension.h>

namespace onebit_cpu {

// y (M, N) in x's dtype = x (M, K) @ w (N, K)^T; x float32 / float16 / bfloat16, w float16 or
// bfloat16, both contiguous CPU tensors. isa: 0 scalar, 1 avx2, 2 avx512 (the caller checks the
// CPU can run it).
at::Tensor dense16_forward(const at::Tensor& x, const at::Tensor& w, int isa);

}  // namespace onebit_cpu
