// onebit._C: CPU binary linear via lookup tables, with run-time ISA dispatch.
//
// This file holds the torch binding, input checks, the per-token activation preparation
// (in_scale folding, gather, int8 quantization matching onebit.reference.quantize_act_int8,
// table building) and the threading (32-row weight tiles handed out to the threads in
// shrinking chunks). The inner loops live in lut_{scalar,avx2,avx512}.cpp, compiled for their
// ISA with `#pragma GCC target` and chosen with __builtin_cpu_supports, so the binary runs on
// any x86-64 CPU.
// With enough tokens, A8 runs on AMX-INT8 (amx_int8.cpp) and A16 on AMX-BF16 (amx_bf16.cpp)
// when the CPU and OS allow it: jobs whose gathered columns fill the 64-column (int8) or
// 32-column (bf16) chunks go to the tile unit, the rest (narrow gathered salient columns) and
// the mean-of-ALL terms stay on the LUT kernel; both read the same activations (int8 q, or
// the fp32 x' that AMX-BF16 splits exactly into bf16 parts).
// The layouts are produced by onebit.backends.cpu.repack_for_lut(); see lut.h.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <string>
#include <type_traits>
#include <vector>

#include "dense.h"
#include "lut.h"

namespace onebit_cpu {
namespace {

enum Isa : int { kScalar = 0, kAvx2 = 1, kAvx512 = 2, kAmx = 3 };

// Auto mode uses AMX for A8 from this many tokens on. Measured on one 2.6 GHz Sapphire Rapids
// core, 4096x4096 single-term: M=4 AMX 346 us vs LUT 340 us (a tie: every TDPBSSD costs ~16
// cycles whatever its row count), M=6 349 vs 517, M=8 389 vs 649; M=1 288 vs 125.
// ONEBIT_CPU_AMX_MIN_M overrides it for tuning.
constexpr int64_t kAmxMinM = 5;
// Auto mode uses AMX-BF16 for an A16 act's jobs from this many tokens on when they include a
// group-select term (the LUT kernel pays two lookups per 4 weights there, AMX the same as for
// any term) or when x' fits one bf16 part (an m-tile then holds 16 tokens, not 5). Measured on
// one Sapphire Rapids core, LUT vs AMX: 4096x4096 CGB fp32 M=4 2178 vs 2557 us, M=5 2889 vs
// 2626; single-term bf16 x (1 part) M=4 468 vs 544, M=5 625 vs 554. Single-term fp32 x
// (3 parts) stays on the LUT kernel: AMX is 1.0-1.2x faster on 4096x4096 at M >= 16 but up to
// 1.5x slower on SmolLM2's layers at M=128 (192x576: 132 vs 201 us).
// ONEBIT_CPU_AMX_A16_MIN_M overrides the token count.
constexpr int64_t kAmxA16MinM = 5;
// ... and only for jobs whose act fills at least this fraction of its zero-padded chunks (a
// gathered act with 8 salient columns per block would waste 7/8 of each TDPBSSD).
constexpr double kAmxMinFill = 0.5;
// Tokens per group on the AMX path: the expanded weight tiles are shared by all m-tiles. A16's
// bf16 parts take up to 6x the bytes of A8's int8: with 256 tokens a 4096-column act (6 MB)
// no longer stays in L2 while every tile chunk re-reads it (M=256 4096^2 single-term:
// 29.0 ms at 256 tokens per group, 23.7 ms at 64; CGB 98.7 / 79.3 ms).
constexpr int64_t kAmxGroup = 256, kAmxA16Group = 64;

// The dense path (DequantRows in lut.h), A16: from this many tokens, weights whose lookups cost
// at least kDenseMinCost times a single-term weight's (CGB: ~5) expand panels of rows to fp32
// and run a float GEMM (at::mm) per panel. The lookups cost per token about lookup_cost() times
// what the GEMM does, while expanding a panel costs once per call (~0.35 ns per CGB weight on
// one Zen 4 core). Measured on Zen 4 (random CGB weights, lookups with the tokens split between
// threads, lookups / dense time, commit 5abfbd3): SmolLM2's 576x576 / 1536x576 / 576x1536
// / 192x576 and 4096x4096 at M=16 0.83-0.91 (2 threads) and 0.74-1.03 (1 thread), at M=32
// 1.11-1.25 and 1.04-1.43, at M=64 1.32-1.49 and 1.29-1.81. Single-term weights stay on the
// lookups (faster than F.linear at M=256 on SmolLM2's shapes). ONEBIT_CPU_DENSE_MIN_M
// overrides the token count (0: never). A panel is at most kDensePanelBytes (in L2 while its
// GEMM reads it): the weight itself stays packed.
constexpr int64_t kDenseMinM = 32;
// On AVX2 (no AVX-512) the lookups are slower relative to a GEMM (8-lane vpermps tables): on
// an AVX2-only AMD EPYC (2 threads and 1, the real arb-rc layers of block 3 of a demo
// checkpoint, commit 9d382c4) lookups / dense was 0.52-0.93 at M=4, 0.70-1.14 at M=8,
// 1.32-1.88 at M=16 and 1.89-3.08 at M=32.
constexpr int64_t kDenseMinMAvx2 = 16;
// The lookups split the tokens between the threads (prefill, batches) from this many tokens per
// thread; below, the threads split the weight's tiles (decode). Measured on Zen 4, 2 threads,
// random weights, tile split / token split time, A16 and A8: SmolLM2's four shapes at M=64-128
// 1.2-2.8x (single-term) and 1.3-4.2x (CGB), at M=16-32 1.1-3.0x; 4096x4096 1.01-1.19x, except
// CGB A16 at M=16 (0.88x; CGB takes the dense path from kDenseMinM).
constexpr int64_t kSplitTokensMinM = 8;
constexpr double kDenseMinCost = 2.0;
constexpr int64_t kDensePanelBytes = int64_t(512) << 10;

int64_t env_min_m(const char* name, int64_t dflt) {
  const char* e = std::getenv(name);
  return e ? std::max<int64_t>(1, std::atoll(e)) : dflt;
}

int64_t amx_min_m() {
  static const int64_t v = env_min_m("ONEBIT_CPU_AMX_MIN_M", kAmxMinM);
  return v;
}

int64_t amx_a16_min_m() {
  static const int64_t v = env_min_m("ONEBIT_CPU_AMX_A16_MIN_M", kAmxA16MinM);
  return v;
}

int best_isa();
int lut_isa(int isa);

// The auto dense path's token count for a weight with K columns on ISA path isa (-1: the best
// this CPU has); ONEBIT_CPU_DENSE_MIN_M, read once, overrides it (0: never). The same for every
// K measured so far (576 to 4096).
int64_t dense_min_m(int64_t /*K*/, int64_t isa) {
  static const int64_t env = [] {
    const char* e = std::getenv("ONEBIT_CPU_DENSE_MIN_M");
    if (!e) return int64_t(-1);
    const int64_t n = std::atoll(e);
    return n > 0 ? n : std::numeric_limits<int64_t>::max();
  }();
  if (env >= 0) return env;
  return (isa < 0 ? best_isa() : lut_isa(static_cast<int>(isa))) == kAvx2 ? kDenseMinMAvx2 : kDenseMinM;
}

bool isa_ok(int isa) {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  switch (isa) {
    case kScalar: return true;
    case kAvx2: return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
    case kAvx512:
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
    case kAmx: return isa_ok(kAvx512) && amx_supported() && amx_bf16_supported();
  }
  return false;
#else
  return isa == kScalar;
#endif
}

// Auto mode's check for one AMX kernel (the forced "amx" path needs both).
bool amx_ok(bool a8) { return isa_ok(kAvx512) && (a8 ? amx_supported() : amx_bf16_supported()); }

// The LUT kernels an ISA path uses (the AMX path runs AVX-512 for the LUT share of its jobs).
int lut_isa(int isa) { return isa == kAmx ? kAvx512 : isa;
}

int best_isa() {
  for (int isa : {kAvx512, kAvx2})
    if (isa_ok(isa)) return isa;
  return kScalar;
}

const char* isa_name(int isa) {
  return isa == kAmx ? "amx" : isa == kAvx512 ? "avx512" : isa == kAvx2 ? "avx2" : "scalar";
}

struct Kernels {
  LutKernel a16, a8;
  TableA16 t16;
  TableA8 t8;
  AbsMax amax;
  QuantA8 q8;
  int a8_unit_tab;  // int16 entries of an A8 table per 16 columns (lut.h)
  DequantRows dq;   // the dense path's weight panels
};

// Every kernel of one ISA path is the function named <kind>_<isa>: a path without its own
// version of one is a compile error, not a silent fallback to a slower ISA's (A8 on AVX2
// once ran the scalar kernel unnoticed: the outputs are the same).
#define ONEBIT_KERNELS(isa) \
  Kernels { lut_a16_##isa, lut_a8_##isa, table_a16_##isa, table_a8_##isa, absmax_##isa, quant_a8_##isa, a8_unit_tab_##isa, \
            dequant_##isa }

Kernels kernels_for(int isa) {
  switch (isa) {
#if defined(__x86_64__) || defined(__i386__)  // the SIMD files are only built on x86 (onebit_build.py)
    case kAvx512: return ONEBIT_KERNELS(avx512);
    case kAvx2: return ONEBIT_KERNELS(avx2);
#endif
    default: return ONEBIT_KERNELS(scalar);
  }
}

#undef ONEBIT_KERNELS

template <typename T>
inline float to_f(T v) {
  return static_cast<float>(v);
}

// x'[k] = x[gidx[k]] * gscale[k], in fp32 exactly as the reference (x.float() * in_scale.float()).
template <typename T>
void gather_scale(const T* x, const int32_t* gidx, const float* gscale, int n, float* out) {
  for (int k = 0; k < n; ++k) out[k] = to_f(x[gidx[k]]) * gscale[k];
}

// The same for an act that is not gathered (gidx[k] = min(k, K - 1)): a contiguous loop the
// compiler vectorizes (the indexed loop above was the largest part of the per-token work).
template <typename T>
void scale_contiguous(const T* x, int64_t K, const float* gscale, int n, float* out) {
  const int kk = static_cast<int>(std::min<int64_t>(K, n));
  for (int k = 0; k < kk; ++k) out[k] = to_f(x[k]) * gscale[k];
  for (int k = kk; k < n; ++k) out[k] = to_f(x[K - 1]) * gscale[k];
}

// This thread's table buffer (64-byte aligned, at least `bytes`), kept between calls: the same
// lines every call, already in this core's caches, and no allocator in the hot path.
uint8_t* thread_tables(int64_t bytes) {
  thread_local std::unique_ptr<uint8_t[]> buf;
  thread_local int64_t cap = -1;
  if (cap < bytes) {
    buf.reset(new uint8_t[static_cast<size_t>(bytes + 64)]);
    cap = bytes;
  }
  return reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(buf.get()) + 63) & ~uintptr_t(63));
}

// A group's tables (per token, act and kind; in the building thread's buffer), block sums and
// token scales: what a LutTokens points at. Every table byte is written before it is read.
struct GroupTables {
  uint8_t* base;
  std::vector<float> xsum, stok;
  std::vector<const void*> ptr;
  GroupTables(int64_t G, int64_t tab_bytes, int A, int nb)
      : base(thread_tables(G * tab_bytes)),
        xsum(static_cast<size_t>(G) * A * nb),
        stok(static_cast<size_t>(G) * A, 1.0f),
        ptr(static_cast<size_t>(G) * A * 2, nullptr) {}
  LutTokens tokens(int gm, bool a8) const { return {gm, ptr.data(), xsum.data(), a8 ? stok.data() : nullptr}; }
};

// Significant bits of a finite fp32 value (its odd integer significand's length); 0 for 0.
int significant_bits(float v) {
  uint32_t u;
  std::memcpy(&u, &v, 4);
  const uint32_t exp = (u >> 23) & 0xFF, sig = (u & 0x7FFFFF) | (exp ? 0x800000u : 0u);
  return sig ? (32 - __builtin_clz(sig)) - __builtin_ctz(sig) : 0;
}

// bf16 parts that represent x' = x * gscale exactly (amx_a16_split): a product of an a-bit and
// a b-bit significand has at most a + b bits (a when the scale is a power of two).
int a16_parts(at::ScalarType xtype, int scale_bits) {
  const int xbits = xtype == at::kFloat ? 24 : xtype == at::kHalf ? 11 : 8;
  const int bits = scale_bits == 0 ? 0 : scale_bits == 1 ? xbits : xbits + scale_bits;
  return std::min(3, std::max(1, (bits + 7) / 8));
}

// One token's row of an act (int8 q: es = 1; one bf16 part: es = 2) -> row `row` of m-tile mt
// of the act's AMX tiles [n_mt][nch][R][64 bytes], each column block zero-padded to whole chunks.
void to_amx_row(const void* src, int es, const int32_t* boff, const int32_t* cb, int nb, int64_t nch, int64_t mt,
                int64_t R, int64_t row, uint8_t* base) {
  const uint8_t* s = static_cast<const uint8_t*>(src);
  for (int b = 0; b < nb; ++b) {
    const int64_t c0 = int64_t(boff[b]) * 8 * es, w = int64_t(boff[b + 1] - boff[b]) * 8 * es;
    for (int c = 0; c < cb[b + 1] - cb[b]; ++c) {
      uint8_t* dst = base + ((mt * nch + cb[b] + c) * R + row) * 64;
      const int64_t len = std::min<int64_t>(64, w - 64 * c);
      std::memcpy(dst, s + c0 + 64 * c, len);
      std::memset(dst + len, 0, 64 - len);
    }
  }
}

}  // namespace

// A weight after repack_for_lut(), validated once; forward() is the per-call path.
class LutWeightC {
 public:
  LutWeightC(int64_t in_features, int64_t n_out, std::vector<at::Tensor> act_gidx, std::vector<at::Tensor> act_gscale,
             std::vector<at::Tensor> act_boff, std::vector<at::Tensor> act_ecoef, const std::vector<int64_t>& job_kind,
             const std::vector<int64_t>& job_inv, const std::vector<int64_t>& job_act, std::vector<at::Tensor> job_b,
             std::vector<at::Tensor> job_g, std::vector<at::Tensor> job_coef)
      : K(in_features),
        n_out(n_out),
        act_gidx(std::move(act_gidx)),
        act_gscale(std::move(act_gscale)),
        act_boff(std::move(act_boff)),
        act_ecoef(std::move(act_ecoef)),
        job_b(std::move(job_b)),
        job_g(std::move(job_g)),
        job_coef(std::move(job_coef)) {
    A = static_cast<int>(this->act_gidx.size());
    J = static_cast<int>(this->job_b.size());
    const size_t uA = A, uJ = J;
    TORCH_CHECK(A > 0 && J > 0 && this->act_gscale.size() == uA && this->act_boff.size() == uA &&
                    this->act_ecoef.size() == uA && job_kind.size() == uJ && job_inv.size() == uJ &&
                    job_act.size() == uJ && this->job_g.size() == uJ && this->job_coef.size() == uJ,
                "LutWeight: inconsistent list lengths");
    nt = static_cast<int>((n_out + kTileRows - 1) / kTileRows);
    nb = static_cast<int>(this->act_boff[0].numel()) - 1;
    TORCH_CHECK(nt * kTileRows >= n_out && n_out > 0 && K > 0, "LutWeight: tiles do not cover n_out");
    boff.resize(A);
    kbytes.resize(A);
    ecoef.resize(A);
    act_cb.assign(A, std::vector<int32_t>(nb + 1, 0));
    act_cb16.assign(A, std::vector<int32_t>(nb + 1, 0));
    act_fill.assign(A, 0.0);
    act_fill16.assign(A, 0.0);
    act_scale_bits.assign(A, 0);
    act_ident.assign(A, 0);
    act_half.assign(A, {});
    act_half_ptr.assign(A, nullptr);
    for (int a = 0; a < A; ++a) {
      const auto &g = this->act_gidx[a], &s = this->act_gscale[a], &bo = this->act_boff[a], &e = this->act_ecoef[a];
      TORCH_CHECK(g.device().is_cpu() && g.scalar_type() == at::kInt && g.is_contiguous() && s.device().is_cpu() &&
                      s.scalar_type() == at::kFloat && s.is_contiguous() && s.numel() == g.numel() && g.numel() % 8 == 0,
                  "LutWeight: act ", a, ": bad gidx/gscale");
      TORCH_CHECK(bo.scalar_type() == at::kInt && bo.is_contiguous() && bo.numel() == nb + 1, "LutWeight: bad boff");
      boff[a] = bo.data_ptr<int32_t>();
      kbytes[a] = static_cast<int32_t>(g.numel() / 8);
      TORCH_CHECK(boff[a][0] == 0 && boff[a][nb] == kbytes[a], "LutWeight: boff does not span the gathered columns");
      for (int b = 0; b < nb; ++b)
        TORCH_CHECK(boff[a][b] <= boff[a][b + 1] && (boff[a][b + 1] - boff[a][b]) % 2 == 0,
                    "LutWeight: boff not monotone or a block not whole 16-column units");
      // AMX chunks: each column block zero-padded to whole 64-column (int8) / 32-column (bf16) chunks.
      for (int b = 0; b < nb; ++b) {
        act_cb[a][b + 1] = act_cb[a][b] + (boff[a][b + 1] - boff[a][b] + 7) / 8;
        act_cb16[a][b + 1] = act_cb16[a][b] + (boff[a][b + 1] - boff[a][b] + 3) / 4;
      }
      act_fill[a] = act_cb[a][nb] ? double(kbytes[a]) / (8.0 * act_cb[a][nb]) : 0.0;
      act_fill16[a] = act_cb16[a][nb] ? double(kbytes[a]) / (4.0 * act_cb16[a][nb]) : 0.0;
      const float* sp = s.data_ptr<float>();
      for (int64_t k = 0; k < s.numel(); ++k) act_scale_bits[a] = std::max(act_scale_bits[a], significant_bits(sp[k]));
      const int32_t* gi = g.data_ptr<int32_t>();
      for (int64_t k = 0; k < g.numel(); ++k) TORCH_CHECK(gi[k] >= 0 && gi[k] < K, "LutWeight: gidx out of range");
      act_half[a].assign(nb, 0);
      for (int b = 0; b < nb; ++b) {
        const int kb1 = boff[a][b + 1];
        bool pad = kb1 - boff[a][b] >= 2;
        for (int k = (kb1 - 1) * 8; k < kb1 * 8 && pad; ++k) pad = sp[k] == 0.f;
        act_half[a][b] = pad;
      }
      act_half_ptr[a] = act_half[a].data();
      act_ident[a] = 1;
      for (int64_t k = 0; k < g.numel() && act_ident[a]; ++k) act_ident[a] = gi[k] == std::min<int64_t>(k, K - 1);
      if (e.numel()) {
        TORCH_CHECK(e.scalar_type() == at::kFloat && e.is_contiguous() && e.numel() == int64_t(nt) * nb * kTileRows,
                    "LutWeight: bad ecoef");
        ecoef[a] = e.data_ptr<float>();
      } else {
        ecoef[a] = nullptr;
      }
    }
    pb.resize(J);
    pg.resize(J);
    coefs.resize(J);
    coef_f16.resize(J);
    jact.resize(J);
    jkind.resize(J);
    jinv.resize(J);
    for (int j = 0; j < J; ++j) {
      TORCH_CHECK(job_act[j] >= 0 && job_act[j] < A, "LutWeight: job_act out of range");
      TORCH_CHECK(job_kind[j] >= kPM && job_kind[j] <= kS01, "LutWeight: bad job kind");
      jact[j] = static_cast<int32_t>(job_act[j]);
      jkind[j] = static_cast<int32_t>(job_kind[j]);
      jinv[j] = job_inv[j] ? 1 : 0;
      const int64_t plane_numel = int64_t(nt) * kbytes[jact[j]] * kTileRows;
      const auto &b = this->job_b[j], &g = this->job_g[j], &c = this->job_coef[j];
      TORCH_CHECK(b.scalar_type() == at::kByte && b.is_contiguous() && b.numel() == plane_numel, "LutWeight: job ", j,
                  ": bad plane");
      pb[j] = b.data_ptr<uint8_t>();
      if (jkind[j] == kSEL) {
        TORCH_CHECK(g.scalar_type() == at::kByte && g.is_contiguous() && g.numel() == plane_numel, "LutWeight: job ", j,
                    ": bad group plane");
        pg[j] = g.data_ptr<uint8_t>();
      } else {
        pg[j] = nullptr;
      }
        TORCH_CHECK((c.scalar_type() == at::kFloat || c.scalar_type() == at::kHalf) && c.is_contiguous() &&
                      c.numel() == int64_t(nt) * nb * kTileRows,
                  "LutWeight: job ", j, ": bad coef");
      coefs[j] = c.data_ptr();
      coef_f16[j] = c.scalar_type() == at::kHalf;
    }
    build_dense();
  }

  // dense: -1 auto (kDenseMinM, kDenseMinCost), 0 lookups, 1 the dense path (A16 only).
  at::Tensor forward(const at::Tensor& x, int64_t act_bits, int64_t isa, int64_t dense) const;
  // The dense path's layout (DenseActs) for tests: W's x columns, row stride, zero_first, and per act
  // (wcol, set_direct, set_stores, 16-lane pieces, 8-lane pieces), pieces as int32 [n_units + 1]
  // offsets and int32 [n_pieces][18] (idx[16], col, mask).
  py::dict dense_layout() const;
  // Lookups per weight and token relative to a single-term weight (selected terms cost two).
  double lookup_cost() const {
    double c = 0;
    for (int j = 0; j < J; ++j) c += double(kbytes[jact[j]]) * (jkind[j] == kSEL ? 2 : 1);
    return c / (double(K) / 8.0);
  }

 private:
  // x' of token row m of x (the act's gathered columns times its in_scale) into xg.
  void gather(const at::Tensor& x, int64_t m, int a, float* xg) const;
  at::Tensor forward_dense(const at::Tensor& x, const Kernels& kern) const;

  int64_t K, n_out;
  int A = 0, J = 0, nt = 0, nb = 0;
  std::vector<at::Tensor> act_gidx, act_gscale, act_boff, act_ecoef, job_b, job_g, job_coef;  // kept alive
  std::vector<const int32_t*> boff;
  std::vector<int32_t> kbytes;
  std::vector<const float*> ecoef;
  std::vector<const uint8_t*> pb, pg;
  std::vector<const void*> coefs;
  std::vector<int32_t> jact, jkind, jinv, coef_f16;
  std::vector<std::vector<int32_t>> act_cb, act_cb16;  // [A][nb + 1] 64- / 32-column chunk offsets (AMX int8 / bf16)
  std::vector<double> act_fill, act_fill16;             // gathered columns / padded chunk columns
  std::vector<int> act_scale_bits;                      // max significant bits of the act's gscale
  std::vector<char> act_ident;                // act not gathered: gidx = min(k, K - 1)
  std::vector<std::vector<uint8_t>> act_half;  // LutProblem::act_half
  std::vector<const uint8_t*> act_half_ptr;
  // The dense path's W columns (DenseActs): x's columns that some act uses; per set of acts with
  // the same gathered columns, where its units land. The arrays are the first act's of each set;
  // the pointers, per act, point at its set's (built once: DenseActs reads them).
  std::vector<int32_t> dense_same_cols;
  std::vector<std::vector<int32_t>> dense_wcol, dense_ucol, dense_upiece, dense_upiece8;
  std::vector<std::vector<uint16_t>> dense_ulive;
  std::vector<std::vector<DensePiece>> dense_piece, dense_piece8;
  std::vector<uint8_t> dense_set_stores, dense_set_direct;
  std::vector<const float*> dense_gscale_p;
  std::vector<const int32_t*> dense_wcol_p, dense_ucol_p, dense_upiece_p, dense_upiece8_p;
  std::vector<const uint16_t*> dense_ulive_p;
  std::vector<const DensePiece*> dense_piece_p, dense_piece8_p;
  int dense_zero_first = 0;
  int64_t dense_ldw = 16;  // W's row stride
  long dense_scratch_ld = 0;
  int64_t dense_cols = 0;       // W columns: x's columns that some act uses
  at::Tensor dense_gather;      // int64 [dense_cols]: the column of x behind each W column
  bool dense_x_direct = false;  // W's columns are x's, in order: X' = x
  void build_dense();
};

// A scattered set's pieces (DenseActs) for lanes of g = 16 (AVX-512 units) or 8 (AVX2 bytes)
// gathered columns: per lane group, the lowest W column left opens a window of g (moved left
// to end by ldw: the AVX2 kernel adds whole windows); every lane left that lands in it (one
// per column) joins; repeat until every live lane has one.
static void make_pieces(const std::vector<int32_t>& wcol, int g, int64_t ldw, std::vector<int32_t>& upiece,
                        std::vector<DensePiece>& piece) {
  upiece.assign(1, 0);
  piece.clear();
  for (size_t u = 0; u < wcol.size() / g; ++u) {
    const int32_t* wc = wcol.data() + g * u;
    bool done[16];
    for (int l = 0; l < g; ++l) done[l] = wc[l] < 0;
    for (;;) {
      int32_t c0 = -1;
      for (int l = 0; l < g; ++l)
        if (!done[l] && (c0 < 0 || wc[l] < c0)) c0 = wc[l];
      if (c0 < 0) break;
      DensePiece p{};
      p.col = static_cast<int32_t>(std::min<int64_t>(c0, ldw - g));
      for (int l = 0; l < g; ++l) {
        const int i = wc[l] - p.col;
        if (done[l] || i >= g || (p.mask >> i) & 1) continue;
        p.idx[i] = l;
        p.mask |= 1u << i;
        done[l] = true;
      }
      piece.push_back(p);
    }
    upiece.push_back(static_cast<int32_t>(piece.size()));
  }
}

// The dense path's W columns and how each set of acts (same gathered columns) lands in them
// (DenseActs). W's columns are x's columns that some act uses, in this order: the largest
// set's live columns in its gathered order, then each next-largest set's columns that are not
// there yet. So the largest set is direct, and so is every set whose columns no larger set
// has (CGB: the main terms' set and the salient one, when they are disjoint); a set sharing
// columns with a larger one (arb-rc gathers its two main terms differently in some layers)
// lands scattered in theirs, and the GEMM is never wider than the columns x has.
void LutWeightC::build_dense() {
  dense_same_cols.assign(A, 0);
  for (int a = 0; a < A; ++a) {
    dense_same_cols[a] = a;
    for (int a0 = 0; a0 < a; ++a0)
      if (dense_same_cols[a0] == a0 && act_gidx[a0].equal(act_gidx[a]) && act_boff[a0].equal(act_boff[a])) {
        dense_same_cols[a] = a0;
        break;
      }
  }
  // A set's live slots: gscale != 0 in some act of the set (padding is 0 in all of them).
  std::vector<std::vector<char>> live(A);
  std::vector<int> sets;
  std::vector<int64_t> n_live(A, 0);
  for (int s = 0; s < A; ++s) {
    if (dense_same_cols[s] != s) continue;
    sets.push_back(s);
    const int64_t n = int64_t(kbytes[s]) * 8;
    live[s].assign(n, 0);
    for (int a = s; a < A; ++a) {
      if (dense_same_cols[a] != s) continue;
      const float* gs = act_gscale[a].data_ptr<float>();
      for (int64_t k = 0; k < n; ++k) live[s][k] |= gs[k] != 0.f;
    }
    for (int64_t k = 0; k < n; ++k) n_live[s] += live[s][k];
  }
  std::vector<int> by_size = sets;
  std::stable_sort(by_size.begin(), by_size.end(), [&](int a, int b) { return n_live[a] > n_live[b]; });
  std::vector<int32_t> xcol(K, -1);  // x column -> W column
  std::vector<int64_t> gather;
  for (int s : by_size) {
    const int32_t* gi = act_gidx[s].data_ptr<int32_t>();
    for (size_t k = 0; k < live[s].size(); ++k)
      if (live[s][k] && xcol[gi[k]] < 0) {
        xcol[gi[k]] = static_cast<int32_t>(gather.size());
        gather.push_back(gi[k]);
      }
  }
  dense_cols = static_cast<int64_t>(gather.size());
  // W's row stride. The expansion writes a unit's 32 rows one after another: rows a multiple of
  // 1 KB apart (K = 1536, 4096) fall in few L1 sets and alias in the 4 KB store-to-load check,
  // which made it 2.5-4x slower per weight than at K = 576; 64 bytes more per row spread them.
  dense_ldw = std::max<int64_t>(16, (dense_cols + 15) / 16 * 16);
  if (dense_ldw % 256 == 0) dense_ldw += 16;
  dense_wcol.assign(A, {});
  dense_ucol.assign(A, {});
  dense_ulive.assign(A, {});
  dense_upiece.assign(A, {});
  dense_piece.assign(A, {});
  dense_upiece8.assign(A, {});
  dense_piece8.assign(A, {});
  dense_set_stores.assign(A, 0);
  dense_set_direct.assign(A, 0);
  std::vector<char> stored(dense_cols, 0);  // W columns a storing set writes first
  int64_t scratch_units = 0;
  for (int s : sets) {  // in the kernels' order (act order): what "first" means for set_stores
    const int64_t n = int64_t(kbytes[s]) * 8;  // whole 16-column units (kbytes is even)
    const int32_t* gi = act_gidx[s].data_ptr<int32_t>();
    std::vector<int32_t>& wcol = dense_wcol[s];
    wcol.assign(n, -1);
    for (int64_t k = 0; k < n; ++k)
      if (live[s][k]) wcol[k] = xcol[gi[k]];
    bool direct = true;  // every unit's live lanes in consecutive W columns
    for (int64_t u = 0; u < n / 16; ++u) {
      const int32_t* wc = wcol.data() + 16 * u;
      uint16_t mask = 0;
      int32_t col = -1, expect = -1;
      for (int l = 0; l < 16; ++l) {
        if (wc[l] < 0) continue;
        mask |= static_cast<uint16_t>(1u << l);
        if (col < 0) col = expect = wc[l];
        direct &= wc[l] == expect++;
      }
      dense_ulive[s].push_back(mask);
      dense_ucol[s].push_back(col < 0 ? 0 : col);
    }
    dense_set_direct[s] = direct;
    make_pieces(wcol, 8, dense_ldw, dense_upiece8[s], dense_piece8[s]);  // direct sets too (AVX2: padding lanes)
    if (direct) {
      dense_upiece[s].assign(n / 16 + 1, 0);
    } else {
      make_pieces(wcol, 16, dense_ldw, dense_upiece[s], dense_piece[s]);
      for (int b = 0; b < nb; ++b) scratch_units = std::max<int64_t>(scratch_units, (boff[s][b + 1] - boff[s][b]) / 2);
    }
    bool works = false;  // some act of the set has a job or an ecoef term
    for (int a = s; a < A; ++a) {
      if (dense_same_cols[a] != s) continue;
      works |= ecoef[a] != nullptr;
      for (int j = 0; j < J; ++j) works |= jact[j] == a;
    }
    bool fresh = true;
    for (int64_t k = 0; k < n; ++k) fresh &= wcol[k] < 0 || !stored[wcol[k]];
    dense_set_stores[s] = works && direct && fresh;
    if (dense_set_stores[s])
      for (int64_t k = 0; k < n; ++k)
        if (wcol[k] >= 0) stored[wcol[k]] = 1;
  }
  dense_zero_first = 0;
  for (int64_t c = 0; c < dense_cols; ++c) dense_zero_first |= !stored[c];
  dense_scratch_ld = scratch_units * 16;
  if (dense_scratch_ld % 256 == 0 && dense_scratch_ld) dense_scratch_ld += 16;  // as dense_ldw
  dense_gscale_p.resize(A);
  dense_wcol_p.resize(A);
  dense_ucol_p.resize(A);
  dense_ulive_p.resize(A);
  dense_upiece_p.resize(A);
  dense_piece_p.resize(A);
  dense_upiece8_p.resize(A);
  dense_piece8_p.resize(A);
  for (int a = 0; a < A; ++a) {
    const int a0 = dense_same_cols[a];
    dense_gscale_p[a] = act_gscale[a].data_ptr<float>();
    dense_wcol_p[a] = dense_wcol[a0].data();
    dense_ucol_p[a] = dense_ucol[a0].data();
    dense_ulive_p[a] = dense_ulive[a0].data();
    dense_upiece_p[a] = dense_upiece[a0].data();
    dense_piece_p[a] = dense_piece[a0].data();
    dense_upiece8_p[a] = dense_upiece8[a0].data();
    dense_piece8_p[a] = dense_piece8[a0].data();
  }
  dense_gather = at::tensor(gather, at::kLong);
  dense_x_direct = dense_cols == K;
  for (int64_t c = 0; c < dense_cols && dense_x_direct; ++c) dense_x_direct = gather[c] == c;
}

py::dict LutWeightC::dense_layout() const {
  auto ints = [](const std::vector<int32_t>& v) { return at::tensor(v, at::kInt); };
  auto pieces = [](const std::vector<DensePiece>& v) {
    at::Tensor t = at::empty({static_cast<int64_t>(v.size()), 18}, at::kInt);
    for (size_t i = 0; i < v.size(); ++i) {
      int32_t* r = t.data_ptr<int32_t>() + 18 * i;
      for (int l = 0; l < 16; ++l) r[l] = v[i].idx[l];
      r[16] = v[i].col;
      r[17] = static_cast<int32_t>(v[i].mask);
    }
    return t;
  };
  py::list per_act;
  for (int a = 0; a < A; ++a) {
    const int s = dense_same_cols[a];
    per_act.append(py::make_tuple(ints(dense_wcol[s]), bool(dense_set_direct[s]), bool(dense_set_stores[s]),
                                  ints(dense_upiece[s]), pieces(dense_piece[s]), ints(dense_upiece8[s]),
                                  pieces(dense_piece8[s])));
  }
  py::dict d;
  d["gather"] = dense_gather;
  d["ldw"] = dense_ldw;
  d["zero_first"] = bool(dense_zero_first);
  d["acts"] = per_act;
  return d;
}

void LutWeightC::gather(const at::Tensor& x, int64_t m, int a, float* xg) const {
  const int n = kbytes[a] * 8;
  const int32_t* gi = act_gidx[a].data_ptr<int32_t>();
  const float* gs = act_gscale[a].data_ptr<float>();
  const void* xr = static_cast<const char*>(x.data_ptr()) + m * K * x.element_size();
  const auto xtype = x.scalar_type();
  if (act_ident[a] && xtype == at::kFloat)
    scale_contiguous(static_cast<const float*>(xr), K, gs, n, xg);
  else if (act_ident[a] && xtype == at::kBFloat16)
    scale_contiguous(static_cast<const at::BFloat16*>(xr), K, gs, n, xg);
  else if (xtype == at::kFloat)
    gather_scale(static_cast<const float*>(xr), gi, gs, n, xg);
  else if (xtype == at::kHalf)
    gather_scale(static_cast<const at::Half*>(xr), gi, gs, n, xg);
  else
    gather_scale(static_cast<const at::BFloat16*>(xr), gi, gs, n, xg);
}

// The dense path (A16): panels of weight rows expanded to fp32 in the acts' gathered columns
// (DequantRows, every act's in_scale folded in), y = X' @ W^T by at::mm with X' = x's columns
// behind W's (x itself when those are x's in order). The sums run in another order than the
// lookups' (fp32 either way).
at::Tensor LutWeightC::forward_dense(const at::Tensor& x, const Kernels& kern) const {
  const LutProblem P{nt,          nb,          A,         J,          boff.data(),    kbytes.data(),       jkind.data(),
                     jinv.data(), jact.data(), pb.data(), pg.data(),  coefs.data(),   coef_f16.data(),     ecoef.data(),
                     act_half_ptr.data()};
  const DenseActs D{dense_gscale_p.data(), dense_same_cols.data(), dense_wcol_p.data(), dense_ulive_p.data(),
                    dense_ucol_p.data(),   dense_upiece_p.data(),   dense_piece_p.data(), dense_upiece8_p.data(),
                    dense_piece8_p.data(), dense_set_direct.data(), dense_set_stores.data(), dense_zero_first, dense_scratch_ld};
  const int64_t kw = dense_cols, ldw = dense_ldw;  // the GEMM's K, W's row stride
  const int64_t M = x.numel() / K;
  const auto f32 = x.options().dtype(at::kFloat);
  // Like the lookups, the dense path is no autograd op (at::mm_out refuses inputs that need grad).
  at::NoGradGuard no_grad;
  at::Tensor X = x.detach().reshape({M, K}).to(at::kFloat).contiguous();
  if (!dense_x_direct) X = X.index_select(1, dense_gather);
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = n_out;
  at::Tensor out = at::empty(out_shape, f32);
  at::Tensor out2 = out.view({M, n_out});
  // Each thread takes an equal range of tiles (one tile more at most: with SmolLM2's 6 to 48
  // tiles, ranges of whole panels left one thread up to twice the other's work) and expands it
  // panel by panel into its own buffer (kept between calls: fresh pages fault), small enough to
  // stay in L2 while the GEMM reads it (an 8 MB panel was bound by the expansion's stores going
  // to memory: ~5 ms for 4096x4096), and multiplies each on its own (at::mm_out inside a
  // parallel region runs single-threaded) into its columns of the output.
  const int64_t cap = std::max<int64_t>(1, kDensePanelBytes / (int64_t(kTileRows) * ldw * 4));
  const int64_t parts = std::min<int64_t>(nt, at::get_num_threads());
  at::parallel_for(0, parts, 1, [&](int64_t p0, int64_t p1) {
    // Grad and inference modes are per thread: a worker outside InferenceMode may not write
    // into `out` when the caller made it under torch.inference_mode (an inference tensor).
    c10::InferenceMode inference;
    static thread_local std::vector<float> wbuf, scratch;
    if (scratch.size() < static_cast<size_t>(kTileRows * dense_scratch_ld)) scratch.resize(static_cast<size_t>(kTileRows * dense_scratch_ld));
    for (int64_t part = p0; part < p1; ++part) {
      const int64_t ta = nt * part / parts, tb = nt * (part + 1) / parts;
      const int64_t n_panels = (tb - ta + cap - 1) / cap, tiles = (tb - ta + n_panels - 1) / n_panels;
      if (wbuf.size() < static_cast<size_t>(tiles * kTileRows * ldw)) wbuf.resize(static_cast<size_t>(tiles * kTileRows * ldw));
      const at::Tensor W = at::from_blob(wbuf.data(), {tiles * kTileRows, ldw}, f32);
      for (int64_t t0 = ta; t0 < tb; t0 += tiles) {
        const int64_t t1 = std::min<int64_t>(tb, t0 + tiles);
        kern.dq(P, D, static_cast<int>(t0), static_cast<int>(t1), wbuf.data(), ldw, scratch.data());
        const int64_t r0 = t0 * kTileRows, r1 = std::min<int64_t>(n_out, t1 * kTileRows);
        at::Tensor dst = out2.narrow(1, r0, r1 - r0);
        at::mm_out(dst, X, W.narrow(0, 0, r1 - r0).narrow(1, 0, kw).t());
      }
    }
  });
  return out;
}

at::Tensor LutWeightC::forward(const at::Tensor& x, int64_t act_bits, int64_t isa, int64_t dense) const {
  // x: (..., K), any number of leading dims (a decode step's (1, 1, K) needs no reshape in Python).
  TORCH_CHECK(x.device().is_cpu() && x.dim() >= 1 && x.is_contiguous(), "LutWeight: x must be a contiguous CPU tensor (..., K)");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16,
              "LutWeight: x must be float32, float16 or bfloat16");
  TORCH_CHECK(x.size(-1) == K, "LutWeight: x has ", x.size(-1), " columns, the weight ", K);
  TORCH_CHECK(act_bits == 16 || act_bits == 8, "LutWeight: act_bits must be 16 or 8");
  const bool auto_isa = isa < 0;
  if (auto_isa) isa = best_isa();
  TORCH_CHECK(isa >= 0 && isa <= 3, "LutWeight: isa must be -1 (auto), 0 (scalar), 1 (avx2), 2 (avx512) or 3 (amx)");
  TORCH_CHECK(isa_ok(static_cast<int>(isa)), "LutWeight: this CPU/OS does not support ", isa_name(static_cast<int>(isa)),
              isa == kAmx ? " (needs AMX-TILE, AMX-INT8, AMX-BF16 and AVX-512 in CPUID and Linux granting XTILEDATA)" : "");
  const int64_t M = x.numel() / K;
  const bool a8 = act_bits == 8;

  // Which jobs run on AMX: forced ("amx"), every job at any M; auto, the jobs of acts that fill
  // their chunks once there are enough tokens. The rest run on the LUT kernel.
  std::vector<char> on_amx(J, 0), amx_act(A, 0), need_pm(A, 0), need_01(A, 0);
  int n_amx = 0;
  const auto xtype = x.scalar_type();
  std::vector<int32_t> parts(A, 1);  // rows per token in the act's AMX tiles
  if (!a8)
    for (int a = 0; a < A; ++a) parts[a] = a16_parts(xtype, act_scale_bits[a]);
  std::vector<char> act_auto(A, 0);  // auto mode: the act's jobs go to AMX
  if (auto_isa && amx_ok(a8)) {
    std::vector<char> has_sel(A, 0);
    for (int j = 0; j < J; ++j) has_sel[jact[j]] |= jkind[j] == kSEL;
    for (int a = 0; a < A; ++a)
      act_auto[a] = (a8 ? act_fill : act_fill16)[a] >= kAmxMinFill &&
                    (a8 ? M >= amx_min_m() : M >= amx_a16_min_m() && (has_sel[a] || parts[a] == 1));
  }
  for (int j = 0; j < J; ++j) {
    on_amx[j] = isa == kAmx || act_auto[jact[j]];
    if (on_amx[j]) {
      ++n_amx;
      amx_act[jact[j]] = 1;
    } else {
      (jkind[j] == kPM ? need_pm : need_01)[jact[j]] = 1;
    }
  }
  // The LUT share: its jobs (and every act's mean-of-ALL coefficients, via add_ecoef).
  std::vector<int32_t> lkind, linv, lact, lf16;
  std::vector<const uint8_t*> lb, lg;
  std::vector<const void*> lcoef;
  for (int j = 0; j < J; ++j)
    if (!on_amx[j]) {
      lkind.push_back(jkind[j]);
      linv.push_back(jinv[j]);
      lact.push_back(jact[j]);
      lf16.push_back(coef_f16[j]);
      lb.push_back(pb[j]);
      lg.push_back(pg[j]);
      lcoef.push_back(coefs[j]);
    }
  const int n_lut = static_cast<int>(lkind.size());
  bool any_ecoef = false;
  for (int a = 0; a < A; ++a) any_ecoef |= ecoef[a] != nullptr;
  const LutProblem P{nt,          nb,          A,           n_lut,        boff.data(), kbytes.data(), lkind.data(),
                     linv.data(), lact.data(), lb.data(),   lg.data(),    lcoef.data(), lf16.data(),   ecoef.data(),
                     act_half_ptr.data()};
  const int run_isa = lut_isa(static_cast<int>(isa));
  const Kernels kern = kernels_for(run_isa);
  // A16 dense (prefill of multi-term weights) where the lookups lose to a float GEMM; never in
  // place of AMX, nor on the scalar path unless asked. A8 stays on the lookups: its int8
  // activations are quantized per act, which one float GEMM cannot keep.
  TORCH_CHECK(dense <= 0 || !a8, "LutWeight: the dense path is A16 only");
  if (!a8 &&
      (dense > 0 || (dense < 0 && n_amx == 0 && run_isa != kScalar && M >= dense_min_m(K, run_isa) &&
                     lookup_cost() >= kDenseMinCost)))
    return forward_dense(x, kern);

  // Tables per (token, act, kind) of the LUT jobs: A16, 2 * kbytes groups x 16 fp32; A8, the
  // ISA's int16 entries per 16 columns (lut.h).
  const int64_t kind_bytes_per_unit = a8 ? int64_t(kern.a8_unit_tab) * 2 : 4 * 16 * 4;
  std::vector<int64_t> kind_bytes(A);
  std::vector<int64_t> tab_off(A + 1, 0);
  for (int a = 0; a < A; ++a) {
    kind_bytes[a] = kbytes[a] / 2 * kind_bytes_per_unit;
    tab_off[a + 1] = tab_off[a] + kind_bytes[a] * (need_pm[a] + need_01[a]);
  }
  const int64_t tab_bytes = tab_off[A];
  // Tokens per group: the LUT kernels run every token of a group over one column block of a
  // tile while its weights are in L1, so a group's tables for one block (tab_bytes / nb per
  // token) should fit L1 next to them (~40 KB); within that, bigger groups read the weights
  // from memory fewer times. A multiple of 4 (the AVX-512 pass). The AMX path shares each
  // expanded weight tile by all m-tiles of a group: big groups.
  const int64_t per_block = std::max<int64_t>(1, tab_bytes / nb);
  int64_t G = std::max<int64_t>(4, std::min<int64_t>(64, (int64_t(40) << 10) / per_block) / 4 * 4);
  if (n_amx) G = a8 ? kAmxGroup : kAmxA16Group;
  if (const char* env = std::getenv("ONEBIT_CPU_GROUP")) G = std::max(1, std::atoi(env));  // tuning
  G = std::min<int64_t>(G, M);
  // AMX activation tiles per act: [m-tile][chunk][R][64 bytes], R = tokens per m-tile x rows per
  // token (A16: the bf16 parts x' needs; A8: 1). Zeroed: padding rows and columns stay 0.
  std::vector<std::unique_ptr<uint8_t[]>> amx_buf(A);
  std::vector<const void*> amx_a(A, nullptr);
  std::vector<const int32_t*> cb_ptr(A);
  for (int a = 0; a < A; ++a) {
    cb_ptr[a] = (a8 ? act_cb : act_cb16)[a].data();
    if (!amx_act[a]) continue;
    const int64_t tok = amx_tokens_per_tile(parts[a], static_cast<int>(G)), n_mt = (G + tok - 1) / tok;
    const size_t bytes = static_cast<size_t>(n_mt * cb_ptr[a][nb] * tok * parts[a] * 64) + 64;
    amx_buf[a].reset(new uint8_t[bytes]());
    amx_a[a] = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(amx_buf[a].get()) + 63) & ~uintptr_t(63));
  }

  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = n_out;
  at::Tensor out = at::empty(out_shape, x.options().dtype(at::kFloat));
  float* out_p = out.data_ptr<float>();

  // Start of the +-1 (kind 0) or 0/1 (kind 1) tables of group token m, act a; nullptr if unused.
  auto tables_of = [&](GroupTables& gt, int64_t m, int a, int kind) -> uint8_t* {
    uint8_t* tab = gt.base + m * tab_bytes + tab_off[a];
    if (kind == 0) return need_pm[a] ? tab : nullptr;
    return need_01[a] ? tab + (need_pm[a] ? kind_bytes[a] : 0) : nullptr;
  };
  auto set_tab_ptrs = [&](GroupTables& gt, int64_t m, int a) {
    for (int kind = 0; kind < 2; ++kind) gt.ptr[(m * A + a) * 2 + kind] = tables_of(gt, m, a, kind);
  };
  // Tables and block sums (mean terms) of group token m, act a, from v = its x' (A16, fp32
  // sums) or its int8 q (A8, exact int32 sums).
  auto build_blocks = [&](GroupTables& gt, int64_t m, int a, const auto* v) {
    using T = std::remove_cv_t<std::remove_pointer_t<decltype(v)>>;
    using Sum = std::conditional_t<std::is_same_v<T, float>, float, int32_t>;
    uint8_t* const tp[2] = {tables_of(gt, m, a, 0), tables_of(gt, m, a, 1)};
    if (tp[0] || tp[1]) {
      if constexpr (std::is_same_v<T, float>)
        kern.t16(v, 2 * kbytes[a], reinterpret_cast<float*>(tp[0]), reinterpret_cast<float*>(tp[1]));
      else
        kern.t8(v, 2 * kbytes[a], reinterpret_cast<int16_t*>(tp[0]), reinterpret_cast<int16_t*>(tp[1]));
    }
    float* xs = gt.xsum.data() + (m * A + a) * nb;
    for (int b = 0; b < nb && ecoef[a]; ++b) {
      Sum s = 0;
      for (int k = boff[a][b] * 8; k < boff[a][b + 1] * 8; ++k) s += v[k];
      xs[b] = static_cast<float>(s);
    }
  };
  int64_t kb_total = 0;
  for (int a = 0; a < A; ++a) kb_total += kbytes[a];
  const int nthreads = at::get_num_threads();
  // The tables of one (token, act) row, from its x' (A16) or int8 q (A8); the token scale too.
  auto build_row = [&](GroupTables& gt, int64_t m_in_x, int64_t m, int a, std::vector<float>& xg, std::vector<int8_t>& q) {
    const int n = kbytes[a] * 8;
    xg.resize(n);
    gather(x, m_in_x, a, xg.data());
    set_tab_ptrs(gt, m, a);
    if (a8) {
      q.resize(n);
      // One quantization for both paths: the LUT tables and the AMX tiles hold the same int8.
      gt.stok[m * A + a] = a8_scale(kern.amax(xg.data(), n));
      kern.q8(xg.data(), n, gt.stok[m * A + a], q.data());
      build_blocks(gt, m, a, static_cast<const int8_t*>(q.data()));
    } else {
      build_blocks(gt, m, a, static_cast<const float*>(xg.data()));
    }
  };

  // The tables of the gm tokens of a group starting at token g0, into gt.
  auto build_group = [&](GroupTables& gt, int64_t g0, int64_t gm, std::vector<float>& xg, std::vector<int8_t>& q) {
    for (int64_t i = 0; i < gm * A; ++i) build_row(gt, g0 + i / A, i / A, static_cast<int>(i % A), xg, q);
  };
  // Tiles [t0, t1) for the gm tokens of a group starting at token g0, into out.
  auto run_group_tiles = [&](const LutTokens& T, const AmxProblem* PA, int64_t g0, int64_t gm, int64_t t0, int64_t t1) {
    const int64_t rows = (t1 - t0) * kTileRows;
    std::vector<float> y(static_cast<size_t>(gm * rows), 0.f);
    if (PA) (a8 ? amx_a8_run : amx_a16_run)(*PA, static_cast<int>(t0), static_cast<int>(t1), y.data());
    if (n_lut || any_ecoef) (a8 ? kern.a8 : kern.a16)(P, T, static_cast<int>(t0), static_cast<int>(t1), y.data());
    const int64_t r0 = t0 * kTileRows, r1 = std::min<int64_t>(n_out, t1 * kTileRows);
    for (int64_t m = 0; m < gm; ++m)
      std::copy(y.data() + m * rows, y.data() + m * rows + (r1 - r0), out_p + (g0 + m) * n_out + r0);
  };

  // Prefill on the lookups (many tokens, no AMX): the threads split the tokens, not the tiles.
  // Each takes the next group of tokens, builds its tables in its own buffer and runs every tile
  // for it. Splitting the tiles of every group instead (below) costs a parallel region per
  // group and sends every table from the core that built it to the other; with SmolLM2's
  // narrow layers and prefill's many groups that made two threads slower than one (192x576
  // single-term A16, 128 tokens: 337 us on 2 threads, 142 us on 1). Either way every group
  // reads the whole weight once. The groups are resized to a multiple of the threads.
  if (!n_amx && nthreads > 1 && M >= kSplitTokensMinM * nthreads) {
    int64_t n_groups = nthreads * ((M + G * nthreads - 1) / (G * nthreads));
    const int64_t Gs = ((M + n_groups - 1) / n_groups + 3) / 4 * 4;  // whole AVX-512 passes of 4 tokens
    n_groups = (M + Gs - 1) / Gs;
    std::atomic<int64_t> next_group{0};
    at::parallel_for(0, nthreads, 1, [&](int64_t, int64_t) {
      GroupTables own(Gs, tab_bytes, A, static_cast<int>(nb));
      std::vector<float> xg;
      std::vector<int8_t> q;
      for (int64_t g = next_group.fetch_add(1); g < n_groups; g = next_group.fetch_add(1)) {
        const int64_t g0 = g * Gs, gm = std::min<int64_t>(Gs, M - g0);
        build_group(own, g0, gm, xg, q);
        run_group_tiles(own.tokens(static_cast<int>(gm), a8), nullptr, g0, gm, 0, nt);
      }
    });
    return out;
  }

  for (int64_t g0 = 0; g0 < M; g0 += G) {
    const int64_t gm = std::min<int64_t>(G, M - g0);
    const int64_t items = gm * A;
    // Threads split the weight tiles; each runs all tokens of the group over its tiles, block
    // by block (one pass over its weights per group).
    int64_t lookups_per_tile = 0;  // table lookups of one 32-row tile for the whole group
    for (int j = 0; j < J; ++j) lookups_per_tile += int64_t(kbytes[jact[j]]) * (jkind[j] == kSEL ? 4 : 2) * gm;
    const int64_t tile_grain = std::max<int64_t>(1, (int64_t(1) << 14) / std::max<int64_t>(lookups_per_tile, 1));
    const int64_t workers = std::min<int64_t>(nthreads, (nt + tile_grain - 1) / tile_grain);
    // Threads take tiles in shrinking chunks (guided scheduling: the rest / workers) instead of
    // one equal share each: on these shared machines one core often runs slower for a while,
    // and an equal split then waits for it (4096x4096 A16 M=1, 2 threads: one thread done at
    // 80 us, the other at 99 us, run after run). Chunks of the rest / (2 workers) balanced
    // better but cost more than they saved: every chunk starts its streams over, per column
    // block, and re-reads the tables of every block from L2 (4096x4096 A8, 2 threads, env
    // toggle alternated in one process: M=1 ~2-6% and M=16 ~9-16% slower than the rest /
    // workers, also while the other core was busy). Chunks of at least tile_grain tiles keep
    // the table re-reads small. Which thread runs a chunk does not change its result.
    std::atomic<int64_t> next{0};
    auto take_tiles = [&](const LutTokens& T, const AmxProblem* PA) {
      int64_t t0 = next.load(std::memory_order_relaxed);
      while (t0 < nt) {
        const int64_t t1 = std::min<int64_t>(nt, t0 + std::max<int64_t>(tile_grain, (nt - t0) / workers));
        if (next.compare_exchange_weak(t0, t1, std::memory_order_relaxed)) {  // else t0 = the new start
          run_group_tiles(T, PA, g0, gm, t0, t1);
          t0 = next.load(std::memory_order_relaxed);
        }
      }
    };

    if (!n_amx && items < nthreads && workers > 1) {
      // Decode (fewer token rows than threads): every thread builds the group's tables itself,
      // in its own buffer, and then takes tiles. Tables written by one core and read by
      // another cross between their caches at every call (the writer's next call must take
      // the lines back): 4096x4096 A8 M=1 at 2 threads spent ~12 us building them on one
      // thread and ~53 us in the tiles, or ~7.5 + ~70 us with each thread building half of
      // them, against ~6 + ~70 us for everything on one thread (per-stage timers, medians of
      // 2500 calls). The rows are few, so building them twice costs the wall clock nothing.
      at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
        GroupTables own(gm, tab_bytes, A, static_cast<int>(nb));
        std::vector<float> xg;
        std::vector<int8_t> q;
        build_group(own, g0, gm, xg, q);
        take_tiles(own.tokens(static_cast<int>(gm), a8), nullptr);
      });
      continue;
    }

    GroupTables shared(gm, tab_bytes, A, static_cast<int>(nb));
    // Small jobs run on the calling thread: waking the pool costs more than it saves, and on
    // shared machines a descheduled worker stalls the whole parallel region.
    const int64_t prep_grain = std::max<int64_t>(1, (int64_t(1) << 15) / std::max<int64_t>(kb_total * 8 / A, 1));
    at::parallel_for(0, items, prep_grain, [&](int64_t i0, int64_t i1) {
      std::vector<float> xg;
      std::vector<int8_t> q;
      std::vector<uint16_t> xparts;
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t m = i / A;
        const int a = static_cast<int>(i % A);
        const int n = kbytes[a] * 8;
        build_row(shared, g0 + m, m, a, xg, q);
        if (!amx_act[a]) continue;
        // This token's rows in the act's AMX tiles.
        const int tok = amx_tokens_per_tile(parts[a], static_cast<int>(gm));
        const int64_t nch = cb_ptr[a][nb], mt = m / tok, R = int64_t(tok) * parts[a], row = (m % tok) * parts[a];
        uint8_t* amx_base = static_cast<uint8_t*>(const_cast<void*>(amx_a[a]));
        if (!a8) {
          xparts.resize(static_cast<size_t>(n) * parts[a]);
          shared.stok[m * A + a] = amx_a16_split(xg.data(), n, parts[a], xparts.data());
          for (int p = 0; p < parts[a]; ++p)
            to_amx_row(xparts.data() + int64_t(p) * n, 2, boff[a], cb_ptr[a], nb, nch, mt, R, row + p, amx_base);
        } else {
          to_amx_row(q.data(), 1, boff[a], cb_ptr[a], nb, nch, mt, R, row, amx_base);
        }
      }
    });
    const AmxProblem PA{nt,        nb,        A,           J,           boff.data(),    cb_ptr.data(),        amx_a.data(),
                        parts.data(), jkind.data(), jinv.data(), jact.data(), pb.data(), pg.data(), coefs.data(),
                        coef_f16.data(), static_cast<int>(gm), shared.stok.data()};
    // The AMX kernel runs every job of the acts that have tiles (amx_a[a] != nullptr): on_amx
    // depends on the act only, so those are exactly the AMX jobs.
    const LutTokens T = shared.tokens(static_cast<int>(gm), a8);
    const AmxProblem* pa = n_amx ? &PA : nullptr;
    if (workers <= 1) {
      run_group_tiles(T, pa, g0, gm, 0, nt);
      continue;
    }
    at::parallel_for(0, workers, 1, [&](int64_t, int64_t) { take_tiles(T, pa); });
  }
  return out;
}

std::vector<std::string> supported_isas() {
  std::vector<std::string> out;
  for (int isa : {kAmx, kAvx512, kAvx2, kScalar})
    if (isa_ok(isa)) out.push_back(isa_name(isa));
  return out;
}

}  // namespace onebit_cpu

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "onebit CPU kernels: lookup-table binary linear (A16 fp32 tables, A8 int16 tables)";
  py::class_<onebit_cpu::LutWeightC>(m, "LutWeight")
      .def(py::init<int64_t, int64_t, std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>,
                    std::vector<at::Tensor>, const std::vector<int64_t>&, const std::vector<int64_t>&,
                    const std::vector<int64_t>&, std::vector<at::Tensor>, std::vector<at::Tensor>,
                    std::vector<at::Tensor>>(),
           py::arg("in_features"), py::arg("n_out"), py::arg("act_gidx"), py::arg("act_gscale"), py::arg("act_boff"),
           py::arg("act_ecoef"), py::arg("job_kind"), py::arg("job_inv"), py::arg("job_act"), py::arg("job_b"),
           py::arg("job_g"), py::arg("job_coef"))
      .def("forward", &onebit_cpu::LutWeightC::forward, "y (M, N) fp32 = x @ W^T", py::arg("x"), py::arg("act_bits"),
           py::arg("isa") = -1, py::arg("dense") = -1)
      .def("dense_layout", &onebit_cpu::LutWeightC::dense_layout,
           "the dense path's W layout: {'gather', 'ldw', 'zero_first', 'acts': [(wcol, direct, stores, upiece16, "
           "pieces16, upiece8, pieces8)]} (tests)")
      .def("lookup_cost", &onebit_cpu::LutWeightC::lookup_cost,
           "lookups per weight and token relative to a single-term weight (the dense path's criterion)");
  m.def("supported_isas", &onebit_cpu::supported_isas, "ISA paths this CPU can run, best first");
  m.def("amx_status", []() {
    using namespace onebit_cpu;
    if (!amx_built()) return std::string("not built (compiler or platform without AMX intrinsics)");
    const bool i8 = amx_supported(), bf = amx_bf16_supported();
    if (i8 && bf) return std::string("available: AMX-INT8 (A8) and AMX-BF16 (A16)");
    if (i8 || bf)
      return std::string("partly available: ") + (i8 ? "AMX-INT8 (A8) only, no AMX-BF16 (A16)" : "AMX-BF16 (A16) only, no AMX-INT8 (A8)") +
             "; auto uses it, ONEBIT_CPU_ISA=amx needs both";
    return std::string("unavailable (no AMX-TILE/AMX-INT8/AMX-BF16/AVX-512 in CPUID, tile state not enabled or not "
                       "granted by the OS, or ONEBIT_CPU_AMX=0)");
  });
  m.def("amx_paths", []() {
    std::vector<std::string> out;
    if (onebit_cpu::amx_ok(true)) out.push_back("a8");
    if (onebit_cpu::amx_ok(false)) out.push_back("a16");
    return out;
  }, "act paths with an AMX kernel here: 'a8' (AMX-INT8), 'a16' (AMX-BF16)");
  m.def("amx_min_m", &onebit_cpu::amx_min_m, "auto mode uses AMX-INT8 for A8 from this many tokens on");
  m.def("amx_a16_min_m", &onebit_cpu::amx_a16_min_m, "auto mode uses AMX-BF16 for A16 from this many tokens on");
  m.def("dense_min_m", &onebit_cpu::dense_min_m,
        "auto mode runs multi-term A16 weights with K columns densely from this many tokens on, on ISA path isa "
        "(0 scalar, 1 avx2, 2 avx512, 3 amx; -1: the best this CPU has)",
        py::arg("K"), py::arg("isa") = -1);
  m.def("best_isa", []() { return std::string(onebit_cpu::isa_name(onebit_cpu::best_isa())); });
  m.def(
      "dense_linear",
      [](const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& scale, int64_t group, int64_t isa) {
        using namespace onebit_cpu;
        if (isa < 0) isa = best_isa();
        TORCH_CHECK(isa >= 0 && isa <= 3, "dense_linear: isa must be -1 (auto), 0 (scalar), 1 (avx2), 2 (avx512) or 3 (amx)");
        TORCH_CHECK(isa_ok(static_cast<int>(isa)), "dense_linear: this CPU cannot run the ", isa_name(static_cast<int>(isa)), " path");
        return dense_forward(x, w, scale, group, lut_isa(static_cast<int>(isa)));  // no AMX kernel: amx runs avx512
      },
      "y (M, N) in x's dtype = x (M, K) @ w (N, K)^T, w float16 / bfloat16, or int8 times scale (N, ceil(K / group)) "
      "per row and group of columns; fp32 accumulation",
      py::arg("x"), py::arg("w"), py::arg("scale") = py::none(), py::arg("group") = 0, py::arg("isa") = -1);
  m.attr("TILE_ROWS") = onebit_cpu::kTileRows;
}
