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

// Job j on (block b, tile t) for tokens m0..m0+MB-1.
template <int MB>
void a16_job(const LutProblem& P, const LutTokens& T, int j, int b, int t, int m0, float* yt, long ystride) {
  alignas(32) uint8_t ub[32], vb[32];
  const int A = P.n_acts, a = P.job_act[j], kind = P.job_kind[j];
  const __m256i inv = _mm256_set1_epi8(P.job_inv[j] ? -1 : 0);
  const int32_t* bo = P.act_boff[a];
  const long off = plane_off(bo, P.n_tiles, b, t);
  const uint8_t* pb = P.job_b[j] + off;
  const uint8_t* pg = kind == kSEL ? P.job_g[j] + off : nullptr;
  const float* tab[MB];
  for (int m = 0; m < MB; ++m)
    tab[m] = static_cast<const float*>(T.tables[((m0 + m) * A + a) * 2 + (kind == kPM ? 0 : 1)]) + bo[b] * 32;
  __m256 acc[MB][4];
  for (int m = 0; m < MB; ++m)
    for (int q = 0; q < 4; ++q) acc[m][q] = _mm256_setzero_ps();
  for (int kb = 0; kb < bo[b + 1] - bo[b]; ++kb) {
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
  const long ci = coef_off(P.n_tiles, b, t);
  for (int q = 0; q < 4; ++q) {
    const __m256 c = P.job_coef_f16[j]
                         ? _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(
                               static_cast<const uint16_t*>(P.job_coef[j]) + ci + 8 * q)))
                         : _mm256_loadu_ps(static_cast<const float*>(P.job_coef[j]) + ci + 8 * q);
    for (int m = 0; m < MB; ++m) {
      float* ym = yt + (m0 + m) * ystride + 8 * q;
      _mm256_storeu_ps(ym, _mm256_fmadd_ps(c, acc[m][q], _mm256_loadu_ps(ym)));
    }
  }
}

// Same loop order as the AVX-512 kernel (block, tile, job, passes of 2 tokens: 16 ymm only).
void a16_run(const LutProblem& P, const LutTokens& T, int t0, int t1, float* y) {
  const int nb = P.n_blocks, A = P.n_acts;
  const long ystride = static_cast<long>(t1 - t0) * kTileRows;
  for (int b = 0; b < nb; ++b) {
    for (int t = t0; t < t1; ++t) {
      float* yt = y + static_cast<long>(t - t0) * kTileRows;
      for (int j = 0; j < P.n_jobs; ++j) {
        const int32_t* bo = P.act_boff[P.job_act[j]];
        if (bo[b] == bo[b + 1]) continue;
        int m0 = 0;
        for (; m0 + 2 <= T.mb; m0 += 2) a16_job<2>(P, T, j, b, t, m0, yt, ystride);
        if (m0 < T.mb) a16_job<1>(P, T, j, b, t, m0, yt, ystride);
      }
      for (int a = 0; a < A; ++a) {
        if (!P.act_ecoef[a]) continue;
        const float* ec = P.act_ecoef[a] + coef_off(P.n_tiles, b, t);
        for (int m = 0; m < T.mb; ++m) {
          const __m256 s = _mm256_set1_ps(T.xsum[(static_cast<long>(m) * A + a) * nb + b]);
          for (int q = 0; q < 4; ++q) {
            float* ym = yt + m * ystride + 8 * q;
            _mm256_storeu_ps(ym, _mm256_fmadd_ps(_mm256_loadu_ps(ec + 8 * q), s, _mm256_loadu_ps(ym)));
          }
        }
      }
    }
  }
}

}  // namespace

void lut_a16_avx2(const LutProblem& P, const LutTokens& T, int t0, int t1, float* y) { a16_run(P, T, t0, t1, y); }

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
