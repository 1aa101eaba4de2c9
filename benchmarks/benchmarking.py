"""Helpers of the benchmark scripts: a steady allocator, a timer, and how busy the machine was while they measured."""

import os
import sys
import time

import torch


# glibc keeps freed memory instead of returning it, like a caching allocator; otherwise every fresh N×K tensor above
# 32 MiB is page-faulted again, which costs more than the matmul that fills it (docs/performance.md#allocator).
TUNED_ALLOCATOR = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736"


def rerun_with_tuned_allocator() -> None:
    """On Linux, re-execute the current script with `GLIBC_TUNABLES=TUNED_ALLOCATOR` (once)."""
    if sys.platform.startswith("linux") and os.environ.get("GLIBC_TUNABLES") != TUNED_ALLOCATOR:
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "GLIBC_TUNABLES": TUNED_ALLOCATOR})


def cpu_clock():
    """(busy CPU seconds of the whole machine, this process's CPU seconds, wall seconds), or None off Linux."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:8]]
    except OSError:
        return None
    busy_jiffies = sum(fields) - fields[3] - fields[4]  # minus idle and iowait
    return busy_jiffies / os.sysconf("SC_CLK_TCK"), time.process_time(), time.perf_counter()


def others_cpu(start, end) -> float:
    """Share of the machine's CPU time that other processes used between two `cpu_clock()` readings."""
    if start is None or end is None:
        return float("nan")
    others = (end[0] - start[0]) - (end[1] - start[1])
    return max(0.0, others / ((os.cpu_count() or 1) * (end[2] - start[2])))


class Timer:
    """Milliseconds of one call: CUDA events on a GPU (no host clock around asynchronous work), else the clock
    (on Apple's MPS, with the queue drained before and after)."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")
        self.mps = device.startswith("mps")  # asynchronous as well: wait for its queue on both sides of the call

    def __call__(self, fn, *args) -> float:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(*args)
            end.record()
            end.synchronize()
            return start.elapsed_time(end)
        if self.mps:
            torch.mps.synchronize()
        started = time.perf_counter()
        fn(*args)
        if self.mps:
            torch.mps.synchronize()
        return (time.perf_counter() - started) * 1e3
