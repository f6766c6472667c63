"""Where the AVX-512 A8 kernel's cycles go (4096x4096, M=1, one thread).

    python benchmarks/a8_anatomy.py

Times, in one process: the core clock (a chain of dependent integer adds, one per cycle);
the throughput of the shuffle-class instructions the kernel issues (vpermt2w, vpermw,
vpsrlw, vpermps) and of vpaddw; the kernel's inner loop alone (per 16-column unit of a
32-row tile: one load, two shifts, three table lookups, three adds, tables in registers,
weights in L1); a stand-alone replica of csrc/cpu/lut_avx512.cpp's A8 loop structure over a
4096x4096 weight (column blocks of 128, 16-tile chunks, 4-unit groups, the next block
prefetched into L2), with and without closing each block of each tile (widen the int16 sums,
convert, multiply by the block's fp16 scale and the token scale, add into y); and onebit's
own kernel on the same shape. All as cycles per unit, so the gap between the inner loop and
the real kernel splits into its parts. Needs a CPU with AVX-512 BW and a C++ compiler.

Results: benchmarks/results/a8_anatomy.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from bench_linear import random_packed  # noqa: E402

SRC = r"""
#include <torch/extension.h>
#include <immintrin.h>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <vector>

static double now() { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); }

// Seconds for n iterations of 4 dependent adds (one cycle each): the clock.
double add_chain(int64_t n) {
  int64_t x = 0;
  double t = now();
  for (int64_t i = 0; i < n; ++i) asm volatile("add $1, %0\n\tadd $1, %0\n\tadd $1, %0\n\tadd $1, %0" : "+r"(x));
  return now() - t;
}

// Seconds for n x 8 independent instructions of one kind (8 chains: throughput, not latency).
template <int which>
double op_chain_t(int64_t n) {
  volatile int seed = 1;
  const __m512i t0 = _mm512_set1_epi16(seed), t1 = _mm512_set1_epi16(seed + 1);
  __m512i a0 = _mm512_set1_epi16(seed + 2), a1 = _mm512_set1_epi16(seed + 3), a2 = _mm512_set1_epi16(seed + 4),
          a3 = _mm512_set1_epi16(seed + 5), a4 = _mm512_set1_epi16(seed + 6), a5 = _mm512_set1_epi16(seed + 7),
          a6 = _mm512_set1_epi16(seed + 8), a7 = _mm512_set1_epi16(seed + 9);
#define OP(a) (which == 0 ? _mm512_permutex2var_epi16(t0, a, t1)                                          \
               : which == 1 ? _mm512_permutexvar_epi16(a, t0)                                            \
               : which == 2 ? _mm512_srli_epi16(a, 3)                                                    \
               : which == 3 ? _mm512_add_epi16(a, t0)                                                    \
                            : _mm512_castps_si512(_mm512_permutexvar_ps(a, _mm512_castsi512_ps(t0))))
  double t = now();
  for (int64_t i = 0; i < n; ++i) {
    a0 = OP(a0); a1 = OP(a1); a2 = OP(a2); a3 = OP(a3); a4 = OP(a4); a5 = OP(a5); a6 = OP(a6); a7 = OP(a7);
    asm volatile("" : "+v"(a0), "+v"(a1), "+v"(a2), "+v"(a3), "+v"(a4), "+v"(a5), "+v"(a6), "+v"(a7));
  }
#undef OP
  return now() - t;
}

double op_chain(int64_t n, int64_t which) {
  switch (which) {
    case 0: return op_chain_t<0>(n);
    case 1: return op_chain_t<1>(n);
    case 2: return op_chain_t<2>(n);
    case 3: return op_chain_t<3>(n);
    default: return op_chain_t<4>(n);
  }
}

static inline void pf(const void* p) { asm volatile("prefetcht1 %0" : : "m"(*(const char*)p)); }

// The tables of 4 units (5 registers a unit: T0 and T1 halves, T2), as the kernel holds them.
struct Tables4 {
  __m512i t0a[4], t0b[4], t1a[4], t1b[4], t2[4];
};

// The kernel's inner loop on one group of 4 units of one tile (64 bytes a unit): per unit one
// load, two shifts, three lookups, three adds; the int16 sum of the group's rows.
__attribute__((always_inline)) static inline __m512i group4(const Tables4& T, const uint8_t* w) {
  __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0;
#pragma GCC unroll 4
  for (int u = 0; u < 4; ++u) {
    const __m512i x = _mm512_loadu_si512(w + 64 * u);
    const __m512i x6 = _mm512_srli_epi16(x, 6), x12 = _mm512_srli_epi16(x, 12);
    a0 = _mm512_add_epi16(a0, _mm512_permutex2var_epi16(T.t0a[u], x, T.t0b[u]));
    a1 = _mm512_add_epi16(a1, _mm512_permutex2var_epi16(T.t1a[u], x6, T.t1b[u]));
    a2 = _mm512_add_epi16(a2, _mm512_permutexvar_epi16(x12, T.t2[u]));
  }
  return _mm512_add_epi16(_mm512_add_epi16(a0, a1), a2);
}

// The replica: tiles of 32 rows, blocks of 8 units (128 columns), block-major weights, groups of
// 4 units whose tables (5 registers a unit) stay in registers over 16 tiles. close: finish
// each block of each tile into y as the kernel does; else keep the int16 sum. Returns the best
// seconds of `reps` passes over the whole weight.
double replica(int64_t n_tiles, int64_t n_blocks, bool close, bool prefetch, int64_t reps) {
  const int NU = 8;
  std::vector<uint8_t> wv(n_tiles * n_blocks * NU * 64 + 64);
  for (auto& b : wv) b = static_cast<uint8_t>(rand());
  std::vector<int16_t> tab(n_blocks * NU * 160);
  for (auto& v : tab) v = static_cast<int16_t>(rand() % 200 - 100);
  std::vector<uint16_t> coef(n_blocks * n_tiles * 32, 0x3c00);
  std::vector<float> y(n_tiles * 32);
  alignas(64) int16_t part[16][32];
  const uint8_t* w = wv.data();
  const __m512 st = _mm512_set1_ps(0.5f);
  double best = 1e9;
  for (int64_t r = 0; r < reps; ++r) {
    double t = now();
    std::fill(y.begin(), y.end(), 0.f);
    for (int64_t b = 0; b < n_blocks; ++b)
      for (int64_t ta = 0; ta < n_tiles; ta += 16)
        for (int u0 = 0; u0 < NU; u0 += 4) {
          const int16_t* tb = tab.data() + (b * NU + u0) * 160;
          Tables4 T;
#pragma GCC unroll 4
          for (int u = 0; u < 4; ++u) {
            T.t0a[u] = _mm512_loadu_si512(tb + u * 160); T.t0b[u] = _mm512_loadu_si512(tb + u * 160 + 32);
            T.t1a[u] = _mm512_loadu_si512(tb + u * 160 + 64); T.t1b[u] = _mm512_loadu_si512(tb + u * 160 + 96);
            T.t2[u] = _mm512_loadu_si512(tb + u * 160 + 128);
          }
          const uint8_t* base = w + (b * n_tiles + ta) * NU * 64;
          const uint8_t* next = w + ((b + 1 < n_blocks ? b + 1 : b) * n_tiles + ta) * NU * 64;
          for (int t = 0; t < 16 && ta + t < n_tiles; ++t) {
            if (prefetch)
              for (int l = u0; l < u0 + 4; ++l) pf(next + t * NU * 64 + 64 * l);
            __m512i s = group4(T, base + t * NU * 64 + 64 * u0);
            if (u0 == 0) {
              _mm512_store_si512(part[t], s);
              continue;
            }
            s = _mm512_add_epi16(s, _mm512_load_si512(part[t]));
            if (!close) {
              _mm512_store_si512(part[t], s);
              continue;
            }
            const __m512i lo = _mm512_cvtepi16_epi32(_mm512_castsi512_si256(s));
            const __m512i hi = _mm512_cvtepi16_epi32(_mm512_extracti64x4_epi64(s, 1));
            const uint16_t* c = coef.data() + (b * n_tiles + ta + t) * 32;
            const __m512 c0 = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)c));
            const __m512 c1 = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(c + 16)));
            float* yt = y.data() + (ta + t) * 32;
            _mm512_storeu_ps(yt, _mm512_fmadd_ps(_mm512_mul_ps(c0, st), _mm512_cvtepi32_ps(lo), _mm512_loadu_ps(yt)));
            _mm512_storeu_ps(yt + 16, _mm512_fmadd_ps(_mm512_mul_ps(c1, st), _mm512_cvtepi32_ps(hi), _mm512_loadu_ps(yt + 16)));
          }
        }
    best = std::min(best, now() - t);
  }
  volatile float sink = y[5] + part[0][0];
  (void)sink;
  return best;
}

// The inner loop alone: groups of 4 units over `bytes` of weights that stay in L1.
double inner(int64_t bytes, int64_t reps) {
  std::vector<uint8_t> wv(bytes + 64);
  for (auto& b : wv) b = static_cast<uint8_t>(rand());
  volatile int seed = 1;
  Tables4 T;
#pragma GCC unroll 4
  for (int u = 0; u < 4; ++u) {
    T.t0a[u] = _mm512_set1_epi16(seed + u); T.t0b[u] = _mm512_set1_epi16(seed + 2 * u);
    T.t1a[u] = _mm512_set1_epi16(seed + 3 * u); T.t1b[u] = _mm512_set1_epi16(seed + 4 * u);
    T.t2[u] = _mm512_set1_epi16(seed + 5 * u);
  }
  __m512i out = _mm512_setzero_si512();
  double t = now();
  for (int64_t r = 0; r < reps; ++r)
    for (int64_t off = 0; off + 256 <= bytes; off += 256) out = _mm512_add_epi16(out, group4(T, wv.data() + off));
  double s = now() - t;
  volatile int sink = _mm512_reduce_add_epi32(out);
  (void)sink;
  return s;
}
"""

OPS = ("vpermt2w", "vpermw", "vpsrlw", "vpaddw", "vpermps")


def build():
    from torch.utils.cpp_extension import load_inline

    flags = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c"]
    return load_inline("onebit_a8_anatomy", cpp_sources=SRC, functions=["add_chain", "op_chain", "replica", "inner"],
                       extra_cflags=flags, verbose=False)  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=2000, help="passes over the weight (best one counts)")
    ap.add_argument("--out-dir", default=harness.RESULTS)
    args = ap.parse_args(argv)
    from onebit.backends import cpu

    if "avx512" not in cpu.supported_isas():
        raise SystemExit("a8_anatomy needs a CPU with AVX-512 (the kernel it takes apart is the AVX-512 one)")
    torch.set_num_threads(1)
    m = build()
    n_add = 200_000_000
    ghz = 4 * n_add / min(m.add_chain(n_add) for _ in range(3)) / 1e9
    cyc = lambda s, n: s * ghz * 1e9 / n  # seconds -> cycles per item
    n_op = 20_000_000
    ops = {name: round(cyc(min(m.op_chain(n_op, i) for _ in range(3)), n_op * 8), 3) for i, name in enumerate(OPS)}
    units = 128 * 32 * 8  # 4096x4096: 128 tiles x 32 blocks x 8 units of 16 columns
    inner_reps = 20_000
    inner = cyc(min(m.inner(4096, inner_reps) for _ in range(3)), inner_reps * 4096 // 64)
    rows = {"clock_ghz": round(ghz, 3), "cycles_per_op": ops, "inner_loop_l1": round(inner, 3)}
    for close in (False, True):
        for prefetch in (False, True):
            s = m.replica(128, 32, close, prefetch, args.reps)
            rows[f"replica{'_close' if close else ''}{'_prefetch' if prefetch else ''}"] = {
                "us": round(s * 1e6, 2), "cycles_per_unit": round(cyc(s, units), 3)}
    # onebit's kernel on the same shape (bound call, weights hot): the best of the timed calls.
    f = cpu.bind(random_packed("single", 4096, 4096), 8)
    x = torch.randn(1, 4096)
    f(x)
    best = 1e9
    for _ in range(args.reps):
        t = time.perf_counter()
        f(x)
        best = min(best, time.perf_counter() - t)
    rows["onebit_kernel"] = {"us": round(best * 1e6, 2), "cycles_per_unit": round(cyc(best, units), 3)}
    meta = harness.metadata("cpu", shape="4096x4096", m=1, threads=1)
    os.makedirs(args.out_dir, exist_ok=True)
    path = os.path.join(args.out_dir, "a8_anatomy.json")
    with open(path, "w") as fh:
        json.dump({"meta": meta, "results": rows}, fh, indent=2)
    print(f"clock {ghz:.2f} GHz; cycles per instruction (8 independent chains): "
          + ", ".join(f"{k} {v}" for k, v in ops.items()))  # fmt: skip
    print(f"cycles per unit (16 columns x 32 rows), 4096x4096 A8 M=1, one thread:\n  inner loop, weights in L1: {inner:.2f}")
    for k, v in rows.items():
        if k.startswith("replica") or k == "onebit_kernel":
            print(f"  {k:<24} {v['cycles_per_unit']:6.2f}  ({v['us']} us)")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
