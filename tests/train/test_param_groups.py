"""Parameter groups as data: per-tower lrs, layer-wise lr decay, --param-groups files, partial unlocking."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

import ldmclip
from ldmclip.core.errors import UserError
from ldmclip.train import TrainConfig, train
from ldmclip.train.loop import TrainingError
from ldmclip.train.optim import build_optimizer, build_scheduler, cosine_with_warmup, parameter_groups
from ldmclip.train.param_groups import build_param_groups, format_param_groups, optimizer_groups
from ldmclip.train.parallelize import lock_towers

LR, WD = 1e-3, 0.1


def _uneven_model(tmp_path) -> torch.nn.Module:
    """ViT-Tiny-64 with a 3-block image tower beside its 2-block text tower (each decays over its own depth)."""
    config = ldmclip.get_model_config("ViT-Tiny-64").to_dict()
    config["vision_cfg"]["layers"] = 3
    path = tmp_path / "uneven.json"
    path.write_text(json.dumps(config))
    return ldmclip.create_model(str(path))


def _optimizer(model, cfg: TrainConfig):
    groups = build_param_groups(model, cfg)
    optimizer = build_optimizer(model, cfg.lr, cfg.wd, (0.9, 0.98), 1e-6, groups=optimizer_groups(model, groups))
    return groups, optimizer


def _lr_and_wd_by_name(model, optimizer) -> dict[str, tuple[float, float]]:
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)]: (g["lr"], g["weight_decay"]) for g in optimizer.param_groups for p in g["params"]}


def test_without_options_the_groups_are_the_two_of_before():
    model = ldmclip.create_model("ViT-Tiny-64")
    groups = build_param_groups(model, TrainConfig(lr=LR, wd=WD))
    assert [g.name for g in groups] == ["all", "all.no_wd"]
    before = parameter_groups(model, WD)  # the optimizer state of older runs lines up with these
    for group, old in zip(optimizer_groups(model, groups), before):
        assert [id(p) for p in group["params"]] == [id(p) for p in old["params"]]
        assert group["weight_decay"] == old["weight_decay"] and group["lr"] == LR


def test_per_tower_lrs_reach_the_optimizer_and_the_schedule_scales_every_group():
    model = ldmclip.create_model("ViT-Tiny-64")
    cfg = TrainConfig(lr=LR, wd=WD, lr_image=1e-4, lr_text=3e-4)
    groups, optimizer = _optimizer(model, cfg)
    assert {g.name for g in groups} == {"text", "text.no_wd", "image", "image.no_wd", "other.no_wd"}
    expected = {n: 1e-4 if n.startswith("visual.") else LR if n.startswith("logit_") else 3e-4
                for n, _ in model.named_parameters()}
    scheduler = build_scheduler(optimizer, warmup=2, total=10)
    for step in range(3):
        factor = cosine_with_warmup(step, 2, 10)
        seen = _lr_and_wd_by_name(model, optimizer)
        assert set(seen) == set(expected)
        for name, (lr, _) in seen.items():
            assert lr == pytest.approx(expected[name] * factor, rel=1e-12), (step, name)
        optimizer.step()
        scheduler.step()
    # the weight-decay exclusions are kept in every group
    seen = _lr_and_wd_by_name(model, optimizer)
    assert seen["visual.transformer.resblocks.0.attn.in_proj_weight"][1] == WD
    assert seen["visual.transformer.resblocks.0.attn.in_proj_bias"][1] == 0.0
    assert seen["token_embedding.weight"][1] == 0.0 and seen["logit_scale"][1] == 0.0


def _expected_layer_scale(name: str, decay: float, image_depth: int, text_depth: int) -> float:
    """BEiT / MAE layer decay written out by hand: embeddings D^(L+1), block k D^(L-k), head 1."""
    if name.startswith("logit_"):
        return 1.0
    image = name.startswith("visual.")
    depth = image_depth if image else text_depth
    local = name[len("visual."):] if image else name
    embeddings = ("conv1.", "class_embedding", "positional_embedding", "ln_pre.") if image \
        else ("token_embedding.", "positional_embedding")
    if local.startswith(embeddings):
        return decay ** (depth + 1)
    if local.startswith("transformer.resblocks."):
        k = int(local.split(".")[2])
        return decay ** (depth - k)
    assert local.split(".")[0] in (("ln_post", "proj") if image else ("ln_final", "text_projection")), name
    return 1.0


def test_layer_decay_follows_the_formula_for_every_block_of_both_towers(tmp_path):
    model = _uneven_model(tmp_path)
    assert len(model.visual.transformer.resblocks) == 3 and len(model.transformer.resblocks) == 2
    cfg = TrainConfig(lr=LR, wd=WD, layer_decay=0.75, lr_text=2e-3)
    groups, optimizer = _optimizer(model, cfg)
    seen = _lr_and_wd_by_name(model, optimizer)
    assert set(seen) == {n for n, _ in model.named_parameters()}
    blocks_seen = set()
    for name, (lr, _) in seen.items():
        base = 2e-3 if not name.startswith(("visual.", "logit_")) else LR
        assert lr == pytest.approx(base * _expected_layer_scale(name, 0.75, 3, 2), rel=1e-12), name
        if ".resblocks." in name:
            blocks_seen.add(name.split(".resblocks.")[0] + name.split(".resblocks.")[1].split(".")[0])
    assert blocks_seen == {"visual.transformer0", "visual.transformer1", "visual.transformer2",
                           "transformer0", "transformer1"}
    names = [g.name for g in groups]
    assert "image.embed.no_wd" in names and "image.block2" in names and "text.head" in names
    table = format_param_groups(groups)
    assert "image.block0" in table and f"{LR * 0.75 ** 3:.2e}" in table


def test_param_groups_file_first_match_wins(tmp_path):
    rules = [{"pattern": "visual.transformer.resblocks.0.*", "lr": 1e-5, "wd": 0.0},
             {"regex": r"resblocks\.0\.", "lr_scale": 0.5},
             {"pattern": "visual.*", "wd_scale": 2}]
    yaml_file = tmp_path / "groups.yaml"
    yaml_file.write_text("- pattern: 'visual.transformer.resblocks.0.*'\n  lr: 1.0e-5\n  wd: 0.0\n"
                         "- regex: 'resblocks\\.0\\.'\n  lr_scale: 0.5\n- pattern: 'visual.*'\n  wd_scale: 2\n")
    json_file = tmp_path / "groups.json"
    json_file.write_text(json.dumps(rules))
    model = ldmclip.create_model("ViT-Tiny-64")
    results = []
    for path in (yaml_file, json_file):
        _, optimizer = _optimizer(model, TrainConfig(lr=LR, wd=WD, param_groups=str(path)))
        results.append(_lr_and_wd_by_name(model, optimizer))
    assert results[0] == results[1]
    seen = results[0]
    assert seen["visual.transformer.resblocks.0.attn.in_proj_weight"] == (1e-5, 0.0)  # rule 1
    assert seen["transformer.resblocks.0.attn.in_proj_weight"] == (0.5 * LR, WD)     # rule 2
    assert seen["visual.transformer.resblocks.1.mlp.c_fc.weight"] == (LR, 2 * WD)     # rule 3
    assert seen["visual.transformer.resblocks.1.mlp.c_fc.bias"] == (LR, 0.0)          # no decay, whatever the rule
    assert seen["transformer.resblocks.1.mlp.c_fc.weight"] == (LR, WD)                # no rule


@pytest.mark.parametrize("rules, message", [
    ([{"pattern": "visual.*", "lr_scale": 0.1, "momentum": 1}], "unknown key"),
    ([{"pattern": "visual.*", "regex": "x", "lr": 1}], "exactly one of"),
    ([{"pattern": "visaul.*", "lr_scale": 0.1}], "matches no parameter"),
    ([{"pattern": "visual.*", "lr": 1e-4, "lr_scale": 2}], "not both"),
    ([{"pattern": "visual.*", "lr": -1}], "at least 0"),
    ({"pattern": "visual.*"}, "list of rules"),
])
def test_a_bad_param_groups_file_is_a_one_line_error(tmp_path, rules, message):
    path = tmp_path / "groups.json"
    path.write_text(json.dumps(rules))
    with pytest.raises(UserError, match=message) as error:
        build_param_groups(ldmclip.create_model("ViT-Tiny-64"), TrainConfig(param_groups=str(path)))
    assert "\n" not in str(error.value)


def _trainable(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_trainable_parameters_equal_openclip_for_every_number_of_unlocked_groups(tmp_path):
    open_clip = pytest.importorskip("open_clip")
    ours = ldmclip.create_model("ViT-Tiny-64")
    ours.save_pretrained(tmp_path / "hub")
    theirs = open_clip.create_model(f"local-dir:{tmp_path / 'hub'}")
    assert {n for n, _ in theirs.named_parameters()} == {n for n, _ in ours.named_parameters()}
    for unlocked in range(0, 6):  # 2 blocks: 4 groups per tower, and more than there are
        for model in (ours, theirs):
            for p in model.parameters():
                p.requires_grad_(True)
        lock_towers(ours, lock_image=True, lock_text=True, image_unlocked_groups=unlocked,
                    text_unlocked_layers=unlocked)
        theirs.lock_image_tower(unlocked_groups=unlocked)
        theirs.lock_text_tower(unlocked_layers=unlocked)
        assert _trainable(ours) == _trainable(theirs), unlocked
        assert "logit_scale" in _trainable(ours)


def _synthetic_config(tmp_path, name: str, **overrides) -> TrainConfig:
    values = dict(model="ViT-Tiny-64", steps=3, batch_size=8, warmup=1, val_size=8, workers=0, eval_every=0,
                  save_every=0, log_every=1, progress=False, precision="fp32", output=str(tmp_path / name))
    values.update(overrides)
    return TrainConfig(**values)


def test_an_unlocked_groups_run_changes_exactly_those_parameters(tmp_path, capsys):
    start = ldmclip.create_model("ViT-Tiny-64")
    start.save_pretrained(tmp_path / "start")
    before = load_file(str(tmp_path / "start" / "open_clip_model.safetensors"))
    cfg = _synthetic_config(tmp_path, "run", pretrained=str(tmp_path / "start"), lock_image_unlocked_groups=2,
                            lock_text_unlocked_layers=1)
    result = train(cfg)
    after = load_file(str(result.final_model / "open_clip_model.safetensors"))
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    # image: the projection, then the last block with ln_post; text: text_projection; and the temperature
    expected = {k for k in before if k.startswith(("visual.proj", "visual.ln_post.", "visual.transformer.resblocks.1."))}
    expected |= {"text_projection", "logit_scale"}
    assert changed == expected
    printed = capsys.readouterr().out
    assert "parameter groups: 2" in printed
    stored = json.loads((result.output / "config.json").read_text())["param_groups"]
    assert [g["name"] for g in stored] == ["all", "all.no_wd"]
    assert sum(g["tensors"] for g in stored) == len(expected)


def test_resume_restores_the_same_groups_and_refuses_other_ones(tmp_path):
    options = dict(layer_decay=0.7, lr_image=2e-4, steps=4, save_every=2, keep_checkpoints=2)
    whole = train(_synthetic_config(tmp_path, "whole", **options))
    checkpoint = whole.output / "checkpoints" / "step_00000002.pt"
    saved = torch.load(checkpoint, weights_only=False)
    model = ldmclip.create_model("ViT-Tiny-64")
    expected = build_param_groups(model, _synthetic_config(tmp_path, "x", **options))
    assert [g.get("name") for g in saved["optimizer"]["param_groups"]] == [g.name for g in expected]
    assert [g["name"] for g in saved["param_groups"]] == [g.name for g in expected]
    (tmp_path / "resumed" / "checkpoints").mkdir(parents=True)
    shutil.copy(checkpoint, tmp_path / "resumed" / "checkpoints" / checkpoint.name)
    resumed = train(_synthetic_config(tmp_path, "resumed", resume="latest", **options))
    a = load_file(str(whole.final_model / "open_clip_model.safetensors"))
    b = load_file(str(resumed.final_model / "open_clip_model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(TrainingError, match="parameter groups"):
        train(_synthetic_config(tmp_path, "resumed", resume=str(checkpoint), steps=4))
