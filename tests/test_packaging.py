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
    out = run_py(
        "import importlib.util, onebit.kernels, os;"
        "print(os.path.realpath(onebit.kernels.__file__));"
        "print(importlib.util.find_spec('kernels') is None)"
    )
    path, no_bare = out.split()
    assert Path(path).parent.name == "kernels"
    assert no_bare == "True"


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
