// AMX-INT8 kernel for the A8 path (W1A8): TDPBSSD on int8 activation tiles and weight tiles
// expanded on the fly from the bit planes of repack_for_lut() (no second copy of the weights).
//
// Why AMX: the A8 lookup-table kernel issues ~6 port-0/5 uops per 256 weights and token, so
// at M = 16 it is port bound near 0.8 ms for 4096^2. One TDPBSSD multiplies a (R x 64) int8
// activation tile by a (64 x 16) int8 weight tile in ~16 cycles, independent of the vector
// ports; the vector ports only expand bits to int8 (~2 uops per 64 weights, shared by every
// token) and apply the per-block scales.
//
// Weight tile of one 64-column chunk and 16 output rows (half h of a 32-row LUT tile):
// TDPBSSD's B operand is 16 rows of 64 bytes where dword n of row r holds the 4 weights
// (output n, columns 4r..4r+3). The LUT layout stores, per 8-column byte kb, one byte per
// row, so 8 consecutive bytes (rows 0-7 or 8-15) are one 64-bit mask: a masked blend turns it
// into 64 int8 weights whose dwords are [row0 cols0-3, row0 cols4-7, row1 cols0-3, ...].
// vshufps(lo rows, hi rows) with 0x88 / 0xDD picks the even / odd dwords of both: B rows
// 2kb and 2kb+1 in natural column order, with the 16 output rows in the order SIGMA below
// (rows 2L, 2L+1, 8+2L, 9+2L in 128-bit lane L). Instead of unshuffling every tile, the
// coefficients are permuted to SIGMA and the per-act accumulator is unpermuted once at the
// end. Per 64 weights: half a mask load, 1 blend, 1 shuffle, 1 store.
//
// Activation tiles: the same int8 values as the LUT path (quant_a8_avx512 of x * in_scale,
// gathered) laid out by the caller as [m-tile][chunk][R rows][64], each column block padded
// with zeros to whole 64-column chunks (the weight bytes there may be stale: they multiply
// zeros). Int32 sums per (row, block) are exact; C tiles are stored, converted to fp32 and
// multiplied by the job's coefficient (out_scale / mean) per block, and the token scale is
// applied once per act at the end.
//
// Builds everywhere: without gcc >= 11 / clang >= 12 on x86-64 Linux the entry points are
// stubs and amx_supported() is false. At run time the kernel runs only when CPUID reports
// AMX-TILE + AMX-INT8 (+ AVX-512 F/BW/VL) and XCR0 enables tile state, and after Linux
// granted XTILEDATA with arch_prctl(ARCH_REQ_XCOMP_PERM) (once per process). Each thread
// loads the tile configuration on entry and releases the tiles on exit.
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "lut.h"

#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__) && \
    ((defined(__clang__) && __clang_major__ >= 12) || (!defined(__clang__) && __GNUC__ >= 11))
#define ONEBIT_AMX 1
#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#else
#define ONEBIT_AMX 0
#endif

namespace onebit_cpu {

#if ONEBIT_AMX

namespace {

constexpr long ARCH_REQ_XCOMP_PERM = 0x1023;
constexpr long XFEATURE_XTILEDATA = 18;

bool env_off(const char* name) {
  const char* e = getenv(name);
  if (!e) return false;
  return !strcmp(e, "0") || !strcasecmp(e, "off") || !strcasecmp(e, "no") || !strcasecmp(e, "false");
}

int detect_amx() {
  if (env_off("ONEBIT_CPU_AMX")) return 0;  // kill switch (and how the tests emulate a CPU without AMX)
  unsigned a, b, c, d;
  if (__get_cpuid_max(0, nullptr) < 7) return 0;
  __cpuid(1, a, b, c, d);
  if (!(c & (1u << 27))) return 0;  // OSXSAVE: xgetbv is usable
  __cpuid_count(7, 0, a, b, c, d);
  const bool tile = d & (1u << 24), int8 = d & (1u << 25);
  const bool avx512 = (b & (1u << 16)) && (b & (1u << 30)) && (b & (1u << 31)) && (b & (1u << 17));  // F, BW, VL, DQ
  if (!tile || !int8 || !avx512) return 0;
  uint32_t lo, hi;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  const uint64_t xcr0 = (static_cast<uint64_t>(hi) << 32) | lo;
  const uint64_t need = (1u << 1) | (1u << 2) | (7u << 5) | (3u << 17);  // SSE, AVX, AVX-512 and tile state
  if ((xcr0 & need) != need) return 0;
  // Linux keeps XTILEDATA disabled (XFD) until the process asks for it.
  if (syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) != 0) return 0;
  return 1;
}

}  // namespace

bool amx_built() { return true; }

bool amx_supported() {
  static const int ok = detect_amx();  // thread-safe, once per process
  return ok != 0;
}

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,amx-tile,amx-int8")
#pragma GCC diagnostic ignored "-Wuninitialized"

namespace {

struct alignas(64) TileConfig {
  uint8_t palette_id;
  uint8_t start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

// Tiles: 0-3 int32 accumulators (2 m-tiles x 2 row halves), 4-5 activations, 6-7 weights.
constexpr int kChunk = 64;                  // columns per TDPBSSD
constexpr int kHalfBytes = 16 * kChunk;     // one weight tile: 16 rows x 64 bytes
constexpr int kChunkBytes = 2 * kHalfBytes; // both row halves of a 32-row LUT tile

alignas(64) const int32_t kSigma[16] = {0, 1, 8, 9, 2, 3, 10, 11, 4, 5, 12, 13, 6, 7, 14, 15};
alignas(64) const int32_t kSigmaInv[16] = {0, 1, 4, 5, 8, 9, 12, 13, 2, 3, 6, 7, 10, 11, 14, 15};

inline __mmask64 load_mask(const uint8_t* p) {
  uint64_t v;
  memcpy(&v, p, 8);
  return _cvtu64_mask64(v);
}

// 64 int8 weights (rows r..r+7 x 8 columns, byte-row-major) of a job from its mask bytes.
template <int KIND, int INV>
inline __m512i weights64(const uint8_t* b, const uint8_t* g) {
  const __m512i one = _mm512_set1_epi8(1), zero = _mm512_setzero_si512();
  const __mmask64 kb = load_mask(b);
  if (KIND == kPM) return _mm512_mask_blend_epi8(kb, _mm512_set1_epi8(-1), one);
  if (KIND == kS01) return INV ? _mm512_mask_blend_epi8(kb, one, zero) : _mm512_mask_blend_epi8(kb, zero, one);
  const __m512i pm = _mm512_mask_blend_epi8(kb, _mm512_set1_epi8(-1), one);
  const __mmask64 kg = load_mask(g);
  return INV ? _mm512_mask_blend_epi8(kg, pm, zero) : _mm512_mask_blend_epi8(kg, zero, pm);
}

// The weight tiles of one (job, block, 32-row tile): nkb bytes-columns of 32 rows at pb (pg)
// -> buf[chunk][half][16 rows][64].
template <int KIND, int INV>
void expand(const uint8_t* pb, const uint8_t* pg, int nkb, int8_t* buf) {
  for (int kb = 0; kb < nkb; ++kb, pb += kTileRows, pg += kTileRows) {
    int8_t* dst = buf + (kb >> 3) * kChunkBytes + (kb & 7) * 2 * kChunk;
    for (int h = 0; h < 2; ++h) {
      const __m512 lo = _mm512_castsi512_ps(weights64<KIND, INV>(pb + 16 * h, pg + 16 * h));
      const __m512 hi = _mm512_castsi512_ps(weights64<KIND, INV>(pb + 16 * h + 8, pg + 16 * h + 8));
      _mm512_store_ps(reinterpret_cast<float*>(dst + h * kHalfBytes), _mm512_shuffle_ps(lo, hi, 0x88));
      _mm512_store_ps(reinterpret_cast<float*>(dst + h * kHalfBytes + kChunk), _mm512_shuffle_ps(lo, hi, 0xDD));
    }
  }
}

using ExpandFn = void (*)(const uint8_t*, const uint8_t*, int, int8_t*);

ExpandFn expand_for(int kind, int inv) {
  switch (kind) {
    case kPM: return expand<kPM, 0>;
    case kSEL: return inv ? expand<kSEL, 1> : expand<kSEL, 0>;
    default: return inv ? expand<kS01, 1> : expand<kS01, 0>;
  }
}

// y[m][0..31] += coef (SIGMA order per half) * C[m] for the rows of one m-tile.
inline void epilogue(const int32_t* c0, const int32_t* c1, int rows, __m512 k0, __m512 k1, float* y, long ystride) {
  for (int r = 0; r < rows; ++r, y += ystride, c0 += 16, c1 += 16) {
    _mm512_storeu_ps(y, _mm512_fmadd_ps(k0, _mm512_cvtepi32_ps(_mm512_load_si512(c0)), _mm512_loadu_ps(y)));
    _mm512_storeu_ps(y + 16, _mm512_fmadd_ps(k1, _mm512_cvtepi32_ps(_mm512_load_si512(c1)), _mm512_loadu_ps(y + 16)));
  }
}

inline void load_coef_sigma(const AmxProblem& P, int j, long idx, __m512& c0, __m512& c1) {
  __m512 a, b;
  if (P.job_coef_f16[j]) {
    const uint16_t* h = static_cast<const uint16_t*>(P.job_coef[j]) + idx;
    a = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(h)));
    b = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(h + 16)));
  } else {
    const float* f = static_cast<const float*>(P.job_coef[j]) + idx;
    a = _mm512_loadu_ps(f);
    b = _mm512_loadu_ps(f + 16);
  }
  const __m512i s = _mm512_load_si512(kSigma);
  c0 = _mm512_permutexvar_ps(s, a);
  c1 = _mm512_permutexvar_ps(s, b);
}

// One unit of work: job j on column block b of 32-row tile t (weights expanded into buf).
struct Step {
  int b, t, j;
  int8_t* buf;
};

// The tile work of one (step, m-tile) unit. Units alternate between two accumulator sets
// (C tiles 0-1 with activation tile 4, C tiles 2-3 with tile 5), so the tile unit computes
// one unit while the vector ports store and scale the previous one.
struct Runner {
  const AmxProblem& P;
  const int8_t* A;
  const int32_t* cb;
  long nch_a;
  int R;
  int32_t* cbuf;
  float* ytmp;  // [tile - ta][mb][32]: a tile's tokens are contiguous (no 4K-strided rows)
  int ta;

  void tdp(const Step& s, int mt, int set) const {
    const int nch = cb[s.b + 1] - cb[s.b];
    const int8_t* a0 = A + (mt * nch_a + cb[s.b]) * R * kChunk;
    // Two copies, not one parametrised loop: AMX tile register numbers are immediates.
    if (set == 0) {
      _tile_zero(0);
      _tile_zero(1);
      for (int c = 0; c < nch; ++c) {
        _tile_loadd(4, a0 + c * R * kChunk, kChunk);
        _tile_loadd(6, s.buf + c * kChunkBytes, kChunk);
        _tile_loadd(7, s.buf + c * kChunkBytes + kHalfBytes, kChunk);
        _tile_dpbssd(0, 4, 6);
        _tile_dpbssd(1, 4, 7);
      }
    } else {
      _tile_zero(2);
      _tile_zero(3);
      for (int c = 0; c < nch; ++c) {
        _tile_loadd(5, a0 + c * R * kChunk, kChunk);
        _tile_loadd(6, s.buf + c * kChunkBytes, kChunk);
        _tile_loadd(7, s.buf + c * kChunkBytes + kHalfBytes, kChunk);
        _tile_dpbssd(2, 5, 6);
        _tile_dpbssd(3, 5, 7);
      }
    }
  }

  void store(const Step& s, int mt, int set) const {
    __m512 k0, k1;
    load_coef_sigma(P, s.j, coef_off(P.n_tiles, s.b, s.t), k0, k1);
    float* yt = ytmp + (static_cast<long>(s.t - ta) * P.mb + static_cast<long>(mt) * R) * kTileRows;
    int32_t* c = cbuf + set * 512;
    if (set == 0) {
      _tile_stored(0, c, 64);
      _tile_stored(1, c + 256, 64);
    } else {
      _tile_stored(2, c, 64);
      _tile_stored(3, c + 256, 64);
    }
    const int rows = P.mb - mt * R < R ? P.mb - mt * R : R;
    epilogue(c, c + 256, rows, k0, k1, yt, kTileRows);
  }
};

}  // namespace

void amx_a8_run(const AmxProblem& P, int t0, int t1, float* y) {
  const int R = P.rows_a, nt = P.n_tiles, nb = P.n_blocks;
  const long ystride = static_cast<long>(t1 - t0) * kTileRows;
  int maxch = 1;
  for (int a = 0; a < P.n_acts; ++a)
    if (P.act_a[a])
      for (int b = 0; b < nb; ++b) maxch = maxch > P.act_cb[a][b + 1] - P.act_cb[a][b] ? maxch : P.act_cb[a][b + 1] - P.act_cb[a][b];
  // Two weight buffers: the next step is expanded while the tile unit works on the current
  // one. Zeroed once (stale bytes past a short block are finite and multiply zeros).
  const size_t bbytes = static_cast<size_t>(maxch) * kChunkBytes;
  int8_t* bbuf = static_cast<int8_t*>(aligned_alloc(64, 2 * bbytes));
  int32_t* cbuf = static_cast<int32_t*>(aligned_alloc(64, 4 * 16 * 64));  // 2 sets x 2 C tiles
  // Tiles per chunk: the per-act fp32 accumulator of a chunk (tc x mb x 32 floats) stays in
  // L2 while every block of the chunk adds into it; the activation tiles are re-read per chunk.
  const int tc = P.mb >= 1024 ? 1 : 1024 / P.mb < 32 ? 1024 / P.mb : 32;
  const size_t ybytes = static_cast<size_t>(tc) * P.mb * kTileRows * sizeof(float);
  float* ytmp = static_cast<float*>(aligned_alloc(64, ybytes));
  memset(bbuf, 0, 2 * bbytes);

  TileConfig cfg;
  memset(&cfg, 0, sizeof(cfg));
  cfg.palette_id = 1;
  for (int i = 0; i < 8; ++i) {
    cfg.colsb[i] = 64;
    cfg.rows[i] = i < 6 ? R : 16;
  }
  _tile_loadconfig(&cfg);

  const __m512i inv = _mm512_load_si512(kSigmaInv);
  for (int ta = t0; ta < t1; ta += tc) {
    const int tb = ta + tc < t1 ? ta + tc : t1;
    for (int a = 0; a < P.n_acts; ++a) {
      if (!P.act_a[a]) continue;
      const int32_t* bo = P.act_boff[a];
      const Runner run{P, P.act_a[a], P.act_cb[a], P.act_cb[a][nb], R, cbuf, ytmp, ta};
      memset(ytmp, 0, static_cast<size_t>(tb - ta) * P.mb * kTileRows * sizeof(float));
      // Software pipeline over (step, m-tile) units: issue the TDPs of unit u, expand the
      // next step's weights after the first unit of a step, then store unit u - 1.
      Step prev{-1, 0, 0, nullptr}, cur{-1, 0, 0, nullptr};
      int prev_mt = 0, u = 0, flip = 0;
      auto run_step = [&](const Step& next) {
        if (cur.b >= 0) {
          for (int mt = 0; mt < P.n_mt; ++mt, ++u) {
            run.tdp(cur, mt, u & 1);
            if (mt == 0 && next.b >= 0) {
              const long off = plane_off(bo, nt, next.b, next.t);
              const uint8_t* pb = P.job_b[next.j] + off;
              const uint8_t* pg = P.job_kind[next.j] == kSEL ? P.job_g[next.j] + off : pb;
              expand_for(P.job_kind[next.j], P.job_inv[next.j])(pb, pg, bo[next.b + 1] - bo[next.b], next.buf);
            }
            if (prev.b >= 0) run.store(prev, prev_mt, (u - 1) & 1);
            prev = cur;
            prev_mt = mt;
          }
        } else if (next.b >= 0) {  // pipeline start: nothing to overlap with
          const long off = plane_off(bo, nt, next.b, next.t);
          const uint8_t* pb = P.job_b[next.j] + off;
          const uint8_t* pg = P.job_kind[next.j] == kSEL ? P.job_g[next.j] + off : pb;
          expand_for(P.job_kind[next.j], P.job_inv[next.j])(pb, pg, bo[next.b + 1] - bo[next.b], next.buf);
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
      // y += token scale * ytmp, back in natural row order.
      for (int m = 0; m < P.mb; ++m) {
        const __m512 st = _mm512_set1_ps(P.stok[m * P.n_acts + a]);
        for (int t = ta; t < tb; ++t) {
          float* ym = y + m * ystride + static_cast<long>(t - t0) * kTileRows;
          const float* zm = ytmp + (static_cast<long>(t - ta) * P.mb + m) * kTileRows;
          for (int h = 0; h < 2; ++h)
            _mm512_storeu_ps(ym + 16 * h, _mm512_fmadd_ps(st, _mm512_permutexvar_ps(inv, _mm512_load_ps(zm + 16 * h)),
                                                          _mm512_loadu_ps(ym + 16 * h)));
        }
      }
    }
  }
  _tile_release();
  free(bbuf);
  free(cbuf);
  free(ytmp);
}

#pragma GCC pop_options

#else  // no AMX support in this compiler / platform

bool amx_built() { return false; }
bool amx_supported() { return false; }
void amx_a8_run(const AmxProblem&, int, int, float*) {}

#endif

}  // namespace onebit_cpu
