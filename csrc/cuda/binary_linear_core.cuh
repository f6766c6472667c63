// onebit CUDA core: binary GEMV (A16) and popcount GEMV (W1A8) over packed format v1.
//
// Plain CUDA C++ (no torch headers) so CI can compile it with nvcc alone for sm_80/sm_90,
// and so the per-row math below, written as __host__ __device__ functions, can also be
// compiled for and checked on the host (tests/test_gpu_compile.py runs it on the CPU
// against onebit.reference): the kernels only add the thread mapping and warp reduction.
//
// Format v1 (onebit/format.py): int32 sign words (P, N, K_pad/32), LSB first along K,
// bit 1 = +1; optional group words (N, K_pad/32); out_scale and mean (T, N, n_blocks) and
// in_scale (T, K_pad) in fp16/bf16/fp32; term t = (plane, select ALL/GROUP0/GROUP1).
//
//   A16:  y[m,i] = sum_t sum_b out_t[i,b] * sum_{j in b} sel*s*x'_t[m,j] + mean_t[i,b] * sum sel*x'_t[m,j]
//         x'_t = in_scale_t * x is folded once per token (prologue kernel, fp32 workspace).
//   A8:   x'_t quantized per token to int8 q (scale a_t[m] = amax/127, round half to even,
//         exactly onebit.reference.quantize_act_int8), stored as 8 two's-complement bit
//         planes; sum mask*q = sum_{p<7} 2^p popc(mask & Q_p) - 128 popc(mask & Q_7).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include "binary_linear_api.h"

#define ONEBIT_HD __host__ __device__ __forceinline__

namespace onebit {

ONEBIT_HD float load_scale(const void* p, int dtype, int64_t i) {
  if (dtype == kFloat16) return __half2float(static_cast<const __half*>(p)[i]);
  if (dtype == kBFloat16) return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
  return static_cast<const float*>(p)[i];
}

template <typename T>
ONEBIT_HD float to_float(T v);
template <>
ONEBIT_HD float to_float<float>(float v) { return v; }
template <>
ONEBIT_HD float to_float<__half>(__half v) { return __half2float(v); }
template <>
ONEBIT_HD float to_float<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

ONEBIT_HD int popc32(uint32_t v) {
#ifdef __CUDA_ARCH__
  return __popc(v);
#else
  return __builtin_popcount(v);
#endif
}

// Division and product are spelled as _rn intrinsics so the result stays IEEE (bit-identical
// to torch) even when the extension is compiled with --use_fast_math (approximate '/').
ONEBIT_HD float div_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}

ONEBIT_HD float mul_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

// Selector word of term t for one (row, word): which weights the term covers.
ONEBIT_HD uint32_t select_word(int select, uint32_t g) {
  return select == kAll ? 0xFFFFFFFFu : (select == kGroup0 ? ~g : g);
}

// ------------------------------------------------------------------------------- A16

// Lane mapping of the A16 kernel (binary_linear.cu): the 32 lanes of a warp load 32
// consecutive sign words of one row (coalesced), then walk them one word at a time,
// broadcasting the word with __shfl_sync, and lane j takes column 32 w + j. The folded
// activations x' are then read 32 consecutive floats per warp instruction (one 128 B line)
// instead of one line per lane, and each lane turns its bit into an effective weight once
// per term and reuses it for all MT tokens.
//
// a16_lane_update: the contribution of weight column 32 ww + lane of one row, all terms:
//   w_eff = sel ? (s ? out_scale : -out_scale) + mean : 0;   acc[m] += w_eff * x'_t[m, col]
// (exactly the reference's sel * (out_scale * s + mean) per term, one FMA per token).
// words[q]: sign word ww of plane q for this row; g: the group word (0 without groups).
template <int MT>
ONEBIT_HD void a16_lane_update(const BinaryLinearParams& p, const float* xs, int m_total, int m_count, int row,
                               int ww, int lane, const uint32_t words[kMaxPlanes], uint32_t g, float acc[MT]) {
  const int b = (ww * 32) / p.block_size;
  const int col = ww * 32 + lane;
  const uint32_t bit = 1u << lane;
  for (int t = 0; t < p.n_terms; ++t) {
    uint32_t s = 0;
#pragma unroll
    for (int q = 0; q < kMaxPlanes; ++q) s = (q == p.term_plane[t]) ? words[q] : s;  // no dynamic register index
    const uint32_t sel = select_word(p.term_select[t], g);
    const int64_t sidx = (static_cast<int64_t>(t) * p.n + row) * p.n_blocks + b;
    const float os = load_scale(p.out_scale, p.scale_dtype, sidx);  // same address in all lanes: broadcast
    const float mu = p.mean ? load_scale(p.mean, p.scale_dtype, sidx) : 0.f;
    const float w_eff = (sel & bit) ? ((s & bit) ? os : -os) + mu : 0.f;
    const float* xt = xs + static_cast<int64_t>(t) * m_total * p.k_pad + col;
#pragma unroll
    for (int m = 0; m < MT; ++m) {
      if (m < m_count) acc[m] = fmaf(w_eff, xt[static_cast<int64_t>(m) * p.k_pad], acc[m]);
    }
  }
}

// x'_t[m, k] = in_scale_t[k] * x[m, k] (0 in the K padding), one element.
template <typename T>
ONEBIT_HD float fold_in_scale(const BinaryLinearParams& p, const T* x, int64_t stride_xm, int t, int m, int k) {
  if (k >= p.k) return 0.f;
  return mul_rn(to_float<T>(x[m * stride_xm + k]), load_scale(p.in_scale, p.scale_dtype, static_cast<int64_t>(t) * p.k_pad + k));
}

// ------------------------------------------------------------------------------- A8

// int8 quantization of one value given the token's scale: round half to even, clamp.
ONEBIT_HD int quantize_int8(float v, float scale) {
  float r = rintf(div_rn(v, scale));  // rint: round half to even, as torch.round(x / s)
  r = fminf(fmaxf(r, -127.f), 127.f);
  return static_cast<int>(r);
}

ONEBIT_HD float act_scale_from_amax(float amax) { return amax > 0.f ? div_rn(amax, 127.f) : 1.f; }

// Exact integer sums for one row, one token and one term over words lane, lane + nlanes, ...
// planes: (8, KW) int32 for this (term, token). Returns the scaled fp32 partial.
ONEBIT_HD float a8_row_term_partial(const BinaryLinearParams& p, const int32_t* planes, int t, int row, int lane,
                                    int nlanes) {
  const int64_t row_words = static_cast<int64_t>(row) * p.kw;
  float acc = 0.f;
  for (int w = lane; w < p.kw; w += nlanes) {
    const int b = (w * 32) / p.block_size;
    const uint32_t g = p.groups ? static_cast<uint32_t>(p.groups[row_words + w]) : 0u;
    const uint32_t s =
        static_cast<uint32_t>(p.signs[static_cast<int64_t>(p.term_plane[t]) * p.n * p.kw + row_words + w]);
    const uint32_t sel = select_word(p.term_select[t], g);
    const uint32_t pos = s & sel;
    int ipos = 0, isel = 0;
#pragma unroll
    for (int q = 0; q < kActPlanes; ++q) {
      const uint32_t a = static_cast<uint32_t>(planes[static_cast<int64_t>(q) * p.kw + w]);
      const int wgt = q < 7 ? (1 << q) : -128;
      ipos += wgt * popc32(a & pos);
      isel += wgt * popc32(a & sel);
    }
    const int64_t sidx = (static_cast<int64_t>(t) * p.n + row) * p.n_blocks + b;
    const float os = load_scale(p.out_scale, p.scale_dtype, sidx);
    const float mu = p.mean ? load_scale(p.mean, p.scale_dtype, sidx) : 0.f;
    acc += os * static_cast<float>(2 * ipos - isel) + mu * static_cast<float>(isel);
  }
  return acc;
}

}  // namespace onebit
