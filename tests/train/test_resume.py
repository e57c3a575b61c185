"""Checkpoints resume exactly: a run killed with SIGKILL and resumed ends with the same weights."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

COMMON = ["--model", "ViT-Tiny-64", "--batch-size", "16", "--precision", "fp32", "--workers", "0",
          "--val-size", "32", "--eval-every", "0", "--log-every", "1", "--lr", "1e-3", "--warmup", "3",
          "--progress", "no", "--seed", "7"]


def _train(output: Path, *extra: str, wait: bool = True) -> subprocess.Popen | subprocess.CompletedProcess:
    command = [sys.executable, "-m", "ldmclip", "train", *COMMON, "--output", str(output), *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if wait:
        return subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def _final_weights(output: Path) -> dict[str, torch.Tensor]:
    return load_file(str(output / "final" / "open_clip_model.safetensors"))


@pytest.mark.slow
def test_sigkill_then_resume_latest_equals_uninterrupted_run(tmp_path):
    steps = ["--steps", "40", "--save-every", "8"]
    reference = _train(tmp_path / "reference", *steps)
    assert reference.returncode == 0, reference.stderr[-2000:]

    killed_dir = tmp_path / "killed"
    process = _train(killed_dir, *steps, wait=False)
    first_checkpoint = killed_dir / "checkpoints" / "step_00000008.pt"
    deadline = time.time() + 300
    while not first_checkpoint.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert first_checkpoint.exists(), "the run never wrote its first checkpoint"
    assert not (killed_dir / "final").exists(), "the run finished before it could be killed"
    # nothing half-written is visible: every file in checkpoints/ is a complete checkpoint
    assert all(p.name.startswith("step_") and p.suffix == ".pt" for p in (killed_dir / "checkpoints").iterdir())

    resumed = _train(killed_dir, *steps, "--resume", "latest")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stdout
    expected, got = _final_weights(tmp_path / "reference"), _final_weights(killed_dir)
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), key


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path):
    output = tmp_path / "run"
    process = _train(output, "--steps", "100000", "--save-every", "0", wait=False)
    metrics = output / "metrics.jsonl"
    deadline = time.time() + 300
    while (not metrics.exists() or metrics.stat().st_size == 0) and time.time() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    out, _ = process.communicate(timeout=120)
    assert process.returncode == 0, out[-2000:]
    assert "saving a checkpoint" in out
    saved = list((output / "checkpoints").glob("step_*.pt"))
    assert len(saved) == 1
    state = torch.load(saved[0], weights_only=True)
    assert state["progress"]["step"] >= 1
