// Shared, torch-free declarations of the CPU lookup-table (LUT) kernels of onebit._C.
//
// The ISA-specific files (lut_avx512.cpp, lut_avx2.cpp) include only this header and
// <immintrin.h>: they are compiled with `#pragma GCC target`, and any inline function from
// a torch or STL header instantiated there could be merged by the linker with the generic
// copy and then run on a CPU without AVX-512. Everything they define is internal except
// the entry points declared here.
//
// Problem, after repack_for_lut() (onebit/backends/cpu.py):
//
//   y[m, i] = sum_j coef_j[i, b] * L_j[m, i, b]  +  sum_a ecoef_a[i, b] * X_a[m, b]   (summed over b)
//
// x'_a = x[gidx_a] * gscale_a is the activation with one term's in_scale folded in,
// gathered to the columns that term uses (block b spans bytes boff_a[b]..boff_a[b+1], 8
// columns per byte). X_a is its block sum. Job j reads bit planes B (and G) of its act's
// column set and computes, over the block, one of
//   kPM : sum_k s_k x'_k                 with s = 2B - 1    (one lookup in the +-1 table)
//   kSEL: sum_k sel_k s_k x'_k, sel = G or ~G (inv)     = T01[B & sel] - T01[~B & sel]
//   kS01: sum_k B_k x'_k  (B or ~B if inv)              (one lookup in the 0/1 table)
// For act_bits=8, x'_a is quantized per token to int8 q * stok[m, a] and L, X are exact
// integer sums. Weight rows come in tiles of 32, stored block-major: the bytes of column
// block b of tile t start at (boff[b] * n_tiles + t * kbb) * 32, kbb = boff[b+1] - boff[b] (always
// even), so one block of every tile is one contiguous run. Within it, 16-column units: unit u
// is uint16 [32] (row r's columns 16u..16u+15, LSB = first column), i.e. byte kb of row r is at
// ((kb / 2) * 32 + r) * 2 + kb % 2 (unit_byte). Why 16 columns per lane: the AVX-512 A8 kernel
// looks up 6 columns per 64-entry table (vpermt2w) straight from the loaded lanes. Coefficients are [n_blocks][n_tiles][32], in fp32 or in fp16 when that is
// exact (they are the format's fp16 scales): 1/8 fewer bytes to stream.
//
// Kernels run column block by column block, every tile of their range and every token of
// the group inside one block: the block's tables (2 KB per token and act at B = 128) stay in
// L1 while the weights stream past once per group of tokens, in address order.
//
// Tables, per (token, act, kind in {+-1, 0/1}): for each nibble group g (4 gathered columns;
// group 2kb is the low nibble of byte kb, 2kb+1 the high nibble) the 16 signed/subset sums.
//   A16: float  [2*kbytes][16]
//   A8 : int16  [2*kbytes][32]   (entries 16..31 repeat 0..15; the scalar kernel reads 0..15)
//   The AVX-512 A8 kernel has its own: per 16 columns (unit) three tables, over columns 0-5
//   (64 entries), 6-11 (64) and 12-15 (16, stored as 32): a8_unit_tab_avx512 int16 per unit
//   instead of 128.
//   On AVX2 (lut_avx2.cpp) the same bytes hold other tables: A8, the int16 sums as two byte
//   planes for vpshufb; A16, per byte of weights three 8-entry tables over columns 0-2, 3-5
//   and 6-7. Each ISA's kernel reads what its own table builder wrote (Kernels in
//   binary_linear.cpp).
#pragma once
#include <stdint.h>

namespace onebit_cpu {

constexpr int kTileRows = 32;

// Byte offset of (block b, tile t) in a plane of the act with block offsets bo, and the
// element offset of (b, t) in coefficient arrays. static: each ISA file keeps its own copy.
static inline long plane_off(const int32_t* bo, int n_tiles, int b, int t) {
  return (static_cast<long>(bo[b]) * n_tiles + static_cast<long>(t) * (bo[b + 1] - bo[b])) * kTileRows;
}
static inline long coef_off(int n_tiles, int b, int t) { return (static_cast<long>(b) * n_tiles + t) * kTileRows; }

// Offset of byte kb (counted from the block's first byte) of tile row r in a block's run.
static inline long unit_byte(int kb, int r) { return ((static_cast<long>(kb >> 1) * kTileRows + r) << 1) + (kb & 1); }

enum JobKind : int32_t { kPM = 0, kSEL = 1, kS01 = 2 };

struct LutProblem {
  int n_tiles;
  int n_blocks;
  int n_acts;
  int n_jobs;
  const int32_t* const* act_boff;  // [n_acts] -> int32[n_blocks + 1], in bytes (8 columns)
  const int32_t* act_kbytes;       // [n_acts]
  const int32_t* job_kind;         // [n_jobs] JobKind
  const int32_t* job_inv;          // [n_jobs] kSEL: sel = ~G; kS01: use ~B
  const int32_t* job_act;          // [n_jobs]
  const uint8_t* const* job_b;     // [n_jobs] -> uint8[kbytes * n_tiles * 32], block-major units (above)
  const uint8_t* const* job_g;     // [n_jobs] -> same layout (kSEL) or nullptr
  const void* const* job_coef;     // [n_jobs] -> [n_blocks][n_tiles][32] fp32, or fp16 bits if job_coef_f16
  const int32_t* job_coef_f16;     // [n_jobs] 1: coefficients stored as fp16 (exact copies of fp16 scales)
  const float* const* act_ecoef;   // [n_acts] -> float[n_blocks][n_tiles][32] or nullptr
  // [n_acts] -> uint8[n_blocks]: 1 where the block's last byte of columns is padding (a gathered
  // act's block padded from 8k to whole 16-column units: gscale 0, so its tables are all zero
  // and a kernel may skip its lookups).
  const uint8_t* const* act_half;
};

// Weights that come from DRAM (a model larger than the last-level cache) arrive too slowly
// for the hardware prefetcher alone while the lookups keep the core busy: the kernels ask
// for what tile t of job j reads in the next column block (its plane bytes, group bytes and
// coefficients) into L2 while they work on this block. That is one block's run of the
// thread's tiles ahead (16-64 KB at 4096 rows), in the thread's own order, so nothing
// another thread reads is fetched. Measured on Zen 4, 4096x4096 A8 M=1 with 57 copies
// round robin: ~2x -> ~1.2x the time of a plain read of the same bytes (standalone kernel);
// a prefetch into L1, or only 2 KB ahead, gained about a third of that. Inline asm on x86:
// gcc drops __builtin_prefetch / _mm_prefetch in functions compiled under
// `#pragma GCC target` (its SSE-prefetch flag comes from -march only).
static inline void prefetch_l2(const void* p) {
#if defined(__x86_64__) || defined(__i386__)
  asm volatile("prefetcht1 %0" : : "m"(*static_cast<const char*>(p)));
#else
  __builtin_prefetch(p, 0, 2);
#endif
}
// What tiles [ta, ...) of job j read in column block b + 1, resolved once per (job, block,
// tile range) so that the per-tile prefetches are pointer arithmetic: resolving them per tile
// (loads of the problem's offset tables, multiplies) took ~15% of a hot-cache A8 call (perf,
// 4096x4096 M=1); with it resolved once, prefetching costs nothing measurable on hot weights.
struct NextBlock {
  const uint8_t* b = nullptr;  // tile ta's bytes of the next block (nullptr: none, or no prefetch)
  const uint8_t* g = nullptr;  // the group plane's (selected terms), else nullptr
  const char* coef = nullptr;  // tile ta's coefficients of the next block
  long tile_bytes = 0;         // bytes of one tile's run in the next block
  int coef_bytes = 4;          // 32 coefficients of a tile: 32 * coef_bytes bytes
  NextBlock() = default;
  NextBlock(const LutProblem& P, int j, int b, int ta, bool with_group) {
    if (b + 1 >= P.n_blocks) return;
    const int32_t* bo = P.act_boff[P.job_act[j]];
    const long off = plane_off(bo, P.n_tiles, b + 1, ta);
    this->b = P.job_b[j] + off;
    if (with_group) g = P.job_g[j] + off;
    tile_bytes = static_cast<long>(bo[b + 2] - bo[b + 1]) * kTileRows;
    coef_bytes = P.job_coef_f16[j] ? 2 : 4;
    coef = static_cast<const char*>(P.job_coef[j]) + coef_off(P.n_tiles, b + 1, ta) * coef_bytes;
  }
  // Lines [o0, o1) of tile ta + dt's run (clamped to it) and (with_coef) its coefficients.
  inline void lines(int dt, long o0, long o1, bool with_coef) const {
    if (!b) return;
    for (long o = o0; o < o1 && o < tile_bytes; o += 64) {
      prefetch_l2(b + dt * tile_bytes + o);
      if (g) prefetch_l2(g + dt * tile_bytes + o);
    }
    if (!with_coef) return;
    const char* c = coef + dt * 32L * coef_bytes;
    prefetch_l2(c);
    if (coef_bytes == 4) prefetch_l2(c + 64);
  }
};
static inline void prefetch_next_block(const LutProblem& P, int j, int b, int t, bool with_group) {
  NextBlock(P, j, b, t, with_group).lines(0, 0, 1L << 30, true);
}

// int16 table entries per 16 columns of an A8 (token, act, kind) table, per ISA path.
constexpr int a8_unit_tab_scalar = 128, a8_unit_tab_avx2 = 128, a8_unit_tab_avx512 = 160;

struct LutTokens {
  int mb;                     // tokens in this group (any number; kernels make passes of a few)
  const void* const* tables;  // [mb][n_acts][2] (+-1, 0/1): float (A16) / int16 (A8), or nullptr
  const float* xsum;          // [mb][n_acts][n_blocks] block sums of x' (A8: of q)
  const float* stok;          // [mb][n_acts] token scales (A8) or nullptr (A16)
};

// Accumulate tiles [t0, t1) of every token into y[mb][(t1 - t0) * 32] (zeroed by the caller).
using LutKernel = void (*)(const LutProblem&, const LutTokens&, int t0, int t1, float* y);
// Build the +-1 (pm) and/or 0/1 (t01) tables of one (token, act) from n_groups*4 activations.
using TableA16 = void (*)(const float* x, int n_groups, float* pm, float* t01);
using TableA8 = void (*)(const int8_t* q, int n_groups, int16_t* pm, int16_t* t01);

// The dense path (A16 prefill, binary_linear.cpp): with many tokens a float GEMM beats the
// lookups on weights with several terms, so the weight's rows are expanded to fp32 a panel at
// a time and y = X' @ W^T. W's columns are the columns of x that some act uses (gscale != 0 in
// a live slot), each once, and X' = x[:, those columns] (x itself when they are all of x's, in
// order): the GEMM is never wider than x, whatever each act gathers (arb-rc's two main CGB
// terms gather different columns in some layers). build_dense picks their order:
//   W[row][wcol_a[k']] += gscale_a[k'] * (sum_{j of act a} coef_j[row, b] * f_j(bits)  +  ecoef_a[row, b])
// over every act a and gathered column k', with f = +-1 (kPM), sel * +-1 (kSEL), 0/1 (kS01), b
// the block of k'. Acts with the same gathered columns (gidx and block offsets) form a set and
// share their wcol and unit tables (same_cols: the set's first act). A set is *direct* where
// every unit's (16 gathered columns) live lanes land in consecutive W columns from ucol (one
// store of the live lanes, compressed where some are padding), else *scattered*: a unit's lanes
// land in pieces, each a window of W columns filled by one permute of the unit's lanes
// (DensePiece). A set *stores* (set_stores) where it is direct and no earlier set (act order)
// has its columns: its first pass stores, every other pass adds; zero_first: some W column has
// no storing set, so the tile's rows are zeroed first. Rows of tiles [t0, t1) go to
// W + (t - t0) * 32 * ldw, ldw >= the used columns; nothing past a row's ldw is written.
struct DensePiece {
  int32_t idx[16];  // W column col + i takes the unit's lane idx[i], where bit i of mask is set
  int32_t col;
  uint32_t mask;
};
struct DenseActs {
  const float* const* gscale;      // [n_acts] the act's in_scale per gathered column (0 on padding)
  const int32_t* same_cols;        // [n_acts] the first act with the same gathered columns
  const int32_t* const* wcol;      // [n_acts] W column of each gathered column, -1 where it has none
  const uint16_t* const* ulive;    // [n_acts] per 16-column unit: the lanes with a W column
  const int32_t* const* ucol;      // [n_acts] per unit: W column of its first live lane (direct units)
  const int32_t* const* upiece;    // [n_acts] per unit + 1: unit u's pieces are piece[upiece[u] .. upiece[u+1]) (scattered sets)
  const DensePiece* const* piece;  // [n_acts] windows of 16 W columns
  const int32_t* const* upiece8;   // [n_acts] the same per byte (8 gathered columns), for the AVX2 kernel
  const DensePiece* const* piece8; // [n_acts] windows of 8 W columns (idx[0..7]), inside the row (col + 8 <= ldw);
                                   // direct sets too: one per byte with live lanes
  const uint8_t* set_direct;       // [n_acts] (a set's first act) 1: every unit direct
  const uint8_t* set_stores;       // [n_acts] (a set's first act) 1: the set's first pass stores
  int zero_first;                  // 1: zero each tile's rows first
  long scratch_ld;                 // floats per row of the caller's scratch (32 rows), 0: none needed
};
// scratch: 32 * D.scratch_ld floats of the calling thread's own (the SIMD kernels expand a
// scattered set's block there, then add it to W piece by piece), or nullptr when scratch_ld is 0.
using DequantRows = void (*)(const LutProblem&, const DenseActs&, int t0, int t1, float* W, long ldw, float* scratch);

// Per-token symmetric int8, exactly onebit.reference.quantize_act_int8: scale = amax / 127
// (1 if amax == 0) over the whole row, q = round_half_even(x / scale). In two steps so that a
// row's columns can be quantized in ranges, on several threads, with the row's scale.
using AbsMax = float (*)(const float* x, int n);
using QuantA8 = void (*)(const float* x, int n, float scale, int8_t* q);
inline float a8_scale(float amax) { return amax > 0.f ? amax / 127.0f : 1.0f; }

// The AMX paths: A8 on AMX-INT8 (amx_int8.cpp, TDPBSSD) and A16 on AMX-BF16 (amx_bf16.cpp,
// TDPBF16PS). Built where the compiler has the AMX intrinsics (gcc >= 11 / clang >= 12 on
// x86-64 Linux); elsewhere the entry points are stubs and the *_supported() checks are false.
#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__) && \
    ((defined(__clang__) && __clang_major__ >= 12) || (!defined(__clang__) && __GNUC__ >= 11))
#define ONEBIT_AMX 1
#else
#define ONEBIT_AMX 0
#endif

// Jobs and planes as in LutProblem. Every tile row is 64 bytes: 64 int8 (A8) or 32 bf16 (A16)
// activations of one "chunk" of gathered columns. The activations of each act with AMX jobs
// are tiles act_a[a] = [n_mt][act_cb[a][n_blocks]][rows][64 bytes]: column block b occupies
// chunks act_cb[a][b]..act_cb[a][b+1]-1, zero-padded to whole chunks. A token takes `parts`
// consecutive rows (A16: the bf16 parts hi, mid, lo of x'; A8: 1), amx_tokens_per_tile(parts,
// mb) tokens per m-tile; rows past the last token are zero.
struct AmxProblem {
  int n_tiles;
  int n_blocks;
  int n_acts;
  int n_jobs;                       // the jobs to run on AMX (a subset of the weight's jobs)
  const int32_t* const* act_boff;   // [n_acts] as LutProblem
  const int32_t* const* act_cb;     // [n_acts] -> int32[n_blocks + 1] chunk offsets
  const void* const* act_a;         // [n_acts] activation tiles, nullptr for acts without AMX jobs
  const int32_t* act_parts;         // [n_acts] rows per token
  const int32_t* job_kind;
  const int32_t* job_inv;
  const int32_t* job_act;
  const uint8_t* const* job_b;
  const uint8_t* const* job_g;
  const void* const* job_coef;
  const int32_t* job_coef_f16;
  int mb;                           // tokens
  const float* stok;                // [mb][n_acts] token scales (A8: int8 scale; A16: a power of two)
};

// Tokens per activation m-tile (16 rows at most, a token's parts never straddle two tiles).
inline int amx_tokens_per_tile(int parts, int mb) { return 16 / parts < mb ? 16 / parts : mb; }

// Add the AMX jobs' contribution of tiles [t0, t1) for every token into y[mb][(t1 - t0) * 32].
// Load the tile configuration on entry and release the tiles on exit (call per thread).
void amx_a8_run(const AmxProblem&, int t0, int t1, float* y);
void amx_a16_run(const AmxProblem&, int t0, int t1, float* y);
// A16: split n values of x' (one token of one act) into `parts` bf16 planes out[p][n] of
// x' * 2^s (exact when x' has at most 8 * parts significant bits); returns the token scale 2^-s.
float amx_a16_split(const float* x, int n, int parts, uint16_t* out);
bool amx_built();           // compiled with AMX intrinsics
bool amx_supported();       // A8 path: CPUID AMX-TILE + AMX-INT8 + AVX-512, OS granted XTILEDATA (asks once)
bool amx_bf16_supported();  // A16 path: the same with AMX-BF16

float absmax_scalar(const float*, int);
void quant_a8_scalar(const float*, int, float, int8_t*);
float absmax_avx512(const float*, int);
void quant_a8_avx512(const float*, int, float, int8_t*);
void lut_a16_scalar(const LutProblem&, const LutTokens&, int, int, float*);
void lut_a8_scalar(const LutProblem&, const LutTokens&, int, int, float*);
void table_a16_scalar(const float*, int, float*, float*);
void table_a8_scalar(const int8_t*, int, int16_t*, int16_t*);
void dequant_scalar(const LutProblem&, const DenseActs&, int, int, float*, long, float*);

void lut_a16_avx2(const LutProblem&, const LutTokens&, int, int, float*);
void lut_a8_avx2(const LutProblem&, const LutTokens&, int, int, float*);
void table_a16_avx2(const float*, int, float*, float*);
void table_a8_avx2(const int8_t*, int, int16_t*, int16_t*);
float absmax_avx2(const float*, int);
void quant_a8_avx2(const float*, int, float, int8_t*);
void dequant_avx2(const LutProblem&, const DenseActs&, int, int, float*, long, float*);

void lut_a16_avx512(const LutProblem&, const LutTokens&, int, int, float*);
void lut_a8_avx512(const LutProblem&, const LutTokens&, int, int, float*);
void table_a16_avx512(const float*, int, float*, float*);
void table_a8_avx512(const int8_t*, int, int16_t*, int16_t*);
void dequant_avx512(const LutProblem&, const DenseActs&, int, int, float*, long, float*);

}  // namespace onebit_cpu
