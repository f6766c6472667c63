// AVX2 + FMA + F16C LUT kernels, selected at run time on CPUs without AVX-512.
//
// A16 (fp32 tables): AVX2 has no 16-entry permute: `vpermps` (permutevar8x32) covers 8
// entries, so the tables are over 3 columns (3 + 3 + 2 per byte of weights, lookup_add)
// instead of the 4 of the AVX-512 kernel.
// A8 (int16 tables, exact): `vpshufb` looks up 16 bytes per 128-bit lane, so each table is
// stored as two byte planes (the low and the high bytes of its 16 int16 sums) and one lookup
// of 32 rows is two shuffles plus an unpack of the two byte results into int16 (a8_job).
#include <immintrin.h>
#include <stdint.h>

#include "lut.h"

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")

namespace onebit_cpu {
namespace {

inline int imin(int a, int b) { return a < b ? a : b; }

// The 8 coefficients of job j at element offset idx, fp32 or converted from fp16.
inline __m256 load_coef8(const LutProblem& P, int j, long idx) {
  if (P.job_coef_f16[j])
    return _mm256_cvtph_ps(
        _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(P.job_coef[j]) + idx)));
  return _mm256_loadu_ps(static_cast<const float*>(P.job_coef[j]) + idx);
}

// A16 tables (table_a16_avx2), per byte of columns (8 columns) 32 floats: three 8-entry
// tables of the columns 0-2, 3-5 and 6-7 (the last uses entries 0-3, and 4-7 repeat them).
// One `vpermps` reads 3 index bits: a byte takes three lookups and two shifts, where 4-bit
// (16-entry) tables took two permutes and a blend per nibble. A 16-column unit of 8 rows (16
// bytes, lut.h) zero-extends to 8 lanes of 16 bits: shifts 0, 3, 6 look up the unit's first
// byte (at 6 the index's bit 2 is column 8: the repeated entries ignore it), 8, 11, 14 the second.
// HALF: the unit's second byte is padding (LutProblem::act_half): its lookups are skipped.
template <int MB, bool HALF>
inline void lookup_add(const uint8_t* unit, const float* const* tab, int kb, __m256 (*acc)[4], bool sub) {
  for (int q = 0; q < 4; ++q) {
    const __m256i v = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(unit + 16 * q)));
    const __m256i v3 = _mm256_srli_epi32(v, 3), v6 = _mm256_srli_epi32(v, 6);
    __m256i v8, v11, v14;
    if (!HALF) v8 = _mm256_srli_epi32(v, 8), v11 = _mm256_srli_epi32(v, 11), v14 = _mm256_srli_epi32(v, 14);
    for (int m = 0; m < MB; ++m) {
      const float* tb = tab[m] + kb * 32;
      __m256 r = _mm256_add_ps(_mm256_add_ps(_mm256_permutevar8x32_ps(_mm256_loadu_ps(tb), v),
                                             _mm256_permutevar8x32_ps(_mm256_loadu_ps(tb + 8), v3)),
                               _mm256_permutevar8x32_ps(_mm256_loadu_ps(tb + 16), v6));
      if (!HALF) {
        const __m256 r1 = _mm256_add_ps(_mm256_add_ps(_mm256_permutevar8x32_ps(_mm256_loadu_ps(tb + 32), v8),
                                                      _mm256_permutevar8x32_ps(_mm256_loadu_ps(tb + 40), v11)),
                                        _mm256_permutevar8x32_ps(_mm256_loadu_ps(tb + 48), v14));
        r = _mm256_add_ps(r, r1);
      }
      acc[m][q] = sub ? _mm256_sub_ps(acc[m][q], r) : _mm256_add_ps(acc[m][q], r);
    }
  }
}

// Job j on (block b, tile t) for tokens m0..m0+MB-1.
template <int MB>
void a16_job(const LutProblem& P, const LutTokens& T, int j, int b, int t, int m0, float* yt, long ystride) {
  alignas(32) uint8_t ub[64], vb[64];
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
  const int nkb = bo[b + 1] - bo[b];
  const bool half = P.act_half[a][b] != 0;
  for (int kb = 0; kb < nkb; kb += 2) {
    const long o = static_cast<long>(kb) * kTileRows;
    for (int h = 0; h < 2; ++h) {  // rows 0-15, 16-31 of the unit
      const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(pb + o + 32 * h));
      if (kind == kSEL) {
        const __m256i g = _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(pg + o + 32 * h)), inv);
        _mm256_store_si256(reinterpret_cast<__m256i*>(ub + 32 * h), _mm256_and_si256(x, g));
        _mm256_store_si256(reinterpret_cast<__m256i*>(vb + 32 * h), _mm256_andnot_si256(x, g));
      } else {
        _mm256_store_si256(reinterpret_cast<__m256i*>(ub + 32 * h), kind == kS01 ? _mm256_xor_si256(x, inv) : x);
      }
    }
    if (half && kb + 2 == nkb) {
      lookup_add<MB, true>(ub, tab, kb, acc, false);
      if (kind == kSEL) lookup_add<MB, true>(vb, tab, kb, acc, true);
    } else {
      lookup_add<MB, false>(ub, tab, kb, acc, false);
      if (kind == kSEL) lookup_add<MB, false>(vb, tab, kb, acc, true);
    }
  }
  const long ci = coef_off(P.n_tiles, b, t);
  for (int q = 0; q < 4; ++q) {
    const __m256 c = load_coef8(P, j, ci + 8 * q);
    for (int m = 0; m < MB; ++m) {
      float* ym = yt + (m0 + m) * ystride + 8 * q;
      _mm256_storeu_ps(ym, _mm256_fmadd_ps(c, acc[m][q], _mm256_loadu_ps(ym)));
    }
  }
}

// A8 tables (table_a8_avx2), per nibble group 64 bytes: the low bytes of the 16 int16 sums,
// twice (one copy per 128-bit lane, as vpshufb reads them), then the high bytes twice.
// The index bytes come in the row order of unit_bytes (rows 0-7, 16-23 | 8-15, 24-31): acc[0]
// gets the int16 sums of rows 0-7 | 8-15, acc[1] of rows 16-23 | 24-31 (the unpacks work
// within 128-bit lanes).
template <bool SUB>
inline void lookup_a8(__m256i idx, const uint8_t* tab, __m256i* acc) {
  const __m256i lo = _mm256_shuffle_epi8(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(tab)), idx);
  const __m256i hi = _mm256_shuffle_epi8(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(tab + 32)), idx);
  const __m256i e0 = _mm256_unpacklo_epi8(lo, hi), e1 = _mm256_unpackhi_epi8(lo, hi);
  acc[0] = SUB ? _mm256_sub_epi16(acc[0], e0) : _mm256_add_epi16(acc[0], e0);
  acc[1] = SUB ? _mm256_sub_epi16(acc[1], e1) : _mm256_add_epi16(acc[1], e1);
}

// The two byte columns of a 16-column unit of 32 rows (lut.h: row r's two bytes side by side)
// as 32-byte vectors, rows in the order 0-7, 16-23 | 8-15, 24-31: per 128-bit lane, a shuffle
// puts the first bytes before the second ones, and the 64-bit unpacks join the rows 0-15 and
// 16-31 halves. 4 shuffles per 512 weights (the lookups take 16).
inline void unit_bytes(__m256i v0, __m256i v1, __m256i& even, __m256i& odd) {
  const __m256i split = _mm256_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15,  //
                                         0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
  const __m256i a = _mm256_shuffle_epi8(v0, split), b = _mm256_shuffle_epi8(v1, split);
  even = _mm256_unpacklo_epi64(a, b);
  odd = _mm256_unpackhi_epi64(a, b);
}

// Job j on (block b, tile t) for tokens m0..m0+MB-1, A8: exact integer sums, int16 for up to
// 32 bytes of columns (each adds at most 2 * 508 per row, kSEL included: its two lookups are
// sums over disjoint subsets), then widened to int32.
template <int MB, int KIND>
void a8_job(const LutProblem& P, const LutTokens& T, int j, int b, int t, int m0, float* yt, long ystride) {
  const int A = P.n_acts, a = P.job_act[j];
  const int32_t* bo = P.act_boff[a];
  const long off = plane_off(bo, P.n_tiles, b, t);
  const uint8_t* pb = P.job_b[j] + off;
  const uint8_t* pg = KIND == kSEL ? P.job_g[j] + off : pb;
  const int nkb = bo[b + 1] - bo[b];
  const bool half = P.act_half[a][b] != 0;  // the last unit's second byte is padding: skipped
  const __m256i inv = _mm256_set1_epi8(P.job_inv[j] ? -1 : 0), nib = _mm256_set1_epi8(15);
  const uint8_t* tab[MB];
  for (int m = 0; m < MB; ++m)
    tab[m] = static_cast<const uint8_t*>(T.tables[((m0 + m) * A + a) * 2 + (KIND == kPM ? 0 : 1)]) + bo[b] * 128L;
  __m256i acc32[MB][4];
  for (int m = 0; m < MB; ++m)
    for (int q = 0; q < 4; ++q) acc32[m][q] = _mm256_setzero_si256();
  for (int s0 = 0; s0 < nkb; s0 += 32) {
    __m256i acc[MB][2];
    for (int m = 0; m < MB; ++m) acc[m][0] = acc[m][1] = _mm256_setzero_si256();
    for (int kb2 = s0; kb2 < imin(nkb, s0 + 32); kb2 += 2) {
      const long o = static_cast<long>(kb2) * kTileRows;
      __m256i x0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(pb + o));
      __m256i x1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(pb + o + 32)), v0, v1;
      if (KIND == kS01) {
        x0 = _mm256_xor_si256(x0, inv);
        x1 = _mm256_xor_si256(x1, inv);
      } else if (KIND == kSEL) {
        const __m256i g0 = _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(pg + o)), inv);
        const __m256i g1 = _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(pg + o + 32)), inv);
        v0 = _mm256_andnot_si256(x0, g0);
        v1 = _mm256_andnot_si256(x1, g1);
        x0 = _mm256_and_si256(x0, g0);
        x1 = _mm256_and_si256(x1, g1);
      }
      __m256i xb[2], vb[2];
      unit_bytes(x0, x1, xb[0], xb[1]);
      if (KIND == kSEL) unit_bytes(v0, v1, vb[0], vb[1]);
      for (int e = 0; e < (half && kb2 + 2 == nkb ? 1 : 2); ++e) {
        const int kb = kb2 + e;
        const __m256i x = xb[e];
        const __m256i xl = _mm256_and_si256(x, nib), xh = _mm256_and_si256(_mm256_srli_epi16(x, 4), nib);
        for (int m = 0; m < MB; ++m) {
          lookup_a8<false>(xl, tab[m] + kb * 128L, acc[m]);
          lookup_a8<false>(xh, tab[m] + kb * 128L + 64, acc[m]);
        }
        if (KIND == kSEL) {
          const __m256i v = vb[e];
          const __m256i vl = _mm256_and_si256(v, nib), vh = _mm256_and_si256(_mm256_srli_epi16(v, 4), nib);
          for (int m = 0; m < MB; ++m) {
            lookup_a8<true>(vl, tab[m] + kb * 128L, acc[m]);
            lookup_a8<true>(vh, tab[m] + kb * 128L + 64, acc[m]);
          }
        }
      }
    }
    // acc[h] holds rows 16h..16h+7 (low lane) and 16h+8..16h+15 (high lane): into acc32[2h], acc32[2h+1].
    for (int m = 0; m < MB; ++m)
      for (int h = 0; h < 2; ++h) {
        acc32[m][2 * h] = _mm256_add_epi32(acc32[m][2 * h], _mm256_cvtepi16_epi32(_mm256_castsi256_si128(acc[m][h])));
        acc32[m][2 * h + 1] =
            _mm256_add_epi32(acc32[m][2 * h + 1], _mm256_cvtepi16_epi32(_mm256_extracti128_si256(acc[m][h], 1)));
      }
  }
  const long ci = coef_off(P.n_tiles, b, t);
  for (int q = 0; q < 4; ++q) {
    const __m256 c = load_coef8(P, j, ci + 8 * q);
    for (int m = 0; m < MB; ++m) {
      float* ym = yt + (m0 + m) * ystride + 8 * q;
      const __m256 cs = _mm256_mul_ps(c, _mm256_set1_ps(T.stok[(m0 + m) * A + a]));
      _mm256_storeu_ps(ym, _mm256_fmadd_ps(cs, _mm256_cvtepi32_ps(acc32[m][q]), _mm256_loadu_ps(ym)));
    }
  }
}

// Job j for MB tokens: A16 (one kernel for every kind) or A8 (one instance per kind).
template <bool A8, int MB>
void run_job(const LutProblem& P, const LutTokens& T, int j, int b, int t, int m0, float* yt, long ystride) {
  if constexpr (!A8) return a16_job<MB>(P, T, j, b, t, m0, yt, ystride);
  switch (P.job_kind[j]) {
    case kPM: return a8_job<MB, kPM>(P, T, j, b, t, m0, yt, ystride);
    case kSEL: return a8_job<MB, kSEL>(P, T, j, b, t, m0, yt, ystride);
    default: return a8_job<MB, kS01>(P, T, j, b, t, m0, yt, ystride);
  }
}

// Same loop order as the AVX-512 kernel (block, tile, job, passes of 2 tokens: 16 ymm only).
template <bool A8>
void lut_run(const LutProblem& P, const LutTokens& T, int t0, int t1, float* y) {
  const int nb = P.n_blocks, A = P.n_acts;
  const long ystride = static_cast<long>(t1 - t0) * kTileRows;
  for (int b = 0; b < nb; ++b) {
    for (int t = t0; t < t1; ++t) {
      float* yt = y + static_cast<long>(t - t0) * kTileRows;
      for (int j = 0; j < P.n_jobs; ++j) {
        const int32_t* bo = P.act_boff[P.job_act[j]];
        if (bo[b] == bo[b + 1]) continue;
        prefetch_next_block(P, j, b, t, P.job_kind[j] == kSEL);
        int m0 = 0;
        for (; m0 + 2 <= T.mb; m0 += 2) run_job<A8, 2>(P, T, j, b, t, m0, yt, ystride);
        if (m0 < T.mb) run_job<A8, 1>(P, T, j, b, t, m0, yt, ystride);
      }
      for (int a = 0; a < A; ++a) {
        if (!P.act_ecoef[a]) continue;
        const float* ec = P.act_ecoef[a] + coef_off(P.n_tiles, b, t);
        for (int m = 0; m < T.mb; ++m) {
          const float st = T.stok ? T.stok[m * A + a] : 1.0f;
          const __m256 s = _mm256_set1_ps(st * T.xsum[(static_cast<long>(m) * A + a) * nb + b]);
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

void lut_a16_avx2(const LutProblem& P, const LutTokens& T, int t0, int t1, float* y) { lut_run<false>(P, T, t0, t1, y); }

void lut_a8_avx2(const LutProblem& P, const LutTokens& T, int t0, int t1, float* y) { lut_run<true>(P, T, t0, t1, y); }

// Entry n of the table of columns c..c+w-1 (w = 3, 3, 2 per byte): sum_i (bit i of n ? x : -x)
// (+-1 table) or the sum over the set bits (0/1 table), accumulated from +0 in column order
// with FMAs by +-1 / 0 (each rounds once, as an add would). Entries 4-7 of the 2-column table
// repeat 0-3 (they depend on bits 0-1 only): lookup_add's index there carries column 8 in bit 2.
void table_a16_avx2(const float* x, int n_groups, float* pm, float* t01) {
  const __m256i n = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  __m256 on[3], sgn[3];
  for (int i = 0; i < 3; ++i) {
    const __m256i b = _mm256_set1_epi32(1 << i);
    on[i] = _mm256_and_ps(_mm256_castsi256_ps(_mm256_cmpeq_epi32(_mm256_and_si256(n, b), b)), _mm256_set1_ps(1.0f));
    sgn[i] = _mm256_sub_ps(_mm256_add_ps(on[i], on[i]), _mm256_set1_ps(1.0f));  // 1 where set, -1 where not
  }
  for (int kb = 0; kb < n_groups / 2; ++kb) {
    const float* v = x + 8 * kb;
    for (int part = 0; part < 3; ++part) {
      const int c0 = 3 * part, w = part < 2 ? 3 : 2;
      __m256 s = _mm256_setzero_ps(), z = _mm256_setzero_ps();
      for (int i = 0; i < w; ++i) {
        const __m256 xi = _mm256_set1_ps(v[c0 + i]);
        s = _mm256_fmadd_ps(xi, sgn[i], s);
        z = _mm256_fmadd_ps(xi, on[i], z);
      }
      if (pm) _mm256_storeu_ps(pm + 32 * kb + 8 * part, s);
      if (t01) _mm256_storeu_ps(t01 + 32 * kb + 8 * part, z);
    }
  }
}

namespace {
// The 16 int16 sums of one group (e: entries 0-7 in the low lane, 8-15 in the high lane) as
// the byte planes lookup_a8 reads: low bytes twice, then high bytes twice.
inline void store_byte_planes(__m256i e, uint8_t* out) {
  const __m256i split = _mm256_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15,  //
                                         0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
  // qwords: lo 0-7, hi 0-7 | lo 8-15, hi 8-15  ->  lo 0-7, lo 8-15, hi 0-7, hi 8-15
  const __m256i s = _mm256_permute4x64_epi64(_mm256_shuffle_epi8(e, split), 0xD8);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), _mm256_permute4x64_epi64(s, 0x44));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + 32), _mm256_permute4x64_epi64(s, 0xEE));
}
}  // namespace

// Entry n of a group's +-1 table: sum_i (bit i of n ? q[i] : -q[i]) (vpsignw by a constant
// +-1 per entry); of its 0/1 table: the sum over the set bits (and with a 0/-1 mask).
void table_a8_avx2(const int8_t* q, int n_groups, int16_t* pm, int16_t* t01) {
  __m256i sgn[4], bit[4];
  const __m256i n = _mm256_setr_epi16(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  for (int i = 0; i < 4; ++i) {
    const __m256i b = _mm256_set1_epi16(static_cast<int16_t>(1 << i));
    bit[i] = _mm256_cmpeq_epi16(_mm256_and_si256(n, b), b);
    sgn[i] = _mm256_or_si256(bit[i], _mm256_set1_epi16(1));  // -1 | 1 = -1 where set, 1 where not
    sgn[i] = _mm256_sign_epi16(sgn[i], _mm256_set1_epi16(-1));  // 1 where set, -1 where not
  }
  for (int g = 0; g < n_groups; ++g) {
    __m256i s = _mm256_setzero_si256(), z = _mm256_setzero_si256();
    for (int i = 0; i < 4; ++i) {
      const __m256i v = _mm256_set1_epi16(q[4 * g + i]);
      s = _mm256_add_epi16(s, _mm256_sign_epi16(v, sgn[i]));
      z = _mm256_add_epi16(z, _mm256_and_si256(v, bit[i]));
    }
    if (pm) store_byte_planes(s, reinterpret_cast<uint8_t*>(pm + 32 * g));
    if (t01) store_byte_planes(z, reinterpret_cast<uint8_t*>(t01 + 32 * g));
  }
}

float absmax_avx2(const float* x, int n) {
  const __m256 mag = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  __m256 amax = _mm256_setzero_ps();
  int k = 0;
  for (; k + 8 <= n; k += 8) amax = _mm256_max_ps(amax, _mm256_and_ps(_mm256_loadu_ps(x + k), mag));
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, amax);
  float am = absmax_scalar(x + k, n - k);  // the tail
  for (float v : lanes) am = v > am ? v : am;
  return am;
}

void quant_a8_avx2(const float* x, int n, float scale, int8_t* q) {
  // True division and round-half-even, as quant_a8_scalar / torch; |v| <= 127 after the clamp.
  const __m256 s = _mm256_set1_ps(scale), hi = _mm256_set1_ps(127.f), lo = _mm256_set1_ps(-127.f);
  int k = 0;
  for (; k + 8 <= n; k += 8) {
    __m256 v = _mm256_round_ps(_mm256_div_ps(_mm256_loadu_ps(x + k), s), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    v = _mm256_min_ps(_mm256_max_ps(v, lo), hi);
    alignas(32) int32_t w[8];
    _mm256_store_si256(reinterpret_cast<__m256i*>(w), _mm256_cvtps_epi32(v));
    for (int i = 0; i < 8; ++i) q[k + i] = static_cast<int8_t>(w[i]);
  }
  quant_a8_scalar(x + k, n - k, scale, q + k);  // the tail, with the same rounding
}

namespace {

constexpr int kEcoef = -1;  // expand_byte's kind for an act's ecoef term: e[r] * gscale

// Lane masks of a byte: kByteLanes.m[v][i] = all ones where bit i of v is set (8 KB, in L1
// while a panel expands): one load per row and plane where a broadcast, an and and a compare
// made the masks (about half of the expansion's instructions for a group-selected term).
struct ByteLanes {
  alignas(32) int32_t m[256][8];
};
constexpr ByteLanes make_byte_lanes() {
  ByteLanes t{};
  for (int v = 0; v < 256; ++v)
    for (int i = 0; i < 8; ++i) t.m[v][i] = (v >> i & 1) ? -1 : 0;
  return t;
}
constexpr ByteLanes kByteLanes = make_byte_lanes();
inline __m256 byte_lanes(int v) { return _mm256_load_ps(reinterpret_cast<const float*>(kByteLanes.m[v])); }

// The lanes of a piece's mask (bit i: lane i) as an all-ones / zero float mask.
inline __m256 piece_lanes(uint32_t mask) {
  const __m256i bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  return _mm256_castsi256_ps(_mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32(static_cast<int>(mask)), bit), bit));
}

// One byte (8 gathered columns) of one job (or an act's ecoef) for the 32 rows of a tile, as
// dequant_avx512's expand_unit: row r's value is c[r] * gscale, its sign flipped where the
// weight bit is 0 (kPM, kSEL), zeroed outside sel (kSEL) or where the bit is 0 (kS01), the lane
// masks read from kByteLanes. pb / pg: the
// byte of row 0 (row r's 2r bytes on: lut.h unit_byte). pc: where the byte lands, nullptr for
// 8 consecutive columns at w (a direct set's whole byte, or scratch); else the byte's one
// piece (a direct set's byte with padding lanes): its lanes permuted into a window of 8 W
// columns, the window's other columns kept (blend) or added zero.
template <int KIND, bool ADD>
inline void expand_byte(const uint8_t* pb, const uint8_t* pg, int inv, const float* c, __m256 gs, const DensePiece* pc,
                        float* w, long ldw) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  const __m256i idx = pc ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(pc->idx)) : _mm256_setzero_si256();
  const __m256 keep = pc ? piece_lanes(pc->mask) : _mm256_setzero_ps();
  if (pc) w += pc->col;
  for (int r = 0; r < kTileRows; ++r, w += ldw) {
    __m256 v = _mm256_mul_ps(gs, _mm256_set1_ps(c[r]));
    if (KIND == kSEL) v = _mm256_and_ps(v, byte_lanes(pg[2 * r] ^ inv));
    if (KIND == kS01) v = _mm256_and_ps(v, byte_lanes(pb[2 * r] ^ inv));
    if (KIND == kPM || KIND == kSEL) v = _mm256_xor_ps(v, _mm256_andnot_ps(byte_lanes(pb[2 * r]), sign));
    if (!pc) {
      _mm256_storeu_ps(w, ADD ? _mm256_add_ps(_mm256_loadu_ps(w), v) : v);
    } else {
      v = _mm256_permutevar8x32_ps(v, idx);
      const __m256 old = _mm256_loadu_ps(w);
      _mm256_storeu_ps(w, ADD ? _mm256_add_ps(old, _mm256_and_ps(v, keep)) : _mm256_blendv_ps(old, v, keep));
    }
  }
}

// expand_byte over the bytes [0, nbytes) of one job of a (block, tile). upiece == nullptr: every
// byte whole at column 8kb of w (a scattered set's scratch), else a direct set's bytes.
template <int KIND, bool ADD>
void expand_bytes(int nbytes, const uint8_t* pb, const uint8_t* pg, int inv, const float* c, const float* gs,
                  const int32_t* upiece, const DensePiece* piece, float* w, long ldw) {
  for (int kb = 0; kb < nbytes; ++kb) {
    const long o = unit_byte(kb, 0);
    const DensePiece* pc = nullptr;
    float* d = w + 8 * kb;
    if (upiece) {
      if (upiece[kb + 1] == upiece[kb]) continue;  // no live lane
      pc = piece + upiece[kb];
      d = w;
      if (pc->mask == 0xFF) {  // 8 live lanes of a direct set: consecutive columns, in order
        d = w + pc->col;
        pc = nullptr;
      }
    }
    expand_byte<KIND, ADD>(KIND == kEcoef ? nullptr : pb + o, KIND == kSEL ? pg + o : nullptr, inv, c,
                           _mm256_loadu_ps(gs + 8 * kb), pc, d, ldw);
  }
}

template <bool ADD>
void expand_job(int kind, int nbytes, const uint8_t* pb, const uint8_t* pg, int inv, const float* c, const float* gs,
                const int32_t* upiece, const DensePiece* piece, float* w, long ldw) {
  switch (kind) {
    case kPM: return expand_bytes<kPM, ADD>(nbytes, pb, pg, inv, c, gs, upiece, piece, w, ldw);
    case kSEL: return expand_bytes<kSEL, ADD>(nbytes, pb, pg, inv, c, gs, upiece, piece, w, ldw);
    case kS01: return expand_bytes<kS01, ADD>(nbytes, pb, pg, inv, c, gs, upiece, piece, w, ldw);
    default: return expand_bytes<kEcoef, ADD>(nbytes, pb, pg, inv, c, gs, upiece, piece, w, ldw);
  }
}

// Add a scattered set's block, expanded in scratch (byte kb at column 8kb, row stride sld), to
// the tile's W rows: per piece, one permute of the byte's lanes into a window of 8 W columns,
// the lanes outside the piece zeroed, added to the whole window, over the 32 rows.
void scatter_bytes(int nbytes, const float* scratch, long sld, const int32_t* upiece, const DensePiece* piece, float* wt,
                   long ldw) {
  for (int kb = 0; kb < nbytes; ++kb)
    for (int q = upiece[kb]; q < upiece[kb + 1]; ++q) {
      const __m256i idx = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(piece[q].idx));
      const __m256 keep = piece_lanes(piece[q].mask);
      const float* src = scratch + 8 * kb;
      float* d = wt + piece[q].col;
      for (int r = 0; r < kTileRows; ++r, src += sld, d += ldw) {
        const __m256 v = _mm256_and_ps(_mm256_permutevar8x32_ps(_mm256_loadu_ps(src), idx), keep);
        _mm256_storeu_ps(d, _mm256_add_ps(_mm256_loadu_ps(d), v));
      }
    }
}

}  // namespace

// dequant_scalar's result, 8 columns per register, in dequant_avx512's order: per (tile, column
// block) and set of acts with the same gathered columns, every job and ecoef term of the set's
// acts is one pass over its bytes (expand_byte, the rows inner), the first storing where the set
// stores (DenseActs), every other adding; a scattered set's passes go to scratch, added to W
// piece by piece once they are all done (scatter_bytes).
void dequant_avx2(const LutProblem& P, const DenseActs& D, int t0, int t1, float* W, long ldw, float* scratch) {
  const int nb = P.n_blocks, nt = P.n_tiles, A = P.n_acts;
  for (int t = t0; t < t1; ++t) {
    float* wt = W + static_cast<long>(t - t0) * kTileRows * ldw;
    if (D.zero_first)
      for (long i = 0; i < kTileRows * ldw; i += 8) _mm256_storeu_ps(wt + i, _mm256_setzero_ps());
    for (int b = 0; b < nb; ++b) {
      for (int s = 0; s < A; ++s) {
        if (D.same_cols[s] != s) continue;  // s: the first act of a set
        const int32_t* bo = P.act_boff[s];
        const int nbytes = bo[b + 1] - bo[b];
        if (nbytes == 0) continue;
        const bool direct = D.set_direct[s];
        const int32_t* upiece = D.upiece8[s] + bo[b];
        const int32_t* up = direct ? upiece : nullptr;
        float* d = direct ? wt : scratch;
        const long ld = direct ? ldw : D.scratch_ld;
        bool written = direct && !D.set_stores[s];
        for (int a = s; a < A; ++a) {
          if (D.same_cols[a] != s) continue;
          const float* gs = D.gscale[a] + bo[b] * 8;
          const long off = plane_off(bo, nt, b, t), co = coef_off(nt, b, t);
          for (int j = 0; j < P.n_jobs; ++j) {
            if (P.job_act[j] != a) continue;
            alignas(32) float c[kTileRows];
            for (int q = 0; q < 4; ++q) _mm256_store_ps(c + 8 * q, load_coef8(P, j, co + 8 * q));
            const uint8_t* pg = P.job_kind[j] == kSEL ? P.job_g[j] + off : nullptr;
            (written ? expand_job<true> : expand_job<false>)(P.job_kind[j], nbytes, P.job_b[j] + off, pg,
                                                             P.job_inv[j] ? 0xFF : 0, c, gs, up, D.piece8[s], d, ld);
            written = true;
          }
          if (P.act_ecoef[a]) {
            (written ? expand_job<true> : expand_job<false>)(kEcoef, nbytes, nullptr, nullptr, 0,
                                                             P.act_ecoef[a] + coef_off(nt, b, t), gs, up, D.piece8[s], d, ld);
            written = true;
          }
        }
        if (!direct && written) scatter_bytes(nbytes, scratch, ld, upiece, D.piece8[s], wt, ldw);
      }
    }
  }
}

}  // namespace onebit_cpu

#pragma GCC pop_options
