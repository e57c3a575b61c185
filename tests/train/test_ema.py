"""--ema: the moving average of the weights, against a hand-computed one, through checkpoints and resume
(SIGKILL, DCP shards), under 2-process DDP and FSDP2, and without --ema nothing changes.

Each run is a tiny ViT (ViT-Tiny-64) for a few steps; the distributed ones reuse test_distributed's harness.
"""

from __future__ import annotations

import random
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import ldmclip
from ldmclip.core.errors import UserError
from ldmclip.train import TrainConfig
from ldmclip.train.ema import EMA, ema_decay
from tests.conftest import relative_error
from tests.train.test_distributed import COMMON, _max_weight_error, _torchrun_train, _train_here

DECAY = 0.3  # low enough that the warm-up (1+n)/(10+n) gives way to it at the 3rd update
FLAGS = ["--batch-size", "16", "--steps", "5", "--save-every", "1", "--keep-checkpoints", "0", "--eval-every", "2"]


def _final(output: Path, name: str = "final") -> dict[str, torch.Tensor]:
    return load_file(str(output / name / "open_clip_model.safetensors"))


def _checkpoint(output: Path, step: int) -> dict:
    return torch.load(output / "checkpoints" / f"step_{step:08d}.pt", weights_only=True)


def _initial_weights() -> dict[str, torch.Tensor]:
    """The weights the runs start from: train seeds Python and torch with --seed, then builds the model."""
    seed = int(COMMON[COMMON.index("--seed") + 1])
    random.seed(seed)
    torch.manual_seed(seed)
    return ldmclip.create_model("ViT-Tiny-64", patch_dropout=0.0).state_dict()


@pytest.fixture(scope="module")
def ema_run(tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("ema") / "run"
    _train_here(output, *FLAGS, "--ema", str(DECAY))
    return output


def test_resuming_with_another_decay_goes_on_at_the_new_one_and_says_so(ema_run, tmp_path, capsys):
    output = tmp_path / "run"
    shutil.copytree(ema_run, output)
    shutil.rmtree(output / "final")
    for later in (4, 5):
        (output / "checkpoints" / f"step_{later:08d}.pt").unlink()
    capsys.readouterr()
    _train_here(output, *FLAGS, "--ema", "0.5", "--resume", "latest")
    assert "the EMA goes on at --ema 0.5, not the 0.3 the checkpoint's run used" in capsys.readouterr().out
    assert _checkpoint(output, 5)["config"]["ema"] == 0.5


def test_the_decay_warms_up_then_stays():
    assert [ema_decay(0.3, n) for n in (1, 2, 3, 4)] == [2 / 11, 3 / 12, 0.3, 0.3]
    assert ema_decay(0.9999, 1, warmup=False) == 0.9999
    assert ema_decay(0.9999, 10_000) == pytest.approx(10_001 / 10_010)


def test_ema_equals_the_hand_computed_average_of_the_raw_weights_after_each_step(ema_run):
    expected = {k: v.double() for k, v in _initial_weights().items()}
    for step in range(1, 6):
        saved = _checkpoint(ema_run, step)
        decay = min(DECAY, (1 + step) / (10 + step))
        expected = {k: decay * v + (1 - decay) * saved["model"][k].double() for k, v in expected.items()}
        ema = saved["ema"]["weights"]
        assert int(saved["ema"]["updates"]) == step
        assert ema.keys() == expected.keys()  # every parameter trains here (buffers: none in a ViT)
        for key, value in ema.items():
            assert value.dtype == torch.float32
            assert relative_error(value, expected[key]) <= 1e-6, (step, key)
        # the EMA is not the raw weights (else the test above would prove nothing)
        assert max(relative_error(ema[k], saved["model"][k]) for k in ema) > 1e-3


def test_final_is_the_ema_model_and_final_raw_the_trained_weights(ema_run):
    last = _checkpoint(ema_run, 5)
    final = ldmclip.create_model(f"local-dir:{ema_run / 'final'}").state_dict()
    raw = ldmclip.create_model(f"local-dir:{ema_run / 'final_raw'}").state_dict()
    assert final.keys() == raw.keys() == last["model"].keys()
    for key in final:
        assert torch.equal(final[key], last["ema"]["weights"][key]), key
        assert torch.equal(raw[key], last["model"][key]), key
    import json

    config = json.loads((ema_run / "config.json").read_text())
    assert config["ema"] == DECAY and config["ema_warmup"] is True and config["ema_settings"]["decay"] == DECAY
    records = [json.loads(line) for line in (ema_run / "metrics.jsonl").read_text().splitlines()]
    validations = [r for r in records if r["kind"] == "val"]
    assert [r["step"] for r in validations] == [2, 4, 5] and all(r["weights"] == "ema" for r in validations)
    assert json.loads((ema_run / "summary.json").read_text())["weights"] == "ema"


def test_without_ema_nothing_changes(ema_run, tmp_path):
    # the same run without --ema trains the same weights, bit for bit (the EMA's swaps for validation at
    # steps 2 and 4 gave the trained weights back exactly), and writes no EMA anywhere
    _train_here(tmp_path / "plain", *FLAGS)
    plain, raw = _final(tmp_path / "plain"), _final(ema_run, "final_raw")
    assert plain.keys() == raw.keys()
    for key in plain:
        assert torch.equal(plain[key], raw[key]), key
    assert not (tmp_path / "plain" / "final_raw").exists()
    assert "ema" not in _checkpoint(tmp_path / "plain", 5)
    assert "weights" not in (tmp_path / "plain" / "metrics.jsonl").read_text()


def test_swap_into_gives_the_weights_back_bit_for_bit():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    model[0].weight.requires_grad_(False)  # frozen: not kept (its EMA would be itself)
    ema = EMA(model, 0.5, warmup=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for param in model.parameters():
            param.add_(1.0)
    ema.update(model)
    assert "0.weight" not in ema.weights and ema.weights.keys() == {"0.bias", "1.weight", "1.bias"}
    trained = {k: v.clone() for k, v in model.state_dict().items()}
    with ema.swap_into(model):
        for key in ema.weights:
            assert torch.allclose(model.state_dict()[key], before[key] + 0.5)
        assert torch.equal(model.state_dict()["0.weight"], trained["0.weight"])
    for key, value in model.state_dict().items():
        assert torch.equal(value, trained[key]), key


def test_decay_out_of_range_is_a_user_error():
    for decay in (0.0, 1.0, 1.5):
        with pytest.raises(UserError, match="--ema must be"):
            TrainConfig(ema=decay).validate()


# ---------------------------------------------------------------------------------------------
# Resume after SIGKILL (the same check as test_resume.py's, for the EMA)


@pytest.mark.slow
def test_sigkill_then_resume_gives_a_bit_identical_ema_and_final(tmp_path):
    from tests.train.test_resume import _train

    steps = ["--steps", "30", "--save-every", "6", "--ema", "0.95"]
    reference = _train(tmp_path / "reference", *steps)
    assert reference.returncode == 0, reference.stderr[-2000:]

    killed_dir = tmp_path / "killed"
    process = _train(killed_dir, *steps, wait=False)
    first_checkpoint = killed_dir / "checkpoints" / "step_00000006.pt"
    deadline = time.time() + 300
    while not first_checkpoint.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert first_checkpoint.exists(), "the run never wrote its first checkpoint"
    assert not (killed_dir / "final").exists(), "the run finished before it could be killed"

    resumed = _train(killed_dir, *steps, "--resume", "latest")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stdout
    for name in ("final", "final_raw"):
        expected, got = _final(tmp_path / "reference", name), _final(killed_dir, name)
        assert expected.keys() == got.keys()
        for key in expected:
            assert torch.equal(expected[key], got[key]), (name, key)
    expected_ema, got_ema = _checkpoint(tmp_path / "reference", 30)["ema"], _checkpoint(killed_dir, 30)["ema"]
    assert int(expected_ema["updates"]) == int(got_ema["updates"]) == 30
    for key, value in expected_ema["weights"].items():
        assert torch.equal(value, got_ema["weights"][key]), key


# ---------------------------------------------------------------------------------------------
# Two processes: the EMA of DDP (replicated) and of FSDP2 (sharded) equals the single-process EMA


DIST_EMA = ["--ema", "0.5"]


def _assert_close_weights(got: Path, expected: Path, *names: str) -> None:
    for name in names:
        error, key = _max_weight_error(_final(got, name), _final(expected, name))
        assert error <= 1e-5, (name, key, error)  # the tolerance test_distributed uses for weights


@pytest.mark.slow
def test_ddp_ema_equals_the_single_process_ema(tmp_path):
    flags = ["--batch-size", "16", "--steps", "4", "--save-every", "0", *DIST_EMA]
    _torchrun_train(tmp_path / "ddp", *flags)
    _train_here(tmp_path / "single", *flags)
    _assert_close_weights(tmp_path / "ddp", tmp_path / "single", "final", "final_raw")
    # the EMA moved away from the raw weights, so "final" checks the EMA and not the weights again
    assert _max_weight_error(_final(tmp_path / "single"), _final(tmp_path / "single", "final_raw"))[0] > 1e-3


FSDP_EMA = ["--batch-size", "16", "--steps", "6", "--save-every", "3", "--keep-checkpoints", "5", *DIST_EMA]


@pytest.mark.slow
def test_fsdp_sharded_ema_equals_the_single_process_ema_and_resumes_from_its_shards(tmp_path):
    import torch.distributed.checkpoint as dcp

    _torchrun_train(tmp_path / "fsdp", *FSDP_EMA, "--fsdp")
    _train_here(tmp_path / "single", *FSDP_EMA)
    _assert_close_weights(tmp_path / "fsdp", tmp_path / "single", "final", "final_raw")

    # the EMA went into the DCP folder as shards of every tensor, beside the model's
    checkpoint = tmp_path / "fsdp" / "checkpoints" / "step_00000003"
    stored = dcp.FileSystemReader(str(checkpoint)).read_metadata().state_dict_metadata
    ema_keys = {k for k in stored if k.startswith("ema.weights.")}
    assert ema_keys == {f"ema.weights.{k}" for k in _final(tmp_path / "single")}
    assert "ema.updates" in stored
    chunks = stored["ema.weights.visual.conv1.weight"].chunks
    assert len(chunks) == 2  # one shard per process

    # resumed from the shards on 2 processes (FSDP2) and on 1: the same EMA at the end
    _torchrun_train(tmp_path / "two", *FSDP_EMA, "--fsdp", "--resume", str(checkpoint))
    _train_here(tmp_path / "one", *FSDP_EMA, "--resume", str(checkpoint))
    for name in ("two", "one"):
        _assert_close_weights(tmp_path / name, tmp_path / "fsdp", "final", "final_raw")


# ---------------------------------------------------------------------------------------------
# The Checkpointer with an EMA (a .pt file; the sharded folder is the FSDP2 test's)


def _model_with_ema(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer, EMA]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(3, 4)).sum().backward()
    optimizer.step()
    ema = EMA(model, 0.9)
    ema.update(model)
    optimizer.step()
    ema.update(model)
    return model, optimizer, ema


def test_checkpointer_saves_and_loads_the_ema(tmp_path):
    from ldmclip.train.checkpointer import Checkpointer
    from ldmclip.train.distributed import DistInfo

    model, optimizer, ema = _model_with_ema(0)
    path = Checkpointer(tmp_path, model, optimizer, 0, DistInfo(), ema=ema).save(2, {})
    other_model, other_optimizer, other_ema = _model_with_ema(1)
    Checkpointer(tmp_path, other_model, other_optimizer, 0, DistInfo(), ema=other_ema).load(path)
    assert other_ema.updates == 2
    for key, value in ema.weights.items():
        assert torch.equal(other_ema.weights[key], value), key


def test_resuming_a_run_without_ema_with_ema_starts_the_ema_from_its_weights(tmp_path, capsys):
    from ldmclip.train.checkpointer import Checkpointer
    from ldmclip.train.distributed import DistInfo

    model, optimizer, _ = _model_with_ema(0)
    path = Checkpointer(tmp_path, model, optimizer, 0, DistInfo()).save(2, {})
    assert "ema" not in torch.load(path, weights_only=True)
    other_model, other_optimizer, other_ema = _model_with_ema(1)
    Checkpointer(tmp_path, other_model, other_optimizer, 0, DistInfo(), ema=other_ema).load(path)
    assert other_ema.updates == 0
    for key, value in model.state_dict().items():
        assert torch.equal(other_ema.weights[key], value), key
    assert "holds no EMA" in capsys.readouterr().err


def test_an_ema_of_other_parameters_is_a_user_error():
    model, _, ema = _model_with_ema(0)
    model[0].weight.requires_grad_(False)
    with pytest.raises(UserError, match="other parameters"):
        EMA(model, 0.9).load_state_dict(ema.state_dict())


def test_resuming_an_ema_checkpoint_without_ema_says_the_ema_is_dropped(tmp_path, capsys):
    from ldmclip.train.checkpointer import Checkpointer
    from ldmclip.train.distributed import DistInfo

    model, optimizer, ema = _model_with_ema(0)
    path = Checkpointer(tmp_path, model, optimizer, 0, DistInfo(), ema=ema).save(2, {"progress": {"step": 2}})
    other_model, other_optimizer, _ = _model_with_ema(1)
    rest = Checkpointer(tmp_path, other_model, other_optimizer, 0, DistInfo()).load(path)
    assert rest == {"progress": {"step": 2}}  # the EMA is not handed on as trainer state
    assert "does not keep; add --ema" in capsys.readouterr().err
