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
// The loop structure (software pipeline, accumulator chunks) is shared with the A16 kernel
// in amx.h. This file also holds the run-time AMX detection of both kernels.
//
// Builds everywhere: without gcc >= 11 / clang >= 12 on x86-64 Linux (ONEBIT_AMX in lut.h)
// the entry points are stubs and the *_supported() checks are false. At run time a kernel
// runs only when CPUID reports AMX-TILE + its AMX-INT8 / AMX-BF16 bit (+ AVX-512 F/BW/VL/DQ)
// and XCR0 enables tile state, and after Linux granted XTILEDATA with
// arch_prctl(ARCH_REQ_XCOMP_PERM) (once per process). Each thread loads the tile
// configuration on entry and releases the tiles on exit.
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "lut.h"

#if ONEBIT_AMX

#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>

namespace onebit_cpu {
namespace {

constexpr long ARCH_REQ_XCOMP_PERM = 0x1023;
constexpr long XFEATURE_XTILEDATA = 18;

bool env_off(const char* name) {
  const char* e = getenv(name);
  if (!e) return false;
  return !strcmp(e, "0") || !strcasecmp(e, "off") || !strcasecmp(e, "no") || !strcasecmp(e, "false");
}

constexpr int kAmxInt8 = 1, kAmxBf16 = 2;

// The AMX kernels this CPU and OS can run, as a mask of kAmxInt8 / kAmxBf16.
int detect_amx() {
  if (env_off("ONEBIT_CPU_AMX")) return 0;  // kill switch (and how the tests emulate a CPU without AMX)
  unsigned a, b, c, d;
  if (__get_cpuid_max(0, nullptr) < 7) return 0;
  __cpuid(1, a, b, c, d);
  if (!(c & (1u << 27))) return 0;  // OSXSAVE: xgetbv is usable
  __cpuid_count(7, 0, a, b, c, d);
  const bool tile = d & (1u << 24);
  const int kinds = (d & (1u << 25) ? kAmxInt8 : 0) | (d & (1u << 22) ? kAmxBf16 : 0);
  const bool avx512 = (b & (1u << 16)) && (b & (1u << 30)) && (b & (1u << 31)) && (b & (1u << 17));  // F, BW, VL, DQ
  if (!tile || !kinds || !avx512) return 0;
  uint32_t lo, hi;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  const uint64_t xcr0 = (static_cast<uint64_t>(hi) << 32) | lo;
  const uint64_t need = (1u << 1) | (1u << 2) | (7u << 5) | (3u << 17);  // SSE, AVX, AVX-512 and tile state
  if ((xcr0 & need) != need) return 0;
  // Linux keeps XTILEDATA disabled (XFD) until the process asks for it.
  if (syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) != 0) return 0;
  return kinds;
}

int amx_kinds() {
  static const int k = detect_amx();  // thread-safe, once per process
  return k;
}

}  // namespace

bool amx_built() { return true; }
bool amx_supported() { return amx_kinds() & kAmxInt8; }
bool amx_bf16_supported() { return amx_kinds() & kAmxBf16; }

}  // namespace onebit_cpu

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,amx-tile,amx-int8")
#pragma GCC diagnostic ignored "-Wuninitialized"

#include "amx.h"

namespace onebit_cpu {
namespace {

constexpr int kChunk = 64;  // int8 columns per TDPBSSD

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
void expand(const uint8_t* pb, const uint8_t* pg, int nkb, uint8_t* buf) {
  for (int kb = 0; kb < nkb; ++kb, pb += kTileRows, pg += kTileRows) {
    uint8_t* dst = buf + (kb >> 3) * kChunkBytes + (kb & 7) * 2 * kChunk;
    for (int h = 0; h < 2; ++h) {
      const __m512 lo = _mm512_castsi512_ps(weights64<KIND, INV>(pb + 16 * h, pg + 16 * h));
      const __m512 hi = _mm512_castsi512_ps(weights64<KIND, INV>(pb + 16 * h + 8, pg + 16 * h + 8));
      _mm512_store_ps(reinterpret_cast<float*>(dst + h * kHalfBytes), _mm512_shuffle_ps(lo, hi, 0x88));
      _mm512_store_ps(reinterpret_cast<float*>(dst + h * kHalfBytes + kChunk), _mm512_shuffle_ps(lo, hi, 0xDD));
    }
  }
}

struct A8Ops {
  ONEBIT_AMX_EXPAND_FOR(expand)

  static void tdp(int set, const uint8_t* a0, int R, const uint8_t* buf, int nch) {
    ONEBIT_AMX_TDP_SET(_tile_dpbssd, set, a0, R, buf, nch);
  }

  // The expanded weight rows are in SIGMA order: the coefficients follow them.
  static void coef(const AmxProblem& P, int j, long idx, __m512& c0, __m512& c1) {
    __m512 a, b;
    load_coef32(P, j, idx, a, b);
    const __m512i s = _mm512_load_si512(kSigma);
    c0 = _mm512_permutexvar_ps(s, a);
    c1 = _mm512_permutexvar_ps(s, b);
  }

  // y[m][0..31] += coef * C[m] (exact int32 sums) for the tokens of one m-tile (1 row each).
  static void epilogue(const void* c, int tokens, int, __m512 k0, __m512 k1, float* y) {
    const int32_t* c0 = static_cast<const int32_t*>(c);
    const int32_t* c1 = c0 + 256;
    for (int r = 0; r < tokens; ++r, y += kTileRows, c0 += 16, c1 += 16) {
      _mm512_storeu_ps(y, _mm512_fmadd_ps(k0, _mm512_cvtepi32_ps(_mm512_load_si512(c0)), _mm512_loadu_ps(y)));
      _mm512_storeu_ps(y + 16, _mm512_fmadd_ps(k1, _mm512_cvtepi32_ps(_mm512_load_si512(c1)), _mm512_loadu_ps(y + 16)));
    }
  }

  static __m512 unpermute(__m512 v) { return _mm512_permutexvar_ps(_mm512_load_si512(kSigmaInv), v); }
};

}  // namespace

void amx_a8_run(const AmxProblem& P, int t0, int t1, float* y) { amx_run<A8Ops>(P, t0, t1, y); }

}  // namespace onebit_cpu

#pragma GCC pop_options

#else  // no AMX support in this compiler / platform

namespace onebit_cpu {

bool amx_built() { return false; }
bool amx_supported() { return false; }
bool amx_bf16_supported() { return false; }
void amx_a8_run(const AmxProblem&, int, int, float*) {}

}  // namespace onebit_cpu

#endif
