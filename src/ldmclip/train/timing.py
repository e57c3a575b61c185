"""Where a training step's time goes: waiting for data, forward, backward, optimizer; and peak memory.

The loop holds one :class:`StepTimer` and marks the end of each phase of a step::

    timer.restart()        # timed work starts (the time since the last mark belongs to no phase)
    batch = next(batches)
    timer.data_ready()     # waiting for data: from the end of the previous step to the batch on the device
    ...forward...
    timer.forward_done()   # (only where the step allows a split: without accumulation)
    ...backward...
    timer.backward_done()
    ...optimizer...
    timer.step_done()
    if window_ends: timer.window(samples)  # the window's numbers, named as in metrics.jsonl

How it measures without slowing training:

* **CPU**: a mark reads ``time.perf_counter()``; CPU work is synchronous, so phases are exact.
* **CUDA**: a mark records a CUDA event on the current stream (``enable_timing=True``): a few
  microseconds on the host and no synchronisation. Only :meth:`StepTimer.window`, once per logging
  window, waits for the last event; the phases are then the GPU-timeline gaps between consecutive
  events (``Event.elapsed_time``). "Waiting for data" is therefore the time the GPU went from the end
  of one step to the moment the next batch was there, host-to-device copy included (the copies are
  queued on the same stream before the data mark): zero when the loader keeps ahead and the host
  queues work faster than the GPU runs it.

With several processes the data mark comes after the processes agree on the batch (a collective),
so waiting for the slowest process's batch counts as waiting for data too; the gradient all-reduce
counts in backward (DDP) and the loss's all-reduce in optimizer.

Validation, checkpoints and logging happen between :meth:`StepTimer.step_done` and the next
:meth:`StepTimer.restart`, so they count in no phase.
"""

from __future__ import annotations

import os
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

DATA_WAIT_WARNING_FRACTION = 0.2  # above this share of step time spent waiting for data, say so
_MIB = 2 ** 20

# the phases a step's time is split into, in order; "forward_backward" where the step does not split them
_COMPUTE_PHASES = ("forward", "backward", "forward_backward", "optimizer")


class _HostClock:
    """Marks are ``clock()`` readings (seconds)."""

    def __init__(self, clock: Callable[[], float]):
        self._clock = clock

    def mark(self) -> float:
        return self._clock()

    def seconds_between(self, start: float, end: float) -> float:
        return end - start

    def wait_for(self, mark: float) -> None:
        pass


class _CudaClock:
    """Marks are CUDA events recorded on the current stream; reading them needs the last one done."""

    def mark(self) -> torch.cuda.Event:
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def seconds_between(self, start: torch.cuda.Event, end: torch.cuda.Event) -> float:
        return start.elapsed_time(end) / 1000.0  # (milliseconds)

    def wait_for(self, mark: torch.cuda.Event) -> None:
        mark.synchronize()  # the one wait per window


class StepTimer:
    """Seconds per phase of the steps of one logging window (see the module docs).

    ``clock`` replaces ``time.perf_counter`` (tests pass a fake one); ``device`` of type ``cuda``
    times with CUDA events instead. A timer with ``enabled=False`` (ranks other than 0) does nothing."""

    def __init__(self, device: torch.device | None = None, clock: Callable[[], float] | None = None,
                 enabled: bool = True):
        self.device = device
        self.enabled = enabled
        cuda = device is not None and device.type == "cuda" and clock is None
        self._clock = _CudaClock() if cuda else _HostClock(clock or time.perf_counter)
        self._marks: list[tuple[str | None, Any]] = []  # (phase that ended at this mark, mark); None: a start
        self._steps = 0
        self._split = False  # forward_done was called since the last data_ready

    # ---- marks, in the order a step makes them
    def restart(self) -> None:
        """Timed work starts now: the time since the previous mark (logging, validation, checkpoints)
        counts in no phase."""
        self._mark(None)

    def data_ready(self) -> None:
        """The batch is on the device: the time since the last mark was spent waiting for it."""
        self._mark("data")
        self._split = False

    def forward_done(self) -> None:
        """The loss is computed; backward comes next."""
        self._mark("forward")
        self._split = True

    def backward_done(self) -> None:
        """Gradients are ready. Without a :meth:`forward_done` since the data, forward and backward are one phase."""
        self._mark("backward" if self._split else "forward_backward")

    def step_done(self) -> None:
        """The optimizer has stepped: one step is complete."""
        self._mark("optimizer")
        if self.enabled:
            self._steps += 1

    def _mark(self, phase: str | None) -> None:
        if self.enabled:
            self._marks.append((phase, self._clock.mark()))

    # ---- the window's numbers
    def window(self, samples: int) -> dict[str, float]:
        """The window's times and memory, named as in ``metrics.jsonl``; starts the next window.

        ``data_wait_s`` and the ``*_s`` of each phase are totals over the window's steps; ``step_s`` is
        the mean step; ``data_wait_fraction`` the share of step time spent waiting for data;
        ``data_samples_per_s`` the ``samples`` delivered per second of waiting (with ``--workers 0``
        the loader's own speed; left out when the step never waited)."""
        if not self.enabled:
            return {}
        seconds = self._phase_seconds()
        steps, self._steps = self._steps, 0
        data = seconds.pop("data", 0.0)
        compute = sum(seconds.values())
        total = data + compute
        values = {"data_wait_s": data, **{f"{phase}_s": seconds[phase] for phase in _COMPUTE_PHASES if phase in seconds},
                  "compute_s": compute, "step_s": total / max(steps, 1),
                  "data_wait_fraction": data / total if total > 0 else 0.0}
        if data > 0:
            values["data_samples_per_s"] = samples / data
        values = {key: round(value, 6) for key, value in values.items()}
        return {**values, **peak_memory(self.device)}

    def _phase_seconds(self) -> dict[str, float]:
        """Seconds per phase from consecutive marks; forgets the marks."""
        marks, self._marks = self._marks, []
        seconds: dict[str, float] = {}
        if not marks:
            return seconds
        self._clock.wait_for(marks[-1][1])
        for (_, start), (phase, end) in zip(marks, marks[1:]):
            if phase is not None:
                seconds[phase] = seconds.get(phase, 0.0) + self._clock.seconds_between(start, end)
        return seconds


def peak_memory(device: torch.device | None) -> dict[str, float]:
    """Peak memory in MiB so far: ``peak_cuda_mib`` (``torch.cuda.max_memory_allocated``) on CUDA;
    ``peak_rss_mib``, this process's peak resident memory (``getrusage``); ``workers_peak_rss_mib``,
    the sum of the peaks of its live child processes (the DataLoader workers; memory they share with
    this process counts in each), where ``/proc`` tells it.

    The CUDA peak is not reset here: whoever measures around a whole run (a benchmark row) keeps
    its own peak, so the numbers are the peak since the process started or since its last reset."""
    values: dict[str, float] = {}
    if device is not None and device.type == "cuda":
        values["peak_cuda_mib"] = round(torch.cuda.max_memory_allocated(device) / _MIB, 1)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    values["peak_rss_mib"] = round(rss / (_MIB if sys.platform == "darwin" else 1024), 1)  # bytes on macOS, KiB else
    workers = _children_peak_rss_kib()
    if workers:
        values["workers_peak_rss_mib"] = round(workers / 1024, 1)
    return values


def _children_peak_rss_kib() -> int:
    """The summed ``VmHWM`` of this process's live children (Linux ``/proc``; 0 where unknown)."""
    total = 0
    try:
        tasks = list(Path("/proc/self/task").iterdir())
    except OSError:
        return 0
    for task in tasks:
        try:
            children = (task / "children").read_text().split()
        except OSError:
            continue
        for pid in children:
            try:
                status = Path(f"/proc/{pid}/status").read_text()
            except OSError:  # (it ended meanwhile)
                continue
            for line in status.splitlines():
                if line.startswith("VmHWM:"):
                    total += int(line.split()[1])
    return total


class DataWaitWarning:
    """A one-line warning when the step waits on data more than :data:`DATA_WAIT_WARNING_FRACTION` of
    the time: the first window that does, then at most once every ``every`` windows."""

    def __init__(self, workers: int, every: int = 100, threshold: float = DATA_WAIT_WARNING_FRACTION):
        self.workers, self.every, self.threshold = workers, every, threshold
        self._windows_since = None  # windows since the last warning; None: never warned

    def check(self, data_wait_fraction: float) -> str | None:
        """The warning to show for this window, or None."""
        if self._windows_since is not None:
            self._windows_since += 1
        if data_wait_fraction <= self.threshold:
            return None
        if self._windows_since is not None and self._windows_since < self.every:
            return None
        self._windows_since = 0
        cores = os.cpu_count() or 1
        return (f"warning: the training step waited for data {data_wait_fraction:.0%} of the time (more than "
                f"{self.threshold:.0%}), so the data loader is the bottleneck: raise --workers (now {self.workers}; "
                f"this machine has {cores} CPU cores)")
