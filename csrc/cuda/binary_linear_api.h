// onebit CUDA: the plain C++ interface of the kernels (no torch, no device code).
// Included by the torch binding (binary_linear_torch.cpp, host compiler) and by the
// CUDA core (binary_linear_core.cuh). Format and math: see binary_linear_core.cuh.
#pragma once

#include <cuda_runtime_api.h>
#include <stddef.h>
#include <stdint.h>

namespace onebit {

constexpr int kMaxTerms = 16;
constexpr int kMaxM = 8;      // tokens per GEMV pass; larger M runs in chunks of 8
constexpr int kActPlanes = 8;
constexpr int kMaxPlanes = 4;  // sign planes per weight (CGB uses 2)

enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };
enum Select : int { kAll = 0, kGroup0 = 1, kGroup1 = 2 };

struct BinaryLinearParams {
  const int32_t* signs;   // (P, N, KW)
  const int32_t* groups;  // (N, KW) or nullptr
  const void* out_scale;  // (T, N, n_blocks)
  const void* in_scale;   // (T, K_pad)
  const void* mean;       // (T, N, n_blocks) or nullptr
  int scale_dtype;        // DType of out_scale / in_scale / mean
  int n, k, k_pad, kw, block_size, n_blocks, n_terms, n_planes;
  int term_plane[kMaxTerms];
  int term_select[kMaxTerms];
};

}  // namespace onebit

// ------------------------------------------------------------------------------- host API
// Launchers (binary_linear.cu). All pointers are device pointers; x is (M, K) with row
// stride stride_xm (unit stride along K); y (M, N) fp32 contiguous. Workspaces are
// allocated by the caller (sizes below) so the launches are CUDA-graph safe.

// A16 workspace: n_terms * M * k_pad floats.
size_t onebit_a16_workspace_bytes(const onebit::BinaryLinearParams& p, int m);
cudaError_t onebit_binary_linear_a16(const onebit::BinaryLinearParams& p, const void* x, int x_dtype,
                                     int64_t stride_xm, int m, float* y, void* workspace, cudaStream_t stream);

// A8 workspace: n_terms * M * (8 * kw int32 planes + 1 float scale).
size_t onebit_a8_workspace_bytes(const onebit::BinaryLinearParams& p, int m);
cudaError_t onebit_binary_linear_a8(const onebit::BinaryLinearParams& p, const void* x, int x_dtype,
                                    int64_t stride_xm, int m, float* y, void* workspace, cudaStream_t stream);
