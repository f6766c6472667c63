// Portable scalar LUT kernels: the fallback on CPUs without AVX2/AVX-512 and the path the
// tests force with isa="scalar". Same layouts and the same math as the SIMD kernels.
#include <math.h>
#include <string.h>

#include "lut.h"

namespace onebit_cpu {

namespace {

// IEEE half -> float (bit manipulation: the scalar path may not assume F16C).
inline float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000) << 16;
  uint32_t exp = (h >> 10) & 0x1F, man = h & 0x3FF, bits;
  if (exp == 0) {
    if (man == 0) {
      bits = sign;
    } else {  // subnormal: normalize
      exp = 127 - 15 + 1;
      while (!(man & 0x400)) {
        man <<= 1;
        --exp;
      }
      bits = sign | (exp << 23) | ((man & 0x3FF) << 13);
    }
  } else if (exp == 31) {
    bits = sign | 0x7F800000 | (man << 13);
  } else {
    bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
  }
  float f;
  memcpy(&f, &bits, 4);
  return f;
}

// T[n] = sum of x[i] over the set bits i of n (built by adding one value per entry).
template <typename T, typename X>
inline void subset_sums(const X* x, T* t) {
  t[0] = 0;
  for (int n = 1; n < 16; ++n) t[n] = t[n & (n - 1)] + static_cast<T>(x[__builtin_ctz(n)]);
}

// T[n] = sum of (bit i of n ? x[i] : -x[i]).
template <typename T, typename X>
inline void signed_sums(const X* x, T* t) {
  for (int n = 0; n < 16; ++n) {
    T s = 0;
    for (int i = 0; i < 4; ++i) s += (n >> i & 1) ? static_cast<T>(x[i]) : static_cast<T>(-x[i]);
    t[n] = s;
  }
}

// Table stride per nibble group: 16 entries for A16 (float), 32 for A8 (int16, duplicated).
template <typename Tab, typename Acc, int STRIDE>
void lut_scalar(const LutProblem& P, const LutTokens& T, int t0, int t1, float* y) {
  const int nb = P.n_blocks, A = P.n_acts, mb = T.mb, nt = P.n_tiles;
  const long ystride = static_cast<long>(t1 - t0) * kTileRows;
  for (int t = t0; t < t1; ++t) {
    float* yt = y + static_cast<long>(t - t0) * kTileRows;
    for (int j = 0; j < P.n_jobs; ++j) {
      const int a = P.job_act[j], kind = P.job_kind[j];
      const uint8_t inv = P.job_inv[j] ? 0xFF : 0;
      const int32_t* bo = P.act_boff[a];
      const bool f16 = P.job_coef_f16[j] != 0;
      for (int m = 0; m < mb; ++m) {
        const Tab* tab = static_cast<const Tab*>(T.tables[(m * A + a) * 2 + (kind == kPM ? 0 : 1)]);
        const float st = T.stok ? T.stok[m * A + a] : 1.0f;
        for (int b = 0; b < nb; ++b) {
          const long off = plane_off(bo, nt, b, t);
          const uint8_t* pb = P.job_b[j] + off;
          const uint8_t* pg = kind == kSEL ? P.job_g[j] + off : nullptr;
          Acc acc[kTileRows] = {};
          for (int kb = bo[b]; kb < bo[b + 1]; ++kb) {
            const Tab* lo = tab + static_cast<long>(kb) * 2 * STRIDE;
            const Tab* hi = lo + STRIDE;
            for (int r = 0; r < kTileRows; ++r) {
              const long o = unit_byte(kb - bo[b], r);
              if (kind == kSEL) {
                const uint8_t sel = pg[o] ^ inv, u = pb[o] & sel, v = static_cast<uint8_t>(~pb[o]) & sel;
                acc[r] += static_cast<Acc>(lo[u & 15]) + static_cast<Acc>(hi[u >> 4]) - static_cast<Acc>(lo[v & 15]) -
                          static_cast<Acc>(hi[v >> 4]);
              } else {
                const uint8_t w = kind == kS01 ? pb[o] ^ inv : pb[o];
                acc[r] += static_cast<Acc>(lo[w & 15]) + static_cast<Acc>(hi[w >> 4]);
              }
            }
          }
          const long co = coef_off(nt, b, t);
          const float* cf32 = static_cast<const float*>(P.job_coef[j]) + co;
          const uint16_t* cf16 = static_cast<const uint16_t*>(P.job_coef[j]) + co;
          for (int r = 0; r < kTileRows; ++r) {
            const float c = f16 ? half_to_float(cf16[r]) : cf32[r];
            yt[m * ystride + r] += c * st * static_cast<float>(acc[r]);
          }
        }
      }
    }
    for (int a = 0; a < A; ++a) {
      if (!P.act_ecoef[a]) continue;
      for (int m = 0; m < mb; ++m) {
        const float st = T.stok ? T.stok[m * A + a] : 1.0f;
        const float* xs = T.xsum + (static_cast<long>(m) * A + a) * nb;
        for (int b = 0; b < nb; ++b) {
          const float* ec = P.act_ecoef[a] + coef_off(nt, b, t);
          for (int r = 0; r < kTileRows; ++r) yt[m * ystride + r] += ec[r] * (st * xs[b]);
        }
      }
    }
  }
}

}  // namespace

void lut_a16_scalar(const LutProblem& P, const LutTokens& T, int t0, int t1, float* y) {
  lut_scalar<float, float, 16>(P, T, t0, t1, y);
}

void lut_a8_scalar(const LutProblem& P, const LutTokens& T, int t0, int t1, float* y) {
  lut_scalar<int16_t, int32_t, 32>(P, T, t0, t1, y);
}

float absmax_scalar(const float* x, int n) {
  float amax = 0.f;
  for (int k = 0; k < n; ++k) amax = fabsf(x[k]) > amax ? fabsf(x[k]) : amax;
  return amax;
}

void quant_a8_scalar(const float* x, int n, float scale, int8_t* q) {
  for (int k = 0; k < n; ++k) {
    float v = nearbyintf(x[k] / scale);  // default rounding mode: half to even, like torch.round
    v = v > 127.f ? 127.f : (v < -127.f ? -127.f : v);
    q[k] = static_cast<int8_t>(v);
  }
}

void table_a16_scalar(const float* x, int n_groups, float* pm, float* t01) {
  for (int g = 0; g < n_groups; ++g) {
    if (pm) signed_sums(x + 4 * g, pm + 16 * g);
    if (t01) subset_sums(x + 4 * g, t01 + 16 * g);
  }
}

void table_a8_scalar(const int8_t* q, int n_groups, int16_t* pm, int16_t* t01) {
  for (int g = 0; g < n_groups; ++g) {
    if (pm) {
      signed_sums(q + 4 * g, pm + 32 * g);
      memcpy(pm + 32 * g + 16, pm + 32 * g, 16 * sizeof(int16_t));
    }
    if (t01) {
      subset_sums(q + 4 * g, t01 + 32 * g);
      memcpy(t01 + 32 * g + 16, t01 + 32 * g, 16 * sizeof(int16_t));
    }
  }
}

// The plain loop over every weight bit: the reference the SIMD versions are tested against.
void dequant_scalar(const LutProblem& P, const DenseActs& D, int t0, int t1, float* W, long ldw, float* /*scratch*/) {
  const int nb = P.n_blocks, nt = P.n_tiles;
  for (int t = t0; t < t1; ++t) {
    float* wt = W + static_cast<long>(t - t0) * kTileRows * ldw;
    memset(wt, 0, sizeof(float) * kTileRows * ldw);
    for (int j = 0; j < P.n_jobs; ++j) {
      const int a = P.job_act[j], kind = P.job_kind[j];
      const uint8_t inv = P.job_inv[j] ? 0xFF : 0;
      const int32_t* bo = P.act_boff[a];
      const float* gs = D.gscale[a];
      for (int b = 0; b < nb; ++b) {
        const long off = plane_off(bo, nt, b, t), co = coef_off(nt, b, t);
        const uint8_t* pb = P.job_b[j] + off;
        const uint8_t* pg = kind == kSEL ? P.job_g[j] + off : nullptr;
        for (int r = 0; r < kTileRows; ++r) {
          const float c = P.job_coef_f16[j] ? half_to_float(static_cast<const uint16_t*>(P.job_coef[j])[co + r])
                                            : static_cast<const float*>(P.job_coef[j])[co + r];
          for (int kb = bo[b]; kb < bo[b + 1]; ++kb) {
            const long o = unit_byte(kb - bo[b], r);
            for (int i = 0; i < 8; ++i) {
              const int k = kb * 8 + i;
              const bool bit = (pb[o] >> i) & 1;
              float v;
              if (kind == kPM)
                v = bit ? c : -c;
              else if (kind == kS01)
                v = ((pb[o] ^ inv) >> i) & 1 ? c : 0.f;
              else
                v = ((pg[o] ^ inv) >> i) & 1 ? (bit ? c : -c) : 0.f;
              if (D.wcol[a][k] >= 0) wt[r * ldw + D.wcol[a][k]] += gs[k] * v;
            }
          }
        }
      }
    }
    for (int a = 0; a < P.n_acts; ++a) {
      if (!P.act_ecoef[a]) continue;
      const int32_t* bo = P.act_boff[a];
      for (int b = 0; b < nb; ++b) {
        const float* ec = P.act_ecoef[a] + coef_off(nt, b, t);
        for (int r = 0; r < kTileRows; ++r)
          for (int k = bo[b] * 8; k < bo[b + 1] * 8; ++k)
            if (D.wcol[a][k] >= 0) wt[r * ldw + D.wcol[a][k]] += D.gscale[a][k] * ec[r];
      }
    }
  }
}

}  // namespace onebit_cpu
