// AVX-512 LUT kernels (F + BW + VL + DQ), selected at run time by the dispatcher.
//
// A16: one `vpermps` looks up 16 rows' nibbles in a 16-entry fp32 table of subset sums of
// 4 activations, i.e. 64 weight-activation products per instruction (masked add does 16).
// A8: one `vpermt2w` looks up 32 rows in a 64-entry int16 table of subset sums of 6 int8
// values, 192 products per instruction, exact in integers (a8_units); int16 partial sums are
// widened to int32 every 16 units of 16 columns (|sum| <= 256 * 127 < 2^15).
//
// Loop order (see lut.h): column block outermost, then sub-ranges of 16 tiles of the thread's
// range, then jobs. A16 then runs passes of up to 4 tokens over the tiles, its tables (2 KB per
// token at B = 128) in L1; A8 runs tokens in pairs, their tables in registers (a8_job). The
// weights stream in address order (block-major layout), read from memory once per group of
// tokens and from L1 after that; the outputs of the tile range stay in L1/L2.
//
// Limits on Sapphire-Rapids-class cores (512-bit work issues on ports 0 and 5 only): A16
// issues 12 uops (2 vpmovzxwd + 6 shifts + 8 vpermps + 8 adds per 512 weights and token, half
// of them shuffle-port), so it is port bound at ~0.023 cycles/weight (~100 us for 4096^2 at
// ~3.5 GHz). A8 issues 5 shuffle-port uops per 512 weights (3 lookups, 2 shifts) plus 3 adds.
// GROUP terms (kSEL) cost twice the lookups plus the and/andn. On Zen 4 (AMD EPYC, the
// project's CPU machines in December 2026) each of vpermps, vpermw, vpermt2w, vpmovzx and the
// shifts issues one 512-bit op per cycle (vpaddw two): the shuffle-class op count sets the
// speed, and A16 splits its accumulations between add and FMA (a16_unit).
#include <immintrin.h>
#include <stdint.h>

#include "lut.h"

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,fma,avx2")
// gcc 12 flags the intrinsics' own _mm512_undefined_*() temporaries as uninitialized.
#pragma GCC diagnostic ignored "-Wuninitialized"

namespace onebit_cpu {
namespace {

constexpr int kPass = 4;  // A16 tokens per pass: 4 x 4 fp32 accumulators + indices fit 32 zmm
// Tiles per sub-range (lut_run): one job's block of 16 tiles is 8 KB at B = 128, so the weights
// of all jobs of a sub-range stay in L1 while further tokens re-read them.
constexpr int kTileChunk = 16;

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

// Two nibbles (indices ia, ib of rows 0-15; ja, jb of rows 16-31) looked up in tables ta, tb
// and added to (sub: subtracted from) a token's four accumulators.
// Half of the accumulations are FMAs by +-1.0: a*1 + c rounds once, exactly like a + c, but
// issues to the FMA pipes. On Zen 4 vaddps shares a pipe with vpermps and the FMA pipes are
// otherwise idle here: 4096x4096 M=1 went from ~177 to ~145 us per call on one core (all
// adds vs this mix; all FMAs ~146). On Intel cores both issue to ports 0 and 5: no change.
inline void lookup4(__m512* ac, __m512i ia, __m512i ib, __m512i ja, __m512i jb, __m512 ta, __m512 tb, bool sub) {
  const __m512 one = _mm512_set1_ps(sub ? -1.0f : 1.0f);
  const __m512 a = _mm512_permutexvar_ps(ia, ta), c = _mm512_permutexvar_ps(ja, ta);
  ac[0] = sub ? _mm512_sub_ps(ac[0], a) : _mm512_add_ps(ac[0], a);
  ac[1] = _mm512_fmadd_ps(_mm512_permutexvar_ps(ib, tb), one, ac[1]);
  ac[2] = sub ? _mm512_sub_ps(ac[2], c) : _mm512_add_ps(ac[2], c);
  ac[3] = _mm512_fmadd_ps(_mm512_permutexvar_ps(jb, tb), one, ac[3]);
}

// One 16-column unit of a 32-row tile for MB tokens, A16: a row's 16 weight bits are one
// 16-bit lane; zero-extended to 32 bits, its four nibbles index the unit's four 16-entry
// tables after shifts by 0, 4, 8 and 12 (vpermps reads 4 index bits). HALF: the unit's second
// byte is padding (LutProblem::act_half), only the first byte's two lookups run.
template <int MB, int KIND, bool HALF>
inline void a16_unit(const uint8_t* w, const uint8_t* g, long to, const float* const* tab, __m256i inv, __m512 (*acc)[4]) {
  // Rows 0-15 and 16-31 as two 256-bit loads: extracting the upper half of one 512-bit load
  // would cost a shuffle-port op per unit (~5% of the loop).
  __m256i x0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w));
  __m256i x1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 32)), v0, v1;
  if (KIND == kS01) {
    x0 = _mm256_xor_si256(x0, inv);
    x1 = _mm256_xor_si256(x1, inv);
  } else if (KIND == kSEL) {
    const __m256i g0 = _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(g)), inv);
    const __m256i g1 = _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(g + 32)), inv);
    v0 = _mm256_andnot_si256(x0, g0);
    v1 = _mm256_andnot_si256(x1, g1);
    x0 = _mm256_and_si256(x0, g0);
    x1 = _mm256_and_si256(x1, g1);
  }
  for (int pass = 0; pass < (KIND == kSEL ? 2 : 1); ++pass) {
    const __m512i i0 = _mm512_cvtepu16_epi32(pass ? v0 : x0);  // rows 0-15
    const __m512i i1 = _mm512_cvtepu16_epi32(pass ? v1 : x1);  // rows 16-31
    const __m512i i0b = _mm512_srli_epi32(i0, 4), i1b = _mm512_srli_epi32(i1, 4);
    __m512i i0c, i1c, i0d, i1d;
    if (!HALF) {
      i0c = _mm512_srli_epi32(i0, 8), i1c = _mm512_srli_epi32(i1, 8);
      i0d = _mm512_srli_epi32(i0, 12), i1d = _mm512_srli_epi32(i1, 12);
    }
    // pass 1 (kSEL's ~B & sel) subtracts: the adds become subtractions, the FMAs by 1 FMAs by -1.
    for (int m = 0; m < MB; ++m) {
      const float* tk = reinterpret_cast<const float*>(reinterpret_cast<const char*>(tab[m]) + to);
      lookup4(acc[m], i0, i0b, i1, i1b, _mm512_loadu_ps(tk), _mm512_loadu_ps(tk + 16), pass == 1);
      if (!HALF) lookup4(acc[m], i0c, i0d, i1c, i1d, _mm512_loadu_ps(tk + 32), _mm512_loadu_ps(tk + 48), pass == 1);
    }
  }
}

// Job j on column block b of tiles [ta, tb) for tokens m0..m0+MB-1, A16: fp32 tables, vpermps.
// The tiles' bytes of block b are contiguous (block-major layout), and so are their
// coefficients and outputs: the tile loop only advances pointers.
template <int MB, int KIND>
void a16_job(const LutProblem& P, const LutTokens& T, int j, int b, int ta, int tb, int m0, float* y, long ystride) {
  const int A = P.n_acts, a = P.job_act[j];
  const JobSpan sp = job_span<KIND>(P, j, b, ta);
  const int kb0 = sp.kb0, nkb = sp.nkb;
  const bool half = P.act_half[a][b] != 0;
  const uint8_t* pb = sp.b;
  const uint8_t* pg = sp.g;
  const __m256i inv = _mm256_set1_epi8(P.job_inv[j] ? -1 : 0);
  const float* tab[MB];
  for (int m = 0; m < MB; ++m)
    tab[m] = static_cast<const float*>(T.tables[((m0 + m) * A + a) * 2 + (KIND == kPM ? 0 : 1)]) + kb0 * 32;
  const long cbase = coef_off(P.n_tiles, b, 0);
  // One byte offset into every token's tables (no per-token pointer arithmetic): a unit's
  // four tables are 256 bytes.
  const long tfull = static_cast<long>(nkb / 2 - half) * 256;
  // The first pass fetches the next block (later passes find the weights in L1).
  const NextBlock next = m0 == 0 ? NextBlock(P, j, b, ta, KIND == kSEL) : NextBlock();
  for (int t = ta; t < tb; ++t) {
    next.lines(t - ta, 0, 1L << 30, true);
    // Four accumulators per token (row halves x two chains): vaddps latency is 4 cycles, so
    // one token alone needs independent chains to keep the ports busy.
    __m512 acc[MB][4];
    for (int m = 0; m < MB; ++m)
      for (int u = 0; u < 4; ++u) acc[m][u] = _mm512_setzero_ps();
    const uint8_t* w = pb;
    const uint8_t* g = pg;
    long to = 0;
#pragma GCC unroll 2
    for (; to < tfull; to += 256, w += 2 * kTileRows, g += 2 * kTileRows) a16_unit<MB, KIND, false>(w, g, to, tab, inv, acc);
    if (half) {
      a16_unit<MB, KIND, true>(w, g, to, tab, inv, acc);
      w += 2 * kTileRows;
      g += 2 * kTileRows;
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

// A8: per 16-column unit three int16 tables (table_a8_avx512): T0, 64 entries over columns
// 0-5, T1, 64 over columns 6-11, T2, 16 over columns 12-15 (stored as 32). A row's 16 bits are
// one 16-bit lane, so the loaded weights index T0 as they are (vpermt2w reads 6 index bits of
// each lane from a two-register table), T1 after a shift by 6 and T2 (vpermw, 5 bits; only 4
// are left) after a shift by 12: 3 lookups and 2 shifts per 16 columns of 32 rows, where
// nibble tables took 4 lookups, 2 zero-extensions and 2 shifts. Those count, not the adds:
// on Zen 4 the shuffle-class ops issue one 512-bit op per cycle.
// The tables of 4 units (20 registers) stay in registers over every tile of the sub-range:
// a lookup whose table comes from memory costs a load per lookup and made the loop load bound
// (standalone, 4096x4096: ~70 us with tables from L1, ~50 us from registers).
constexpr int kA8UnitTab = a8_unit_tab_avx512;  // int16 per unit: T0 (64), T1 (64), T2 (32)
constexpr int kA8Group = 4;  // units x tokens whose tables are held in registers at once (4 x 1, 2 x 2)

// A walk of NT tokens over job j's column block b on the tiles [ta, ta + ntiles) (a8_job).
template <int NT>
struct A8Walk {
  const LutProblem& P;
  int j, b, ta, ntiles;
  const uint8_t* pb;  // the block's bytes of tile ta (sign plane; group plane for kSEL)
  const uint8_t* pg;
  long tile_bytes;    // bytes of one tile's block
  __m512i inv;
  NextBlock next;     // the walk of the first token: fetch the next block's bytes (else empty)
  bool wide;          // more than 16 units: int32 partials too
  __m512 st[NT];      // per token: the int8 scale,
  float* y[NT];       // the outputs of tile ta,
  int16_t (*part[NT])[32];  // the partial sums between groups of units
  int32_t (*part32[NT])[32];
};

// STAGE fixes the flags at compile time for the groups of a block of at most 16 units (the
// formats' default is 128 columns, 8 units): kOpen (first, not last: store the int16 partial),
// kMid (add to it, store it), kClose (last: no int32 partial); kAny reads them at run time. The
// fixed instances keep the flags (loaded from the stack: the tables fill the registers) out of
// the tile loop: 4096x4096 A8, in one process, 9 alternations: M=1 2% / 8% faster at 1 / 2
// threads, M=16 5% / 11%.
enum A8Stage { kAny, kOpen, kMid, kClose };

// Token k's sum s of this group on tile t: into its partial, or (last group) coef * token
// scale * (s + the int32 partial) into y.
template <int NT>
inline void a8_tile_out(const A8Walk<NT>& W, int k, int t, __m512i s, bool first, bool flush, bool last, bool wide) {
  if (!first) s = _mm512_add_epi16(s, _mm512_load_si512(W.part[k][t]));
  if (!last && !flush) {
    _mm512_store_si512(W.part[k][t], s);
    return;
  }
  __m512i lo = _mm512_cvtepi16_epi32(_mm512_castsi512_si256(s)), hi = _mm512_cvtepi16_epi32(_mm512_extracti64x4_epi64(s, 1));
  if (wide) {
    lo = _mm512_add_epi32(lo, _mm512_load_si512(W.part32[k][t]));
    hi = _mm512_add_epi32(hi, _mm512_load_si512(W.part32[k][t] + 16));
  }
  if (!last) {
    _mm512_store_si512(W.part32[k][t], lo);
    _mm512_store_si512(W.part32[k][t] + 16, hi);
    return;
  }
  __m512 c0, c1;
  load_coef(W.P, W.j, coef_off(W.P.n_tiles, W.b, W.ta + t), c0, c1);
  float* yt = W.y[k] + static_cast<long>(t) * kTileRows;
  _mm512_storeu_ps(yt, _mm512_fmadd_ps(_mm512_mul_ps(c0, W.st[k]), _mm512_cvtepi32_ps(lo), _mm512_loadu_ps(yt)));
  _mm512_storeu_ps(yt + 16, _mm512_fmadd_ps(_mm512_mul_ps(c1, W.st[k]), _mm512_cvtepi32_ps(hi), _mm512_loadu_ps(yt + 16)));
}

// Units [u0, u0 + NU) of the walk's block (token k's tables tab[k], already at unit u0) over its
// tiles, for NT tokens: int16 partial sums in part[k][tile] between groups of units; the last
// group (last) adds coef * token scale * the sum (+ part32 when the block has more than 16
// units) into y. Each unit adds at most 16 * 127 = 2032 in magnitude to a row (kSEL too: its
// two lookups are sums over disjoint subsets), so int16 holds 16 units; `flush` moves the int16
// partial into part32 every 16 units. Two tokens share each weight load and its two shifts:
// 8 shuffle-class ops per unit and token pair instead of 10 (4096x4096 M=16, in one process,
// 9 alternations against token by token: 5% / 9% faster at 1 / 2 threads).
template <int NU, int NT, int KIND, int STAGE>
void a8_units(const A8Walk<NT>& W, int u0, const int16_t* const* tab, bool first_, bool flush_, bool last_) {
  const bool first = STAGE == kOpen || (STAGE == kAny && first_);
  const bool last = STAGE == kClose || (STAGE == kAny && last_);
  const bool flush = STAGE == kAny && flush_;
  const bool wide = STAGE == kAny && W.wide;
  __m512i t0a[NT][NU], t0b[NT][NU], t1a[NT][NU], t1b[NT][NU], t2[NT][NU];  // T0, T1 halves; T2
  for (int k = 0; k < NT; ++k)
    for (int u = 0; u < NU; ++u) {
      const int16_t* tu = tab[k] + u * kA8UnitTab;
      t0a[k][u] = _mm512_loadu_si512(tu);
      t0b[k][u] = _mm512_loadu_si512(tu + 32);
      t1a[k][u] = _mm512_loadu_si512(tu + 64);
      t1b[k][u] = _mm512_loadu_si512(tu + 96);
      t2[k][u] = _mm512_loadu_si512(tu + 128);
    }
  for (int t = 0; t < W.ntiles; ++t) {
    // The first token fetches the next block's bytes of this tile for this group's units (the
    // last group: the rest), spread over the groups, not all in the first: on weights from
    // DRAM (4096x11008, 2 threads, 21 copies round robin, in one process) 305 -> 290 us. The
    // prefetch as a whole makes DRAM-bound calls ~1.5-1.7x faster (57 copies of 4096x4096,
    // 1 and 2 threads) and costs nothing measurable hot; one line per unit between the lookups
    // was as fast hot and 4-11% slower from DRAM (in one process, 7 alternations).
    W.next.lines(t, 64L * u0, last ? 1L << 30 : 64L * (u0 + NU), u0 == 0);
    const uint8_t* w = W.pb + t * W.tile_bytes + 64 * u0;
    const uint8_t* g = W.pg + t * W.tile_bytes + 64 * u0;
    __m512i a0[NT], a1[NT], a2[NT];
    for (int k = 0; k < NT; ++k) a0[k] = a1[k] = a2[k] = _mm512_setzero_si512();
#pragma GCC unroll 4
    for (int u = 0; u < NU; ++u) {
      __m512i x = _mm512_loadu_si512(w + 64 * u), v;
      if (KIND == kS01) {
        x = _mm512_xor_si512(x, W.inv);
      } else if (KIND == kSEL) {
        const __m512i gg = _mm512_xor_si512(_mm512_loadu_si512(g + 64 * u), W.inv);
        v = _mm512_andnot_si512(x, gg);
        x = _mm512_and_si512(x, gg);
      }
      const __m512i x6 = _mm512_srli_epi16(x, 6), x12 = _mm512_srli_epi16(x, 12);
      for (int k = 0; k < NT; ++k) {
        a0[k] = _mm512_add_epi16(a0[k], _mm512_permutex2var_epi16(t0a[k][u], x, t0b[k][u]));
        a1[k] = _mm512_add_epi16(a1[k], _mm512_permutex2var_epi16(t1a[k][u], x6, t1b[k][u]));
        a2[k] = _mm512_add_epi16(a2[k], _mm512_permutexvar_epi16(x12, t2[k][u]));
      }
      if (KIND == kSEL) {
        const __m512i v6 = _mm512_srli_epi16(v, 6), v12 = _mm512_srli_epi16(v, 12);
        for (int k = 0; k < NT; ++k) {
          a0[k] = _mm512_sub_epi16(a0[k], _mm512_permutex2var_epi16(t0a[k][u], v, t0b[k][u]));
          a1[k] = _mm512_sub_epi16(a1[k], _mm512_permutex2var_epi16(t1a[k][u], v6, t1b[k][u]));
          a2[k] = _mm512_sub_epi16(a2[k], _mm512_permutexvar_epi16(v12, t2[k][u]));
        }
      }
    }
    for (int k = 0; k < NT; ++k)
      a8_tile_out(W, k, t, _mm512_add_epi16(_mm512_add_epi16(a0[k], a1[k]), a2[k]), first, flush, last, wide);
  }
}

// Tokens m0..m0+NT-1 of job j on column block b of tiles [ta, tb): groups of units whose
// tables (G units x NT tokens x 5 = 20 registers) stay in registers over every tile.
template <int NT, int KIND>
void a8_tokens(const LutProblem& P, const LutTokens& T, int j, int b, int ta, int tb, int m0, float* y, long ystride,
               int16_t (*part)[kTileChunk][32], int32_t (*part32)[kTileChunk][32]) {
  constexpr int G = kA8Group / NT;  // units per group
  const int A = P.n_acts, a = P.job_act[j];
  const JobSpan sp = job_span<KIND>(P, j, b, ta);
  const int nu = sp.nkb / 2;
  A8Walk<NT> W{P, j, b, ta, tb - ta, sp.b, sp.g, static_cast<long>(sp.nkb) * kTileRows,
               _mm512_set1_epi8(P.job_inv[j] ? -1 : 0), m0 == 0 ? NextBlock(P, j, b, ta, KIND == kSEL) : NextBlock(),
               nu > 16, {}, {}, {}, {}};
  const int16_t* tab[NT];
  for (int k = 0; k < NT; ++k) {
    const int m = m0 + k;
    W.st[k] = _mm512_set1_ps(T.stok[m * A + a]);
    W.y[k] = y + m * ystride;
    W.part[k] = part[k];
    W.part32[k] = part32[k];
    tab[k] = static_cast<const int16_t*>(T.tables[(m * A + a) * 2 + (KIND == kPM ? 0 : 1)]) + (sp.kb0 / 2) * kA8UnitTab;
    if (W.wide)
      for (int t = 0; t < W.ntiles; ++t) {
        _mm512_store_si512(part32[k][t], _mm512_setzero_si512());
        _mm512_store_si512(part32[k][t] + 16, _mm512_setzero_si512());
      }
  }
  for (int u0 = 0; u0 < nu; u0 += G) {
    const int n = imin(G, nu - u0);
    const bool first = u0 % 16 == 0, last = u0 + n >= nu, flush = (u0 + n) % 16 == 0;
    const int16_t* tu[NT];
    for (int k = 0; k < NT; ++k) tu[k] = tab[k] + u0 * kA8UnitTab;
    if (n == G && !W.wide && !flush) {
      if (first && !last) {
        a8_units<G, NT, KIND, kOpen>(W, u0, tu, first, flush, last);
        continue;
      }
      if (!first && !last) {
        a8_units<G, NT, KIND, kMid>(W, u0, tu, first, flush, last);
        continue;
      }
    }
    if (n == G && !W.wide && !first && last) {
      a8_units<G, NT, KIND, kClose>(W, u0, tu, first, flush, last);
      continue;
    }
    switch (n) {
      case 4: if constexpr (G >= 4) a8_units<4, NT, KIND, kAny>(W, u0, tu, first, flush, last); break;
      case 3: if constexpr (G >= 3) a8_units<3, NT, KIND, kAny>(W, u0, tu, first, flush, last); break;
      case 2: a8_units<2, NT, KIND, kAny>(W, u0, tu, first, flush, last); break;
      default: a8_units<1, NT, KIND, kAny>(W, u0, tu, first, flush, last);
    }
  }
}

// Job j on column block b of tiles [ta, tb) (at most kTileChunk), every token: pairs of tokens
// (then a last single one), each walk with its tables in registers over every tile. The
// block's weights of the sub-range (8 KB at B = 128) stay in L1 while the tokens re-read them.
template <int KIND>
void a8_job(const LutProblem& P, const LutTokens& T, int j, int b, int ta, int tb, float* y, long ystride) {
  alignas(64) int16_t part[2][kTileChunk][32];
  alignas(64) int32_t part32[2][kTileChunk][32];
  int m = 0;
  for (; m + 2 <= T.mb; m += 2) a8_tokens<2, KIND>(P, T, j, b, ta, tb, m, y, ystride, part, part32);
  for (; m < T.mb; ++m) a8_tokens<1, KIND>(P, T, j, b, ta, tb, m, y, ystride, part, part32);
}

template <int KIND>
void a16_all_tokens(const LutProblem& P, const LutTokens& T, int j, int b, int ta, int tb, float* y, long ystride) {
  int m0 = 0;
  for (; m0 + kPass <= T.mb; m0 += kPass) a16_job<kPass, KIND>(P, T, j, b, ta, tb, m0, y, ystride);
  switch (T.mb - m0) {
    case 1: return a16_job<1, KIND>(P, T, j, b, ta, tb, m0, y, ystride);
    case 2: return a16_job<2, KIND>(P, T, j, b, ta, tb, m0, y, ystride);
    case 3: return a16_job<3, KIND>(P, T, j, b, ta, tb, m0, y, ystride);
    default: return;
  }
}

template <bool A8, int KIND>
void job_all_tokens(const LutProblem& P, const LutTokens& T, int j, int b, int ta, int tb, float* y, long ystride) {
  if (A8)
    a8_job<KIND>(P, T, j, b, ta, tb, y, ystride);
  else
    a16_all_tokens<KIND>(P, T, j, b, ta, tb, y, ystride);
}

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

}  // namespace

void table_a16_avx512(const float* x, int n_groups, float* pm, float* t01) {
  for (int g = 0; g < n_groups; ++g) {
    if (t01) _mm512_storeu_ps(t01 + 16 * g, subset_sums(x + 4 * g, kSigns.t01));
    if (pm) _mm512_storeu_ps(pm + 16 * g, subset_sums(x + 4 * g, kSigns.pm));
  }
}

// A8 tables of a8_units, per 16 columns q[0..15]: T0[n] over columns 0-5 and T1[n] over 6-11
// (n = 0..63), T2[n] over 12-15 (n = 0..15, repeated in 16..31). Entry n of a +-1 table is
// sum_i (bit i of n ? q[i] : -q[i]), of a 0/1 table the sum over the set bits; exact in int16
// (|sum| <= 6 * 127). Lane n of a 32-lane half gets bit i (i < 5) of n from mask kBit[i]; bit
// 5 is the half: T[n + 32] = T[n] + 2 q[5] (+-1) or + q[5] (0/1).
namespace {
constexpr __mmask32 kBit[5] = {0xAAAAAAAAu, 0xCCCCCCCCu, 0xF0F0F0F0u, 0xFF00FF00u, 0xFFFF0000u};

inline void table6(const int8_t* q, int w, bool pm, int16_t* out) {
  int sum = 0;
  for (int i = 0; i < w; ++i) sum += q[i];
  const int last = w == 6 ? 5 : w;  // columns from masks (bits 0-4); column 5 picks the half
  __m512i s = _mm512_set1_epi16(static_cast<int16_t>(pm ? -sum : 0));
  for (int i = 0; i < last; ++i)
    s = _mm512_mask_add_epi16(s, kBit[i], s, _mm512_set1_epi16(static_cast<int16_t>(pm ? 2 * q[i] : q[i])));
  if (w == 6) {
    // The half with bit 5 clear; the other adds column 5.
    _mm512_storeu_si512(out, s);
    _mm512_storeu_si512(out + 32, _mm512_add_epi16(s, _mm512_set1_epi16(static_cast<int16_t>(pm ? 2 * q[5] : q[5]))));
  } else {  // w == 4: lanes 16-31 repeat 0-15 (bits 0-3 of the lane index)
    _mm512_storeu_si512(out, s);
  }
}
}  // namespace

void table_a8_avx512(const int8_t* q, int n_groups, int16_t* pm, int16_t* t01) {
  for (int u = 0; u < n_groups / 4; ++u) {
    const int8_t* v = q + 16 * u;
    for (int k = 0; k < 2; ++k) {
      int16_t* out = k == 0 ? pm : t01;
      if (!out) continue;
      out += u * kA8UnitTab;
      table6(v, 6, k == 0, out);
      table6(v + 6, 6, k == 0, out + 64);
      table6(v + 12, 4, k == 0, out + 128);
    }
  }
}

namespace {

// The jobs of act a on one (block, tile), up to kMaxJobs at a time (next), their coefficients
// converted to fp32.
struct DequantJob {
  int kind;
  uint32_t inv;       // 0xFFFF: kSEL's sel = ~G, kS01's ~B
  const uint16_t* b;  // the job's plane at (block, tile): unit u, row r at b[u * 32 + r]
  const uint16_t* g;
  const float* c;     // its 32 coefficients
};
constexpr int kMaxJobs = 16;
struct DequantAct {
  DequantJob jobs[kMaxJobs];
  alignas(64) float c[kMaxJobs][kTileRows];
  int n = 0;
  // The act's next jobs from job index `from` on (returns where it stopped).
  int next(const LutProblem& P, int a, int b, int t, int from) {
    const long off = coef_off(P.n_tiles, b, t), po = plane_off(P.act_boff[a], P.n_tiles, b, t);
    n = 0;
    for (; from < P.n_jobs && n < kMaxJobs; ++from) {
      if (P.job_act[from] != a) continue;
      const int j = from;
      __m512 c0, c1;
      load_coef(P, j, off, c0, c1);
      _mm512_store_ps(c[n], c0);
      _mm512_store_ps(c[n] + 16, c1);
      jobs[n] = {P.job_kind[j], P.job_inv[j] ? 0xFFFFu : 0u, reinterpret_cast<const uint16_t*>(P.job_b[j] + po),
                 P.job_kind[j] == kSEL ? reinterpret_cast<const uint16_t*>(P.job_g[j] + po) : nullptr, c[n]};
      ++n;
    }
    return from;
  }
};

constexpr int kEcoef = -1;  // expand_unit's kind for an act's ecoef term: e[r] * gscale

// One 16-column unit of one job (or an act's ecoef) for the 32 rows of a tile, into the unit's
// W columns at d (row r at d + r * ldw): row r's value is c[r] * gscale (one multiply), its sign
// flipped where the weight bit is 0 (kPM, kSEL) and zeroed outside sel (kSEL) or where the bit
// is 0 (kS01). ADD: added to what earlier jobs of the unit's columns wrote, else stored. PART:
// a unit with padding lanes, compressed to its live ones (masked store). The rows are the inner
// loop so that the unit's gscale and the job's kind and masks stay fixed while 32 rows stream.
template <int KIND, bool ADD, bool PART>
inline void expand_unit(const uint16_t* pb, const uint16_t* pg, uint32_t inv, const float* c, __m512 gs,
                        __mmask16 live, float* d, long ldw) {
  const __m512 sign = _mm512_set1_ps(-0.0f);
  const __mmask16 k = PART ? static_cast<__mmask16>((1u << __builtin_popcount(live)) - 1) : 0xFFFF;
#pragma GCC unroll 4
  for (int r = 0; r < kTileRows; ++r, d += ldw) {
    __m512 v;
    if (KIND == kEcoef || KIND == kPM) {
      v = _mm512_mul_ps(gs, _mm512_set1_ps(c[r]));
    } else {
      const __mmask16 on = static_cast<__mmask16>((KIND == kSEL ? pg[r] : pb[r]) ^ inv);
      v = _mm512_maskz_mul_ps(on, gs, _mm512_set1_ps(c[r]));
    }
    if (KIND == kPM || KIND == kSEL) v = _mm512_mask_xor_ps(v, static_cast<__mmask16>(~pb[r]), v, sign);
    if (PART) {
      v = _mm512_maskz_compress_ps(live, v);
      _mm512_mask_storeu_ps(d, k, ADD ? _mm512_add_ps(_mm512_maskz_loadu_ps(k, d), v) : v);
    } else {
      _mm512_storeu_ps(d, ADD ? _mm512_add_ps(_mm512_loadu_ps(d), v) : v);
    }
  }
}

// expand_unit over units [0, nu) of one job of a (block, tile); d: the tile's W rows. live ==
// nullptr: every unit whole at column 16u of d (a scattered set's scratch).
template <int KIND, bool ADD>
void expand_units(int nu, const uint16_t* pb, const uint16_t* pg, uint32_t inv, const float* c, const float* gs,
                  const uint16_t* live, const int32_t* ucol, float* d, long ldw) {
  for (int u = 0; u < nu; ++u, pb += KIND == kEcoef ? 0 : kTileRows, pg += KIND == kSEL ? kTileRows : 0) {
    const __m512 g = _mm512_loadu_ps(gs + 16 * u);
    if (!live)
      expand_unit<KIND, ADD, false>(pb, pg, inv, c, g, 0xFFFF, d + 16 * u, ldw);
    else if (live[u] == 0xFFFF)
      expand_unit<KIND, ADD, false>(pb, pg, inv, c, g, live[u], d + ucol[u], ldw);
    else if (live[u])
      expand_unit<KIND, ADD, true>(pb, pg, inv, c, g, live[u], d + ucol[u], ldw);
  }
}

// Add a scattered set's block, expanded in scratch (unit u at column 16u, row stride sld), to
// the tile's W rows: per piece, one permute of the unit's lanes into a window of 16 W columns
// and a masked add, over the 32 rows.
void scatter_units(int nu, const float* scratch, long sld, const int32_t* upiece, const DensePiece* piece, float* wt,
                   long ldw) {
  for (int u = 0; u < nu; ++u)
    for (int q = upiece[u]; q < upiece[u + 1]; ++q) {
      const __m512i idx = _mm512_loadu_si512(piece[q].idx);
      const __mmask16 m = static_cast<__mmask16>(piece[q].mask);
      const float* src = scratch + 16 * u;
      float* d = wt + piece[q].col;
#pragma GCC unroll 4
      for (int r = 0; r < kTileRows; ++r, src += sld, d += ldw) {
        const __m512 v = _mm512_permutexvar_ps(idx, _mm512_loadu_ps(src));
        _mm512_mask_storeu_ps(d, m, _mm512_add_ps(_mm512_maskz_loadu_ps(m, d), v));
      }
    }
}

template <bool ADD>
void expand_job(int kind, int nu, const uint16_t* pb, const uint16_t* pg, uint32_t inv, const float* c,
                const float* gs, const uint16_t* live, const int32_t* ucol, float* d, long ldw) {
  switch (kind) {
    case kPM: return expand_units<kPM, ADD>(nu, pb, pg, inv, c, gs, live, ucol, d, ldw);
    case kSEL: return expand_units<kSEL, ADD>(nu, pb, pg, inv, c, gs, live, ucol, d, ldw);
    case kS01: return expand_units<kS01, ADD>(nu, pb, pg, inv, c, gs, live, ucol, d, ldw);
    default: return expand_units<kEcoef, ADD>(nu, pb, pg, inv, c, gs, live, ucol, d, ldw);
  }
}

}  // namespace

// dequant_scalar's result, 16 columns per register. Per (tile, column block) and set of acts
// with the same gathered columns (DenseActs::same_cols): every job of every act of the set, and
// every act's ecoef term, is one pass over the set's units (expand_unit: the rows inner, 4-5
// ops per row and unit), the first pass storing (where the set stores), the others adding. A
// set with scattered units makes its passes in scratch, in its own gathered columns, and then
// adds the sum to W piece by piece (scatter_units): one permute per piece and row however many
// jobs the set has (stop 19's layout moved every job's lanes with compress + expand per row and
// made the expansion ~1.3 ns per weight on SmolLM2's CGB layers).
void dequant_avx512(const LutProblem& P, const DenseActs& D, int t0, int t1, float* W, long ldw, float* scratch) {
  const int nb = P.n_blocks, nt = P.n_tiles, A = P.n_acts;
  DequantAct act;
  for (int t = t0; t < t1; ++t) {
    float* wt = W + static_cast<long>(t - t0) * kTileRows * ldw;
    if (D.zero_first)
      for (long i = 0; i < kTileRows * ldw; i += 16) _mm512_storeu_ps(wt + i, _mm512_setzero_ps());
    for (int b = 0; b < nb; ++b) {
      for (int s = 0; s < A; ++s) {
        if (D.same_cols[s] != s) continue;  // s: the first act of a set
        const int32_t* bo = P.act_boff[s];
        const int nu = (bo[b + 1] - bo[b]) / 2;
        if (nu == 0) continue;  // gathered acts with no column in this block
        const int32_t* upiece = D.upiece[s] + bo[b] / 2;
        const bool scattered = !D.set_direct[s];
        const uint16_t* live = scattered ? nullptr : D.ulive[s] + bo[b] / 2;
        const int32_t* ucol = D.ucol[s] + bo[b] / 2;
        float* d = scattered ? scratch : wt;
        const long ld = scattered ? D.scratch_ld : ldw;
        bool written = !scattered && !D.set_stores[s];
        for (int a = s; a < A; ++a) {
          if (D.same_cols[a] != s) continue;
          const float* gs = D.gscale[a] + bo[b] * 8;
          for (int next = 0; next < P.n_jobs;) {
            next = act.next(P, a, b, t, next);
            for (int q = 0; q < act.n; ++q, written = true) {
              const DequantJob& J = act.jobs[q];
              (written ? expand_job<true> : expand_job<false>)(J.kind, nu, J.b, J.g, J.inv, J.c, gs, live, ucol, d, ld);
            }
          }
          if (P.act_ecoef[a]) {
            const float* ec = P.act_ecoef[a] + coef_off(nt, b, t);
            (written ? expand_job<true> : expand_job<false>)(kEcoef, nu, nullptr, nullptr, 0, ec, gs, live, ucol, d, ld);
            written = true;
          }
        }
        if (scattered && written) scatter_units(nu, scratch, ld, upiece, D.piece[s], wt, ldw);
      }
    }
  }
}

}  // namespace onebit_cpu

#pragma GCC pop_options
