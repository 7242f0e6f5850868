"""Throughput of a training run: tokens/s, MFU (model FLOPs utilisation) and peak memory at every log
(`ThroughputCallback`), against the matmul rate this device reaches (`measure_peak_tflops`)."""

import sys
import time
from collections.abc import Callable

import torch
from transformers import TrainerCallback, TrainingArguments


def measure_peak_tflops(device: torch.device, dtype: torch.dtype = torch.float32, seconds: float = 0.5) -> float:
    """Dense matmul throughput of one device, in TFLOP/s: what MFU is measured against when --peak_tflops is not
    given. It is what this device reaches, not its data-sheet peak, so MFU reads as a share of the achievable.

    The best of several short windows is kept, so a moment of contention from other processes does not lower it.
    """
    size = 1024 if device.type == "cpu" else 8192  # large enough that a sync per matmul costs ~1%
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(2):  # warm-up: kernels chosen, caches filled
        a @ b
    synchronize()
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline or best == 0.0:
        iterations, start = 0, time.perf_counter()
        while iterations < 2 or time.perf_counter() - start < seconds / 8:
            a @ b
            iterations += 1
            synchronize()
        best = max(best, 2 * size**3 * iterations / (time.perf_counter() - start) / 1e12)
    return best


def peak_memory_mb(device: torch.device) -> float:
    """Allocator peak on a GPU; the process's peak resident memory on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
        return peak / 2**20 if sys.platform == "darwin" else peak / 2**10
    except ImportError:  # Windows: current RSS is the best there is
        import psutil

        return psutil.Process().memory_info().rss / 2**20


# An interval whose MFU passes this had its peak probed while the device was busy (a small model's training
# reaches well under half of a large matmul's rate): the peak is probed again
SUSPICIOUS_MFU = 0.8


class ThroughputCallback(TrainerCallback):
    """Times the training steps (not evaluation, saving or logging) and turns the Trainer's count of
    non-padding tokens into tokens/s and MFU for each logging interval.

    MFU's denominator is the best matmul rate measured on this device. A probe made while other processes
    loaded the machine reads low, and MFU above 1 follows; so when an interval's MFU passes SUSPICIOUS_MFU,
    `reprobe` (the probe again, None when --peak_tflops was given) runs and the best rate so far is kept.
    """

    def __init__(self, flops_per_token: Callable[[int], float], peak_flops: float, device: torch.device,
                 block_size: Callable[[int], int], reprobe: Callable[[], float] | None = None):
        self.flops_per_token, self.peak_flops, self.device, self.block_size = flops_per_token, peak_flops, device, block_size
        self.reprobe = reprobe
        self.probes = [peak_flops]  # every peak measured, in FLOP/s
        self.train_seconds = 0.0
        self._step_start = None
        self._last_tokens = self._last_seconds = None
        self.intervals: list[tuple[float, float]] = []  # (tokens/s, achieved FLOP/s per device) per log
        self.step_seconds: list[float] = []  # of this process's steps; the first holds any torch.compile time
        self.wall_start = None  # when training began: every log gets its elapsed wall-clock seconds

    def on_train_begin(self, args, state, control, **kwargs):
        # a resumed run's clock goes on from its checkpoint's last log (the history it loaded), not from zero
        spent = next((entry["elapsed_seconds"] for entry in reversed(state.log_history) if "elapsed_seconds" in entry), 0.0)
        self.wall_start = time.perf_counter() - spent
        self._last_tokens, self._last_seconds = state.num_input_tokens_seen, self.train_seconds
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def on_step_begin(self, args, state, control, **kwargs):
        self._step_start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if self._step_start is not None:
            seconds = time.perf_counter() - self._step_start
            self.train_seconds += seconds
            self.step_seconds.append(seconds)
            self._step_start = None

    def metrics(self, args: TrainingArguments, state) -> dict:
        """Since the previous call: tokens_per_second, mfu; and block_size, peak_memory_mb."""
        tokens = state.num_input_tokens_seen - (self._last_tokens or 0)
        seconds = self.train_seconds - (self._last_seconds or 0.0)
        self._last_tokens, self._last_seconds = state.num_input_tokens_seen, self.train_seconds
        block_size = self.block_size(max(state.global_step - 1, 0))
        metrics = {"block_size": block_size, "peak_memory_mb": round(peak_memory_mb(self.device), 1)}
        if tokens > 0 and seconds > 0:
            tokens_per_second = tokens / seconds
            achieved = tokens_per_second * self.flops_per_token(block_size) / max(args.world_size, 1)
            if achieved > SUSPICIOUS_MFU * self.peak_flops and self.reprobe is not None:
                self.probes.append(self.reprobe())
                self.peak_flops = max(self.probes)
            metrics.update(tokens_per_second=round(tokens_per_second, 1), mfu=round(achieved / self.peak_flops, 5))
            self.intervals.append((tokens_per_second, achieved))
        return metrics

    def mean_mfu(self) -> float | None:
        """Over the run's intervals, against the best peak measured (a later probe may have raised it)."""
        return sum(achieved for _, achieved in self.intervals) / len(self.intervals) / self.peak_flops \
            if self.intervals else None
