// AVX-512 LUT kernels (F + BW + VL + DQ), selected at run time by the dispatcher.
//
// A16: one `vpermps` looks up 16 rows' nibbles in a 16-entry fp32 table of subset sums of
// 4 activations, i.e. 64 weight-activation products per instruction (masked add does 16).
// A8: one `vpermw` looks up 32 rows in an int16 table of subset sums of 4 int8 values,
// 128 products per instruction, exact in integers; int16 partial sums are widened to int32
// every 32 bytes (|sum| <= 64 * 4 * 127 < 2^15).
//
// Loop order (see lut.h): column block outermost, then the tiles of the thread's range, then
// jobs, then passes of up to 4 tokens. A block's tables (2 KB per token at B = 128) stay in
// L1 for every tile; the weights stream in address order (block-major layout) and are read
// from memory once per group of tokens, then from L1 by the later passes; the outputs of the
// tile range stay in L1/L2.
//
// Limits on Sapphire-Rapids-class cores (512-bit work issues on ports 0 and 5 only): A16
// issues 12 uops (2 vpmovzxbd + 2 shifts + 4 vpermps + 4 adds) per 256 weights and token, so
// it is port bound at ~0.023 cycles/weight (~100 us for 4096^2 at ~3.5 GHz). A8 issues 6 uops
// per 256 weights (vpmovzxbw + shift + 2 vpermw + 2 adds), half of A16. GROUP terms (kSEL)
// cost 2 lookups per 4 weights plus the and/andn. On Zen 4 (AMD EPYC, the project's CPU
// machines in December 2026) each of vpermps, vpermw, vpmovzx and the shifts issues one
// 512-bit op per cycle (vpaddw two), and a lookup plus its add costs ~1.6 cycles: A8 runs at
// ~5 cycles per 256 weights, and A16 splits its accumulations between add and FMA (a16_job).
#include <immintrin.h>
#include <stdint.h>

#include "lut.h"

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,fma,avx2")
// gcc 12 flags the intrinsics' own _mm512_undefined_*() temporaries as uninitialized.
#pragma GCC diagnostic ignored "-Wuninitialized"

namespace onebit_cpu {
namespace {

constexpr int kPass = 4;  // tokens per pass: 4 x 4 fp32 accumulators + indices fit 32 zmm

inline int imin(int a, int b) { return a < b ? a : b; }

// The 32 coefficients of job j at element offset idx, fp32 or converted from fp16.
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

// Mean terms of (block b, tile t): y += ecoef * (token scale * block sum of x'), every token.
inline void add_ecoef(const LutProblem& P, const LutTokens& T, int b, int t, float* yt, long ystride) {
  const int nb = P.n_blocks, A = P.n_acts;
  for (int a = 0; a < A; ++a) {
    const float* ec = P.act_ecoef[a];
    if (!ec) continue;
    ec += coef_off(P.n_tiles, b, t);
    const __m512 e0 = _mm512_loadu_ps(ec), e1 = _mm512_loadu_ps(ec + 16);
    for (int m = 0; m < T.mb; ++m) {
      const float st = T.stok ? T.stok[m * A + a] : 1.0f;
      const __m512 s = _mm512_set1_ps(st * T.xsum[(static_cast<long>(m) * A + a) * nb + b]);
      float* ym = yt + m * ystride;
      _mm512_storeu_ps(ym, _mm512_fmadd_ps(e0, s, _mm512_loadu_ps(ym)));
      _mm512_storeu_ps(ym + 16, _mm512_fmadd_ps(e1, s, _mm512_loadu_ps(ym + 16)));
    }
  }
}

// Where job j's bytes of column block b start at tile ta (sign plane, and the group plane
// for selected terms), and the block's range of 4-column groups: shared by A16 and A8.
struct JobSpan {
  int kb0, nkb;
  const uint8_t* b;
  const uint8_t* g;
};
template <int KIND>
inline JobSpan job_span(const LutProblem& P, int j, int b, int ta) {
  const int32_t* bo = P.act_boff[P.job_act[j]];
  const long off = plane_off(bo, P.n_tiles, b, ta);
  const uint8_t* pb = P.job_b[j] + off;
  return {bo[b], bo[b + 1] - bo[b], pb, KIND == kSEL ? P.job_g[j] + off : pb};
}

// Job j on column block b of tiles [ta, tb) for tokens m0..m0+MB-1, A16: fp32 tables, vpermps.
// The tiles' bytes of block b are contiguous (block-major layout), and so are their
// coefficients and outputs: the tile loop only advances pointers.
template <int MB, int KIND>
void a16_job(const LutProblem& P, const LutTokens& T, int j, int b, int ta, int tb, int m0, float* y, long ystride) {
  const int A = P.n_acts, a = P.job_act[j];
  const JobSpan sp = job_span<KIND>(P, j, b, ta);
  const int kb0 = sp.kb0, nkb = sp.nkb;
  const uint8_t* pb = sp.b;
  const uint8_t* pg = sp.g;
  const __m128i inv = _mm_set1_epi8(P.job_inv[j] ? -1 : 0);
  const float* tab[MB];
  for (int m = 0; m < MB; ++m)
    tab[m] = static_cast<const float*>(T.tables[((m0 + m) * A + a) * 2 + (KIND == kPM ? 0 : 1)]) + kb0 * 32;
  const long cbase = coef_off(P.n_tiles, b, 0);
  // Half of the accumulations are FMAs by 1.0: a*1 + c rounds once, exactly like a + c, but
  // issues to the FMA pipes. On Zen 4 vaddps shares a pipe with vpermps and the FMA pipes are
  // otherwise idle here: 4096x4096 M=1 went from ~177 to ~145 us per call on one core (all
  // adds vs this mix; all FMAs ~146). On Intel cores both issue to ports 0 and 5: no change.
  const __m512 one = _mm512_set1_ps(1.0f);
  for (int t = ta; t < tb; ++t) {
    if (m0 == 0) prefetch_next_block(P, j, b, t, KIND == kSEL);  // later passes find the weights in L1
    // Four accumulators per token (row halves x nibble halves): vaddps latency is 4 cycles,
    // so one token alone needs independent chains to keep the ports busy.
    __m512 acc[MB][4];
    for (int m = 0; m < MB; ++m)
      for (int u = 0; u < 4; ++u) acc[m][u] = _mm512_setzero_ps();
    const uint8_t* w = pb;
    const uint8_t* g = pg;
    // One byte offset into every token's tables (no per-token pointer arithmetic).
    const long tend = static_cast<long>(nkb) * 128;
#pragma GCC unroll 4
    for (long to = 0; to < tend; to += 128, w += kTileRows, g += kTileRows) {
      __m128i x0 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w));
      __m128i x1 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + 16));
      __m128i v0, v1;
      if (KIND == kS01) {
        x0 = _mm_xor_si128(x0, inv);
        x1 = _mm_xor_si128(x1, inv);
      } else if (KIND == kSEL) {
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
        const float* tk = reinterpret_cast<const float*>(reinterpret_cast<const char*>(tab[m]) + to);
        const __m512 tl = _mm512_loadu_ps(tk), th = _mm512_loadu_ps(tk + 16);
        acc[m][0] = _mm512_add_ps(acc[m][0], _mm512_permutexvar_ps(i0, tl));
        acc[m][1] = _mm512_fmadd_ps(_mm512_permutexvar_ps(h0, th), one, acc[m][1]);
        acc[m][2] = _mm512_add_ps(acc[m][2], _mm512_permutexvar_ps(i1, tl));
        acc[m][3] = _mm512_fmadd_ps(_mm512_permutexvar_ps(h1, th), one, acc[m][3]);
      }
      if (KIND == kSEL) {
        const __m512i j0 = _mm512_cvtepu8_epi32(v0), j1 = _mm512_cvtepu8_epi32(v1);
        const __m512i k0 = _mm512_srli_epi32(j0, 4), k1 = _mm512_srli_epi32(j1, 4);
        for (int m = 0; m < MB; ++m) {
          const float* tk = reinterpret_cast<const float*>(reinterpret_cast<const char*>(tab[m]) + to);
          const __m512 tl = _mm512_loadu_ps(tk), th = _mm512_loadu_ps(tk + 16);
          acc[m][0] = _mm512_sub_ps(acc[m][0], _mm512_permutexvar_ps(j0, tl));
          acc[m][1] = _mm512_fnmadd_ps(_mm512_permutexvar_ps(k0, th), one, acc[m][1]);
          acc[m][2] = _mm512_sub_ps(acc[m][2], _mm512_permutexvar_ps(j1, tl));
          acc[m][3] = _mm512_fnmadd_ps(_mm512_permutexvar_ps(k1, th), one, acc[m][3]);
        }
      }
    }
    pb = w;
    pg = g;
    __m512 c0, c1;
    load_coef(P, j, cbase + static_cast<long>(t) * kTileRows, c0, c1);
    float* yt = y + static_cast<long>(t - ta) * kTileRows;
    for (int m = 0; m < MB; ++m) {
      float* ym = yt + (m0 + m) * ystride;
      _mm512_storeu_ps(ym, _mm512_fmadd_ps(c0, _mm512_add_ps(acc[m][0], acc[m][1]), _mm512_loadu_ps(ym)));
      _mm512_storeu_ps(ym + 16, _mm512_fmadd_ps(c1, _mm512_add_ps(acc[m][2], acc[m][3]), _mm512_loadu_ps(ym + 16)));
    }
  }
}

// Job j on column block b of tiles [ta, tb) for tokens m0..m0+MB-1, A8: int16 tables,
// vpermw, exact integer sums.
template <int MB, int KIND>
void a8_job(const LutProblem& P, const LutTokens& T, int j, int b, int ta, int tb, int m0, float* y, long ystride) {
  const int A = P.n_acts, a = P.job_act[j];
  const JobSpan sp = job_span<KIND>(P, j, b, ta);
  const int kb0 = sp.kb0, nkb = sp.nkb;
  const uint8_t* pb = sp.b;
  const uint8_t* pg = sp.g;
  const __m256i inv = _mm256_set1_epi8(P.job_inv[j] ? -1 : 0);
  const int16_t* tab[MB];
  __m512 st[MB];
  for (int m = 0; m < MB; ++m) {
    tab[m] = static_cast<const int16_t*>(T.tables[((m0 + m) * A + a) * 2 + (KIND == kPM ? 0 : 1)]) + kb0 * 64;
    st[m] = _mm512_set1_ps(T.stok[(m0 + m) * A + a]);
  }
  const long cbase = coef_off(P.n_tiles, b, 0);
  for (int t = ta; t < tb; ++t) {
    if (m0 == 0) prefetch_next_block(P, j, b, t, KIND == kSEL);
    __m512i acc32[MB][2];
    for (int m = 0; m < MB; ++m) acc32[m][0] = acc32[m][1] = _mm512_setzero_si512();
    const uint8_t* w = pb;
    const uint8_t* g = pg;
    for (int s0 = 0; s0 < nkb; s0 += 32) {
      const int s1 = imin(nkb, s0 + 32);
      __m512i acc[MB][2];
      for (int m = 0; m < MB; ++m) acc[m][0] = acc[m][1] = _mm512_setzero_si512();
      const long tend = static_cast<long>(s1) * 128;
#pragma GCC unroll 4
      for (long to = static_cast<long>(s0) * 128; to < tend; to += 128, w += kTileRows, g += kTileRows) {
        __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w));
        __m256i v;
        if (KIND == kS01) {
          x = _mm256_xor_si256(x, inv);
        } else if (KIND == kSEL) {
          const __m256i gg = _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(g)), inv);
          v = _mm256_andnot_si256(x, gg);
          x = _mm256_and_si256(x, gg);
        }
        // vpermw reads 5 index bits; the tables repeat entries 0..15 in 16..31, so the low
        // nibble needs no mask.
        const __m512i lo = _mm512_cvtepu8_epi16(x);
        const __m512i hi = _mm512_srli_epi16(lo, 4);
        for (int m = 0; m < MB; ++m) {
          const int16_t* tk = reinterpret_cast<const int16_t*>(reinterpret_cast<const char*>(tab[m]) + to);
          acc[m][0] = _mm512_add_epi16(acc[m][0], _mm512_permutexvar_epi16(lo, _mm512_loadu_si512(tk)));
          acc[m][1] = _mm512_add_epi16(acc[m][1], _mm512_permutexvar_epi16(hi, _mm512_loadu_si512(tk + 32)));
        }
        if (KIND == kSEL) {
          const __m512i vlo = _mm512_cvtepu8_epi16(v);
          const __m512i vhi = _mm512_srli_epi16(vlo, 4);
          for (int m = 0; m < MB; ++m) {
            const int16_t* tk = reinterpret_cast<const int16_t*>(reinterpret_cast<const char*>(tab[m]) + to);
            acc[m][0] = _mm512_sub_epi16(acc[m][0], _mm512_permutexvar_epi16(vlo, _mm512_loadu_si512(tk)));
            acc[m][1] = _mm512_sub_epi16(acc[m][1], _mm512_permutexvar_epi16(vhi, _mm512_loadu_si512(tk + 32)));
          }
        }
      }
      // |acc| <= 32 steps * 508 each (kSEL: |T01[u] - T01[v]| <= 508 too, u and v are
      // disjoint subsets), so the int16 sum of the two cannot overflow.
      for (int m = 0; m < MB; ++m) {
        const __m512i s = _mm512_add_epi16(acc[m][0], acc[m][1]);
        acc32[m][0] = _mm512_add_epi32(acc32[m][0], _mm512_cvtepi16_epi32(_mm512_castsi512_si256(s)));
        acc32[m][1] = _mm512_add_epi32(acc32[m][1], _mm512_cvtepi16_epi32(_mm512_extracti64x4_epi64(s, 1)));
      }
    }
    pb = w;
    pg = g;
    __m512 c0, c1;
    load_coef(P, j, cbase + static_cast<long>(t) * kTileRows, c0, c1);
    float* yt = y + static_cast<long>(t - ta) * kTileRows;
    for (int m = 0; m < MB; ++m) {
      float* ym = yt + (m0 + m) * ystride;
      _mm512_storeu_ps(ym, _mm512_fmadd_ps(_mm512_mul_ps(c0, st[m]), _mm512_cvtepi32_ps(acc32[m][0]), _mm512_loadu_ps(ym)));
      _mm512_storeu_ps(ym + 16, _mm512_fmadd_ps(_mm512_mul_ps(c1, st[m]), _mm512_cvtepi32_ps(acc32[m][1]),
                                                _mm512_loadu_ps(ym + 16)));
    }
  }
}

template <bool A8, int KIND>
void job_all_tokens(const LutProblem& P, const LutTokens& T, int j, int b, int ta, int tb, float* y, long ystride) {
  int m0 = 0;
  for (; m0 + kPass <= T.mb; m0 += kPass)
    A8 ? a8_job<kPass, KIND>(P, T, j, b, ta, tb, m0, y, ystride) : a16_job<kPass, KIND>(P, T, j, b, ta, tb, m0, y, ystride);
  switch (T.mb - m0) {
    case 1: return A8 ? a8_job<1, KIND>(P, T, j, b, ta, tb, m0, y, ystride) : a16_job<1, KIND>(P, T, j, b, ta, tb, m0, y, ystride);
    case 2: return A8 ? a8_job<2, KIND>(P, T, j, b, ta, tb, m0, y, ystride) : a16_job<2, KIND>(P, T, j, b, ta, tb, m0, y, ystride);
    case 3: return A8 ? a8_job<3, KIND>(P, T, j, b, ta, tb, m0, y, ystride) : a16_job<3, KIND>(P, T, j, b, ta, tb, m0, y, ystride);
    default: return;
  }
}

// Tiles per sub-range: one job's block of 16 tiles is 8 KB at B = 128, so the weights of all
// jobs of a sub-range stay in L1 while the passes of further tokens re-read them.
constexpr int kTileChunk = 16;

template <bool A8>
void lut_run(const LutProblem& P, const LutTokens& T, int t0, int t1, float* y) {
  const long ystride = static_cast<long>(t1 - t0) * kTileRows;
  for (int b = 0; b < P.n_blocks; ++b) {
    for (int ta = t0; ta < t1; ta += kTileChunk) {
      const int tb = imin(t1, ta + kTileChunk);
      float* ya = y + static_cast<long>(ta - t0) * kTileRows;
      for (int j = 0; j < P.n_jobs; ++j) {
        const int32_t* bo = P.act_boff[P.job_act[j]];
        if (bo[b] == bo[b + 1]) continue;  // a gathered act with no column in this block
        switch (P.job_kind[j]) {
          case kPM: job_all_tokens<A8, kPM>(P, T, j, b, ta, tb, ya, ystride); break;
          case kSEL: job_all_tokens<A8, kSEL>(P, T, j, b, ta, tb, ya, ystride); break;
          default: job_all_tokens<A8, kS01>(P, T, j, b, ta, tb, ya, ystride);
        }
      }
      for (int t = ta; t < tb; ++t) add_ecoef(P, T, b, t, ya + static_cast<long>(t - ta) * kTileRows, ystride);
    }
  }
}

}  // namespace

void lut_a16_avx512(const LutProblem& P, const LutTokens& T, int t0, int t1, float* y) { lut_run<false>(P, T, t0, t1, y); }

void lut_a8_avx512(const LutProblem& P, const LutTokens& T, int t0, int t1, float* y) { lut_run<true>(P, T, t0, t1, y); }

float absmax_avx512(const float* x, int n) {
  __m512 amax = _mm512_setzero_ps();
  int k = 0;
  for (; k + 16 <= n; k += 16) amax = _mm512_max_ps(amax, _mm512_abs_ps(_mm512_loadu_ps(x + k)));
  const float am = _mm512_reduce_max_ps(amax), tail = absmax_scalar(x + k, n - k);
  return tail > am ? tail : am;
}

void quant_a8_avx512(const float* x, int n, float scale, int8_t* q) {
  // True division (not a reciprocal multiply) and round-half-even: bit-identical to torch.
  const __m512 s = _mm512_set1_ps(scale), hi = _mm512_set1_ps(127.f), lo = _mm512_set1_ps(-127.f);
  int k = 0;
  for (; k + 16 <= n; k += 16) {
    __m512 v = _mm512_roundscale_ps(_mm512_div_ps(_mm512_loadu_ps(x + k), s), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    v = _mm512_min_ps(_mm512_max_ps(v, lo), hi);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + k), _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(v)));
  }
  quant_a8_scalar(x + k, n - k, scale, q + k);  // the tail, with the same rounding
}

// Lane n of the 0/1 table gets the sum of x[i] over the set bits i of n, lane n of the +-1
// table the sum of +-x[i] (n mod 16 for A8, whose tables repeat in lanes 16..31). A decode
// step (M=1) builds one table per 4 columns of every layer and token, so this is a visible
// share of a call (4096 columns: ~3-4 us of a ~60-100 us A8 call with the earlier
// broadcast-and-blend version on Zen 4, ~1 us now).
namespace {
// c[i][n] = the coefficient of x[i] in lane n: 1 or -1 (pm), 1 or 0 (t01). constexpr: a
// run-time initializer compiled under this file's target pragma could run AVX-512 code at
// load time on any CPU.
struct SubsetSigns {
  float pm[4][16] = {}, t01[4][16] = {};
  int8_t pm8[64] = {}, t01_8[64] = {};      // byte 4n + i: the same as int8, lane n of a dword
  int32_t pm_bias[16] = {}, t01_bias[16] = {};  // -128 * sum_i c[i][n]: undoes the +128 of the unsigned bytes
  constexpr SubsetSigns() {
    for (int n = 0; n < 16; ++n) {
      pm_bias[n] = t01_bias[n] = 0;
      for (int i = 0; i < 4; ++i) {
        const int bit = (n >> i) & 1;
        pm[i][n] = bit ? 1.f : -1.f;
        t01[i][n] = static_cast<float>(bit);
        pm8[4 * n + i] = static_cast<int8_t>(bit ? 1 : -1);
        t01_8[4 * n + i] = static_cast<int8_t>(bit);
        pm_bias[n] -= 128 * (bit ? 1 : -1);
        t01_bias[n] -= 128 * bit;
      }
    }
  }
};
constexpr SubsetSigns kSigns{};

// sum_i c[i][n] * v[i], accumulated in order i = 0..3 from +0 with FMAs by +-1 or 0: every
// step rounds once, like the sum of the products it stands for, and a lane with no term
// stays +0.
inline __m512 subset_sums(const float* v, const float (*c)[16]) {
  __m512 s = _mm512_setzero_ps();
  for (int i = 0; i < 4; ++i) s = _mm512_fmadd_ps(_mm512_set1_ps(v[i]), _mm512_loadu_ps(c[i]), s);
  return s;
}

// The 16 exact sums of one group as int16, stored twice (lanes 0..15 and 16..31). vpmaddubsw
// takes unsigned bytes: the group's 4 int8 (one dword, broadcast) are offset by 128 (an xor
// of the sign bit), multiplied by the signed coefficients and summed in pairs (|pair| <= 510,
// no saturation), vpmaddwd adds the pairs, the bias removes the offset.
inline void store_subset_sums_a8(__m512i u, const int8_t* c, const int32_t* bias, int16_t* out) {
  const __m512i pairs = _mm512_maddubs_epi16(u, _mm512_loadu_si512(c));
  const __m512i s = _mm512_add_epi32(_mm512_madd_epi16(pairs, _mm512_set1_epi16(1)), _mm512_loadu_si512(bias));
  const __m256i h = _mm512_cvtepi32_epi16(s);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), h);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + 16), h);
}
}  // namespace

void table_a16_avx512(const float* x, int n_groups, float* pm, float* t01) {
  for (int g = 0; g < n_groups; ++g) {
    if (t01) _mm512_storeu_ps(t01 + 16 * g, subset_sums(x + 4 * g, kSigns.t01));
    if (pm) _mm512_storeu_ps(pm + 16 * g, subset_sums(x + 4 * g, kSigns.pm));
  }
}

void table_a8_avx512(const int8_t* q, int n_groups, int16_t* pm, int16_t* t01) {
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  for (int g = 0; g < n_groups; ++g) {
    int32_t v;
    __builtin_memcpy(&v, q + 4 * g, 4);
    const __m512i u = _mm512_xor_si512(_mm512_set1_epi32(v), flip);
    if (t01) store_subset_sums_a8(u, kSigns.t01_8, kSigns.t01_bias, t01 + 32 * g);
    if (pm) store_subset_sums_a8(u, kSigns.pm8, kSigns.pm_bias, pm + 32 * g);
  }
}

}  // namespace onebit_cpu

#pragma GCC pop_options
