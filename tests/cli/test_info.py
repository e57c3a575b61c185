"""``ldmclip info MODEL`` prints JSON that loads back as a config file."""

from __future__ import annotations

import json

import torch

import ldmclip
from ldmclip.cli import main


def test_info_model_prints_json_that_loads_back_with_create_model(tmp_path, capsys):
    assert main(["info", "ViT-Tiny-64"]) == 0
    config = json.loads(capsys.readouterr().out)
    assert config["vision_cfg"]["image_size"] == 64 and "text_cfg" in config
    path = tmp_path / "my-model.json"
    path.write_text(json.dumps(config))
    assert ldmclip.get_model_config(str(path)) == ldmclip.get_model_config("ViT-Tiny-64")
    torch.manual_seed(0)
    mine = ldmclip.create_model(str(path))
    torch.manual_seed(0)
    packaged = ldmclip.create_model("ViT-Tiny-64")
    mine_state, packaged_state = mine.state_dict(), packaged.state_dict()
    assert mine_state.keys() == packaged_state.keys()
    assert all(torch.equal(mine_state[k], packaged_state[k]) for k in mine_state)
