// AMX-BF16 kernel for the exact A16 path: TDPBF16PS on bf16 activation tiles holding an exact
// split of the fp32 activations x', and +1/-1/0 bf16 weight tiles expanded on the fly from the
// bit planes of repack_for_lut() (no second copy of the weights).
//
// Why AMX: the A16 lookup-table kernel issues 12 port-0/5 uops per 256 weights and token,
// so its time grows with the number of tokens (4096^2: ~95 us per token on one core). One
// TDPBF16PS multiplies a (R x 32) bf16 activation tile by a (32 x 16) weight tile for up to 16
// rows in ~16 cycles, independent of the vector ports; the vector ports only expand bits to
// bf16 (shared by every token of the group) and apply the per-block scales.
//
// Exactness. Weights are +1, -1 or 0, exact in bf16, so a product is exact whenever the
// activation is: x' (fp32, 24 significant bits) is cut into bf16 parts by truncation,
//   hi = x' & 0xFFFF0000,  mid = (x' - hi) & 0xFFFF0000,  lo = x' - hi - mid,
// each subtraction exact (same binade), each part 8 significant bits, hi + mid + lo = x'
// (truncation, not rounding: hi can never round up to infinity). A token's parts occupy
// consecutive rows of the activation tile (a token-part is one "row"), so at small M the
// parts ride in rows a TDP would leave empty; the epilogue adds the parts' fp32 sums,
// (lo + mid) + hi, then scales. The result differs from the fp32 reference only by summation
// order (and, within a TDP, by its pairwise fp32 accumulation), like the LUT path. Fewer parts
// are exact when x' has fewer significant bits: the caller counts them from the input dtype
// and the act's in_scale (bf16 x with a power-of-two in_scale: 1 part; fp16 x: 2; fp32: 3).
//
// Denormals. TDPBF16PS ignores MXCSR: it treats denormal bf16 inputs as zero (DAZ), flushes
// denormal results to zero (FTZ) and rounds to nearest even (measured here: a denormal part
// contributes 0, and a sum that cancels to below 2^-126 reads 0). So that this never
// matters at the scale of a token, each token's x' is first scaled by a power of two 2^s
// (exact) that brings max|x'| to [1, 2) when it is below 1 (s = 0 otherwise), and 2^-s is
// the token scale applied once at the end. After that a flushed part or partial sum is
// below 2^-126 in units where the token's largest activation is >= 1: at most K * 2^-126
// relative, far below the 2^-24 rounding of any fp32 sum. Non-finite x' give NaN outputs.
//
// Weight tile of one 32-column chunk and 16 output rows (half h of a 32-row LUT tile):
// TDPBF16PS's B operand is 16 rows of 64 bytes where dword n of row r holds the bf16 pair
// (output n: column 2r, column 2r+1). The LUT layout stores, per 8-column byte kb, one byte
// per output row: 16 bytes zero-extended to 16 dwords are the 8 column bits of the 16 rows,
// and for each column pair q of the byte, `vpermd` looks up (bits >> 2q) & 3 in a 16-entry
// table of bf16 pairs: one B row per permute, natural row order. GROUP selects combine two
// sign bits and two group bits into the 4-bit index with one vpternlogd. Per 32 weights: 1
// permute, ~1 shift, 1 store (+ 1/4 of a zero-extension).
#include <math.h>
#include <stdint.h>

#include "lut.h"

#if ONEBIT_AMX

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,amx-tile,amx-bf16")
#pragma GCC diagnostic ignored "-Wuninitialized"

#include "amx.h"

namespace onebit_cpu {
namespace {

constexpr uint32_t kOne = 0x3F80, kMinusOne = 0xBF80;  // bf16 +1, -1

// The 16-entry dword table of a job kind: entry i = (weight of column 2r, weight of column
// 2r+1) for sign bits i & 3 and, for kSEL, group bits (i >> 2) & 3.
template <int KIND, int INV>
struct PairTable {
  alignas(64) uint32_t v[16];
  static uint32_t weight(int s, int g) {
    if (KIND == kPM) return s ? kOne : kMinusOne;
    if (KIND == kS01) return (s ^ INV) ? kOne : 0;
    return (g ^ INV) ? (s ? kOne : kMinusOne) : 0;
  }
  PairTable() {
    for (int i = 0; i < 16; ++i) v[i] = weight(i & 1, (i >> 2) & 1) | weight((i >> 1) & 1, (i >> 3) & 1) << 16;
  }
};

// The weight tiles of one (job, block, 32-row tile): nkb byte-columns of 32 rows at pb (pg)
// -> buf[chunk][half][16 B rows][16 dwords]; chunk c holds bytes 4c..4c+3 (B row 4 (kb % 4) + q).
template <int KIND, int INV>
void expand(const uint8_t* pb, const uint8_t* pg, int nkb, uint8_t* buf) {
  static const PairTable<KIND, INV> tab;
  const __m512i table = _mm512_load_si512(tab.v), low2 = _mm512_set1_epi32(3);
  for (int kb = 0; kb < nkb; ++kb, pb += kTileRows, pg += kTileRows) {
    uint8_t* dst = buf + (kb >> 2) * kChunkBytes + (kb & 3) * 4 * kRowBytes;
    for (int h = 0; h < 2; ++h, dst += kHalfBytes) {
      const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(pb + 16 * h)));
      // kSEL: group bits two places up, so that bits 2q+2, 2q+3 of g2 land above the sign bits.
      const __m512i g2 = KIND == kSEL
          ? _mm512_slli_epi32(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(pg + 16 * h))), 2)
          : b;
#pragma GCC unroll 4
      for (int q = 0; q < 4; ++q) {
        __m512i idx = _mm512_srli_epi32(b, 2 * q);  // vpermd reads the low 4 bits only
        if (KIND == kSEL) idx = _mm512_ternarylogic_epi32(low2, idx, _mm512_srli_epi32(g2, 2 * q), 0xCA);  // low2 ? idx : g
        _mm512_store_si512(dst + q * kRowBytes, _mm512_permutexvar_epi32(idx, table));
      }
    }
  }
}

struct A16Ops {
  ONEBIT_AMX_EXPAND_FOR(expand)

  static void tdp(int set, const uint8_t* a0, int R, const uint8_t* buf, int nch) {
    ONEBIT_AMX_TDP_SET(_tile_dpbf16ps, set, a0, R, buf, nch);
  }

  static void coef(const AmxProblem& P, int j, long idx, __m512& c0, __m512& c1) { load_coef32(P, j, idx, c0, c1); }

  // y[m][0..31] += coef * (sum of the token's part rows of C), small parts first.
  static void epilogue(const void* c, int tokens, int parts, __m512 k0, __m512 k1, float* y) {
    const float* c0 = static_cast<const float*>(c);
    const float* c1 = c0 + 256;
    for (int r = 0; r < tokens; ++r, y += kTileRows) {
      __m512 s0 = _mm512_load_ps(c0 + 16 * (r * parts + parts - 1)), s1 = _mm512_load_ps(c1 + 16 * (r * parts + parts - 1));
      for (int p = parts - 2; p >= 0; --p) {
        s0 = _mm512_add_ps(s0, _mm512_load_ps(c0 + 16 * (r * parts + p)));
        s1 = _mm512_add_ps(s1, _mm512_load_ps(c1 + 16 * (r * parts + p)));
      }
      _mm512_storeu_ps(y, _mm512_fmadd_ps(k0, s0, _mm512_loadu_ps(y)));
      _mm512_storeu_ps(y + 16, _mm512_fmadd_ps(k1, s1, _mm512_loadu_ps(y + 16)));
    }
  }

  static __m512 unpermute(__m512 v) { return v; }
};

// The bf16 bits (upper half) of 16 fp32 values that are exact in bf16.
inline void store_bf16(uint16_t* p, __m512i v, __mmask16 k) {
  _mm256_mask_storeu_epi16(p, k, _mm512_cvtepi32_epi16(_mm512_srli_epi32(v, 16)));
}

}  // namespace

void amx_a16_run(const AmxProblem& P, int t0, int t1, float* y) { amx_run<A16Ops>(P, t0, t1, y); }

float amx_a16_split(const float* x, int n, int parts, uint16_t* out) {
  __m512 amax = _mm512_setzero_ps();
  for (int k = 0; k < n; k += 16) {
    const __mmask16 m = n - k >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (n - k)) - 1);
    amax = _mm512_max_ps(amax, _mm512_abs_ps(_mm512_maskz_loadu_ps(m, x + k)));
  }
  const float am = _mm512_reduce_max_ps(amax);
  int s = 0;
  if (am > 0.f && am < 1.f) {
    int e;
    frexpf(am, &e);  // am = f 2^e, f in [0.5, 1): am 2^(1 - e) in [1, 2)
    s = 1 - e;       // <= 149 (am >= 2^-149): 2^s is applied with vscalefps, exact, and 2^-s is an fp32
  }
  const __m512 sc = _mm512_set1_ps(static_cast<float>(s));
  const __m512i top = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
  for (int k = 0; k < n; k += 16) {
    const __mmask16 m = n - k >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (n - k)) - 1);
    const __m512i v = _mm512_castps_si512(_mm512_scalef_ps(_mm512_maskz_loadu_ps(m, x + k), sc));
    const __m512i hi = _mm512_and_si512(v, top);
    store_bf16(out + k, hi, m);
    if (parts == 1) continue;
    const __m512i r = _mm512_castps_si512(_mm512_sub_ps(_mm512_castsi512_ps(v), _mm512_castsi512_ps(hi)));
    const __m512i mid = _mm512_and_si512(r, top);
    store_bf16(out + n + k, mid, m);
    if (parts == 2) continue;
    store_bf16(out + 2 * n + k, _mm512_castps_si512(_mm512_sub_ps(_mm512_castsi512_ps(r), _mm512_castsi512_ps(mid))), m);
  }
  return ldexpf(1.0f, -s);
}

}  // namespace onebit_cpu

#pragma GCC pop_options

#else  // no AMX support in this compiler / platform

namespace onebit_cpu {

void amx_a16_run(const AmxProblem&, int, int, float*) {}
float amx_a16_split(const float*, int, int, uint16_t*) { return 1.0f; }

}  // namespace onebit_cpu

#endif
