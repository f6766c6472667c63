// AVX-512 LUT kernels (F + BW + VL + DQ), selected at run time by the dispatcher.
//
// A16: one `vpermps` looks up 16 rows' nibbles in a 16-entry fp32 table of subset sums of
// 4 activations, i.e. 64 weight-activation products per instruction (masked add does 16).
// A8: one `vpermw` looks up 32 rows in an int16 table of subset sums of 4 int8 values,
// 128 products per instruction, exact in integers; int16 partial sums are widened to int32
// every 32 bytes (|sum| <= 64 * 4 * 127 < 2^15).
// Weights of a 32-row tile stream once per pass of up to kMaxMB tokens (the dispatcher runs
// all passes of a token group over ~256 KB of tiles before moving on, so weights come from
// L2 after the first pass); tables come from L1/L2.
//
// Limits measured on the project's machines (Sapphire-Rapids-class cores, 512-bit ports 0
// and 5): A16 issues 6 port-5 uops (2 vpmovzxbd + 4 vpermps) per 256 weights and token, so
// it is port-5 bound at ~0.023 cycles/weight, and single-threaded it streams ~15-17 GB/s
// from L3 when the weight does not fit L2. vpermw with its add costs ~1.6x vpermps+add, so
// A8 (twice the lanes) gains only ~10-25% over A16. GROUP terms (kSEL) cost 2 lookups per
// 4 weights plus the and/andn.
#include <immintrin.h>
#include <stdint.h>

#include "lut.h"

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,fma,avx2")
// gcc 12 flags the intrinsics' own _mm512_undefined_*() temporaries as uninitialized.
#pragma GCC diagnostic ignored "-Wuninitialized"

namespace onebit_cpu {
namespace {


inline int imin(int a, int b) { return a < b ? a : b; }
inline int imax(int a, int b) { return a > b ? a : b; }

// Blocks per chunk. Chunking keeps a chunk's tables in L1 while all tiles stream past, but it
// cuts each tile's weight stream into short runs separated by a large stride, which the
// hardware prefetchers do not follow; with tables in L2 (a 64-byte table load per 256
// weights and token, well within L2 bandwidth) a whole-row stream per tile is faster. So
// the default is one chunk; ONEBIT_CPU_CHUNK_KB=<kbytes> restores L1 chunking (tuning).
inline int chunk_blocks(const LutProblem& P, int mb, int bytes_per_kb, long l1_bytes) {
  if (l1_bytes <= 0) return P.n_blocks;
  long kb_total = 0;
  for (int a = 0; a < P.n_acts; ++a) kb_total += P.act_kbytes[a];
  const long per_block = (kb_total * bytes_per_kb * mb + P.n_blocks - 1) / P.n_blocks;
  return imax(1, static_cast<int>(l1_bytes / (per_block > 0 ? per_block : 1)));
}

// The 32 coefficients of (job j, tile t, block b), fp32 or converted from fp16.
inline void load_coef(const LutProblem& P, int j, long idx, __m512& c0, __m512& c1) {
  if (P.job_coef_f16[j]) {
    const uint16_t* h = static_cast<const uint16_t*>(P.job_coef[j]) + idx;
    c0 = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(h)));
    c1 = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(h + 16)));
  } else {
    const float* f = static_cast<const float*>(P.job_coef[j]) + idx;
    c0 = _mm512_loadu_ps(f);
    c1 = _mm512_loadu_ps(f + 16);
  }
}

inline void add_ecoef(const LutProblem& P, const LutTokens& T, int t, int b0, int b1, float* yt, long ystride) {
  const int nb = P.n_blocks, A = P.n_acts;
  for (int a = 0; a < A; ++a) {
    const float* ec = P.act_ecoef[a];
    if (!ec) continue;
    ec += static_cast<long>(t) * nb * kTileRows;
    for (int m = 0; m < T.mb; ++m) {
      const float st = T.stok ? T.stok[m * A + a] : 1.0f;
      const float* xs = T.xsum + (static_cast<long>(m) * A + a) * nb;
      __m512 y0 = _mm512_loadu_ps(yt + m * ystride), y1 = _mm512_loadu_ps(yt + m * ystride + 16);
      for (int b = b0; b < b1; ++b) {
        const __m512 s = _mm512_set1_ps(st * xs[b]);
        y0 = _mm512_fmadd_ps(_mm512_loadu_ps(ec + b * kTileRows), s, y0);
        y1 = _mm512_fmadd_ps(_mm512_loadu_ps(ec + b * kTileRows + 16), s, y1);
      }
      _mm512_storeu_ps(yt + m * ystride, y0);
      _mm512_storeu_ps(yt + m * ystride + 16, y1);
    }
  }
}

// One job over blocks [b0, b1) of tile t, A16: fp32 tables, vpermps.
template <int MB, int KIND>
inline void a16_job(const LutProblem& P, const LutTokens& T, int j, int t, int b0, int b1, float* yt, long ystride) {
  const int nb = P.n_blocks, A = P.n_acts, a = P.job_act[j];
  const int32_t* bo = P.act_boff[a];
  const long off = static_cast<long>(t) * P.act_kbytes[a] * kTileRows;
  const uint8_t* pb = P.job_b[j] + off;
  const uint8_t* pg = KIND == kSEL ? P.job_g[j] + off : nullptr;
  const __m128i inv = _mm_set1_epi8(P.job_inv[j] ? -1 : 0);
  const long coff = static_cast<long>(t) * nb * kTileRows;
  const float* tab[MB];
  for (int m = 0; m < MB; ++m) tab[m] = static_cast<const float*>(T.tables[(m * A + a) * 2 + (KIND == kPM ? 0 : 1)]);
  for (int b = b0; b < b1; ++b) {
    const int kb0 = bo[b], kb1 = bo[b + 1];
    if (kb0 == kb1) continue;
    // Four accumulators per token (row halves x nibble halves): vaddps latency is 4
    // cycles, so one token alone needs independent chains to keep the ports busy.
    __m512 acc[MB][4];
    for (int m = 0; m < MB; ++m)
      for (int u = 0; u < 4; ++u) acc[m][u] = _mm512_setzero_ps();
    for (int kb = kb0; kb < kb1; ++kb) {
      const uint8_t* w = pb + static_cast<long>(kb) * kTileRows;
      __m128i x0 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w));
      __m128i x1 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + 16));
      __m128i v0, v1;
      if (KIND == kS01) {
        x0 = _mm_xor_si128(x0, inv);
        x1 = _mm_xor_si128(x1, inv);
      } else if (KIND == kSEL) {
        const uint8_t* g = pg + static_cast<long>(kb) * kTileRows;
        const __m128i g0 = _mm_xor_si128(_mm_loadu_si128(reinterpret_cast<const __m128i*>(g)), inv);
        const __m128i g1 = _mm_xor_si128(_mm_loadu_si128(reinterpret_cast<const __m128i*>(g + 16)), inv);
        v0 = _mm_andnot_si128(x0, g0);
        v1 = _mm_andnot_si128(x1, g1);
        x0 = _mm_and_si128(x0, g0);
        x1 = _mm_and_si128(x1, g1);
      }
      // vpermps reads the low 4 bits of each index: the low nibble needs no mask.
      const __m512i i0 = _mm512_cvtepu8_epi32(x0), i1 = _mm512_cvtepu8_epi32(x1);
      const __m512i h0 = _mm512_srli_epi32(i0, 4), h1 = _mm512_srli_epi32(i1, 4);
      for (int m = 0; m < MB; ++m) {
        const __m512 tl = _mm512_loadu_ps(tab[m] + kb * 32), th = _mm512_loadu_ps(tab[m] + kb * 32 + 16);
        acc[m][0] = _mm512_add_ps(acc[m][0], _mm512_permutexvar_ps(i0, tl));
        acc[m][1] = _mm512_add_ps(acc[m][1], _mm512_permutexvar_ps(h0, th));
        acc[m][2] = _mm512_add_ps(acc[m][2], _mm512_permutexvar_ps(i1, tl));
        acc[m][3] = _mm512_add_ps(acc[m][3], _mm512_permutexvar_ps(h1, th));
      }
      if (KIND == kSEL) {
        const __m512i j0 = _mm512_cvtepu8_epi32(v0), j1 = _mm512_cvtepu8_epi32(v1);
        const __m512i k0 = _mm512_srli_epi32(j0, 4), k1 = _mm512_srli_epi32(j1, 4);
        for (int m = 0; m < MB; ++m) {
          const __m512 tl = _mm512_loadu_ps(tab[m] + kb * 32), th = _mm512_loadu_ps(tab[m] + kb * 32 + 16);
          acc[m][0] = _mm512_sub_ps(acc[m][0], _mm512_permutexvar_ps(j0, tl));
          acc[m][1] = _mm512_sub_ps(acc[m][1], _mm512_permutexvar_ps(k0, th));
          acc[m][2] = _mm512_sub_ps(acc[m][2], _mm512_permutexvar_ps(j1, tl));
          acc[m][3] = _mm512_sub_ps(acc[m][3], _mm512_permutexvar_ps(k1, th));
        }
      }
    }
    __m512 c0, c1;
    load_coef(P, j, coff + static_cast<long>(b) * kTileRows, c0, c1);
    for (int m = 0; m < MB; ++m) {
      float* ym = yt + m * ystride;
      _mm512_storeu_ps(ym, _mm512_fmadd_ps(c0, _mm512_add_ps(acc[m][0], acc[m][1]), _mm512_loadu_ps(ym)));
      _mm512_storeu_ps(ym + 16, _mm512_fmadd_ps(c1, _mm512_add_ps(acc[m][2], acc[m][3]), _mm512_loadu_ps(ym + 16)));
    }
  }
}

// One job over blocks [b0, b1) of tile t, A8: int16 tables, vpermw, exact integer sums.
template <int MB, int KIND>
inline void a8_job(const LutProblem& P, const LutTokens& T, int j, int t, int b0, int b1, float* yt, long ystride) {
  const int nb = P.n_blocks, A = P.n_acts, a = P.job_act[j];
  const int32_t* bo = P.act_boff[a];
  const long off = static_cast<long>(t) * P.act_kbytes[a] * kTileRows;
  const uint8_t* pb = P.job_b[j] + off;
  const uint8_t* pg = KIND == kSEL ? P.job_g[j] + off : nullptr;
  const __m256i inv = _mm256_set1_epi8(P.job_inv[j] ? -1 : 0);
  const long coff = static_cast<long>(t) * nb * kTileRows;
  const int16_t* tab[MB];
  float st[MB];
  for (int m = 0; m < MB; ++m) {
    tab[m] = static_cast<const int16_t*>(T.tables[(m * A + a) * 2 + (KIND == kPM ? 0 : 1)]);
    st[m] = T.stok[m * A + a];
  }
  for (int b = b0; b < b1; ++b) {
    const int kb0 = bo[b], kb1 = bo[b + 1];
    if (kb0 == kb1) continue;
    __m512i acc32[MB][2];
    for (int m = 0; m < MB; ++m) acc32[m][0] = acc32[m][1] = _mm512_setzero_si512();
    for (int s0 = kb0; s0 < kb1; s0 += 32) {
      const int s1 = imin(kb1, s0 + 32);
      __m512i acc[MB][2];
      for (int m = 0; m < MB; ++m) acc[m][0] = acc[m][1] = _mm512_setzero_si512();
      for (int kb = s0; kb < s1; ++kb) {
        __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(pb + static_cast<long>(kb) * kTileRows));
        __m256i v;
        if (KIND == kS01) {
          x = _mm256_xor_si256(x, inv);
        } else if (KIND == kSEL) {
          const __m256i g = _mm256_xor_si256(
              _mm256_loadu_si256(reinterpret_cast<const __m256i*>(pg + static_cast<long>(kb) * kTileRows)), inv);
          v = _mm256_andnot_si256(x, g);
          x = _mm256_and_si256(x, g);
        }
        const __m512i lo = _mm512_cvtepu8_epi16(x);
        const __m512i hi = _mm512_srli_epi16(lo, 4);
        for (int m = 0; m < MB; ++m) {
          const int16_t* tb = tab[m] + kb * 64;
          acc[m][0] = _mm512_add_epi16(acc[m][0], _mm512_permutexvar_epi16(lo, _mm512_loadu_si512(tb)));
          acc[m][1] = _mm512_add_epi16(acc[m][1], _mm512_permutexvar_epi16(hi, _mm512_loadu_si512(tb + 32)));
        }
        if (KIND == kSEL) {
          const __m512i vlo = _mm512_cvtepu8_epi16(v);
          const __m512i vhi = _mm512_srli_epi16(vlo, 4);
          for (int m = 0; m < MB; ++m) {
            const int16_t* tb = tab[m] + kb * 64;
            acc[m][0] = _mm512_sub_epi16(acc[m][0], _mm512_permutexvar_epi16(vlo, _mm512_loadu_si512(tb)));
            acc[m][1] = _mm512_sub_epi16(acc[m][1], _mm512_permutexvar_epi16(vhi, _mm512_loadu_si512(tb + 32)));
          }
        }
      }
      // |acc| <= 32 steps * 508 each, so the int16 sum of the two cannot overflow.
      for (int m = 0; m < MB; ++m) {
        const __m512i s = _mm512_add_epi16(acc[m][0], acc[m][1]);
        acc32[m][0] = _mm512_add_epi32(acc32[m][0], _mm512_cvtepi16_epi32(_mm512_castsi512_si256(s)));
        acc32[m][1] = _mm512_add_epi32(acc32[m][1], _mm512_cvtepi16_epi32(_mm512_extracti64x4_epi64(s, 1)));
      }
    }
    __m512 c0, c1;
    load_coef(P, j, coff + static_cast<long>(b) * kTileRows, c0, c1);
    for (int m = 0; m < MB; ++m) {
      float* ym = yt + m * ystride;
      const __m512 s = _mm512_set1_ps(st[m]);
      _mm512_storeu_ps(ym, _mm512_fmadd_ps(_mm512_mul_ps(c0, s), _mm512_cvtepi32_ps(acc32[m][0]), _mm512_loadu_ps(ym)));
      _mm512_storeu_ps(ym + 16,
                       _mm512_fmadd_ps(_mm512_mul_ps(c1, s), _mm512_cvtepi32_ps(acc32[m][1]), _mm512_loadu_ps(ym + 16)));
    }
  }
}

template <int MB, bool A8>
void lut_pass(const LutProblem& P, const LutTokens& T, int t0, int t1, float* y) {
  const int nb = P.n_blocks;
  const long ystride = static_cast<long>(t1 - t0) * kTileRows;
  const int chunk = chunk_blocks(P, MB, 128, P.chunk_bytes);
  for (int b0 = 0; b0 < nb; b0 += chunk) {
    const int b1 = imin(nb, b0 + chunk);
    for (int t = t0; t < t1; ++t) {
      float* yt = y + static_cast<long>(t - t0) * kTileRows;
      for (int j = 0; j < P.n_jobs; ++j) {
        switch (P.job_kind[j]) {
          case kPM:
            A8 ? a8_job<MB, kPM>(P, T, j, t, b0, b1, yt, ystride) : a16_job<MB, kPM>(P, T, j, t, b0, b1, yt, ystride);
            break;
          case kSEL:
            A8 ? a8_job<MB, kSEL>(P, T, j, t, b0, b1, yt, ystride) : a16_job<MB, kSEL>(P, T, j, t, b0, b1, yt, ystride);
            break;
          default:
            A8 ? a8_job<MB, kS01>(P, T, j, t, b0, b1, yt, ystride) : a16_job<MB, kS01>(P, T, j, t, b0, b1, yt, ystride);
        }
      }
      add_ecoef(P, T, t, b0, b1, yt, ystride);
    }
  }
}

}  // namespace

void lut_a16_avx512(const LutProblem& P, const LutTokens& T, int t0, int t1, float* y) {
  switch (T.mb) {
    case 1: return lut_pass<1, false>(P, T, t0, t1, y);
    case 2: return lut_pass<2, false>(P, T, t0, t1, y);
    case 3: return lut_pass<3, false>(P, T, t0, t1, y);
    default: return lut_pass<4, false>(P, T, t0, t1, y);
  }
}

void lut_a8_avx512(const LutProblem& P, const LutTokens& T, int t0, int t1, float* y) {
  switch (T.mb) {
    case 1: return lut_pass<1, true>(P, T, t0, t1, y);
    case 2: return lut_pass<2, true>(P, T, t0, t1, y);
    case 3: return lut_pass<3, true>(P, T, t0, t1, y);
    default: return lut_pass<4, true>(P, T, t0, t1, y);
  }
}

float quant_a8_avx512(const float* x, int n, int8_t* q) {
  __m512 amax = _mm512_setzero_ps();
  int k = 0;
  for (; k + 16 <= n; k += 16) amax = _mm512_max_ps(amax, _mm512_abs_ps(_mm512_loadu_ps(x + k)));
  float am = _mm512_reduce_max_ps(amax);
  for (; k < n; ++k) {
    const float v = x[k] < 0 ? -x[k] : x[k];
    am = v > am ? v : am;
  }
  const float scale = am > 0.f ? am / 127.0f : 1.0f;
  // True division (not a reciprocal multiply) and round-half-even: bit-identical to torch.
  const __m512 s = _mm512_set1_ps(scale), hi = _mm512_set1_ps(127.f), lo = _mm512_set1_ps(-127.f);
  for (k = 0; k + 16 <= n; k += 16) {
    __m512 v = _mm512_roundscale_ps(_mm512_div_ps(_mm512_loadu_ps(x + k), s), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    v = _mm512_min_ps(_mm512_max_ps(v, lo), hi);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + k), _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(v)));
  }
  for (; k < n; ++k) {
    const __m128 v = _mm_round_ss(_mm_setzero_ps(), _mm_set_ss(x[k] / scale), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    float f = _mm_cvtss_f32(v);
    f = f > 127.f ? 127.f : (f < -127.f ? -127.f : f);
    q[k] = static_cast<int8_t>(static_cast<int>(f));
  }
  return scale;
}

// Lane n of the 0/1 table gets the sum of x[i] over the set bits i of n, lane n of the +-1
// table the sum of +-x[i] (n mod 16 for A8, whose tables repeat in lanes 16..31).
void table_a16_avx512(const float* x, int n_groups, float* pm, float* t01) {
  static const __mmask16 bit[4] = {0xAAAA, 0xCCCC, 0xF0F0, 0xFF00};
  // +-1 table: flip the sign of x[i] where bit i of the lane is 0 (an xor of the sign bit).
  const __m512 sign = _mm512_set1_ps(-0.0f);
  for (int g = 0; g < n_groups; ++g) {
    const float* v = x + 4 * g;
    if (t01) {
      __m512 z = _mm512_maskz_mov_ps(bit[0], _mm512_set1_ps(v[0]));
      for (int i = 1; i < 4; ++i) z = _mm512_add_ps(z, _mm512_maskz_mov_ps(bit[i], _mm512_set1_ps(v[i])));
      _mm512_storeu_ps(t01 + 16 * g, z);
    }
    if (pm) {
      __m512 s = _mm512_mask_xor_ps(_mm512_set1_ps(v[0]), static_cast<__mmask16>(~bit[0]), _mm512_set1_ps(v[0]), sign);
      for (int i = 1; i < 4; ++i) {
        const __m512 xi = _mm512_set1_ps(v[i]);
        s = _mm512_add_ps(s, _mm512_mask_xor_ps(xi, static_cast<__mmask16>(~bit[i]), xi, sign));
      }
      _mm512_storeu_ps(pm + 16 * g, s);
    }
  }
}

void table_a8_avx512(const int8_t* q, int n_groups, int16_t* pm, int16_t* t01) {
  static const __mmask32 bit[4] = {0xAAAAAAAAu, 0xCCCCCCCCu, 0xF0F0F0F0u, 0xFF00FF00u};
  for (int g = 0; g < n_groups; ++g) {
    const int8_t* v = q + 4 * g;
    if (t01) {
      __m512i z = _mm512_maskz_mov_epi16(bit[0], _mm512_set1_epi16(v[0]));
      for (int i = 1; i < 4; ++i) z = _mm512_add_epi16(z, _mm512_maskz_mov_epi16(bit[i], _mm512_set1_epi16(v[i])));
      _mm512_storeu_si512(t01 + 32 * g, z);
    }
    if (pm) {
      __m512i s = _mm512_mask_blend_epi16(bit[0], _mm512_set1_epi16(static_cast<int16_t>(-v[0])), _mm512_set1_epi16(v[0]));
      for (int i = 1; i < 4; ++i)
        s = _mm512_add_epi16(
            s, _mm512_mask_blend_epi16(bit[i], _mm512_set1_epi16(static_cast<int16_t>(-v[i])), _mm512_set1_epi16(v[i])));
      _mm512_storeu_si512(pm + 32 * g, s);
    }
  }
}

}  // namespace onebit_cpu

#pragma GCC pop_options
