"""Shared benchmark plumbing: timing with median and spread, run metadata, result files.

CPU timings are wall-clock medians over repeated calls (weights hot in cache after the
warm-up; the machines are shared, so medians and p10/p90 are reported, never means), taken
round robin when several functions are compared (time_cpu_interleaved).
CUDA timings use triton.testing.do_bench, which flushes L2 between calls, with quantiles.
"""

from __future__ import annotations

import csv
import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import time
from typing import Any, Callable

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")


def _stats(ts: list[float]) -> dict:
    ts = sorted(ts)
    q = lambda f: ts[min(len(ts) - 1, int(f * len(ts)))]  # noqa: E731
    return {
        "median_us": statistics.median(ts) * 1e6,
        "p10_us": q(0.1) * 1e6,
        "p90_us": q(0.9) * 1e6,
        "min_us": ts[0] * 1e6,
        "n": len(ts),
    }


def _samples(fn: Callable[[], Any], reps: int, min_time_s: float, max_time_s: float,
             before: Callable[[], Any] | None = None) -> list[float]:
    ts: list[float] = []
    t_start = time.perf_counter()
    while len(ts) < reps or (time.perf_counter() - t_start < min_time_s and len(ts) < 10 * reps):
        if before is not None:
            before()
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
        if time.perf_counter() - t_start > max_time_s and len(ts) >= 5:
            break
    return ts


def time_cpu(fn: Callable[[], Any], warmup: int = 3, reps: int = 30, min_time_s: float = 0.2, max_time_s: float = 5.0) -> dict:
    """Median / p10 / p90 / min wall time of fn() in microseconds."""
    for _ in range(warmup):
        fn()
    return _stats(_samples(fn, reps, min_time_s, max_time_s))


def time_cpu_interleaved(fns: dict[str, Callable[[], Any]], rounds: int = 5, warmup: int = 3, reps: int = 30,
                         min_time_s: float = 0.2, max_time_s: float = 5.0,
                         before: Callable[[], Any] | None = None) -> dict[str, dict]:
    """time_cpu of several functions compared with each other, in `rounds` round-robin slices.

    The project's CPU machines are shared virtual machines whose speed changes for seconds at a
    time; timing one function after the other lets such a phase land on one of them only and
    skew the ratios. Interleaving spreads it over all; each gets the same budget as time_cpu.
    `before` runs untimed ahead of every timed call (e.g. evict_caches).
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    per = max(1, -(-reps // rounds))
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            samples[k] += _samples(fn, per, min_time_s / rounds, max_time_s / rounds, before)
    return {k: _stats(v) for k, v in samples.items()}


class CacheEvictor:
    """evict() writes a buffer of twice the last-level cache, so the next call reads its weights
    from DRAM as it would inside a model, where other layers run between two of its calls."""

    def __init__(self, nbytes: int = 128 << 20):
        self.buf = torch.zeros(nbytes // 4)

    def __call__(self) -> None:
        self.buf.add_(1.0)


def time_cuda(fn: Callable[[], Any], reps_ms: int = 100) -> dict:
    """triton.testing.do_bench (flushes L2 between calls): median and p20/p80 in microseconds."""
    import triton.testing

    med, p20, p80, mn = triton.testing.do_bench(fn, rep=reps_ms, quantiles=[0.5, 0.2, 0.8, 0.0])
    return {"median_us": med * 1e3, "p10_us": p20 * 1e3, "p90_us": p80 * 1e3, "min_us": mn * 1e3, "n": -1}


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()} x{os.cpu_count()}"
    except OSError:
        pass
    return platform.processor() or "cpu"


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def metadata(device: str, **extra: Any) -> dict:
    meta = {
        "device": device,
        "device_name": device_name(device),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "git_commit": git_commit(),
        "date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    try:
        import onebit

        meta["onebit"] = onebit.__version__
    except ImportError:
        pass
    if device == "cpu":
        try:
            from onebit.backends import cpu as cpu_backend

            meta["cpu_isas"] = cpu_backend.supported_isas()
        except ImportError:
            pass
    try:
        import triton

        meta["triton"] = triton.__version__
    except ImportError:
        pass
    meta.update(extra)
    return meta


def write_results(name: str, meta: dict, rows: list[dict], out_dir: str = RESULTS) -> tuple[str, str]:
    """Write <name>.json (metadata + rows) and <name>.csv (rows); returns both paths."""
    os.makedirs(out_dir, exist_ok=True)
    jpath, cpath = os.path.join(out_dir, f"{name}.json"), os.path.join(out_dir, f"{name}.csv")
    with open(jpath, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    with open(cpath, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    return jpath, cpath


def merge_previous(name: str, meta: dict, rows: list[dict], append: bool, out_dir: str = RESULTS) -> tuple[dict, list[dict]]:
    """With append, prepend the rows of the existing results file and record this run's meta under 'appended'."""
    old = os.path.join(out_dir, f"{name}.json")
    if not (append and os.path.exists(old)):
        return meta, rows
    with open(old) as f:
        prev = json.load(f)
    return {**prev["meta"], "appended": prev["meta"].get("appended", []) + [meta]}, prev["rows"] + rows
