"""The timing and memory protocol: interleaved groups, warm-up, median of repeats, extrapolated limits."""

import ctypes
import ctypes.util
import os
import statistics
import threading
import time

import torch

from .settings import DEFAULT_MEMORY_EXPONENT, DEFAULT_TIME_EXPONENT, MEMORY_EXPONENT, TIME_EXPONENT, format_length


try:  # glibc's malloc_trim, to measure peak memory through the resident set (see release_memory)
    LIBC = ctypes.CDLL(ctypes.util.find_library("c"))
    LIBC.malloc_trim
except (OSError, AttributeError, TypeError):
    LIBC = None


# ---------------------------------------------------------------------------------------------------------------
# Timing and memory
# ---------------------------------------------------------------------------------------------------------------


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def release_memory():
    """Hand freed memory back to the OS, so that the resident set measures the next call's peak and not what the
    allocator kept from earlier calls. (Tensors are freed by reference counting; no gc.collect() needed.)"""
    if LIBC is not None:
        LIBC.malloc_trim(0)


def keep_freed_memory_mapped():
    """Serve every allocation from glibc's heap and never shrink it automatically.

    By default glibc maps each block above its mmap threshold (at most 32 MiB) fresh from the OS and unmaps it on
    free, so every activation of a long sequence is page-faulted in again at each call: about 15% of a BST-SH or
    sliding-window layer step at 16k on the 2-core machine, and more at 64k. `M_MMAP_MAX = 0` and a high
    `M_TRIM_THRESHOLD` remove that for every model in the run alike (PyTorch's CPU performance guide gets the same
    effect from jemalloc or tcmalloc). `release_memory()` still hands freed memory back between measurements.
    Returns whether glibc accepted the settings.
    """
    if LIBC is None or not hasattr(LIBC, "mallopt"):
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # <malloc.h>
    return bool(LIBC.mallopt(m_mmap_max, 0)) and bool(LIBC.mallopt(m_trim_threshold, 2**31 - 1))


def resident_bytes():
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def available_bytes():
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return None


class PeakMemory:
    """Peak extra memory of the code inside the `with`: CUDA allocator peak on GPU, sampled resident set on CPU."""

    def __init__(self, device, interval=0.01):
        self.device, self.interval = device, interval
        self.peak_bytes = 0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
            return self
        self.start = self.peak = resident_bytes()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.sample, daemon=True)
        self.thread.start()
        return self

    def sample(self):
        while not self.stop.wait(self.interval):
            self.peak = max(self.peak, resident_bytes())

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self.start
            return False
        self.stop.set()
        self.thread.join()
        self.peak_bytes = max(0, max(self.peak, resident_bytes()) - self.start)
        return False


def is_out_of_memory(error):
    return isinstance(error, torch.OutOfMemoryError) or "can't allocate memory" in str(error)


class Runner:
    """Runs measurements under the timing protocol, extrapolates cost from shorter lengths, and records results.

    The things compared in a ratio are measured as one group, round-robin: one timed call of each in turn, repeated.
    On a shared machine the load changes from minute to minute; interleaving spreads that change over all members of
    a group instead of charging it to whichever was measured last.
    """

    def __init__(self, args, progress):
        self.args = args
        self.device = torch.device(args.device)
        self.progress = progress
        self.results = []
        self.history = {}  # (section, name, dtype) -> [(length, seconds per call, peak bytes)]
        self.started = time.perf_counter()

    def estimate(self, section, name, length, dtype):
        """Seconds per call and extra bytes at `length`, extrapolated from the longest shorter measurement."""
        previous = [point for point in self.history.get((section, name, dtype), []) if point[0] < length]
        if not previous:
            return None, None
        known_length, seconds, peak = previous[-1]
        kind = name.split("/")[0]
        scale = length / known_length
        return (
            seconds * scale ** TIME_EXPONENT.get(kind, DEFAULT_TIME_EXPONENT),
            peak * scale ** MEMORY_EXPONENT.get(kind, DEFAULT_MEMORY_EXPONENT),
        )

    def skip_reason(self, section, name, length, dtype, skip_slow=True):
        args = self.args
        est_seconds, est_bytes = self.estimate(section, name, length, dtype)
        memory_limit = args.max_memory_gb * 2**30
        available = available_bytes() if self.device.type == "cpu" else None
        if available is not None:
            memory_limit = min(memory_limit, 0.8 * available)
        if skip_slow and est_seconds is not None and est_seconds > args.max_call_seconds:
            return (
                f"estimated {est_seconds:.0f} s per call (extrapolated from the previous length) exceeds "
                f"--max-call-seconds {args.max_call_seconds:.0f}"
            )
        if est_bytes is not None and est_bytes > memory_limit:
            return (
                f"estimated {est_bytes / 2**30:.1f} GiB of extra memory exceeds the limit of "
                f"{memory_limit / 2**30:.1f} GiB (--max-memory-gb, or 80% of the memory available now)"
            )
        return None

    def measure_group(self, section, length, dtype, calls, extras=None, unit_tokens=None, skip_slow=True, skipped=None):
        """Time each `calls[name]()` (one call = the thing measured), round-robin; returns {name: record}.

        A member whose extrapolated memory (or time, with `skip_slow`) is over the limits is recorded as skipped, as is
        a member named in `skipped` ({name: reason}). Each member gets
        `--warmup` untimed calls (none when one call is expected to take longer than `--seconds-per-point`: the same
        code already ran at the shorter lengths), then at most `--repeats` timed calls, fewer when they would exceed
        `--seconds-per-point` (at least one). The median is reported. With `unit_tokens`, tokens/s = unit_tokens /
        median.
        """
        args = self.args
        records, active = {}, {}
        for name, fn in calls.items():
            records[name] = {"section": section, "name": name, "length": length, "dtype": dtype,
                             **((extras or {}).get(name, {}))}
            reason = (skipped or {}).get(name) or self.skip_reason(section, name, length, dtype, skip_slow)
            if reason:
                records[name]["skipped"] = reason
                self.finish(records[name])
            else:
                active[name] = fn
        times = {name: [] for name in active}
        peaks = {name: 0 for name in active}
        warmups = {}
        for name, fn in list(active.items()):
            est_seconds, _ = self.estimate(section, name, length, dtype)
            warmups[name] = args.warmup if est_seconds is None or est_seconds < args.seconds_per_point else 0
            self.progress.set_description(f"{section} {name} {format_length(length)} warm-up")
            try:
                for index in range(warmups[name]):
                    if index == 0:
                        release_memory()
                    with PeakMemory(self.device) as memory:
                        fn()
                        synchronize(self.device)
                    peaks[name] = max(peaks[name], memory.peak_bytes)
            except RuntimeError as error:
                self.skip_out_of_memory(error, records[name], active, name)
        while active:
            for name, fn in list(active.items()):
                self.progress.set_description(f"{section} {name} {format_length(length)} run {len(times[name]) + 1}")
                try:
                    # The first call of a member starts from trimmed memory, so that its peak is seen; later calls
                    # reuse what the allocator kept (trimming before every call would add page faults to the time).
                    if not times[name] and not warmups[name]:
                        release_memory()
                    with PeakMemory(self.device) as memory:
                        synchronize(self.device)
                        start = time.perf_counter()
                        fn()
                        synchronize(self.device)
                        times[name].append(time.perf_counter() - start)
                except RuntimeError as error:
                    self.skip_out_of_memory(error, records[name], active, name)
                    continue
                peaks[name] = max(peaks[name], memory.peak_bytes)
                spent = sum(times[name])
                if len(times[name]) >= args.repeats or spent + spent / len(times[name]) > args.seconds_per_point:
                    del active[name]
                    record = records[name]
                    median = statistics.median(times[name])
                    record.update(seconds=median, min_seconds=min(times[name]), times=times[name],
                                  warmup=warmups[name], repeats=len(times[name]), peak_memory_bytes=peaks[name])
                    if unit_tokens is not None:
                        record["tokens_per_second"] = unit_tokens / median
                    self.history.setdefault((section, name, dtype), []).append((length, median, peaks[name]))
                    self.finish(record)
        return records

    def skip_out_of_memory(self, error, record, active, name):
        """Records an out-of-memory member as skipped and drops it from `active`; any other error propagates."""
        if not is_out_of_memory(error):
            raise error
        record["skipped"] = f"out of memory: {str(error).splitlines()[0]}"
        self.finish(record)
        del active[name]

    def finish(self, record):
        # The machine may be shared: keep the load next to each number so that noisy points can be recognised.
        record["load_average_1min"] = round(os.getloadavg()[0], 2)
        self.results.append(record)
        self.progress.update(1)
        if "skipped" in record:
            message = f"skipped: {record['skipped']}"
        else:
            message = f"{record['seconds'] * 1e3:10.1f} ms  (median of {record['repeats']})"
        self.progress.write(
            f"[{time.perf_counter() - self.started:6.0f}s] {record['section']:<8} {record['name']:<26} "
            f"{format_length(record['length']):>5} {record['dtype']:<8} {message}"
        )


def autocast_context(device, dtype):
    if dtype == "float32":
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=torch.bfloat16)
