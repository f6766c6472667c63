"""Build script: package layout plus the optional C++/CUDA extension `onebit._C`.

`kernels/` holds the Triton code at the top of the repository but installs as
`onebit.kernels`, never as a bare `kernels` module (that name is Hugging Face's `kernels`
package, which transformers imports when present).

The extension is built only when torch is importable at build time (install with
`--no-build-isolation`) and ONEBIT_BUILD_EXT is not 0; otherwise onebit falls back to
its Triton / pure-torch backends and says so here.
"""

from __future__ import annotations

import os
import sys

from setuptools import find_packages, setup


def ext_modules_and_cmdclass():
    """The C++ CPU extension (and CUDA sources when a CUDA torch + nvcc exist)."""
    mode = os.environ.get("ONEBIT_BUILD_EXT", "auto").lower()
    if mode in ("0", "no", "off", "false"):
        print("onebit: ONEBIT_BUILD_EXT=0, not building onebit._C", file=sys.stderr)
        return [], {}
    try:
        from onebit_build import extension  # noqa: F401  (kept beside setup.py)
    except ImportError:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    try:
        import onebit_build
    except ImportError as e:
        print(f"onebit: no extension build helper ({e}); skipping onebit._C", file=sys.stderr)
        return [], {}
    return onebit_build.extension(mode)


packages = find_packages(include=["onebit", "onebit.*"]) + ["onebit.kernels"]
ext_modules, cmdclass = ext_modules_and_cmdclass()

setup(
    packages=packages,
    package_dir={"onebit.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
