// AVX2 + FMA + F16C LUT kernel for A16 (fp32 tables), selected at run time on CPUs without AVX-512.
//
// AVX2 has no 16-entry permute: `vpermps` (permutevar8x32) covers 8 entries, so each lookup
// is two permutes and a blend on index bit 3 (moved to the sign bit). About 4x the
// instructions of the AVX-512 kernel per weight. A8 on AVX2 falls back to the scalar kernel.
#include <immintrin.h>
#include <stdint.h>

#include "lut.h"

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")

namespace onebit_cpu {
namespace {

inline __m256 lookup16(__m256i idx, __m256 t_lo, __m256 t_hi) {
  const __m256 a = _mm256_permutevar8x32_ps(t_lo, idx);
  const __m256 b = _mm256_permutevar8x32_ps(t_hi, idx);
  return _mm256_blendv_ps(a, b, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
}

template <int MB>
inline void lookup_add(const uint8_t* bytes, const float* const* tab, int kb, __m256 (*acc)[4], bool sub) {
  const __m256i nib = _mm256_set1_epi32(15);
  for (int q = 0; q < 4; ++q) {
    const __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(bytes + 8 * q)));
    const __m256i lo = _mm256_and_si256(v, nib), hi = _mm256_srli_epi32(v, 4);
    for (int m = 0; m < MB; ++m) {
      const float* tb = tab[m] + kb * 32;
      const __m256 r = _mm256_add_ps(lookup16(lo, _mm256_loadu_ps(tb), _mm256_loadu_ps(tb + 8)),
                                     lookup16(hi, _mm256_loadu_ps(tb + 16), _mm256_loadu_ps(tb + 24)));
      acc[m][q] = sub ? _mm256_sub_ps(acc[m][q], r) : _mm256_add_ps(acc[m][q], r);
    }
  }
}

template <int MB>
void a16_pass(const LutProblem& P, const LutTokens& T, int t0, int t1, float* y) {
  const int nb = P.n_blocks, A = P.n_acts;
  const long ystride = static_cast<long>(t1 - t0) * kTileRows;
  alignas(32) uint8_t ub[32], vb[32];
  for (int t = t0; t < t1; ++t) {
    float* yt = y + static_cast<long>(t - t0) * kTileRows;
    for (int j = 0; j < P.n_jobs; ++j) {
      const int a = P.job_act[j], kind = P.job_kind[j];
      const __m256i inv = _mm256_set1_epi8(P.job_inv[j] ? -1 : 0);
      const int32_t* bo = P.act_boff[a];
      const long off = static_cast<long>(t) * P.act_kbytes[a] * kTileRows;
      const uint8_t* pb = P.job_b[j] + off;
      const uint8_t* pg = kind == kSEL ? P.job_g[j] + off : nullptr;
      const long coff = static_cast<long>(t) * nb * kTileRows;
      const bool f16 = P.job_coef_f16[j] != 0;
      const float* tab[MB];
      for (int m = 0; m < MB; ++m) tab[m] = static_cast<const float*>(T.tables[(m * A + a) * 2 + (kind == kPM ? 0 : 1)]);
      for (int b = 0; b < nb; ++b) {
        __m256 acc[MB][4];
        for (int m = 0; m < MB; ++m)
          for (int q = 0; q < 4; ++q) acc[m][q] = _mm256_setzero_ps();
        for (int kb = bo[b]; kb < bo[b + 1]; ++kb) {
          const long o = static_cast<long>(kb) * kTileRows;
          const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(pb + o));
          if (kind == kSEL) {
            const __m256i g = _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(pg + o)), inv);
            _mm256_store_si256(reinterpret_cast<__m256i*>(ub), _mm256_and_si256(x, g));
            _mm256_store_si256(reinterpret_cast<__m256i*>(vb), _mm256_andnot_si256(x, g));
            lookup_add<MB>(ub, tab, kb, acc, false);
            lookup_add<MB>(vb, tab, kb, acc, true);
          } else {
            _mm256_store_si256(reinterpret_cast<__m256i*>(ub), kind == kS01 ? _mm256_xor_si256(x, inv) : x);
            lookup_add<MB>(ub, tab, kb, acc, false);
          }
        }
        for (int m = 0; m < MB; ++m)
          for (int q = 0; q < 4; ++q) {
            float* ym = yt + m * ystride + 8 * q;
            const long ci = coff + static_cast<long>(b) * kTileRows + 8 * q;
            const __m256 c = f16 ? _mm256_cvtph_ps(_mm_loadu_si128(
                                       reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(P.job_coef[j]) + ci)))
                                 : _mm256_loadu_ps(static_cast<const float*>(P.job_coef[j]) + ci);
            _mm256_storeu_ps(ym, _mm256_fmadd_ps(c, acc[m][q], _mm256_loadu_ps(ym)));
          }
      }
    }
    for (int a = 0; a < A; ++a) {
      const float* ec = P.act_ecoef[a];
      if (!ec) continue;
      ec += static_cast<long>(t) * nb * kTileRows;
      for (int m = 0; m < MB; ++m) {
        const float* xs = T.xsum + (static_cast<long>(m) * A + a) * nb;
        for (int q = 0; q < 4; ++q) {
          float* ym = yt + m * ystride + 8 * q;
          __m256 v = _mm256_loadu_ps(ym);
          for (int b = 0; b < nb; ++b)
            v = _mm256_fmadd_ps(_mm256_loadu_ps(ec + b * kTileRows + 8 * q), _mm256_set1_ps(xs[b]), v);
          _mm256_storeu_ps(ym, v);
        }
      }
    }
  }
}

}  // namespace

void lut_a16_avx2(const LutProblem& P, const LutTokens& T, int t0, int t1, float* y) {
  switch (T.mb) {
    case 1: return a16_pass<1>(P, T, t0, t1, y);
    case 2: return a16_pass<2>(P, T, t0, t1, y);
    default:
      // Few registers (16 ymm): passes of more than 2 tokens would spill; split them.
      for (int m0 = 0; m0 < T.mb; m0 += 2) {
        const int mb = T.mb - m0 < 2 ? T.mb - m0 : 2;
        const LutTokens sub{mb, T.tables + m0 * P.n_acts * 2, T.xsum + static_cast<long>(m0) * P.n_acts * P.n_blocks,
                            nullptr};
        const long ystride = static_cast<long>(t1 - t0) * kTileRows;
        if (mb == 2)
          a16_pass<2>(P, sub, t0, t1, y + m0 * ystride);
        else
          a16_pass<1>(P, sub, t0, t1, y + m0 * ystride);
      }
  }
}

void table_a16_avx2(const float* x, int n_groups, float* pm, float* t01) {
  const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  for (int g = 0; g < n_groups; ++g) {
    const float* v = x + 4 * g;
    for (int h = 0; h < 2; ++h) {
      const __m256i n = _mm256_add_epi32(lanes, _mm256_set1_epi32(8 * h));
      __m256 z = _mm256_setzero_ps(), s = _mm256_setzero_ps();
      for (int i = 0; i < 4; ++i) {
        const __m256 on = _mm256_castsi256_ps(
            _mm256_cmpeq_epi32(_mm256_and_si256(n, _mm256_set1_epi32(1 << i)), _mm256_set1_epi32(1 << i)));
        const __m256 xi = _mm256_set1_ps(v[i]);
        z = _mm256_add_ps(z, _mm256_and_ps(on, xi));
        s = _mm256_add_ps(s, _mm256_blendv_ps(_mm256_sub_ps(_mm256_setzero_ps(), xi), xi, on));
      }
      if (pm) _mm256_storeu_ps(pm + 16 * g + 8 * h, s);
      if (t01) _mm256_storeu_ps(t01 + 16 * g + 8 * h, z);
    }
  }
}

}  // namespace onebit_cpu

#pragma GCC pop_options
