"""``ldmclip train`` on webdataset shards never hangs: shards that give nothing stop it with one line
naming them, a stop signal ends a wait for data, and no DataLoader worker outlives a killed run.

Every run is a subprocess with a timeout, so a hang fails the test instead of blocking the suite."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # each test starts a training run (about 20 s on a busy 2-core machine)

SRC = Path(__file__).resolve().parents[2] / "src"
COMMON = ["--model", "ViT-Tiny-64", "--batch-size", "4", "--steps", "5", "--precision", "fp32",
          "--eval-every", "0", "--quiet"]
# A shard that gives nothing for a long time: the reader waits on the pipe (a stand-in for a slow or
# hanging download). Far longer than any test waits, so a run can only end by being stopped.
SLOW_SHARD = "pipe:sleep 120"


def _env() -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(SRC), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}


def _start(command: list[str], **kwargs) -> subprocess.Popen:
    """The run in a session of its own, so that :func:`_end_group` can end all it started."""
    kwargs.setdefault("stdout", subprocess.PIPE)
    return subprocess.Popen(command, text=True, env=_env(), start_new_session=True, **kwargs)


def _end_group(process: subprocess.Popen) -> None:
    """Kill whatever of the run is left (a worker that outlived it, a pipe command), pass or fail."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    if process.poll() is None:
        process.kill()


def _command(data: str, out: Path, workers: int) -> list[str]:
    return [sys.executable, "-m", "ldmclip", "train", *COMMON, "--data", data, "--workers", str(workers),
            "--out", str(out)]


@pytest.fixture
def unreadable_shards(tmp_path: Path) -> Path:
    """shards/{00000..00003}.tar: missing, zero bytes, random bytes, missing."""
    root = tmp_path / "shards"
    root.mkdir()
    (root / "00001.tar").write_bytes(b"")
    (root / "00002.tar").write_bytes(os.urandom(4096) + b"not a tar")
    return root


@pytest.mark.parametrize("workers", [0, 2])
def test_train_on_only_unreadable_shards_stops_with_one_line_naming_them(unreadable_shards, tmp_path, workers):
    pattern = str(unreadable_shards / "{00000..00003}.tar")
    process = _start(_command(pattern, tmp_path / "run", workers), stderr=subprocess.PIPE)
    try:
        _, stderr = process.communicate(timeout=120)  # the old code spun here forever
    finally:
        _end_group(process)
    assert process.returncode == 2, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and "Traceback" not in stderr, stderr[-3000:]
    [line] = errors
    assert line.startswith("ldmclip train: error: no usable image-caption sample from the webdataset shards")
    for name, problem in [("00000.tar", "not found"), ("00001.tar", "empty file"),
                          ("00002.tar", "not a tar file"), ("00003.tar", "not found")]:
        assert f"{unreadable_shards / name}: {problem}" in line
    assert not (tmp_path / "run").exists()  # a run that failed before its first checkpoint leaves nothing


# ---------------------------------------------------------------------------------------------------
# processes


def _children() -> dict[int, list[int]]:
    """parent pid -> child pids, from /proc."""
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        tree.setdefault(ppid, []).append(int(entry))
    return tree


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")  # a zombie has ended; only its parent has not read its status yet


def _wait_for(condition, seconds: float, step: float = 0.1) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(step)
    return condition()


def _start_waiting_run(tmp_path: Path, workers: int) -> tuple[subprocess.Popen, list[int]]:
    """A run whose readers all wait on SLOW_SHARD; returns it with its worker pids (once each worker
    waits on its pipe; [] with --workers 0, once the main process does)."""
    process = _start(_command(SLOW_SHARD, tmp_path / "run", workers), stderr=subprocess.STDOUT)
    tree: dict[int, list[int]] = {}

    def waiting() -> bool:
        nonlocal tree
        tree = _children()
        if process.poll() is not None:
            return False
        if not workers:  # the main process reads: it has started the pipe command
            return bool(tree.get(process.pid))
        readers = tree.get(process.pid, [])
        return len(readers) == workers and all(tree.get(reader) for reader in readers)

    if not _wait_for(waiting, 120, step=0.25):
        _end_group(process)
        output = process.communicate(timeout=30)[0]
        pytest.fail(f"the run never reached its wait for data:\n{output[-3000:]}")
    return process, (tree.get(process.pid, []) if workers else [])


def _stop(process: subprocess.Popen) -> str:
    _end_group(process)
    return process.communicate(timeout=30)[0]


@pytest.mark.parametrize("kill", [signal.SIGKILL, signal.SIGTERM])
def test_a_killed_run_leaves_no_worker_behind(tmp_path, kill):
    process, workers = _start_waiting_run(tmp_path, workers=2)
    try:
        process.send_signal(kill)
        # SIGKILL: the kernel ends the workers with their parent. SIGTERM: the run stops while it
        # waits for data and shuts its workers down (DataLoader: a few seconds per stuck worker).
        assert _wait_for(lambda: not any(_alive(pid) for pid in workers), 15), \
            f"workers {[pid for pid in workers if _alive(pid)]} outlived the run"
        if kill == signal.SIGTERM:
            assert process.wait(timeout=60) == 0
    finally:
        output = _stop(process)
    if kill == signal.SIGTERM:
        assert "received signal 15: saving a checkpoint at step 0 and stopping" in output, output[-3000:]


def test_the_first_sigterm_stops_a_run_waiting_for_data_in_the_main_process(tmp_path):
    process, _ = _start_waiting_run(tmp_path, workers=0)
    try:
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=60)  # the old code kept waiting (the stop was checked between steps)
    finally:
        output = _stop(process)
    assert code == 0, output[-3000:]
    assert "received signal 15: saving a checkpoint at step 0 and stopping" in output
    assert (tmp_path / "run" / "checkpoints").is_dir()


def test_ctrl_c_stops_a_run_waiting_on_its_workers_without_a_traceback(tmp_path):
    process, workers = _start_waiting_run(tmp_path, workers=2)
    try:
        os.killpg(process.pid, signal.SIGINT)  # as a terminal's Ctrl-C: the main process and its workers
        code = process.wait(timeout=60)
        assert _wait_for(lambda: not any(_alive(pid) for pid in workers), 15)
    finally:
        output = _stop(process)
    assert code == 0, output[-3000:]
    assert "received signal 2: saving a checkpoint at step 0 and stopping" in output
    assert "Traceback" not in output, output[-3000:]
