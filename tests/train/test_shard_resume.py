"""Exact resume on webdataset shards: a reader continued after k items gives what an uninterrupted one
gives from item k on, fast-forwarding by tar headers only (no image decoded); and ``ldmclip train``
killed with SIGKILL and resumed trains on the same samples and ends with bit-identical weights."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from ldmclip.data import shards as shards_module
from ldmclip.data.shards import ShardDataset
from ldmclip.data.writer import write_shards

SRC = Path(__file__).resolve().parents[2] / "src"


def _png(i: int, size: int = 64) -> bytes:
    image = Image.new("RGB", (size, size), ((37 * i) % 256, (11 * i) % 256, (101 * i) % 256))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _write(root: Path, count: int, per_shard: int) -> str:
    items = [(i, _png(i), f"a picture of colour number {i}") for i in range(count)]
    paths = write_shards(items, root, max_per_shard=per_shard, reencode="never", verify=False)
    return str(root / ("shard-{00000..%05d}.tar" % (len(paths) - 1)))


@pytest.fixture(scope="module")
def pattern(tmp_path_factory) -> str:
    return _write(tmp_path_factory.mktemp("shards"), 96, 12)


def _keys(dataset: ShardDataset) -> list[str]:
    return [sample.key if sample is not None else "-" for sample in dataset]


@pytest.mark.parametrize("resampled", [False, True])
@pytest.mark.parametrize("skip", [0, 1, 17, 40])
def test_a_reader_resumed_after_k_items_continues_as_the_uninterrupted_one(pattern, resampled, skip):
    def make() -> ShardDataset:
        return ShardDataset(pattern, shuffle_buffer=20, resampled=resampled, seed=3, epoch=2, split_by_node=False)

    whole = make()
    take = 70
    reference = [s.key for s, _ in zip(whole, range(take))]
    resumed = make()
    resumed.resume_at({0: skip})
    got = [s.key for s, _ in zip(resumed, range(take - skip))]
    assert got == reference[skip:]
    assert len(set(reference)) == take or resampled  # (without resampling no key comes twice in an epoch)


def test_fast_forward_decodes_no_image_and_extracts_only_the_buffer(pattern, monkeypatch):
    decoded, extracted = [], []
    real_load, real_extract = shards_module.load_sample, tarfile.TarFile.extractfile
    monkeypatch.setattr(shards_module, "load_sample", lambda *a, **k: decoded.append(a[2]) or real_load(*a, **k))
    monkeypatch.setattr(tarfile.TarFile, "extractfile",
                        lambda self, info: extracted.append(info.name) or real_extract(self, info))
    dataset = ShardDataset(pattern, shuffle_buffer=10, seed=1, split_by_node=False)
    dataset.resume_at({0: 60})
    first = next(iter(dataset))
    assert decoded == [first.key]  # the 60 items passed over were not decoded
    # only the samples left in the buffer (image + caption each) and the ones pulled since were read
    assert len(extracted) <= 2 * (10 + 3)


def test_a_reader_past_its_end_yields_nothing(pattern):
    dataset = ShardDataset(pattern, shuffle_buffer=10, seed=1, split_by_node=False)
    dataset.resume_at({0: 96})
    assert _keys(dataset) == []


# ---- ldmclip train, killed and resumed

COMMON = ["--model", "ViT-Tiny-64", "--batch-size", "8", "--precision", "fp32", "--eval-every", "0",
          "--log-every", "1", "--lr", "1e-3", "--warmup", "2", "--quiet", "--seed", "5", "--shuffle-buffer", "16"]


def _env(keys: Path) -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(SRC), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", "LDMCLIP_TRAINED_KEYS": str(keys)}


def _command(data: str, out: Path, extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "ldmclip", "train", *COMMON, "--data", data, "--out", str(out), *extra]


def _torchrun(command: list[str]) -> list[str]:
    """The same command with 2 processes (CPU, gloo)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
            "--master-port", str(port), *command[1:]]


def _trained(keys: Path, up_to: int | None = None, rank: int = 0) -> list[tuple[int, str]]:
    """(step, keys) lines of a rank, the later line winning for a step trained twice (killed, resumed)."""
    steps: dict[int, str] = {}
    for line in Path(f"{keys}.rank{rank}").read_text().splitlines():
        step, names = line.split("\t")
        if up_to is None or int(step) <= up_to:
            steps[int(step)] = names
    return sorted(steps.items())


def _kill_after_checkpoint(command: list[str], env: dict[str, str], checkpoint: Path, out: Path) -> None:
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        deadline = time.time() + 300
        while not checkpoint.exists() and process.poll() is None and time.time() < deadline:
            time.sleep(0.02)
    finally:
        os.killpg(process.pid, signal.SIGKILL)  # the run and its DataLoader workers
        process.wait()
    assert checkpoint.exists(), f"the run never wrote {checkpoint.name}: {process.stderr.read()[-2000:]}"
    assert not (out / "final").exists(), "the run finished before it could be killed"


@pytest.mark.slow
@pytest.mark.parametrize("resampled, workers, processes",
                         [("no", 0, 1), ("yes", 0, 1), ("no", 2, 1), ("yes", 2, 1), ("no", 0, 2), ("yes", 2, 2)])
def test_sigkill_and_resume_on_shards_trains_on_the_same_samples(tmp_path, resampled, workers, processes):
    data = _write(tmp_path / "shards", 100, 10)  # 10 shards; without resampling an epoch is 12 steps
    extra = ["--steps", "16", "--save-every", "5", "--resampled", resampled, "--workers", str(workers)]

    def command(out: Path, *more: str) -> list[str]:
        plain = _command(data, out, [*extra, *more])
        return plain if processes == 1 else _torchrun(plain)

    reference_keys, killed_keys = tmp_path / "reference.keys", tmp_path / "killed.keys"
    done = subprocess.run(command(tmp_path / "reference"), env=_env(reference_keys),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]

    killed = tmp_path / "killed"
    checkpoint = killed / "checkpoints" / "step_00000005.pt"
    _kill_after_checkpoint(command(killed), _env(killed_keys), checkpoint, killed)
    resumed = subprocess.run(command(killed, "--resume", "latest"), env=_env(killed_keys),
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stdout

    for rank in range(processes):
        expected = _trained(reference_keys, rank=rank)
        assert [step for step, _ in expected] == list(range(1, 17))
        assert _trained(killed_keys, rank=rank) == expected  # no sample repeated, none left out, same batches
    want, got = (load_file(str(p / "final" / "open_clip_model.safetensors")) for p in (tmp_path / "reference", killed))
    assert want.keys() == got.keys()
    for key in want:
        assert torch.equal(want[key], got[key]), key


def _stream(workers: int, world_size: int = 1):
    from ldmclip.train.data import StreamData

    return StreamData(lambda epoch: None, None, 8, workers, seed=5, world_size=world_size)


def test_a_resume_with_other_workers_says_the_epoch_is_not_continued(capsys):
    from ldmclip.train.data import DataPosition

    saved_position = DataPosition(3, 7, {0: 32, 1: 24}, 0)
    saved = [_stream(2).stream_state(saved_position)]
    same = _stream(2).resumed_position(DataPosition(3, 7), saved)
    assert (same.epoch, same.batches, same.readers, same.last_reader) == (3, 7, {0: 32, 1: 24}, 0)
    assert capsys.readouterr().err == ""

    other = _stream(4).resumed_position(DataPosition(3, 7), saved)
    assert (other.epoch, other.batches, other.readers) == (4, 0, {})
    message = capsys.readouterr().err.strip()
    assert len(message.splitlines()) == 1
    assert "workers 2 -> 4" in message and "restarts at epoch 4" in message and "nothing is repeated" in message

    old = _stream(2).resumed_position(DataPosition(3, 7), None)
    assert old.epoch == 4 and "no webdataset stream position" in capsys.readouterr().err


@pytest.mark.parametrize("buffer,initial", [(1, 1), (7, 3), (50, 50)])
def test_the_shuffle_buffer_draws_what_webdatasets_draws(tmp_path, buffer, initial):
    """The buffer keeps webdataset's policy and RNG calls (a seed gives the order OpenCLIP's pipeline gives),
    also while it fills and drains."""
    import random

    from webdataset import filters

    from ldmclip.data.shards import ShardDataset

    shard = tmp_path / "one.tar"
    shard.write_bytes(b"")  # never read: the samples below are given directly
    reader = ShardDataset(str(shard), shuffle_buffer=buffer, shuffle_initial=initial)
    items = [{"__key__": str(i)} for i in range(40)]
    ours = [s["__key__"] for s in reader._shuffled(iter(items), random.Random(3))]
    theirs = [s["__key__"] for s in filters._shuffle(iter(items), bufsize=buffer, initial=initial, rng=random.Random(3))]
    assert ours == theirs and sorted(ours, key=int) == [str(i) for i in range(40)]
