"""Time spent in forward passes, without stalling the GPU.

On a CPU a pass is timed with the wall clock. On a GPU the host only queues the kernels, so
a wall clock would need ``torch.cuda.synchronize`` after every pass; instead each pass
records a pair of CUDA events and their elapsed time is read later, when the decoder has
synchronized anyway (its one host sync per step) and the events are done.
"""

from __future__ import annotations

import time

import torch


class PassTimer:
    def __init__(self, device: torch.device | str | None = None):
        self.cuda = device is not None and torch.device(device).type == "cuda"
        self._seconds = 0.0
        self._pending: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []  # CUDA passes not yet read
        self._start: float | torch.cuda.Event | None = None

    def start(self) -> None:
        if self.cuda:
            self._start = torch.cuda.Event(enable_timing=True)
            self._start.record()
        else:
            self._start = time.perf_counter()

    def stop(self) -> None:
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self._pending.append((self._start, end))
        else:
            self._seconds += time.perf_counter() - self._start

    @property
    def seconds(self) -> float:
        """Total seconds of the timed passes (on a GPU, waits for any still running)."""
        for start, end in self._pending:
            end.synchronize()
            self._seconds += start.elapsed_time(end) / 1000
        self._pending.clear()
        return self._seconds
