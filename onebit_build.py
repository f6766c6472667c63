"""Extension build helper for setup.py: `extension(mode) -> (ext_modules, cmdclass)`.

* `onebit._C` (CPU): a torch CppExtension from csrc/cpu/*.cpp, built whenever torch is
  importable at build time (install with `pip install --no-build-isolation`). Compiled at
  -O3 without -march=native: the AVX2 / AVX-512 kernels carry `#pragma GCC target` and are
  chosen at run time, so the binary runs on any x86-64 CPU. Threads come from
  at::parallel_for (OpenMP in the stock torch build).
* `onebit._C_cuda`: a CUDAExtension from csrc/cuda/*.cu + csrc/cuda/*.cpp, only when torch
  has CUDA, nvcc is found and that directory has sources.

mode is ONEBIT_BUILD_EXT: "auto" (default) builds what it can and prints why it skips the
rest; "1"/"on" makes a missing prerequisite for the CPU extension an error.
ONEBIT_BUILD_CUDA=0 turns the CUDA extension off.
"""

from __future__ import annotations

import glob
import os
import platform
import shutil
import sys

ROOT = os.path.dirname(os.path.abspath(__file__))
CPU_FLAGS = ["-O3", "-std=c++20", "-fvisibility=hidden", "-Wall", "-Wno-unused-function", "-Wno-maybe-uninitialized"]


def _say(msg: str) -> None:
    print(f"onebit: {msg}", file=sys.stderr)


def _rel(paths: list[str]) -> list[str]:
    # setuptools wants sources relative to setup.py's directory.
    return sorted(os.path.relpath(p, ROOT) for p in paths)


def _cuda_extension(torch_mod, cpp_extension):
    if os.environ.get("ONEBIT_BUILD_CUDA", "auto").lower() in ("0", "no", "off", "false"):
        _say("ONEBIT_BUILD_CUDA=0, not building onebit._C_cuda")
        return None
    sources = glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")) + glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cpp"))
    if not sources:
        _say("csrc/cuda has no sources; not building onebit._C_cuda")
        return None
    if torch_mod.version.cuda is None:
        _say(f"torch {torch_mod.__version__} has no CUDA; not building onebit._C_cuda")
        return None
    nvcc = os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc") if cpp_extension.CUDA_HOME else shutil.which("nvcc")
    if not nvcc or not os.path.exists(nvcc):
        _say("nvcc not found (set CUDA_HOME); not building onebit._C_cuda")
        return None
    return cpp_extension.CUDAExtension(
        name="onebit._C_cuda",
        sources=_rel(sources),
        include_dirs=[os.path.join(ROOT, "csrc", "cuda")],
        extra_compile_args={"cxx": ["-O3", "-std=c++17"], "nvcc": ["-O3", "-std=c++17", "-lineinfo"]},
    )


def extension(mode: str = "auto"):
    """Return (ext_modules, cmdclass) for setup(); empty when the extension cannot be built."""
    required = mode in ("1", "on", "yes", "true", "force")
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError as e:
        msg = (
            f"torch is not importable at build time ({e}); onebit._C is not built and the CPU "
            "backend falls back to torch. Install with `pip install --no-build-isolation`."
        )
        if required:
            raise RuntimeError(msg) from None
        _say(msg)
        return [], {}
    sources = glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp"))
    if platform.machine().lower() not in ("x86_64", "amd64", "i686", "i386", "x86"):
        # AVX2/AVX-512 kernels are x86 code; elsewhere only the portable scalar path is built.
        sources = [s for s in sources if not os.path.basename(s).startswith("lut_avx")]
    if not sources:
        msg = "csrc/cpu has no sources; onebit._C is not built"
        if required:
            raise RuntimeError(msg)
        _say(msg)
        return [], {}
    ext_modules = [
        cpp_extension.CppExtension(
            name="onebit._C",
            sources=_rel(sources),
            include_dirs=[os.path.join(ROOT, "csrc", "cpu")],
            extra_compile_args={"cxx": CPU_FLAGS + ["-fopenmp"]},
            extra_link_args=["-fopenmp"],
        )
    ]
    _say(f"building onebit._C from {len(sources)} C++ sources against torch {torch.__version__}")
    cuda = _cuda_extension(torch, cpp_extension)
    if cuda is not None:
        ext_modules.append(cuda)
        _say("building onebit._C_cuda")
    use_ninja = shutil.which("ninja") is not None
    if not use_ninja:
        _say("ninja not found; compiling the extension without it (slower, serial)")
    build_ext = cpp_extension.BuildExtension.with_options(use_ninja=use_ninja)
    return ext_modules, {"build_ext": build_ext}
