// The AMX driver shared by amx_int8.cpp (A8, TDPBSSD) and amx_bf16.cpp (A16, TDPBF16PS).
//
// Include it inside a `#pragma GCC target` region that enables avx512f/bw/vl/dq and amx-tile
// (each kernel file adds its own amx-int8 / amx-bf16): everything here has internal linkage
// and is compiled for that target, never merged with generic code.
//
// Both kernels have the same anatomy, in bytes: a tile row is 64 bytes (64 int8 or 32 bf16
// activations of one column chunk; 16 int32 or fp32 sums); one weight tile is 16 output rows
// x 64 bytes, the two halves of a 32-row LUT tile make one 2 KB chunk. They differ in how
// bits become weights (Ops::expand_for), in the dot-product instruction (Ops::tdp) and in the
// epilogue (Ops::epilogue: int32 -> fp32, summing a token's bf16 parts).
//
// Loop order: chunks of tc tiles (the per-act fp32 accumulator of a chunk, tc x mb x 32
// floats, stays in L2 while every block of the chunk adds into it; the activation tiles are
// re-read per chunk), then acts, then column blocks, tiles and jobs. Each (block, tile, job)
// step expands its weights once into a buffer shared by all m-tiles of the token group.
#pragma once

#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "lut.h"

namespace onebit_cpu {
namespace {

struct alignas(64) TileConfig {
  uint8_t palette_id;
  uint8_t start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

// Tiles: 0-3 accumulators (2 sets x 2 row halves), 4-5 activations (one per set), 6-7 weights.
constexpr int kRowBytes = 64;
constexpr int kHalfBytes = 16 * kRowBytes;   // one weight tile: 16 rows x 64 bytes
constexpr int kChunkBytes = 2 * kHalfBytes;  // both row halves of a 32-row LUT tile

inline void load_tile_config(int rows_a) {
  TileConfig cfg;
  memset(&cfg, 0, sizeof(cfg));
  cfg.palette_id = 1;
  for (int i = 0; i < 8; ++i) {
    cfg.colsb[i] = kRowBytes;
    cfg.rows[i] = i < 6 ? rows_a : 16;
  }
  _tile_loadconfig(&cfg);
}

// gcc's AMX intrinsics paste tile numbers into the asm text, so they must be literal tokens:
// each kernel expands this once per accumulator set (C0, C1 with activations A) instead of
// passing the set as a parameter. a0: the m-tile's first chunk, R rows of kRowBytes each.
#define ONEBIT_AMX_TDP_LOOP(DP, C0, C1, A, a0, R, buf, nch)                            \
  do {                                                                                \
    _tile_zero(C0);                                                                   \
    _tile_zero(C1);                                                                   \
    for (int c_ = 0; c_ < (nch); ++c_) {                                              \
      _tile_loadd(A, (a0) + static_cast<long>(c_) * (R) * kRowBytes, kRowBytes);      \
      _tile_loadd(6, (buf) + static_cast<long>(c_) * kChunkBytes, kRowBytes);         \
      _tile_loadd(7, (buf) + static_cast<long>(c_) * kChunkBytes + kHalfBytes, kRowBytes); \
      DP(C0, A, 6);                                                                   \
      DP(C1, A, 7);                                                                   \
    }                                                                                 \
  } while (0)

// The loop above on accumulator set 0 (C tiles 0, 1, activations 4) or 1 (2, 3, 5).
#define ONEBIT_AMX_TDP_SET(DP, set, a0, R, buf, nch)          \
  do {                                                        \
    if ((set) == 0)                                           \
      ONEBIT_AMX_TDP_LOOP(DP, 0, 1, 4, a0, R, buf, nch);      \
    else                                                      \
      ONEBIT_AMX_TDP_LOOP(DP, 2, 3, 5, a0, R, buf, nch);      \
  } while (0)

using ExpandFn = void (*)(const uint8_t* pb, const uint8_t* pg, int nkb, uint8_t* buf);

// Ops::expand_for for a kernel whose weight expansion is `template <int KIND, int INV> EXPAND`
// (a macro because each kernel's EXPAND is a function template of its own file).
#define ONEBIT_AMX_EXPAND_FOR(EXPAND)                                       \
  static ExpandFn expand_for(int kind, int inv) {                           \
    switch (kind) {                                                         \
      case kPM: return EXPAND<kPM, 0>;                                      \
      case kSEL: return inv ? EXPAND<kSEL, 1> : EXPAND<kSEL, 0>;            \
      default: return inv ? EXPAND<kS01, 1> : EXPAND<kS01, 0>;              \
    }                                                                       \
  }

// The 32 coefficients of job j at element offset idx (fp32, or fp16 converted).
inline void load_coef32(const AmxProblem& P, int j, long idx, __m512& a, __m512& b) {
  if (P.job_coef_f16[j]) {
    const uint16_t* h = static_cast<const uint16_t*>(P.job_coef[j]) + idx;
    a = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(h)));
    b = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(h + 16)));
  } else {
    const float* f = static_cast<const float*>(P.job_coef[j]) + idx;
    a = _mm512_loadu_ps(f);
    b = _mm512_loadu_ps(f + 16);
  }
}

// One unit of work: job j on column block b of 32-row tile t (weights expanded into buf).
struct Step {
  int b, t, j;
  uint8_t* buf;
};

// The two C tiles of a set -> c, c + 1 KB (int32 sums for A8, fp32 for A16: both 64-byte rows).
inline void store_c_tiles(int set, void* c) {
  uint8_t* p = static_cast<uint8_t*>(c);
  if (set == 0) {  // tile numbers are immediates: one branch per set
    _tile_stored(0, p, kRowBytes);
    _tile_stored(1, p + kHalfBytes, kRowBytes);
  } else {
    _tile_stored(2, p, kRowBytes);
    _tile_stored(3, p + kHalfBytes, kRowBytes);
  }
}

// Ops (one per kernel) provides:
//   static ExpandFn expand_for(int kind, int inv);
//   static void tdp(int set, const uint8_t* a0, int R, const uint8_t* buf, int nch);
//   static void coef(const AmxProblem&, int j, long idx, __m512& c0, __m512& c1);  // in the
//                                                      // row order of the expanded weights
//   static void epilogue(const void* c, int tokens, int parts, __m512 k0, __m512 k1, float* y);
//   static __m512 unpermute(__m512 v);              // that row order -> natural order
template <class Ops>
struct Runner {
  const AmxProblem& P;
  const uint8_t* A;
  const int32_t* cb;
  long nch_a;
  int R, tok, parts;
  uint8_t* cbuf;
  float* ytmp;  // [tile - ta][mb][32]: a tile's tokens are contiguous (no 4K-strided rows)
  int ta;

  void tdp(const Step& s, int mt, int set) const {
    const uint8_t* a0 = A + (mt * nch_a + cb[s.b]) * R * kRowBytes;
    Ops::tdp(set, a0, R, s.buf, cb[s.b + 1] - cb[s.b]);
  }

  void store(const Step& s, int mt, int set) const {
    __m512 k0, k1;
    Ops::coef(P, s.j, coef_off(P.n_tiles, s.b, s.t), k0, k1);
    float* yt = ytmp + (static_cast<long>(s.t - ta) * P.mb + static_cast<long>(mt) * tok) * kTileRows;
    uint8_t* c = cbuf + set * 2 * 1024;
    store_c_tiles(set, c);
    const int tokens = P.mb - mt * tok < tok ? P.mb - mt * tok : tok;
    Ops::epilogue(c, tokens, parts, k0, k1, yt);
  }
};

// A (block, tile) run of a plane in 16-column units (lut.h) -> byte columns, dst[kb][32 rows]:
// the layout the expand functions read (the unit layout serves the AVX-512 A8 kernel).
inline const uint8_t* unpair(const uint8_t* src, int nkb, uint8_t* dst) {
  for (int u = 0; u < nkb / 2; ++u) {
    const __m512i v = _mm512_loadu_si512(src + 64 * u);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + 64 * u), _mm512_cvtepi16_epi8(v));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + 64 * u + 32), _mm512_cvtepi16_epi8(_mm512_srli_epi16(v, 8)));
  }
  return dst;
}

// ubuf: room for two planes of the widest block (2 x max kbb x 32 bytes).
template <class Ops>
void expand_step(const AmxProblem& P, const Step& s, uint8_t* ubuf) {
  const int32_t* bo = P.act_boff[P.job_act[s.j]];
  const long off = plane_off(bo, P.n_tiles, s.b, s.t);
  const int nkb = bo[s.b + 1] - bo[s.b];
  const uint8_t* pb = unpair(P.job_b[s.j] + off, nkb, ubuf);
  const uint8_t* pg = P.job_kind[s.j] == kSEL ? unpair(P.job_g[s.j] + off, nkb, ubuf + nkb * kTileRows) : pb;
  Ops::expand_for(P.job_kind[s.j], P.job_inv[s.j])(pb, pg, nkb, s.buf);
}

template <class Ops>
void amx_run(const AmxProblem& P, int t0, int t1, float* y) {
  const int nb = P.n_blocks;
  const long ystride = static_cast<long>(t1 - t0) * kTileRows;
  int maxch = 1, maxkb = 2;
  for (int a = 0; a < P.n_acts; ++a)
    if (P.act_a[a])
      for (int b = 0; b < nb; ++b) {
        maxch = maxch > P.act_cb[a][b + 1] - P.act_cb[a][b] ? maxch : P.act_cb[a][b + 1] - P.act_cb[a][b];
        maxkb = maxkb > P.act_boff[a][b + 1] - P.act_boff[a][b] ? maxkb : P.act_boff[a][b + 1] - P.act_boff[a][b];
      }
  // Two weight buffers: the next step is expanded while the tile unit works on the current
  // one. Zeroed once: bytes past a short block are stale weights (finite: +-1 or 0) that
  // multiply zero activations.
  const size_t bbytes = static_cast<size_t>(maxch) * kChunkBytes;
  uint8_t* bbuf = static_cast<uint8_t*>(aligned_alloc(64, 2 * bbytes));
  uint8_t* cbuf = static_cast<uint8_t*>(aligned_alloc(64, 4 * 1024));  // 2 sets x 2 C tiles
  const int tc = P.mb >= 1024 ? 1 : 1024 / P.mb < 32 ? 1024 / P.mb : 32;
  const size_t ybytes = static_cast<size_t>(tc) * P.mb * kTileRows * sizeof(float);
  float* ytmp = static_cast<float*>(aligned_alloc(64, ybytes));
  uint8_t* ubuf = static_cast<uint8_t*>(aligned_alloc(64, static_cast<size_t>(maxkb) * 2 * kTileRows));
  memset(bbuf, 0, 2 * bbytes);

  int cfg_rows = -1;
  for (int ta = t0; ta < t1; ta += tc) {
    const int tb = ta + tc < t1 ? ta + tc : t1;
    for (int a = 0; a < P.n_acts; ++a) {
      if (!P.act_a[a]) continue;
      const int parts = P.act_parts[a], tok = amx_tokens_per_tile(parts, P.mb), R = tok * parts;
      const int n_mt = (P.mb + tok - 1) / tok;
      if (R != cfg_rows) load_tile_config(cfg_rows = R);
      const int32_t* bo = P.act_boff[a];
      const Runner<Ops> run{P, static_cast<const uint8_t*>(P.act_a[a]), P.act_cb[a], P.act_cb[a][nb], R, tok, parts,
                            cbuf, ytmp, ta};
      memset(ytmp, 0, static_cast<size_t>(tb - ta) * P.mb * kTileRows * sizeof(float));
      // Software pipeline over (step, m-tile) units, alternating between the two accumulator
      // sets: issue the TDPs of unit u, expand the next step's weights after the first unit of
      // a step, then store unit u - 1 (the vector ports work while the tile unit computes).
      Step prev{-1, 0, 0, nullptr}, cur{-1, 0, 0, nullptr};
      int prev_mt = 0, u = 0, flip = 0;
      auto run_step = [&](const Step& next) {
        if (cur.b >= 0) {
          for (int mt = 0; mt < n_mt; ++mt, ++u) {
            run.tdp(cur, mt, u & 1);
            if (mt == 0 && next.b >= 0) expand_step<Ops>(P, next, ubuf);
            if (prev.b >= 0) run.store(prev, prev_mt, (u - 1) & 1);
            prev = cur;
            prev_mt = mt;
          }
        } else if (next.b >= 0) {  // pipeline start: nothing to overlap with
          expand_step<Ops>(P, next, ubuf);
        }
        cur = next;
      };
      for (int b = 0; b < nb; ++b) {
        if (bo[b + 1] == bo[b]) continue;
        for (int t = ta; t < tb; ++t)
          for (int j = 0; j < P.n_jobs; ++j)
            if (P.job_act[j] == a) run_step(Step{b, t, j, bbuf + (flip ^= 1) * bbytes});
      }
      run_step(Step{-1, 0, 0, nullptr});
      if (prev.b >= 0) run.store(prev, prev_mt, (u - 1) & 1);
      // y += token scale * ytmp, in natural row order.
      for (int m = 0; m < P.mb; ++m) {
        const __m512 st = _mm512_set1_ps(P.stok[m * P.n_acts + a]);
        for (int t = ta; t < tb; ++t) {
          float* ym = y + m * ystride + static_cast<long>(t - t0) * kTileRows;
          const float* zm = ytmp + (static_cast<long>(t - ta) * P.mb + m) * kTileRows;
          for (int h = 0; h < 2; ++h)
            _mm512_storeu_ps(ym + 16 * h, _mm512_fmadd_ps(st, Ops::unpermute(_mm512_load_ps(zm + 16 * h)),
                                                          _mm512_loadu_ps(ym + 16 * h)));
        }
      }
    }
  }
  _tile_release();
  free(bbuf);
  free(cbuf);
  free(ytmp);
  free(ubuf);
}

}  // namespace
}  // namespace onebit_cpu
