// onebit CUDA kernels: binary GEMV (A16) and popcount GEMV (W1A8). See binary_linear_core.cuh
// for the math and format; this file adds thread mapping, warp reductions and launchers.
//
// Mapping: one warp per output row. A16: the warp loads 32 consecutive sign words of its row
// (128 B per plane, coalesced) and walks them with __shfl_sync, lane j owning column 32 w + j,
// so the folded activations x' (fp32, T x M x K_pad, shared by all rows, L1/L2 resident) are
// read one 128 B line per warp instruction (see a16_lane_update). A8: lanes stride over the
// row's words (popcount is word-granular). Up to 8 tokens per pass (template MT), so at
// batch 1 each sign word is read once from DRAM.
// Trade-offs / limits: no tensor cores (M > 8 runs in chunks of 8 tokens: use the Triton
// GEMM for prefill); the term list is a runtime table in the params (uniform branches),
// not specialised per layout; workspaces come from the caller (CUDA-graph safe, no mallocs).
#include <cuda_runtime.h>

#include "binary_linear_core.cuh"

namespace onebit {
namespace {

constexpr int kWarps = 8;  // rows per 256-thread block
constexpr unsigned kFull = 0xFFFFFFFFu;

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFull, v, o);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(kFull, v, o));
  return v;
}

// xs[t, m, k] = in_scale_t[k] * x[m, k]; grid (T * M, ceil(K_pad / 256)).
template <typename T>
__global__ void fold_kernel(BinaryLinearParams p, const T* __restrict__ x, int64_t stride_xm, int m_total,
                            float* __restrict__ xs) {
  const int tm = blockIdx.x, t = tm / m_total, m = tm % m_total;
  const int k = blockIdx.y * blockDim.x + threadIdx.x;
  if (k < p.k_pad) xs[static_cast<int64_t>(tm) * p.k_pad + k] = fold_in_scale<T>(p, x, stride_xm, t, m, k);
}

template <int MT>
__global__ void __launch_bounds__(kWarps * 32) a16_kernel(BinaryLinearParams p, const float* __restrict__ xs,
                                                          int m_total, int m0, int m_count, float* __restrict__ y) {
  const int lane = threadIdx.x & 31;
  const int row = blockIdx.x * kWarps + (threadIdx.x >> 5);
  if (row >= p.n) return;  // whole warp exits together: the shuffles below stay full-warp
  float acc[MT];
#pragma unroll
  for (int m = 0; m < MT; ++m) acc[m] = 0.f;
  const float* xs0 = xs + static_cast<int64_t>(m0) * p.k_pad;
  const int64_t row_words = static_cast<int64_t>(row) * p.kw;
  for (int w0 = 0; w0 < p.kw; w0 += 32) {
    // 32 consecutive words of this row, one per lane (coalesced 128 B per plane) ...
    const int w = w0 + lane;
    uint32_t mine[kMaxPlanes];
#pragma unroll
    for (int q = 0; q < kMaxPlanes; ++q)
      mine[q] = (q < p.n_planes && w < p.kw)
                    ? static_cast<uint32_t>(__ldg(p.signs + static_cast<int64_t>(q) * p.n * p.kw + row_words + w))
                    : 0u;
    const uint32_t g_mine = (p.groups && w < p.kw) ? static_cast<uint32_t>(__ldg(p.groups + row_words + w)) : 0u;
    // ... then walked one word at a time, lane j taking column 32 w + j.
    const int nw = min(32, p.kw - w0);
    for (int j = 0; j < nw; ++j) {
      uint32_t words[kMaxPlanes];
#pragma unroll
      for (int q = 0; q < kMaxPlanes; ++q) words[q] = __shfl_sync(kFull, mine[q], j);
      const uint32_t g = __shfl_sync(kFull, g_mine, j);
      a16_lane_update<MT>(p, xs0, m_total, m_count, row, w0 + j, lane, words, g, acc);
    }
  }
#pragma unroll
  for (int m = 0; m < MT; ++m) {
    const float v = warp_sum(acc[m]);
    if (lane == 0 && m < m_count) y[static_cast<int64_t>(m0 + m) * p.n + row] = v;
  }
}

// One 256-thread block per (term, token) row of x': block amax -> scale -> int8 q -> 8 bit
// planes, one __ballot_sync per plane and 32-column word (lane j owns column 32 w + j).
// planes (T, M, 8, KW) int32, a_scale (T, M) fp32. Grid: T * M blocks.
template <typename T>
__global__ void __launch_bounds__(kWarps * 32) a8_quantize_kernel(BinaryLinearParams p, const T* __restrict__ x,
                                                                  int64_t stride_xm, int m_total,
                                                                  int32_t* __restrict__ planes,
                                                                  float* __restrict__ a_scale) {
  __shared__ float red[kWarps];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int tm = blockIdx.x;
  const int t = tm / m_total, m = tm % m_total;
  float amax = 0.f;
  for (int k = threadIdx.x; k < p.k_pad; k += kWarps * 32)
    amax = fmaxf(amax, fabsf(fold_in_scale<T>(p, x, stride_xm, t, m, k)));
  amax = warp_max(amax);  // max is exact: any reduction order gives torch's amax
  if (lane == 0) red[warp] = amax;
  __syncthreads();
  if (warp == 0) {
    float v = warp_max(lane < kWarps ? red[lane] : 0.f);
    if (lane == 0) red[0] = v;
  }
  __syncthreads();
  const float scale = act_scale_from_amax(red[0]);
  int32_t* out = planes + static_cast<int64_t>(tm) * kActPlanes * p.kw;
  for (int w = warp; w < p.kw; w += kWarps) {
    const int q = quantize_int8(fold_in_scale<T>(p, x, stride_xm, t, m, w * 32 + lane), scale);
#pragma unroll
    for (int b = 0; b < kActPlanes; ++b) {
      const unsigned word = __ballot_sync(kFull, (q >> b) & 1);
      if (lane == 0) out[static_cast<int64_t>(b) * p.kw + w] = static_cast<int32_t>(word);
    }
  }
  if (threadIdx.x == 0) a_scale[tm] = scale;
}

template <int MT>
__global__ void __launch_bounds__(kWarps * 32) a8_kernel(BinaryLinearParams p, const int32_t* __restrict__ planes,
                                                         const float* __restrict__ a_scale, int m_total, int m0,
                                                         int m_count, float* __restrict__ y) {
  const int lane = threadIdx.x & 31;
  const int row = blockIdx.x * kWarps + (threadIdx.x >> 5);
  if (row >= p.n) return;
  float acc[MT];
#pragma unroll
  for (int m = 0; m < MT; ++m) acc[m] = 0.f;
  for (int t = 0; t < p.n_terms; ++t) {
#pragma unroll
    for (int m = 0; m < MT; ++m) {
      if (m >= m_count) break;
      const int64_t tm = static_cast<int64_t>(t) * m_total + m0 + m;
      acc[m] += a_scale[tm] * a8_row_term_partial(p, planes + tm * kActPlanes * p.kw, t, row, lane, 32);
    }
  }
#pragma unroll
  for (int m = 0; m < MT; ++m) {
    const float v = warp_sum(acc[m]);
    if (lane == 0 && m < m_count) y[static_cast<int64_t>(m0 + m) * p.n + row] = v;
  }
}

template <typename T>
void launch_fold(const BinaryLinearParams& p, const void* x, int64_t stride_xm, int m, float* xs, cudaStream_t s) {
  dim3 grid(p.n_terms * m, (p.k_pad + 255) / 256);
  fold_kernel<T><<<grid, 256, 0, s>>>(p, static_cast<const T*>(x), stride_xm, m, xs);
}

template <typename T>
void launch_a8_quantize(const BinaryLinearParams& p, const void* x, int64_t stride_xm, int m, int32_t* planes,
                        float* a_scale, cudaStream_t s) {
  a8_quantize_kernel<T><<<p.n_terms * m, kWarps * 32, 0, s>>>(p, static_cast<const T*>(x), stride_xm, m, planes,
                                                                a_scale);
}

bool params_ok(const BinaryLinearParams& p) {
  return p.n > 0 && p.k > 0 && p.k_pad >= p.k && p.k_pad % 32 == 0 && p.kw * 32 == p.k_pad && p.block_size > 0 &&
         p.block_size % 32 == 0 && p.n_blocks * p.block_size == p.k_pad && p.n_terms > 0 && p.n_terms <= kMaxTerms &&
         p.n_planes > 0 && p.n_planes <= kMaxPlanes;
}

}  // namespace
}  // namespace onebit

using onebit::BinaryLinearParams;

size_t onebit_a16_workspace_bytes(const BinaryLinearParams& p, int m) {
  return sizeof(float) * static_cast<size_t>(p.n_terms) * m * p.k_pad;
}

size_t onebit_a8_workspace_bytes(const BinaryLinearParams& p, int m) {
  const size_t rows = static_cast<size_t>(p.n_terms) * m;
  return rows * onebit::kActPlanes * p.kw * sizeof(int32_t) + rows * sizeof(float);
}

cudaError_t onebit_binary_linear_a16(const BinaryLinearParams& p, const void* x, int x_dtype, int64_t stride_xm,
                                     int m, float* y, void* workspace, cudaStream_t stream) {
  using namespace onebit;
  if (!params_ok(p) || m < 0) return cudaErrorInvalidValue;
  if (m == 0) return cudaSuccess;
  float* xs = static_cast<float*>(workspace);
  switch (x_dtype) {
    case kFloat32: launch_fold<float>(p, x, stride_xm, m, xs, stream); break;
    case kFloat16: launch_fold<__half>(p, x, stride_xm, m, xs, stream); break;
    case kBFloat16: launch_fold<__nv_bfloat16>(p, x, stride_xm, m, xs, stream); break;
    default: return cudaErrorInvalidValue;
  }
  const int blocks = (p.n + kWarps - 1) / kWarps;
  for (int m0 = 0; m0 < m; m0 += kMaxM) {
    const int mc = m - m0 < kMaxM ? m - m0 : kMaxM;
    if (mc == 1) a16_kernel<1><<<blocks, kWarps * 32, 0, stream>>>(p, xs, m, m0, mc, y);
    else if (mc == 2) a16_kernel<2><<<blocks, kWarps * 32, 0, stream>>>(p, xs, m, m0, mc, y);
    else if (mc <= 4) a16_kernel<4><<<blocks, kWarps * 32, 0, stream>>>(p, xs, m, m0, mc, y);
    else a16_kernel<8><<<blocks, kWarps * 32, 0, stream>>>(p, xs, m, m0, mc, y);
  }
  return cudaGetLastError();
}

cudaError_t onebit_binary_linear_a8(const BinaryLinearParams& p, const void* x, int x_dtype, int64_t stride_xm, int m,
                                    float* y, void* workspace, cudaStream_t stream) {
  using namespace onebit;
  if (!params_ok(p) || m < 0) return cudaErrorInvalidValue;
  if (m == 0) return cudaSuccess;
  const size_t rows = static_cast<size_t>(p.n_terms) * m;
  int32_t* planes = static_cast<int32_t*>(workspace);
  float* a_scale = reinterpret_cast<float*>(planes + rows * kActPlanes * p.kw);
  switch (x_dtype) {
    case kFloat32: launch_a8_quantize<float>(p, x, stride_xm, m, planes, a_scale, stream); break;
    case kFloat16: launch_a8_quantize<__half>(p, x, stride_xm, m, planes, a_scale, stream); break;
    case kBFloat16: launch_a8_quantize<__nv_bfloat16>(p, x, stride_xm, m, planes, a_scale, stream); break;
    default: return cudaErrorInvalidValue;
  }
  const int blocks = (p.n + kWarps - 1) / kWarps;
  for (int m0 = 0; m0 < m; m0 += kMaxM) {
    const int mc = m - m0 < kMaxM ? m - m0 : kMaxM;
    if (mc == 1) a8_kernel<1><<<blocks, kWarps * 32, 0, stream>>>(p, planes, a_scale, m, m0, mc, y);
    else if (mc == 2) a8_kernel<2><<<blocks, kWarps * 32, 0, stream>>>(p, planes, a_scale, m, m0, mc, y);
    else if (mc <= 4) a8_kernel<4><<<blocks, kWarps * 32, 0, stream>>>(p, planes, a_scale, m, m0, mc, y);
    else a8_kernel<8><<<blocks, kWarps * 32, 0, stream>>>(p, planes, a_scale, m, m0, mc, y);
  }
  return cudaGetLastError();
}
