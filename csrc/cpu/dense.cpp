// Dense linear with narrow weights and fp32 accumulation: y = x @ w^T for fp16 / bf16 w, and
// w = q * scale for int8 q with one fp32 scale per row and group of G consecutive columns.
//
// Why: once the decoder's linear layers are 1-bit, the float layers a model keeps dominate a
// decode step. SmolLM2-135M's lm_head (its 49152 x 576 embedding, tied) is 113 MB in fp32 and
// took 11 ms of a 25 ms decode step through torch's fp32 GEMV (~10 GB/s on these Zen 4 cores),
// more than all 210 packed layers. A token reads every weight once, so the head is a
// bandwidth problem: 16-bit weights halve its bytes, int8 quarters them, and this kernel keeps
// the loads streaming. (Inside a decode step the head comes from DRAM: the 1-bit layers run
// between two of its calls evict it from L3. Called alone, back to back, part of it stays in
// the 32 MB L3 and it looks ~1.5x faster than it is.)
//
// Loop order: rows in blocks of kRowBlock (64 rows x K 16-bit weights, 72 KB at K = 576: L2),
// then passes of up to kTok tokens over the block, so that weights come from DRAM once however
// many tokens there are. A step converts 16 (AVX-512) or 8 (AVX2) weights of each of kRows rows
// to fp32 (vcvtph2ps for fp16, a 16-bit shift for bf16; for int8 sign extension, vcvtdq2ps and
// a multiply by the group's scale: G is a multiple of the step or the whole row, so a step never
// straddles two groups) and FMAs them into kRows x tokens accumulators; each accumulator's
// lanes are summed once at the end of the row. The sums are
// fp32 in a different order than torch's, so results match a float64 reference to fp32
// rounding, not torch bit for bit.
#include "dense.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

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
// this SmolLM2's head, M=1, 1 thread, read at ~10 GB/s). While a step reads 16 weights of each
// of its R rows, it prefetches as many bytes of the next group's rows in address order: one
// sequential stream, one group (R * K weights) ahead, which covers every byte of the
// next group by the time it starts. Asking for the next group's same columns instead (R
// interleaved streams again) measured 2x slower on SmolLM2's head; a fixed 4 KB ahead was as
// fast there but fell behind on K = 4096 rows, where a group is 32 KB. A group that large
// goes to L2, not L1 (L1 is 32 KB and still holds the group being read): alternated processes,
// 1 thread, M=1: Llama-2's 32000 x 4096 head 11-13 ms into L2 vs 19-20 ms into L1, SmolLM2's
// 49152 x 576 head 3.5-3.8 ms into L2 vs 2.1-3.3 ms into L1. An int8 group of 4096-column
// rows (16 KB) into L1 left Llama-2's head at 2.5x the streaming time (the group being read,
// the next one and x fill the 32 KB L1), so only groups up to 8 KB go to L1.
constexpr int64_t kPrefetchL1Bytes = 8 << 10;

// The weight's element type; Elem<W> is how it is stored.
enum class W { kF16, kBF16, kI8 };
template <W T>
using Elem = std::conditional_t<T == W::kI8, int8_t, uint16_t>;

struct Problem {
  const float* x;  // (M, K) fp32
  int64_t M, K;
  const void* w;        // (N, K) Elem<W>: fp16 / bf16 bits or int8
  const float* scale;   // int8: (N, ceil(K / G)), else null
  int64_t G;            // int8: columns per scale
  float* y;             // (M, N) fp32
  int64_t N;
};

// Scales of an int8 weight, row by row: at(r, k) is the scale of row n + r's column k.
struct RowScales {
  const float* s;  // row n's first scale
  int64_t ng, G;
  RowScales(const Problem& p, int64_t n) : ng(p.scale ? (p.K + p.G - 1) / p.G : 0), G(p.G) { s = p.scale ? p.scale + n * ng : nullptr; }
  float at(int r, int64_t k) const { return s[r * ng + k / G]; }
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

template <W T>
inline float to_f32(Elem<T> v) {
  if constexpr (T == W::kBF16) return static_cast<float>(c10::BFloat16(v, c10::BFloat16::from_bits()));
  else if constexpr (T == W::kF16) return static_cast<float>(c10::Half(v, c10::Half::from_bits()));
  else return static_cast<float>(v);
}

template <W WT>
struct ScalarStep {
  template <int R, int T>
  struct S {
    static void run(const Problem& p, int64_t n, int64_t m0) {
      const Elem<WT>* w = static_cast<const Elem<WT>*>(p.w);
      const RowScales sc(p, n);
      float acc[R][T] = {};
      for (int64_t k = 0; k < p.K; ++k)
        for (int r = 0; r < R; ++r) {
          float wf = to_f32<WT>(w[(n + r) * p.K + k]);
          if constexpr (WT == W::kI8) wf *= sc.at(r, k);
          for (int t = 0; t < T; ++t) acc[r][t] += wf * p.x[(m0 + t) * p.K + k];
        }
      for (int r = 0; r < R; ++r)
        for (int t = 0; t < T; ++t) p.y[(m0 + t) * p.N + n + r] = acc[r][t];
    }
  };
};

template <W WT>
void rows_scalar(const Problem& p, int64_t n0, int64_t n1) {
  run_rows<ScalarStep<WT>::template S>(p, n0, n1);
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

// 16 weights from w as fp32; masked: lanes of m only, the rest 0 (and not read).
template <W T>
inline __m512 load16_512(const Elem<T>* w) {
  if constexpr (T == W::kI8) return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w))));
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w));
  if constexpr (T == W::kBF16) return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  else return _mm512_cvtph_ps(h);
}

template <W T>
inline __m512 load16_512(__mmask16 m, const Elem<T>* w) {
  if constexpr (T == W::kI8) return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(m, w)));
  const __m256i h = _mm256_maskz_loadu_epi16(m, w);
  if constexpr (T == W::kBF16) return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  else return _mm512_cvtph_ps(h);
}

template <W WT>
struct Avx512Step {
  template <int R, int T>
  struct S {
    static void run(const Problem& p, int64_t n, int64_t m0) {
      constexpr int kStepBytes = R * 16 * static_cast<int>(sizeof(Elem<WT>));
      const int64_t K = p.K;
      const Elem<WT>* w = static_cast<const Elem<WT>*>(p.w) + n * K;
      const float* x = p.x + m0 * K;
      const RowScales sc(p, n);
      __m512 acc[R][T];
      for (int r = 0; r < R; ++r)
        for (int t = 0; t < T; ++t) acc[r][t] = _mm512_setzero_ps();
      int64_t k = 0;
      const char* pf = reinterpret_cast<const char*>(w + R * K);  // the next group (may lie past the end: prefetch only)
      const bool to_l1 = R * K * static_cast<int64_t>(sizeof(Elem<WT>)) <= kPrefetchL1Bytes;
      for (; k + 16 <= K; k += 16, pf += kStepBytes) {
        prefetch_span(pf, kStepBytes, to_l1);
        __m512 wv[R];
        for (int r = 0; r < R; ++r) {
          wv[r] = load16_512<WT>(w + r * K + k);
          if constexpr (WT == W::kI8) wv[r] = _mm512_mul_ps(wv[r], _mm512_set1_ps(sc.at(r, k)));
        }
        for (int t = 0; t < T; ++t) {
          const __m512 xv = _mm512_loadu_ps(x + t * K + k);
          for (int r = 0; r < R; ++r) acc[r][t] = _mm512_fmadd_ps(wv[r], xv, acc[r][t]);
        }
      }
      if (k < K) {  // masked tail: lanes past K load as 0 (and fault-free)
        const __mmask16 m = static_cast<__mmask16>((1u << (K - k)) - 1);
        __m512 wv[R];
        for (int r = 0; r < R; ++r) {
          wv[r] = load16_512<WT>(m, w + r * K + k);
          if constexpr (WT == W::kI8) wv[r] = _mm512_mul_ps(wv[r], _mm512_set1_ps(sc.at(r, k)));
        }
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

template <W WT>
void rows_avx512(const Problem& p, int64_t n0, int64_t n1) {
  run_rows<Avx512Step<WT>::template S>(p, n0, n1);
}

#pragma GCC pop_options

// ------------------------------------------------------------------------------ AVX2

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")

// 8 weights from w as fp32.
template <W T>
inline __m256 load8_256(const Elem<T>* w) {
  if constexpr (T == W::kI8) return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(w))));
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w));
  if constexpr (T == W::kBF16) return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  else return _mm256_cvtph_ps(h);
}

inline float hsum256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

template <W WT>
struct Avx2Step {
  template <int R, int T>
  struct S {
    static void run(const Problem& p, int64_t n, int64_t m0) {
      constexpr int kStepBytes = R * 8 * static_cast<int>(sizeof(Elem<WT>));
      const int64_t K = p.K;
      const Elem<WT>* w = static_cast<const Elem<WT>*>(p.w) + n * K;
      const float* x = p.x + m0 * K;
      const RowScales sc(p, n);
      __m256 acc[R][T];
      for (int r = 0; r < R; ++r)
        for (int t = 0; t < T; ++t) acc[r][t] = _mm256_setzero_ps();
      int64_t k = 0;
      const char* pf = reinterpret_cast<const char*>(w + R * K);  // as in Avx512Step
      const bool to_l1 = R * K * static_cast<int64_t>(sizeof(Elem<WT>)) <= kPrefetchL1Bytes;
      for (; k + 8 <= K; k += 8, pf += kStepBytes) {
        prefetch_span(pf, kStepBytes, to_l1);
        __m256 wv[R];
        for (int r = 0; r < R; ++r) {
          wv[r] = load8_256<WT>(w + r * K + k);
          if constexpr (WT == W::kI8) wv[r] = _mm256_mul_ps(wv[r], _mm256_set1_ps(sc.at(r, k)));
        }
        for (int t = 0; t < T; ++t) {
          const __m256 xv = _mm256_loadu_ps(x + t * K + k);
          for (int r = 0; r < R; ++r) acc[r][t] = _mm256_fmadd_ps(wv[r], xv, acc[r][t]);
        }
      }
      for (int r = 0; r < R; ++r)
        for (int t = 0; t < T; ++t) {
          float s = hsum256(acc[r][t]);
          for (int64_t j = k; j < K; ++j) {  // < 8 tail columns
            float wf = to_f32<WT>(w[r * K + j]);
            if constexpr (WT == W::kI8) wf *= sc.at(r, j);
            s += wf * x[t * K + j];
          }
          p.y[(m0 + t) * p.N + n + r] = s;
        }
    }
  };
};

template <W WT>
void rows_avx2(const Problem& p, int64_t n0, int64_t n1) {
  run_rows<Avx2Step<WT>::template S>(p, n0, n1);
}

#pragma GCC pop_options

#endif  // x86

template <W WT>
RowsFn rows_for(int isa) {
#if defined(__x86_64__) || defined(__i386__)
  if (isa == 2) return rows_avx512<WT>;
  if (isa == 1) return rows_avx2<WT>;
#endif
  return rows_scalar<WT>;
}

RowsFn rows_for(int isa, at::ScalarType wt) {
  if (wt == at::kBFloat16) return rows_for<W::kBF16>(isa);
  if (wt == at::kChar) return rows_for<W::kI8>(isa);
  return rows_for<W::kF16>(isa);
}

}  // namespace

at::Tensor dense_forward(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& scale, int64_t group, int isa) {
  TORCH_CHECK(w.device().is_cpu() && w.dim() == 2 && w.is_contiguous(), "dense: w must be a contiguous 2-D CPU tensor");
  const at::ScalarType wt = w.scalar_type();
  TORCH_CHECK(wt == at::kHalf || wt == at::kBFloat16 || wt == at::kChar, "dense: w must be float16, bfloat16 or int8, got ", wt);
  const float* sp = nullptr;
  if (wt == at::kChar) {
    TORCH_CHECK(scale.has_value(), "dense: an int8 w needs scales");
    const int64_t K = w.size(1);
    // A vector step (16 or 8 columns) must lie in one group.
    TORCH_CHECK(group > 0 && (group % 16 == 0 || group >= K), "dense: group must be a positive multiple of 16 or at least K = ", K,
                ", got ", group);
    const at::Tensor& s = *scale;
    const int64_t ng = K == 0 ? 0 : (K + group - 1) / group;
    TORCH_CHECK(s.device().is_cpu() && s.scalar_type() == at::kFloat && s.dim() == 2 && s.is_contiguous() && s.size(0) == w.size(0) &&
                    s.size(1) == ng,
                "dense: scale must be a contiguous float32 CPU tensor of shape (", w.size(0), ", ", ng, "), got ", s.scalar_type(), " ",
                s.sizes());
    sp = s.data_ptr<float>();
  } else {
    TORCH_CHECK(!scale.has_value(), "dense: a scale goes with int8 weights only, not ", wt);
  }
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 2 && x.is_contiguous(), "dense: x must be a contiguous 2-D CPU tensor");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16,
              "dense: x must be float32, float16 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(x.size(1) == w.size(1), "dense: x has ", x.size(1), " columns, the weight ", w.size(1));
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  const at::Tensor x32 = x.scalar_type() == at::kFloat ? x : x.to(at::kFloat);
  at::Tensor y = at::empty({M, N}, x.options().dtype(at::kFloat));
  if (M == 0 || N == 0) return y.to(x.scalar_type());
  const Problem p{x32.data_ptr<float>(), M, K, w.data_ptr(), sp, group, y.data_ptr<float>(), N};
  const RowsFn fn = rows_for(isa, wt);
  const int64_t blocks = (N + kRowBlock - 1) / kRowBlock;
  const int64_t grain = std::max<int64_t>(1, kMinWork / std::max<int64_t>(1, kRowBlock * K * M));
  at::parallel_for(0, blocks, grain, [&](int64_t b0, int64_t b1) {
    fn(p, b0 * kRowBlock, std::min(N, b1 * kRowBlock));
  });
  return x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type());
}

}  // namespace onebit_cpu
