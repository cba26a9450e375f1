"""What the benchmark scripts (scripts/bench_*.py) share: steps timed round-robin, the memory one step needs, the
process's resident set, and the table each writes. A benchmark times our code and its reference side by side in
one process and prints ratios (README "Benchmarks")."""

import csv
import ctypes
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm import tqdm


def sync(device: str | torch.device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def median_times(steps: dict[str, Callable[[], object]], device: str | torch.device, warmup: int, repeats: int,
                 before: Callable[[], None] | None = None, desc: str | None = None) -> dict[str, float]:
    """Median seconds of each step after `warmup` rounds of all of them, timed round-robin: one step of each per
    repeat, so that load drifting on a shared machine hits all of them alike. `before()` runs untimed before
    each timed step (clearing gradients, say); `desc` shows a progress bar over the repeats."""
    for _ in range(warmup):
        for step in steps.values():
            step()
    times: dict[str, list[float]] = {k: [] for k in steps}
    for _ in tqdm(range(repeats), desc=desc, leave=False, disable=desc is None):
        for k, step in steps.items():
            if before is not None:
                before()
            sync(device)
            t0 = time.perf_counter()
            step()
            sync(device)
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def resident_kb(field: str) -> int | None:
    """A field of /proc/self/status in kB (VmRSS: resident now; VmHWM: its peak); None off Linux."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak_resident() -> None:
    """Set the peak resident set (VmHWM) to the current one (Linux), so that what follows has its own peak."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def trim_heap() -> None:
    """Hand the heap's free pages back to the OS (glibc), so that a step's peak resident set counts every page it
    touches: a freed block glibc kept resident would be reused unseen. The allocator's thresholds are left as
    they are, so that steps are timed as a training process runs them."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def step_peak_mb(step: Callable[[], object], device: str | torch.device) -> float | None:
    """Memory one step needs above what is allocated before it: CUDA, the allocator's peak; CPU, the rise of the
    peak resident set (Linux; None elsewhere)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    trim_heap()
    reset_peak_resident()
    base = resident_kb("VmRSS")
    step()
    peak = resident_kb("VmHWM")
    return None if base is None or peak is None else (peak - base) / 2**10


def write_csv(rows: list[dict], path: str | Path) -> Path:
    """The benchmark's table, one row a measurement (columns: the first row's keys)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path
