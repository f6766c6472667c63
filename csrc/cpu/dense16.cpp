// Dense linear with 16-bit weights (fp16 or bf16) and fp32 accumulation: y = x @ w^T.
//
// Why: once the decoder's linear layers are 1-bit, the float layers a model keeps dominate a
// decode step. SmolLM2-135M's lm_head (its 49152 x 576 embedding, tied) is 113 MB in fp32 and
// took 11 ms of a 25 ms decode step through torch's fp32 GEMV (~10 GB/s on these Zen 4 cores),
// more than all 210 packed layers. A token reads every weight once, so the head is a
// bandwidth problem: 16-bit weights halve its bytes, and this kernel keeps the loads streaming.
//
// Loop order: rows in blocks of kRowBlock (64 rows x K 16-bit weights, 72 KB at K = 576: L2),
// then passes of up to kTok tokens over the block, so that weights come from DRAM once however
// many tokens there are. A step converts 16 (AVX-512) or 8 (AVX2) weights of each of kRows rows
// to fp32 (vcvtph2ps for fp16, a 16-bit shift for bf16) and FMAs them into kRows x tokens
// accumulators; each accumulator's lanes are summed once at the end of the row. The sums are
// fp32 in a different order than torch's, so results match a float64 reference to fp32
// rounding, not torch bit for bit.
#include "dense16.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

namespace onebit_cpu {
namespace {

constexpr int kRows = 4;            // rows per step: 4 independent FMA chains per token
constexpr int kTok = 4;             // tokens per pass: 4 x 4 accumulators in registers
constexpr int64_t kRowBlock = 64;   // rows whose weights stay in cache across the token passes
constexpr int64_t kMinWork = 1 << 18;  // weight-token products below which a thread is not worth waking
// Software prefetch: the hardware prefetchers do not follow R rows read side by side (without
// this SmolLM2's head, M=1, 1 thread, read at ~10 GB/s). While a step reads 32 bytes of each
// of its R rows, it prefetches the next 32 R bytes of the next group's rows in address order:
// one sequential stream, one group (R * K * 2 bytes) ahead, which covers every byte of the
// next group by the time it starts. Asking for the next group's same columns instead (R
// interleaved streams again) measured 2x slower on SmolLM2's head; a fixed 4 KB ahead was as
// fast there but fell behind on K = 4096 rows, where a group is 32 KB. A group that large
// goes to L2, not L1 (L1 is 32 KB and still holds the group being read): alternated processes,
// 1 thread, M=1: Llama-2's 32000 x 4096 head 11-13 ms into L2 vs 19-20 ms into L1, SmolLM2's
// 49152 x 576 head 3.5-3.8 ms into L2 vs 2.1-3.3 ms into L1.
constexpr int64_t kPrefetchL1Bytes = 16 << 10;

struct Problem {
  const float* x;  // (M, K) fp32
  int64_t M, K;
  const uint16_t* w;  // (N, K) fp16 / bf16 bits
  float* y;           // (M, N) fp32
  int64_t N;
};

using RowsFn = void (*)(const Problem&, int64_t n0, int64_t n1);

// Rows [n0, n1) of every token, a row block at a time; Step<R, T>::run does R rows x T tokens.
template <template <int, int> class Step>
void run_rows(const Problem& p, int64_t n0, int64_t n1) {
  for (int64_t b = n0; b < n1; b += kRowBlock) {
    const int64_t be = std::min(n1, b + kRowBlock);
    for (int64_t m0 = 0; m0 < p.M; m0 += kTok) {
      const int64_t t = std::min<int64_t>(kTok, p.M - m0);
      int64_t n = b;
      for (; n + kRows <= be; n += kRows) {
        switch (t) {
          case 1: Step<kRows, 1>::run(p, n, m0); break;
          case 2: Step<kRows, 2>::run(p, n, m0); break;
          case 3: Step<kRows, 3>::run(p, n, m0); break;
          default: Step<kRows, 4>::run(p, n, m0); break;
        }
      }
      for (; n < be; ++n) {
        switch (t) {
          case 1: Step<1, 1>::run(p, n, m0); break;
          case 2: Step<1, 2>::run(p, n, m0); break;
          case 3: Step<1, 3>::run(p, n, m0); break;
          default: Step<1, 4>::run(p, n, m0); break;
        }
      }
    }
  }
}

// ------------------------------------------------------------------------------ scalar

template <bool BF>
inline float to_f32(uint16_t v) {
  if constexpr (BF) return static_cast<float>(c10::BFloat16(v, c10::BFloat16::from_bits()));
  else return static_cast<float>(c10::Half(v, c10::Half::from_bits()));
}

template <bool BF>
struct ScalarStep {
  template <int R, int T>
  struct S {
    static void run(const Problem& p, int64_t n, int64_t m0) {
      float acc[R][T] = {};
      for (int64_t k = 0; k < p.K; ++k)
        for (int r = 0; r < R; ++r) {
          const float w = to_f32<BF>(p.w[(n + r) * p.K + k]);
          for (int t = 0; t < T; ++t) acc[r][t] += w * p.x[(m0 + t) * p.K + k];
        }
      for (int r = 0; r < R; ++r)
        for (int t = 0; t < T; ++t) p.y[(m0 + t) * p.N + n + r] = acc[r][t];
    }
  };
};

template <bool BF>
void rows_scalar(const Problem& p, int64_t n0, int64_t n1) {
  run_rows<ScalarStep<BF>::template S>(p, n0, n1);
}

#if defined(__x86_64__) || defined(__i386__)

// Prefetch [pf, pf + bytes) (bytes a multiple of 64, or less than 64: one line) for the next
// row group, into L1 when the group fits kPrefetchL1Bytes, else into L2.
inline void prefetch_span(const char* pf, int bytes, bool to_l1) {
  for (int i = 0; i < bytes; i += 64) {
    if (to_l1)
      _mm_prefetch(pf + i, _MM_HINT_T0);
    else
      _mm_prefetch(pf + i, _MM_HINT_T1);
  }
}

// ------------------------------------------------------------------------------ AVX-512

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,fma,avx2,f16c")

template <bool BF>
inline __m512 cvt16_512(__m256i h) {
  if constexpr (BF) return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  else return _mm512_cvtph_ps(h);
}

template <bool BF>
struct Avx512Step {
  template <int R, int T>
  struct S {
    static void run(const Problem& p, int64_t n, int64_t m0) {
      const int64_t K = p.K;
      const uint16_t* w = p.w + n * K;
      const float* x = p.x + m0 * K;
      __m512 acc[R][T];
      for (int r = 0; r < R; ++r)
        for (int t = 0; t < T; ++t) acc[r][t] = _mm512_setzero_ps();
      int64_t k = 0;
      const char* pf = reinterpret_cast<const char*>(w + R * K);  // the next group (may lie past the end: prefetch only)
      const bool to_l1 = R * K * 2 <= kPrefetchL1Bytes;
      for (; k + 16 <= K; k += 16, pf += R * 32) {
        prefetch_span(pf, R * 32, to_l1);
        __m512 wv[R];
        for (int r = 0; r < R; ++r) wv[r] = cvt16_512<BF>(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + r * K + k)));
        for (int t = 0; t < T; ++t) {
          const __m512 xv = _mm512_loadu_ps(x + t * K + k);
          for (int r = 0; r < R; ++r) acc[r][t] = _mm512_fmadd_ps(wv[r], xv, acc[r][t]);
        }
      }
      if (k < K) {  // masked tail: lanes past K load as 0 (and fault-free)
        const __mmask16 m = static_cast<__mmask16>((1u << (K - k)) - 1);
        __m512 wv[R];
        for (int r = 0; r < R; ++r) wv[r] = cvt16_512<BF>(_mm256_maskz_loadu_epi16(m, w + r * K + k));
        for (int t = 0; t < T; ++t) {
          const __m512 xv = _mm512_maskz_loadu_ps(m, x + t * K + k);
          for (int r = 0; r < R; ++r) acc[r][t] = _mm512_fmadd_ps(wv[r], xv, acc[r][t]);
        }
      }
      for (int r = 0; r < R; ++r)
        for (int t = 0; t < T; ++t) p.y[(m0 + t) * p.N + n + r] = _mm512_reduce_add_ps(acc[r][t]);
    }
  };
};

template <bool BF>
void rows_avx512(const Problem& p, int64_t n0, int64_t n1) {
  run_rows<Avx512Step<BF>::template S>(p, n0, n1);
}

#pragma GCC pop_options

// ------------------------------------------------------------------------------ AVX2

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")

template <bool BF>
inline __m256 cvt16_256(__m128i h) {
  if constexpr (BF) return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  else return _mm256_cvtph_ps(h);
}

inline float hsum256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

template <bool BF>
struct Avx2Step {
  template <int R, int T>
  struct S {
    static void run(const Problem& p, int64_t n, int64_t m0) {
      const int64_t K = p.K;
      const uint16_t* w = p.w + n * K;
      const float* x = p.x + m0 * K;
      __m256 acc[R][T];
      for (int r = 0; r < R; ++r)
        for (int t = 0; t < T; ++t) acc[r][t] = _mm256_setzero_ps();
      int64_t k = 0;
      const char* pf = reinterpret_cast<const char*>(w + R * K);  // as in Avx512Step
      const bool to_l1 = R * K * 2 <= kPrefetchL1Bytes;
      for (; k + 8 <= K; k += 8, pf += R * 16) {
        prefetch_span(pf, R * 16, to_l1);
        __m256 wv[R];
        for (int r = 0; r < R; ++r) wv[r] = cvt16_256<BF>(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + r * K + k)));
        for (int t = 0; t < T; ++t) {
          const __m256 xv = _mm256_loadu_ps(x + t * K + k);
          for (int r = 0; r < R; ++r) acc[r][t] = _mm256_fmadd_ps(wv[r], xv, acc[r][t]);
        }
      }
      for (int r = 0; r < R; ++r)
        for (int t = 0; t < T; ++t) {
          float s = hsum256(acc[r][t]);
          for (int64_t j = k; j < K; ++j) s += to_f32<BF>(w[r * K + j]) * x[t * K + j];  // < 8 tail columns
          p.y[(m0 + t) * p.N + n + r] = s;
        }
    }
  };
};

template <bool BF>
void rows_avx2(const Problem& p, int64_t n0, int64_t n1) {
  run_rows<Avx2Step<BF>::template S>(p, n0, n1);
}

#pragma GCC pop_options

#endif  // x86

RowsFn rows_for(int isa, bool bf16) {
#if defined(__x86_64__) || defined(__i386__)
  if (isa == 2) return bf16 ? rows_avx512<true> : rows_avx512<false>;
  if (isa == 1) return bf16 ? rows_avx2<true> : rows_avx2<false>;
#endif
  return bf16 ? rows_scalar<true> : rows_scalar<false>;
}

}  // namespace

at::Tensor dense16_forward(const at::Tensor& x, const at::Tensor& w, int isa) {
  TORCH_CHECK(w.device().is_cpu() && w.dim() == 2 && w.is_contiguous(), "dense16: w must be a contiguous 2-D CPU tensor");
  TORCH_CHECK(w.scalar_type() == at::kHalf || w.scalar_type() == at::kBFloat16, "dense16: w must be float16 or bfloat16, got ",
              w.scalar_type());
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 2 && x.is_contiguous(), "dense16: x must be a contiguous 2-D CPU tensor");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16,
              "dense16: x must be float32, float16 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(x.size(1) == w.size(1), "dense16: x has ", x.size(1), " columns, the weight ", w.size(1));
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  const at::Tensor x32 = x.scalar_type() == at::kFloat ? x : x.to(at::kFloat);
  at::Tensor y = at::empty({M, N}, x.options().dtype(at::kFloat));
  if (M == 0 || N == 0) return y.to(x.scalar_type());
  const Problem p{x32.data_ptr<float>(), M, K, reinterpret_cast<const uint16_t*>(w.data_ptr()), y.data_ptr<float>(), N};
  const RowsFn fn = rows_for(isa, w.scalar_type() == at::kBFloat16);
  const int64_t blocks = (N + kRowBlock - 1) / kRowBlock;
  const int64_t grain = std::max<int64_t>(1, kMinWork / std::max<int64_t>(1, kRowBlock * K * M));
  at::parallel_for(0, blocks, grain, [&](int64_t b0, int64_t b1) {
    fn(p, b0 * kRowBlock, std::min(N, b1 * kRowBlock));
  });
  return x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type());
}

}  // namespace onebit_cpu
