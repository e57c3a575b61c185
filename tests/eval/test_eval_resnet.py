"""``ldmclip eval`` on a ResNet model (it uses ``encode_image`` alone): the retrieval numbers are the
metric of the model's own features, and zero-shot classification runs and counts every image."""

from __future__ import annotations

import json

import pytest
import torch

import ldmclip
from ldmclip.cli import main
from ldmclip.eval import retrieval_metrics
from ldmclip.models import CLIP, CLIPConfig
from tests.models.test_resnet import TINY_RN, randomize

from .conftest import make_caption_table, make_class_folder


def test_eval_of_a_resnet_model(tmp_path, capsys):
    randomize(CLIP(CLIPConfig.from_dict(TINY_RN))).save_pretrained(tmp_path / "rn")
    name = f"local-dir:{tmp_path / 'rn'}"
    table = make_caption_table(tmp_path / "flickr", images=9, captions_per_image=2)
    folder = make_class_folder(tmp_path / "classes", per_class=2)
    out = tmp_path / "r.json"
    code = main(["eval", "--model", name, "--retrieval", str(table), "--images", str(tmp_path / "flickr" / "images"),
                 "--zeroshot", str(folder), "--templates", "simple", "--precision", "fp32", "--workers", "0",
                 "--json", str(out)])
    assert code == 0, capsys.readouterr().err
    results = json.loads(out.read_text())
    assert results["zeroshot"]["num_images"] == 12 and results["zeroshot"]["num_classes"] == 6

    model, _, preprocess = ldmclip.create_model_and_transforms(name)
    model.eval()
    from PIL import Image

    images = torch.stack([preprocess(Image.open(tmp_path / "flickr" / "images" / f"im{i:03d}.png"))
                          for i in range(9)])
    captions = [line.split(",", 1)[1] for line in table.read_text().splitlines()[1:]]
    with torch.no_grad():
        expected = retrieval_metrics(model.encode_image(images, normalize=True),
                                     model.encode_text(ldmclip.get_tokenizer(name)(captions), normalize=True),
                                     torch.arange(9).repeat_interleave(2))
    for key, value in expected.items():
        assert results["retrieval"][key] == pytest.approx(value, abs=1e-12), key
