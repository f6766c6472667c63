"""GPU code is compiled in CI even without a GPU.

* Every Triton kernel of onebit.kernels is compiled for sm_90 and sm_80 with
  `triton.compile(ASTSource(...), target=GPUTarget(...))` (in a subprocess: the test
  process runs Triton in interpreter mode, where kernels are not compilable JIT functions);
  PTX and cubin must come out, the popcount kernel must use `popc` and the fp16/bf16 GEMM
  tensor-core MMA. Every config of every kernel's CONFIGS list is compiled for sm_90.
* Every csrc/cuda/*.cu is compiled with nvcc for sm_80 and sm_90 (with and without
  --use_fast_math, as the extension build uses it).
* The CUDA core's per-row math (__host__ __device__ functions of binary_linear_core.cuh)
  is compiled by nvcc for the host and run on the CPU against onebit.reference.
* The torch binding (binary_linear_torch.cpp) is syntax-checked with the host compiler
  against the CPU torch's headers (one generated CUDA header stubbed).
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch
from helpers import LAYOUTS, random_packed
from tolerances import assert_close

from onebit.reference import binary_linear_ref

ROOT = Path(__file__).resolve().parents[1]
CUDA_DIR = ROOT / "csrc" / "cuda"
ARCHS = (90, 80)
NVCC = shutil.which("nvcc")

# ------------------------------------------------------------------------------- Triton

# The worker runs in a fresh interpreter without TRITON_INTERPRET and prints one JSON list.
_WORKER = r"""
import json, sys, torch, triton
sys.path.insert(0, sys.argv[1])
from helpers import LAYOUTS, random_packed
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from onebit.kernels import binary_gemm, binary_gemv, binary_popcount, gram
from onebit.kernels._common import TRITON_DTYPE, repack_for_binary_linear

def signature(kernel, args, consts):
    sig, it = {}, iter(args)
    for name in kernel.arg_names:
        if name in consts:
            sig[name] = "constexpr"
            continue
        a = next(it)
        sig[name] = "*" + TRITON_DTYPE[a.dtype] if isinstance(a, torch.Tensor) else "i32"
    return sig

def compile_one(kernel, args, consts, cfg, arch):
    consts = dict(consts, **{k: v for k, v in cfg.items() if k not in ("num_warps", "num_stages")})
    opts = {k: cfg[k] for k in ("num_warps", "num_stages") if k in cfg}
    c = triton.compile(ASTSource(fn=kernel, signature=signature(kernel, args, consts), constexprs=consts),
                       target=GPUTarget("cuda", arch, 32), options=opts)
    ptx = c.asm.get("ptx", "")
    return {"ptx_len": len(ptx), "cubin_len": len(c.asm.get("cubin", b"")), "target": f"sm_{arch}" in ptx,
            "popc": "popc" in ptx, "mma": "mma" in ptx, "tf32": "tf32" in ptx, "shared": c.metadata.shared}

def cases(arch, all_configs):
    out = []
    for layout, dtypes in (("single", (torch.float16, torch.float32)), ("cgb", (torch.bfloat16,)), ("mean", (torch.float16,))):
        kw = repack_for_binary_linear(random_packed(45, 300, LAYOUTS[layout], 128))
        for dt in dtypes:
            x = torch.zeros(4, 300, dtype=dt)
            y = torch.zeros(4, 45)
            args, meta = binary_gemv.kernel_args(x, kw, y)
            out.append((f"gemv-{layout}-{dt}", binary_gemv._binary_gemv_kernel, args, meta, binary_gemv.CONFIGS[0]))
            args, meta = binary_gemm.kernel_args(x, kw, y, dot_fp32=dt == torch.float32)
            out.append((f"gemm-{layout}-{dt}", binary_gemm._binary_gemm_kernel, args, meta, binary_gemm.CONFIGS[1]))
        planes = torch.zeros(kw.n_terms, 4, 8, kw.k_pad // 32, dtype=torch.int32)
        a_scale = torch.zeros(kw.n_terms, 4)
        args, meta = binary_popcount.kernel_args(planes, a_scale, kw, y, use_popc=True)
        out.append((f"popcount-{layout}", binary_popcount._binary_popcount_kernel, args, meta, binary_popcount.CONFIGS[2]))
    q = torch.zeros(6, 320, dtype=torch.int8)
    pl = torch.zeros(6, 8, 10, dtype=torch.int32)
    out.append(("act_planes", binary_popcount._act_planes_kernel, [q, pl, 6, 10, 320, 80, 10], {},
                binary_popcount.PLANES_CONFIG))
    sq = torch.zeros(70, 70)
    for has_s in (True, False):
        args, meta = gram.kernel_args(torch.zeros(33, 70), torch.zeros(33, 70) if has_s else None, sq,
                                      sq if has_s else None, 0.5)
        out.append((f"gram-s{int(has_s)}", gram._gram_kernel, args, meta, gram.CONFIGS[1]))
    if all_configs:
        for i, cfg in enumerate(gram.CONFIGS):
            args, meta = gram.kernel_args(torch.zeros(33, 70, dtype=torch.bfloat16), torch.zeros(33, 70), sq, sq, 1.0)
            out.append((f"gram-config{i}", gram._gram_kernel, args, meta, cfg))
        kw = repack_for_binary_linear(random_packed(45, 300, LAYOUTS["single"], 128))
        x = torch.zeros(4, 300, dtype=torch.float16)
        y = torch.zeros(4, 45)
        for i, cfg in enumerate(binary_gemv.CONFIGS):
            args, meta = binary_gemv.kernel_args(x, kw, y)
            out.append((f"gemv-config{i}", binary_gemv._binary_gemv_kernel, args, meta, cfg))
        for i, cfg in enumerate(binary_gemm.CONFIGS):
            args, meta = binary_gemm.kernel_args(x, kw, y, dot_fp32=False)
            out.append((f"gemm-config{i}", binary_gemm._binary_gemm_kernel, args, meta, cfg))
        planes = torch.zeros(1, 4, 8, kw.k_pad // 32, dtype=torch.int32)
        for i, cfg in enumerate(binary_popcount.CONFIGS):
            args, meta = binary_popcount.kernel_args(planes, torch.zeros(1, 4), kw, y, use_popc=True)
            out.append((f"popcount-config{i}", binary_popcount._binary_popcount_kernel, args, meta, cfg))
    return out

arch, all_configs = int(sys.argv[2]), sys.argv[3] == "1"
results = []
for name, kernel, args, meta, cfg in cases(arch, all_configs):
    try:
        results.append(dict(name=name, ok=True, **compile_one(kernel, args, meta, cfg, arch)))
    except Exception as e:  # report every failure, not only the first
        results.append({"name": name, "ok": False, "error": f"{type(e).__name__}: {str(e)[-2000:]}"})
print("@@RESULTS@@" + json.dumps(results))
"""


def _start_worker(arch: int, all_configs: bool) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    return subprocess.Popen(
        [sys.executable, "-c", _WORKER, str(Path(__file__).parent), str(arch), "1" if all_configs else "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=ROOT,
    )


def _collect(proc: subprocess.Popen) -> list[dict]:
    out, err = proc.communicate(timeout=900)
    marker = "@@RESULTS@@"
    if proc.returncode != 0 or marker not in out:
        raise AssertionError(f"Triton compile worker failed (rc={proc.returncode}):\n{err[-4000:]}")
    return json.loads(out.split(marker, 1)[1])


@pytest.fixture(scope="module")
def triton_results():
    pytest.importorskip("triton")
    procs = {arch: _start_worker(arch, all_configs=arch == 90) for arch in ARCHS}  # one per arch, in parallel
    return {arch: _collect(p) for arch, p in procs.items()}


@pytest.mark.parametrize("arch", ARCHS)
def test_triton_kernels_compile(triton_results, arch):
    res = triton_results[arch]
    failed = [r for r in res if not r["ok"]]
    assert not failed, "\n".join(f"{r['name']}: {r['error']}" for r in failed)
    names = {r["name"] for r in res}
    for fam in ("gemv", "gemm", "popcount", "gram"):
        assert any(n.startswith(fam) for n in names), f"no {fam} kernel was compiled"
    for r in res:
        assert r["ptx_len"] > 0 and r["cubin_len"] > 0 and r["target"], r
        if r["name"].startswith("popcount"):
            assert r["popc"], f"{r['name']}: no popc instruction in the PTX"
        if r["name"].startswith("gemm") and "float32" not in r["name"]:
            assert r["mma"], f"{r['name']}: the fp16/bf16 GEMM does not use tensor-core MMA"
        if r["name"].startswith("gram"):
            assert not r["tf32"], f"{r['name']}: the Gram kernel must not use TF32"
    if arch == 90:
        from onebit.kernels import binary_gemm, binary_gemv, binary_popcount, gram

        mods = (("gemv", binary_gemv), ("gemm", binary_gemm), ("popcount", binary_popcount), ("gram", gram))
        for fam, mod in mods:
            n = sum(r["name"].startswith(f"{fam}-config") for r in res)
            assert n == len(mod.CONFIGS), f"only {n} of {len(mod.CONFIGS)} {fam} configs compiled"


# ------------------------------------------------------------------------------- nvcc


def _cu_sources() -> list[Path]:
    return sorted(CUDA_DIR.glob("*.cu"))


requires_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH")


@requires_nvcc
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("fast_math", [False, True], ids=["ieee", "fast_math"])
def test_cuda_sources_compile(arch, fast_math, tmp_path):
    srcs = _cu_sources()
    assert srcs, "csrc/cuda has no .cu sources"
    for src in srcs:
        out = tmp_path / (src.stem + ".o")
        cmd = [NVCC, "-std=c++17", "-O3", f"-arch=sm_{arch}", "-Xptxas", "-v", "-c", str(src), "-o", str(out)]
        cmd += ["--use_fast_math"] if fast_math else []
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
        assert proc.returncode == 0, f"nvcc failed for {src.name} sm_{arch}:\n{proc.stderr[-4000:]}"
        assert out.stat().st_size > 0
        assert "warning" not in proc.stderr.lower().replace("ptxas info", ""), proc.stderr[-4000:]


# A host program around the CUDA core: reads one case, runs the same per-row functions the
# kernels run (one "lane" covering all words), writes y. Exercises indexing, term/selector
# handling, scale dtypes, the A8 quantizer and the popcount identity on the CPU.
_HARNESS = r"""
#include <cstdio>
#include <cstdlib>
#include <vector>
#include "binary_linear_core.cuh"
using namespace onebit;

template <typename T> static void run(const BinaryLinearParams& p, const void* xraw, int m, int act_bits, float* y) {
  const T* x = static_cast<const T*>(xraw);
  if (act_bits == 16) {
    std::vector<float> xs((size_t)p.n_terms * m * p.k_pad);
    for (int t = 0; t < p.n_terms; ++t)
      for (int i = 0; i < m; ++i)
        for (int k = 0; k < p.k_pad; ++k) xs[((size_t)t * m + i) * p.k_pad + k] = fold_in_scale<T>(p, x, p.k, t, i, k);
    for (int m0 = 0; m0 < m; m0 += kMaxM) {
      const int mc = m - m0 < kMaxM ? m - m0 : kMaxM;
      for (int row = 0; row < p.n; ++row) {
        float acc[kMaxM] = {0.f};
        for (int ww = 0; ww < p.kw; ++ww) {  // what the warp does, one lane at a time
          uint32_t words[kMaxPlanes] = {0u};
          for (int q = 0; q < p.n_planes; ++q) words[q] = (uint32_t)p.signs[((size_t)q * p.n + row) * p.kw + ww];
          const uint32_t g = p.groups ? (uint32_t)p.groups[(size_t)row * p.kw + ww] : 0u;
          for (int lane = 0; lane < 32; ++lane)
            a16_lane_update<kMaxM>(p, xs.data() + (size_t)m0 * p.k_pad, m, mc, row, ww, lane, words, g, acc);
        }
        for (int i = 0; i < mc; ++i) y[(size_t)(m0 + i) * p.n + row] = acc[i];
      }
    }
    return;
  }
  std::vector<int32_t> planes((size_t)p.n_terms * m * kActPlanes * p.kw, 0);
  std::vector<float> a_scale((size_t)p.n_terms * m);
  for (int t = 0; t < p.n_terms; ++t)
    for (int i = 0; i < m; ++i) {
      float amax = 0.f;
      for (int k = 0; k < p.k_pad; ++k) amax = fmaxf(amax, fabsf(fold_in_scale<T>(p, x, p.k, t, i, k)));
      const float s = act_scale_from_amax(amax);
      a_scale[(size_t)t * m + i] = s;
      int32_t* out = planes.data() + ((size_t)t * m + i) * kActPlanes * p.kw;
      for (int k = 0; k < p.k_pad; ++k) {
        const int q = quantize_int8(fold_in_scale<T>(p, x, p.k, t, i, k), s);
        for (int b = 0; b < kActPlanes; ++b)
          if ((q >> b) & 1) out[(size_t)b * p.kw + k / 32] |= (int32_t)(1u << (k % 32));
      }
    }
  for (int i = 0; i < m; ++i)
    for (int row = 0; row < p.n; ++row) {
      float acc = 0.f;
      for (int t = 0; t < p.n_terms; ++t) {
        const size_t tm = (size_t)t * m + i;
        acc += a_scale[tm] * a8_row_term_partial(p, planes.data() + tm * kActPlanes * p.kw, t, row, 0, 1);
      }
      y[(size_t)i * p.n + row] = acc;
    }
}

static std::vector<char> slurp(FILE* f, size_t n) { std::vector<char> v(n); if (n && fread(v.data(), 1, n, f) != n) exit(3); return v; }

int main(int argc, char** argv) {
  FILE* f = fopen(argv[1], "rb");
  int h[14];
  if (fread(h, sizeof(int), 14, f) != 14) return 2;
  BinaryLinearParams p{};
  p.n = h[0]; p.k = h[1]; p.k_pad = h[2]; p.kw = h[3]; p.block_size = h[4]; p.n_blocks = h[5]; p.n_terms = h[6];
  p.n_planes = h[7];
  const int n_planes = h[7], has_groups = h[8], has_mean = h[9], scale_bytes = h[11], x_dtype = h[12], m = h[13];
  p.scale_dtype = h[10];
  if (fread(p.term_plane, sizeof(int), kMaxTerms, f) != kMaxTerms) return 2;
  if (fread(p.term_select, sizeof(int), kMaxTerms, f) != kMaxTerms) return 2;
  int act_bits; if (fread(&act_bits, sizeof(int), 1, f) != 1) return 2;
  auto signs = slurp(f, (size_t)n_planes * p.n * p.kw * 4);
  auto groups = slurp(f, has_groups ? (size_t)p.n * p.kw * 4 : 0);
  const size_t ns = (size_t)p.n_terms * p.n * p.n_blocks;
  auto out_scale = slurp(f, ns * scale_bytes);
  auto in_scale = slurp(f, (size_t)p.n_terms * p.k_pad * scale_bytes);
  auto mean = slurp(f, has_mean ? ns * scale_bytes : 0);
  const int xb = x_dtype == kFloat32 ? 4 : 2;
  auto x = slurp(f, (size_t)m * p.k * xb);
  fclose(f);
  p.signs = (const int32_t*)signs.data(); p.groups = has_groups ? (const int32_t*)groups.data() : nullptr;
  p.out_scale = out_scale.data(); p.in_scale = in_scale.data(); p.mean = has_mean ? mean.data() : nullptr;
  std::vector<float> y((size_t)m * p.n);
  if (x_dtype == kFloat32) run<float>(p, x.data(), m, act_bits, y.data());
  else if (x_dtype == kFloat16) run<__half>(p, x.data(), m, act_bits, y.data());
  else run<__nv_bfloat16>(p, x.data(), m, act_bits, y.data());
  FILE* o = fopen(argv[2], "wb"); fwrite(y.data(), 4, y.size(), o); fclose(o);
  return 0;
}
"""

_DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    if NVCC is None:
        pytest.skip("nvcc is not on PATH")
    d = tmp_path_factory.mktemp("cuda_host")
    (d / "harness.cu").write_text(_HARNESS)
    exe = d / "harness"
    proc = subprocess.run(
        [NVCC, "-std=c++17", "-O1", "-I", str(CUDA_DIR), str(d / "harness.cu"), "-o", str(exe)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, f"nvcc failed to build the host harness:\n{proc.stderr[-4000:]}"
    return exe


def _raw(t: torch.Tensor) -> bytes:
    t = t.contiguous().cpu()
    if t.dtype in (torch.float16, torch.bfloat16):
        return t.view(torch.int16).numpy().tobytes()
    return t.numpy().tobytes()


def _run_harness(exe: Path, x: torch.Tensor, p, act_bits: int, tmp: Path) -> torch.Tensor:
    terms = p.layout.terms
    planes = [t.plane for t in terms] + [0] * (16 - len(terms))
    selects = [int(t.select) for t in terms] + [0] * (16 - len(terms))
    head = [p.out_features, p.in_features, p.k_pad, p.k_pad // 32, p.block_size, p.n_blocks, len(terms),
            p.layout.n_planes, int(p.groups is not None), int(p.mean is not None), _DTYPE_CODE[p.out_scale.dtype],
            p.out_scale.element_size(), _DTYPE_CODE[x.dtype], x.shape[0]]  # fmt: skip
    blob = struct.pack(f"{14 + 32 + 1}i", *head, *planes, *selects, act_bits)
    blob += _raw(p.signs) + (_raw(p.groups) if p.groups is not None else b"")
    blob += _raw(p.out_scale) + _raw(p.in_scale) + (_raw(p.mean) if p.mean is not None else b"") + _raw(x)
    (tmp / "in.bin").write_bytes(blob)
    proc = subprocess.run(
        [str(exe), str(tmp / "in.bin"), str(tmp / "out.bin")], capture_output=True, timeout=120, check=False
    )
    assert proc.returncode == 0, proc.stderr
    y = torch.frombuffer(bytearray((tmp / "out.bin").read_bytes()), dtype=torch.float32)
    return y.reshape(x.shape[0], p.out_features)


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("act_bits", [16, 8])
@pytest.mark.parametrize("dtype,scale_dtype,m", [(torch.float32, "float32", 1), (torch.float16, "float16", 3),
                                                 (torch.bfloat16, "bfloat16", 11)])  # fmt: skip
def test_cuda_core_on_host_matches_reference(harness, tmp_path, layout, act_bits, dtype, scale_dtype, m):
    p = random_packed(37, 200, LAYOUTS[layout], 64, seed=m, scale_dtype=scale_dtype)
    x = torch.randn(m, 200, generator=torch.Generator().manual_seed(m)).to(dtype)
    y = _run_harness(harness, x, p, act_bits, tmp_path)
    assert_close(y, binary_linear_ref(x, p, act_bits=act_bits), dtype=torch.float32, what=f"cuda core {layout}")


# ------------------------------------------------------------------------------- binding


def test_torch_binding_syntax(tmp_path):
    """The .cpp binding parses and type-checks against torch's headers (CUDA torch headers minus one generated file)."""
    cxx = shutil.which("g++") or shutil.which("c++")
    tinc = Path(torch.__file__).parent / "include"
    homes = [os.environ.get("CUDA_HOME"), "/usr/local/cuda", Path(NVCC).resolve().parents[1] if NVCC else None]
    incs = [Path(h) / "include" for h in homes if h]
    cuda_inc = next((i for i in incs if (i / "cuda_runtime_api.h").exists()), None)
    if cxx is None or cuda_inc is None:
        pytest.skip("needs a host C++ compiler and the CUDA headers")
    if not (tinc / "c10" / "cuda" / "CUDAGuard.h").exists():
        pytest.skip("this torch build ships no c10/cuda headers")
    stub = tmp_path / "c10" / "cuda" / "impl"
    stub.mkdir(parents=True)
    (stub / "cuda_cmake_macros.h").write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    for cpp in sorted(CUDA_DIR.glob("*.cpp")):
        cmd = [cxx, "-std=c++17", "-fsyntax-only", "-DTORCH_EXTENSION_NAME=_C_cuda", f"-I{tmp_path}", f"-I{tinc}",
               f"-I{tinc / 'torch' / 'csrc' / 'api' / 'include'}", f"-I{sysconfig.get_paths()['include']}",
               f"-I{cuda_inc}", f"-I{CUDA_DIR}", str(cpp)]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
        assert proc.returncode == 0, f"{cpp.name}:\n{proc.stderr[-4000:]}"


# ------------------------------------------------------------------------------- CUDA backend


def test_cuda_backend_explains_when_unavailable():
    from onebit.backends import cuda as cuda_backend

    ok, why = cuda_backend.available("cpu")
    assert not ok and "CUDA tensors" in why
    ok, why = cuda_backend.available("cuda")
    if not ok:
        assert why  # CPU-only torch / no device / extension not built, each named
        if cuda_backend._extension() is None:
            with pytest.raises(RuntimeError):
                cuda_backend.binary_linear(torch.zeros(1, 8), random_packed(4, 8, LAYOUTS["single"], 32), 16)


def _cuda_backend_or_skip():
    from onebit.backends import cuda as cuda_backend

    ok, why = cuda_backend.available("cuda")
    if not ok:
        pytest.skip(why)
    return cuda_backend


@pytest.mark.requires_cuda
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("act_bits", [16, 8])
@pytest.mark.parametrize("m", [1, 2, 3, 7, 16, 33])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_cuda_backend_matches_reference(layout, act_bits, m, dtype):
    cuda_backend = _cuda_backend_or_skip()
    p = random_packed(45, 300, LAYOUTS[layout], 128, seed=m, scale_dtype="float16").to("cuda")
    x = torch.randn(m, 300, generator=torch.Generator().manual_seed(m)).to(dtype).cuda()
    y = cuda_backend.binary_linear(x, p, act_bits)
    # Large A16 batches go to the Triton tensor-core GEMM, which rounds +-in_scale to x's dtype.
    big = act_bits == 16 and m > cuda_backend.GEMM_MIN_M and dtype != torch.float32
    tol = dtype if big else torch.float32
    assert_close(y, binary_linear_ref(x, p, act_bits=act_bits), dtype=tol, what=f"cuda {layout} M={m}")
