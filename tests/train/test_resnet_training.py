"""ResNet image towers in the trainer: the loss falls, the final model loads in OpenCLIP with equal
outputs, --lock-image keeps BatchNorm in eval mode, activation checkpointing leaves the running
statistics as they would be without it, and 2-process DDP with --sync-bn equals 1 process."""

from __future__ import annotations

import json

import pytest
import torch

import ldmclip
from ldmclip.core.errors import UserError
from ldmclip.train import TrainConfig, train
from ldmclip.train.parallelize import apply_activation_checkpointing
from tests.conftest import relative_error
from tests.models.test_resnet import TINY_RN, randomize
from tests.train.test_loop import _table


def _tiny_rn(tmp_path) -> str:
    path = tmp_path / "tiny-rn.json"
    path.write_text(json.dumps(TINY_RN))
    return str(path)


def _losses(run) -> list[float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if r["kind"] == "train"]


def _config(tmp_path, model: str, **overrides) -> TrainConfig:
    table, images = _table(tmp_path)
    values = dict(model=model, data=str(table), images=str(images), val_data=str(table), val_size=8, steps=8,
                  batch_size=8, workers=0, warmup=1, lr=2e-3, output=str(tmp_path / "run"), eval_every=0,
                  save_every=0, log_every=1, progress=False, precision="fp32")
    values.update(overrides)
    return TrainConfig(**values)


def test_a_resnet_trains_and_its_final_model_loads_in_openclip(tmp_path):
    open_clip = pytest.importorskip("open_clip")
    result = train(_config(tmp_path, _tiny_rn(tmp_path)))
    losses = _losses(tmp_path / "run")
    assert len(losses) == 8 and sum(losses[-3:]) / 3 < losses[0], losses
    ours = ldmclip.create_model(f"local-dir:{result.final_model}").eval()
    theirs = open_clip.create_model(f"local-dir:{result.final_model}").eval()
    # the BatchNorm running statistics were trained and saved (not the initial 0 / 1)
    assert ours.visual.bn1.num_batches_tracked.item() == 8
    assert not torch.equal(ours.visual.bn1.running_mean, torch.zeros_like(ours.visual.bn1.running_mean))
    images = torch.randn(2, 3, 64, 64)
    tokens = ldmclip.get_tokenizer(f"local-dir:{result.final_model}")(["a red square", "something blue"])
    with torch.no_grad():
        assert relative_error(ours.encode_image(images), theirs.encode_image(images)) <= 1e-5
        assert relative_error(ours.encode_text(tokens), theirs.encode_text(tokens)) <= 1e-5


def test_lock_image_keeps_batchnorm_in_eval_mode(tmp_path):
    model = _tiny_rn(tmp_path)
    before = ldmclip.create_model(model).visual.state_dict()  # the seed makes the run's init the same
    result = train(_config(tmp_path, model, steps=3, lock_image=True))
    after = ldmclip.create_model(f"local-dir:{result.final_model}").visual.state_dict()
    for key, value in before.items():  # weights, running statistics, num_batches_tracked: all untouched
        assert torch.equal(after[key], value), key


def test_activation_checkpointing_gives_the_same_step_and_running_statistics():
    cfg = ldmclip.models.CLIPConfig.from_dict(TINY_RN)
    plain = randomize(ldmclip.models.CLIP(cfg)).train()
    checkpointed = ldmclip.models.CLIP(cfg)
    checkpointed.load_state_dict(plain.state_dict())
    apply_activation_checkpointing(checkpointed).train()
    assert checkpointed.visual.grad_checkpointing
    images = torch.randn(4, 3, 64, 64)
    for model in (plain, checkpointed):
        model.encode_image(images).square().sum().backward()
    ours, theirs = dict(checkpointed.visual.named_parameters()), dict(plain.visual.named_parameters())
    for name, param in theirs.items():
        if name != "attnpool.k_proj.bias":  # a true gradient of zero (softmax ignores it)
            assert relative_error(ours[name].grad, param.grad) <= 1e-5, name
    buffers = dict(checkpointed.visual.named_buffers())
    for name, buffer in plain.visual.named_buffers():  # counted once, not again in the recomputation
        assert torch.equal(buffers[name], buffer), name


def test_sync_bn_with_fsdp_is_refused():
    with pytest.raises(UserError, match="--sync-bn is for DDP"):
        TrainConfig(sync_bn=True, fsdp=True).validate()


def _rn50_at_32px(tmp_path) -> str:
    """RN50 itself (the packaged tower and text tower) at the smallest image size its five halvings
    allow, with a short context."""
    cfg = ldmclip.get_model_config("RN50").to_dict()
    cfg["vision_cfg"]["image_size"] = 32
    cfg["text_cfg"]["context_length"] = 16
    path = tmp_path / "rn50-32.json"
    path.write_text(json.dumps(cfg))
    return str(path)


@pytest.mark.slow
def test_rn50_trains_a_few_steps_and_the_loss_falls(tmp_path):
    # on a tiny table it can memorise
    train(_config(tmp_path, _rn50_at_32px(tmp_path), steps=4, batch_size=4, lr=1e-4, val_size=4))
    losses = _losses(tmp_path / "run")
    assert len(losses) == 4 and losses[-1] < losses[0], losses


def _train_under_ddp(tmp_path, model: str, batch_size: int, steps: int):
    """``ldmclip train`` of ``model`` in 2 DDP processes; checks the run's size and that its losses are
    finite, and returns its flags and its final model."""
    from tests.train.test_distributed import _torchrun_train

    flags = ["--model", model, "--batch-size", str(batch_size), "--steps", str(steps), "--save-every", "0"]
    done = _torchrun_train(tmp_path / "ddp", *flags)
    assert "x 2 processes (DDP)" in done.stdout
    summary = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["samples"] == steps * batch_size
    assert all(loss == loss for loss in _losses(tmp_path / "ddp"))  # finite, not NaN
    return flags, ldmclip.create_model(f"local-dir:{tmp_path / 'ddp' / 'final'}")


@pytest.mark.skipif(not torch.distributed.is_available(), reason="needs torch.distributed")
def test_a_resnet_trains_under_2_process_ddp_and_sync_bn_on_cpu_is_refused(tmp_path):
    import subprocess

    from tests.train.test_distributed import _env, _torchrun_command

    # each process normalises with its own batch's statistics (OpenCLIP's default), as documented
    flags, model = _train_under_ddp(tmp_path, _tiny_rn(tmp_path), batch_size=16, steps=3)
    assert model.visual.bn1.num_batches_tracked.item() == 3  # rank 0's statistics, one update a step
    command = _torchrun_command("-m", "ldmclip", "train", "--precision", "fp32", "--workers", "0", "--progress", "no",
                                "--out", str(tmp_path / "sync"), *flags, "--sync-bn")
    refused = subprocess.run(command, capture_output=True, text=True, timeout=120, env=_env())
    assert refused.returncode != 0
    assert "ldmclip train: error: --sync-bn needs CUDA devices" in refused.stderr + refused.stdout


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available(), reason="needs torch.distributed")
def test_rn50_trains_under_2_process_ddp(tmp_path):
    _, model = _train_under_ddp(tmp_path, _rn50_at_32px(tmp_path), batch_size=4, steps=2)
    assert model.visual.layer4[2].bn3.num_batches_tracked.item() == 2  # one BatchNorm update a step


@pytest.mark.skipif(not torch.distributed.is_available(), reason="needs torch.distributed")
def test_a_resnet_under_fsdp2_follows_its_ddp_loss_curve(tmp_path):
    """FSDP2 shards the bottlenecks' parameters but not the BatchNorm buffers: each process normalises
    with its own batch as under DDP (without --sync-bn), so the two runs give the same losses."""
    from tests.train.test_distributed import _torchrun_train

    flags = ["--model", _tiny_rn(tmp_path), "--batch-size", "16", "--steps", "3", "--save-every", "0"]
    _torchrun_train(tmp_path / "ddp", *flags)
    _torchrun_train(tmp_path / "fsdp", *flags, "--fsdp")
    ddp, fsdp = _losses(tmp_path / "ddp"), _losses(tmp_path / "fsdp")
    assert len(ddp) == len(fsdp) == 3
    assert fsdp == pytest.approx(ddp, rel=1e-5)
    model = ldmclip.create_model(f"local-dir:{tmp_path / 'fsdp' / 'final'}")
    assert model.visual.bn1.num_batches_tracked.item() == 3
