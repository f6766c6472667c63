"""Install layout: lean import, kernels only as onebit.kernels, regular and editable installs."""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_py(code: str, cwd=None, python=sys.executable) -> str:
    res = subprocess.run([python, "-c", code], capture_output=True, text=True, cwd=cwd or "/")
    assert res.returncode == 0, res.stderr
    return res.stdout


def test_import_onebit_is_lean():
    out = run_py(
        "import sys, onebit, onebit.nn, onebit.ops;"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('triton', 'transformers') or m.startswith('onebit._C')];"
        "print(bad)"
    )
    assert out.strip() == "[]"


def test_kernels_import_as_onebit_kernels_only():
    """The install adds no bare `kernels`: one found (Hugging Face's, which transformers >= 5.25
    requires) must come from somewhere else than this repository."""
    out = run_py(
        "import importlib.util, onebit.kernels, os;"
        "print(os.path.realpath(onebit.kernels.__file__));"
        "s = importlib.util.find_spec('kernels');"
        "print(s.origin if s else None)"
    )
    path, bare = out.split()
    assert Path(path).parent.name == "kernels"
    assert bare == "None" or not os.path.realpath(bare).startswith(str(ROOT) + os.sep), bare


def test_repository_root_does_not_shadow_hf_kernels():
    """From the repository root (`python -m pytest`, `python -c`) the root's `kernels/` is on
    sys.path first; `import kernels` must still give Hugging Face's package, or fail like a
    missing package, never this repository's Triton code."""
    out = run_py(
        "import os\n"
        "try:\n"
        "    import kernels\n"
        "    print(os.path.realpath(kernels.__file__))\n"
        "except ModuleNotFoundError:\n"
        "    print('missing')\n"
        "import onebit.kernels.binary_linear\n",
        cwd=ROOT,
    )
    where = out.split()[0]
    assert where == "missing" or not where.startswith(str(ROOT) + os.sep), where


@pytest.mark.slow
def test_regular_install_wheel_and_venv(tmp_path):
    """Build a wheel (what `pip install .` installs) and import it from a fresh venv."""
    env = dict(os.environ, ONEBIT_BUILD_EXT="0")
    wheel_dir = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(wheel_dir), str(ROOT)],
        check=True, capture_output=True, env=env,
    )  # fmt: skip
    wheel = next(wheel_dir.glob("onebit-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "onebit/kernels/__init__.py" in names
    assert not any(n.startswith("kernels/") for n in names), "bare top-level `kernels` would shadow HF kernels"
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    py = venv / "bin" / "python"
    subprocess.run([str(py), "-m", "pip", "install", "--no-deps", "--no-index", str(wheel)], check=True,
                   capture_output=True)  # fmt: skip
    out = run_py("import onebit, onebit.kernels; print(onebit.__file__); print(onebit.kernels.__file__)", python=py)
    assert all(str(venv) in line for line in out.split()), out
