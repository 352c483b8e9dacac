"""Machine-load and memory probes shared by the PyTorch benchmark scripts (Linux /proc;
they degrade to None elsewhere). Standard library only."""

from __future__ import annotations

import os
import statistics
import time


def process_peak_mib(maxrss_mib: float) -> float:
    """The process's peak: the largest per-measurement peak, ru_maxrss or the current VmHWM."""
    return max(maxrss_mib, PEAK_SEEN_MIB, peak_rss_mib() or 0.0)


def proc_stat() -> tuple[float, float] | None:
    """(busy, steal) jiffies of the whole machine since boot."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return float(user + nice + system + irq + softirq), float(steal)


def reset_peak_rss() -> bool:
    # Writing 5 to clear_refs resets VmHWM to the current RSS (Linux >= 4.0), which lets one
    # process report a separate peak for each measurement.
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_mib() -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except (OSError, ValueError):
        pass
    return None


class Probe:
    """Wall time, own CPU time and the machine's other load over a span of timed reps."""

    def __init__(self) -> None:
        self.hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self.ncpu = os.cpu_count() or 1
        self.wall = 0.0
        self.cpu = 0.0
        self.busy = 0.0
        self.steal = 0.0
        self.have_stat = True

    def span(self):
        probe = self

        class _Span:
            def __enter__(self):
                self.s0 = proc_stat()
                self.c0 = time.process_time()
                self.t0 = time.perf_counter()
                return self

            def __exit__(self, *exc):
                self.dt = time.perf_counter() - self.t0
                dc = time.process_time() - self.c0
                s1 = proc_stat()
                probe.wall += self.dt
                probe.cpu += dc
                if self.s0 is None or s1 is None:
                    probe.have_stat = False
                else:
                    probe.busy += (s1[0] - self.s0[0]) / probe.hz
                    probe.steal += (s1[1] - self.s0[1]) / probe.hz
                return False

        return _Span()

    def fields(self) -> dict:
        wall = max(self.wall, 1e-9)
        out = {"cpu_wall": round(self.cpu / wall, 3)}
        if self.have_stat:
            # Jiffy granularity (10 ms) makes short spans noisy; clamp the small negative values.
            others = max(0.0, self.busy - self.cpu) / (wall * self.ncpu)
            out["others_cpu"] = round(min(others, 1.0), 3)
            out["steal"] = round(self.steal / (wall * self.ncpu), 3)
        return out


# The largest per-measurement peak so far: VmHWM (and with it ru_maxrss, which Linux reads
# from the same high-water mark) is reset before each measurement.
PEAK_SEEN_MIB = 0.0


def timed(fn, reps: int, budget_s: float = float("inf")):
    """Runs fn `reps` times (stopping early once `budget_s` of timed work is spent, after at
    least one rep); returns (median seconds, number of reps, probe fields, peak RSS MiB)."""
    global PEAK_SEEN_MIB
    PEAK_SEEN_MIB = max(PEAK_SEEN_MIB, peak_rss_mib() or 0.0)
    probe = Probe()
    have_hwm = reset_peak_rss()
    times = []
    for _ in range(max(reps, 1)):
        with probe.span() as s:
            fn()
        times.append(s.dt)
        if sum(times) >= budget_s:
            break
    peak = peak_rss_mib() if have_hwm else None
    PEAK_SEEN_MIB = max(PEAK_SEEN_MIB, peak or 0.0)
    return statistics.median(times), len(times), probe.fields(), peak
