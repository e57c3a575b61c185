"""Multi-process training on CPU with gloo: each test launches its own 2 processes.

* the distributed losses equal the single-process loss on the global batch (value and gradients);
* a 2-process DDP run equals a 1-process run with the same (global) --batch-size;
* FSDP2 follows the same loss curve, writes sharded checkpoints, and resumes from them on 1 and 2
  processes;
* a signal to one rank stops all of them together; a killed rank makes the others stop with a
  clear error instead of hanging.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest
import torch
from safetensors.torch import load_file

from ldmclip.train import TrainConfig, train
from tests.conftest import REPO, relative_error

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="needs torch.distributed")

# AdamW's eps is raised from 1e-6 so that parameters whose true gradient is exactly zero (the key
# bias of attention: softmax ignores it) are not moved by float noise that Adam would normalise to
# full-size steps; with them, 1-process and 2-process runs agree to ~1e-4 instead of ~1e-6.
COMMON = ["--model", "ViT-Tiny-64", "--precision", "fp32", "--workers", "0", "--val-size", "16",
          "--eval-every", "0", "--log-every", "1", "--lr", "1e-3", "--warmup", "2", "--eps", "1e-3",
          "--progress", "no", "--seed", "5", "--dist-timeout", "30"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    # src/ first: the processes import this checkout's ldmclip, not whatever the environment installed
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO)])}


def _torchrun_command(*args: str, nproc: int = 2) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-addr",
            "127.0.0.1", "--master-port", str(_free_port()), *args]


def _torchrun_train(output: Path, *extra: str, nproc: int = 2) -> subprocess.CompletedProcess:
    command = _torchrun_command("-m", "ldmclip", "train", *COMMON, "--output", str(output), *extra, nproc=nproc)
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=_env(), cwd=REPO)
    assert done.returncode == 0, (done.stdout[-3000:], done.stderr[-3000:])
    return done


def _train_here(output: Path, *extra: str) -> None:
    """A 1-process run in this process (no process group), from the same flags."""
    import argparse

    from ldmclip.cli.train import add_arguments as add_train_arguments, config_from_args

    parser = argparse.ArgumentParser()
    add_train_arguments(parser)
    cfg = config_from_args(parser.parse_args([*COMMON, "--output", str(output), *extra]))
    assert isinstance(cfg, TrainConfig)
    train(cfg)


def _weights(output: Path) -> dict[str, torch.Tensor]:
    return load_file(str(output / "final" / "open_clip_model.safetensors"))


def _losses(output: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if r["kind"] == "train"}


def _max_weight_error(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> tuple[float, str]:
    assert got.keys() == expected.keys()
    return max((relative_error(got[k], expected[k]), k) for k in expected)


def test_distributed_losses_equal_the_single_process_loss_on_the_global_batch():
    command = _torchrun_command(str(REPO / "tests" / "train" / "_distributed_losses_worker.py"))
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, env=_env(), cwd=REPO)
    assert done.returncode == 0, (done.stdout[-3000:], done.stderr[-3000:])
    for name in ("clip", "clip_bias", "tiled", "tiled_bias", "siglip"):
        assert f"OK {name} " in done.stdout, done.stdout


@pytest.mark.parametrize("loss_flags", [["--loss", "clip"], ["--loss", "clip", "--tile-size", "5"],
                                        ["--loss", "siglip"], ["--loss", "clip", "--accum", "2"]],
                         ids=["clip", "tiled", "siglip", "clip-accum"])
def test_ddp_with_2_processes_equals_1_process_on_the_same_global_batch(tmp_path, loss_flags):
    # --batch-size is the global batch: 2 processes x 8 samples == 1 process x 16 samples.
    # With --accum 2 each process runs 2 micro-batches of 4 (DDP's no_sync until the last one),
    # compared with a 1-process run of one batch of 16.
    flags = ["--batch-size", "16", "--steps", "4", "--save-every", "0", *loss_flags]
    _torchrun_train(tmp_path / "ddp", *flags)
    _train_here(tmp_path / "single", *[f for f in flags if f not in ("--accum", "2")])
    error, key = _max_weight_error(_weights(tmp_path / "ddp"), _weights(tmp_path / "single"))
    assert error <= 1e-5, (key, error)
    ddp_losses, single_losses = _losses(tmp_path / "ddp"), _losses(tmp_path / "single")
    assert ddp_losses.keys() == single_losses.keys() == {1, 2, 3, 4}
    for step, loss in single_losses.items():
        assert ddp_losses[step] == pytest.approx(loss, rel=1e-5)
    summary = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["samples"] == 4 * 16
    # only rank 0 wrote the outputs: one line per step, a single-file checkpoint
    assert [p.name for p in (tmp_path / "ddp" / "checkpoints").iterdir()] == ["step_00000004.pt"]


FSDP_FLAGS = ["--batch-size", "16", "--steps", "6", "--save-every", "3", "--keep-checkpoints", "5"]


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("fsdp") / "run"
    _torchrun_train(output, *FSDP_FLAGS, "--fsdp")
    return output


def test_fsdp_follows_the_ddp_loss_curve(fsdp_run, tmp_path):
    _torchrun_train(tmp_path / "ddp", *FSDP_FLAGS)
    fsdp_losses, ddp_losses = _losses(fsdp_run), _losses(tmp_path / "ddp")
    assert fsdp_losses.keys() == ddp_losses.keys() == set(range(1, 7))
    for step, loss in ddp_losses.items():
        assert fsdp_losses[step] == pytest.approx(loss, rel=1e-5), step
    error, key = _max_weight_error(_weights(fsdp_run), _weights(tmp_path / "ddp"))
    assert error <= 1e-5, (key, error)


def test_fsdp_sharded_checkpoint_resumes_on_1_and_on_2_processes(fsdp_run, tmp_path):
    import ldmclip

    checkpoint = fsdp_run / "checkpoints" / "step_00000003"
    assert sorted(p.name for p in checkpoint.iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp",
                                                           "trainer_state.pt"]
    assert sorted(p.name for p in (fsdp_run / "checkpoints").iterdir()) == ["step_00000003", "step_00000006"]
    # the final model was gathered into one full state dict, in the OpenCLIP hub layout
    reference = ldmclip.create_model("ViT-Tiny-64").state_dict()
    assert ldmclip.create_model(f"local-dir:{fsdp_run / 'final'}").state_dict().keys() == reference.keys()

    expected_weights, expected_losses = _weights(fsdp_run), _losses(fsdp_run)
    _torchrun_train(tmp_path / "two", *FSDP_FLAGS, "--fsdp", "--resume", str(checkpoint))
    _train_here(tmp_path / "one", *FSDP_FLAGS, "--resume", str(checkpoint))
    for name in ("two", "one"):
        losses = _losses(tmp_path / name)
        assert losses.keys() == {4, 5, 6}, name
        for step, loss in losses.items():
            assert loss == pytest.approx(expected_losses[step], rel=1e-5), (name, step)
        error, key = _max_weight_error(_weights(tmp_path / name), expected_weights)
        assert error <= 1e-5, (name, key, error)


def test_fsdp_composes_with_bf16_mixed_precision_checkpointing_and_accumulation(tmp_path):
    # CPU bf16 autocast + FSDP2's bf16 MixedPrecisionPolicy, activation checkpointing, cached-feature
    # accumulation and the tiled loss, all at once: the run finishes, learns, and saves a full model.
    output = tmp_path / "run"
    _torchrun_train(output, "--batch-size", "16", "--steps", "6", "--save-every", "0", "--fsdp", "--precision",
                    "amp_bf16", "--grad-checkpointing", "--accum", "2", "--tile-size", "4", "--lr", "3e-3")
    losses = _losses(output)
    assert len(losses) == 6 and all(loss == loss for loss in losses.values())
    weights = _weights(output)
    assert all(w.dtype == torch.float32 for w in weights.values())  # fp32 master weights were saved


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(x) for x in path.read_text().split()] if path.exists() else []


def _wait_for_steps(metrics: Path, process: subprocess.Popen, steps: int = 2, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and process.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= steps:
            return
        time.sleep(0.1)
    raise AssertionError(f"the run did not reach step {steps} (exit code {process.poll()})")


def _worker_pids(launcher: subprocess.Popen) -> list[int]:
    deadline = time.time() + 30
    while time.time() < deadline:
        workers = _children(launcher.pid)
        if len(workers) == 2:
            return workers
        time.sleep(0.1)
    raise AssertionError("torchrun did not start 2 workers")


@contextlib.contextmanager
def _endless_torchrun_run(output: Path) -> Iterator[tuple[subprocess.Popen, list[int]]]:
    """A 2-process run that would go on for ages: yields the torchrun launcher and its two worker pids
    once 2 steps are logged; the launcher is killed on the way out, whatever the test did."""
    command = _torchrun_command("-m", "ldmclip", "train", *COMMON, "--output", str(output), "--batch-size", "8",
                                "--steps", "100000", "--save-every", "0")
    launcher = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env(),
                                cwd=REPO)
    try:
        workers = _worker_pids(launcher)
        _wait_for_steps(output / "metrics.jsonl", launcher)
        yield launcher, workers
    finally:
        launcher.kill()


def test_a_signal_to_one_rank_stops_every_rank_at_the_same_step(tmp_path):
    output = tmp_path / "run"
    with _endless_torchrun_run(output) as (launcher, workers):
        os.kill(workers[1], signal.SIGTERM)  # one worker only (which one is rank 1 does not matter)
        out, _ = launcher.communicate(timeout=120)
    assert launcher.returncode == 0, out[-3000:]
    assert "saving a checkpoint" in out
    saved = list((output / "checkpoints").glob("step_*.pt"))
    assert len(saved) == 1
    state = torch.load(saved[0], weights_only=True)
    assert state["progress"]["step"] >= 2
    assert len(state["rng_per_rank"]) == 2


def test_killing_one_rank_makes_the_other_exit_with_a_clear_error(tmp_path):
    # Launched without torchrun (which would tear the group down itself): the surviving process must
    # notice on its own, through the failed collective, and exit with an error that says why.
    port = str(_free_port())
    processes = []
    for rank in range(2):
        env = {**_env(), "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
        command = [sys.executable, "-m", "ldmclip", "train", *COMMON, "--output", str(tmp_path / "run"),
                   "--batch-size", "8", "--steps", "100000", "--save-every", "0", "--dist-timeout", "20"]
        processes.append(subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                          env=env, cwd=REPO))
    survivor, victim = processes
    try:
        _wait_for_steps(tmp_path / "run" / "metrics.jsonl", survivor)
        victim.kill()
        victim.wait()
        killed_at = time.time()
        out, _ = survivor.communicate(timeout=90)
        waited = time.time() - killed_at
    finally:
        for process in processes:
            process.kill()
    assert survivor.returncode not in (0, None), out[-3000:]
    assert "another process died" in out, out[-3000:]
    assert waited < 60, waited


def test_torchrun_tears_down_the_run_when_a_worker_is_killed(tmp_path):
    with _endless_torchrun_run(tmp_path / "run") as (launcher, workers):
        os.kill(workers[1], signal.SIGKILL)
        killed_at = time.time()
        out, _ = launcher.communicate(timeout=90)
        waited = time.time() - killed_at
    assert launcher.returncode != 0
    assert "FAILED" in out or "ChildFailedError" in out, out[-3000:]
    assert waited < 60, waited
    for pid in workers:  # no worker left behind
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()


# ---------------------------------------------------------------------------------------------
# Pieces that need no second process


def test_each_rank_loads_its_slice_of_the_same_global_batches():
    from ldmclip.train.data import EpochPermutation, GlobalBatchSlices

    order = EpochPermutation(50, seed=3, epoch=1)
    single = list(GlobalBatchSlices(order, 12))
    per_rank = [list(GlobalBatchSlices(order, 12, rank, 4)) for rank in range(4)]
    assert len(single) == 4 and all(len(batches) == 4 for batches in per_rank)
    for step, batch in enumerate(single):
        assert sum((ranks[step] for ranks in per_rank), []) == batch  # rank order = global order
    with pytest.raises(ValueError, match="divisible"):
        GlobalBatchSlices(order, 10, 0, 4)
