"""Where the time goes: the step timer on a fake clock, the data-wait warning, and a run's outputs
(metrics.jsonl fields, the curves panel) with a slow and with a fast dataset."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from matplotlib.figure import Figure
from torch.utils.data import Dataset

from ldmclip.train import loop as train_loop
from ldmclip.train import train
from ldmclip.train.timing import DataWaitWarning, StepTimer, peak_memory

from tests.train.test_loop import _config, _table


class FakeClock:
    """A clock that moves only when told to."""

    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def _step(timer: StepTimer, clock: FakeClock, data: float, forward: float | None, backward: float,
          optimizer: float) -> None:
    clock.advance(data)
    timer.data_ready()
    if forward is not None:
        clock.advance(forward)
        timer.forward_done()
    clock.advance(backward)
    timer.backward_done()
    clock.advance(optimizer)
    timer.step_done()


def test_timer_sums_each_phase_over_the_window_and_leaves_out_the_time_between_steps():
    clock = FakeClock()
    timer = StepTimer(clock=clock)
    timer.restart()
    _step(timer, clock, data=1.0, forward=2.0, backward=3.0, optimizer=0.5)
    clock.advance(50.0)  # validation and a checkpoint: no phase of a step
    timer.restart()
    _step(timer, clock, data=3.0, forward=1.0, backward=1.0, optimizer=0.5)
    values = timer.window(samples=16)
    assert values["data_wait_s"] == 4.0
    assert (values["forward_s"], values["backward_s"], values["optimizer_s"]) == (3.0, 4.0, 1.0)
    assert "forward_backward_s" not in values
    assert values["compute_s"] == 8.0
    assert values["step_s"] == 6.0  # (4 + 8) / 2 steps
    assert values["data_wait_fraction"] == pytest.approx(4 / 12)
    assert values["data_samples_per_s"] == 4.0  # 16 samples per 4 s of waiting
    assert values["peak_rss_mib"] > 0

    # the next window starts afresh; a batch too small to train on waits into the next step's data time
    timer.restart()
    clock.advance(0.25)
    _step(timer, clock, data=0.25, forward=1.0, backward=1.0, optimizer=1.0)
    values = timer.window(samples=8)
    assert values["data_wait_s"] == 0.5
    assert values["step_s"] == 3.5


def test_timer_without_a_forward_mark_reports_forward_and_backward_as_one_phase():
    clock = FakeClock()
    timer = StepTimer(clock=clock)
    timer.restart()
    _step(timer, clock, data=0.0, forward=None, backward=3.0, optimizer=1.0)  # (accumulation: interleaved passes)
    values = timer.window(samples=8)
    assert values["forward_backward_s"] == 3.0
    assert "forward_s" not in values and "backward_s" not in values
    assert values["data_wait_fraction"] == 0.0
    assert "data_samples_per_s" not in values  # never waited: the loader's speed is not seen


def test_a_disabled_timer_marks_nothing():
    clock = FakeClock()
    timer = StepTimer(clock=clock, enabled=False)
    timer.restart()
    _step(timer, clock, data=1.0, forward=1.0, backward=1.0, optimizer=1.0)
    assert timer.window(samples=8) == {}


def test_peak_memory_reports_the_process_rss_in_mib_on_cpu():
    values = peak_memory(torch.device("cpu"))
    assert "peak_cuda_mib" not in values
    with open("/proc/self/status") as status:  # (Linux: the same peak, in KiB)
        hwm = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
    assert values["peak_rss_mib"] == pytest.approx(hwm / 1024, rel=0.05)


def test_peak_memory_adds_up_the_live_child_processes():
    if not Path(f"/proc/self/task/{os.getpid()}/children").exists():
        pytest.skip("no /proc/<pid>/task/<tid>/children here")
    before = peak_memory(None).get("workers_peak_rss_mib", 0.0)
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 10
        while (after := peak_memory(None).get("workers_peak_rss_mib", 0.0)) <= before + 1 and time.monotonic() < deadline:
            time.sleep(0.05)  # (until the child has its memory: a Python interpreter, several MiB)
        assert after > before + 1
    finally:
        child.communicate(b"")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_cuda_timer_reads_its_events_at_the_window_and_reports_the_peak():
    device = torch.device("cuda")
    timer = StepTimer(device)
    timer.restart()
    weights = torch.randn(2048, 2048, device=device, requires_grad=True)
    timer.data_ready()
    loss = (weights @ weights).square().mean()
    timer.forward_done()
    loss.backward()
    timer.backward_done()
    with torch.no_grad():
        weights -= 0.1 * weights.grad
    timer.step_done()
    values = timer.window(samples=8)
    assert values["forward_s"] > 0 and values["backward_s"] > 0 and values["optimizer_s"] > 0
    assert values["peak_cuda_mib"] >= 3 * 2048 * 2048 * 4 / 2 ** 20  # the weights, a product, the gradient
    del loss
    timer.restart()
    timer.data_ready()
    timer.backward_done()
    timer.step_done()
    assert timer.window(samples=8)["peak_cuda_mib"] == values["peak_cuda_mib"]  # (never reset: a run's peak)


def test_the_data_wait_warning_comes_first_when_it_happens_then_at_most_every_n_windows():
    warning = DataWaitWarning(workers=3, every=4)
    said = [warning.check(fraction) is not None for fraction in (0.1, 0.2, 0.5, 0.9, 0.9, 0.9, 0.05, 0.9, 0.9)]
    assert said == [False, False, True, False, False, False, False, True, False]
    message = DataWaitWarning(workers=3).check(0.35)
    assert "35%" in message and "--workers (now 3;" in message and "\n" not in message


SLEEP = 0.08  # seconds per sample of the slow dataset: 0.64 s per batch of 8, several ViT-Tiny steps on a CPU


class SlowDataset(Dataset):
    """The table's samples, each after a short sleep: a data loader that cannot keep up."""

    def __init__(self, dataset: Dataset, seconds: float):
        self.dataset, self.seconds = dataset, seconds

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index):
        time.sleep(self.seconds)
        return self.dataset[index]


class PreloadedDataset(Dataset):
    """The table's samples decoded once up front: a data loader that is never the bottleneck."""

    def __init__(self, dataset: Dataset):
        self.samples = [dataset[index] for index in range(len(dataset))]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index):
        return self.samples[index]


def _train_with(monkeypatch, tmp_path, wrap, **overrides):
    """Train on the test table with its dataset wrapped by ``wrap``; the train records and the
    figures the curves PNG was drawn from."""
    build = train_loop.build_train_data

    def build_wrapped(*args, **kwargs):
        data = build(*args, **kwargs)
        data.dataset = wrap(data.dataset)
        return data

    figures = []
    savefig = Figure.savefig

    def keep_figure(figure, *args, **kwargs):
        figures.append(figure)
        return savefig(figure, *args, **kwargs)

    monkeypatch.setattr(train_loop, "build_train_data", build_wrapped)
    monkeypatch.setattr(Figure, "savefig", keep_figure)
    table, images = _table(tmp_path)
    train(_config(tmp_path, table, images, val_data=None, eval_every=0, save_every=0, **overrides))
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if r["kind"] == "train"], figures


def test_a_slow_dataset_shows_in_metrics_and_the_curves_and_warns_to_raise_workers(monkeypatch, tmp_path, capsys):
    records, figures = _train_with(monkeypatch, tmp_path, lambda dataset: SlowDataset(dataset, SLEEP), steps=3,
                                   progress=True)
    assert [r["step"] for r in records] == [1, 2, 3]
    for record in records:
        for key in ("data_wait_s", "forward_s", "backward_s", "optimizer_s", "compute_s", "step_s",
                    "data_wait_fraction", "data_samples_per_s", "peak_rss_mib"):
            assert key in record, key
        assert record["data_wait_s"] >= 8 * SLEEP  # every sample of the batch slept
        assert record["data_samples_per_s"] <= 1 / SLEEP
    # (the first step also warms the model up, and a shared CPU makes any one step's compute erratic:
    # the fraction over the steps after the first)
    later = records[1:]
    assert sum(r["data_wait_s"] for r in later) / sum(r["data_wait_s"] + r["compute_s"] for r in later) > 0.2
    assert max(r["data_wait_fraction"] for r in records) > 0.2
    printed = capsys.readouterr()
    warnings = [line for line in printed.out.splitlines() if "waited for data" in line]
    assert len(warnings) == 1  # once, not every window
    assert "raise --workers (now 0;" in warnings[0]
    assert f"data={records[-1]['data_wait_fraction']:.0%}" in printed.err  # the progress bar's postfix

    # the curves PNG has the panel, drawn from the logged numbers
    (figure,) = figures
    (panel,) = [ax for ax in figure.axes if ax.get_title() == "where the time goes"]
    assert panel.get_ylabel() == "data-wait fraction"
    assert list(panel.lines[0].get_ydata()) == [r["data_wait_fraction"] for r in records]
    (step_axis,) = [ax for ax in figure.axes if ax.get_ylabel() == "step time (s)"]
    assert list(step_axis.lines[0].get_ydata()) == [r["step_s"] for r in records]
    (memory,) = [ax for ax in figure.axes if ax.get_title() == "peak memory"]
    assert list(memory.lines[0].get_ydata()) == [r["peak_rss_mib"] / 1024 for r in records]  # CPU: no GPU curve
    assert f"mem={records[-1]['peak_rss_mib'] / 1024:.1f}G" in printed.err  # the progress bar's postfix
    assert (tmp_path / "run" / "training_curves.png").stat().st_size > 0
    # TensorBoard has the same numbers as scalars
    accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    events = accumulator.EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    scalars = events.Scalars("train/data_wait_fraction")
    assert [s.step for s in scalars] == [1, 2, 3]
    assert [s.value for s in scalars] == pytest.approx([r["data_wait_fraction"] for r in records])
    assert "train/peak_rss_mib" in events.Tags()["scalars"]


def test_a_fast_dataset_with_compute_dominating_waits_little_and_does_not_warn(monkeypatch, tmp_path, capsys):
    # (with accumulation the passes interleave: forward and backward are timed as one phase)
    records, _ = _train_with(monkeypatch, tmp_path, PreloadedDataset, steps=4, log_every=2, accum=2)
    assert [r["step"] for r in records] == [2, 4]
    assert all("forward_backward_s" in r and "forward_s" not in r for r in records)
    data = sum(r["data_wait_s"] for r in records)
    compute = sum(r["compute_s"] for r in records)
    assert data / (data + compute) < 0.2
    assert all(r["data_wait_fraction"] < 0.2 for r in records)
    assert "waited for data" not in capsys.readouterr().out
