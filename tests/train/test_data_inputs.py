"""What ``--data`` is, decided by core.formats for train exactly as for eval and cache-text."""

from pathlib import Path

import pytest
from PIL import Image

from ldmclip.core.formats import input_kind
from ldmclip.eval.sources import open_retrieval
from ldmclip.registry import get_tokenizer
from ldmclip.train.config import TrainConfig
from ldmclip.train.data import MapStyleData, StreamData, build_train_data
from ldmclip.transforms import PreprocessConfig


@pytest.fixture
def tab_table(tmp_path: Path) -> Path:
    for i, colour in enumerate(("red", "blue", "green")):
        Image.new("RGB", (40, 40), colour).save(tmp_path / f"{i}.png")
    table = tmp_path / "captions.tab"
    table.write_text("image\tcaption\n" + "".join(f"{i}.png\ta {c} square\n" for i, c in
                                                  enumerate(("red", "blue", "green"))), encoding="utf-8")
    return table


def test_train_reads_a_tab_file_as_a_table_like_eval(tab_table: Path):
    # Before core.formats, train's own suffix list lacked .tab and streamed this file as webdataset shards.
    cfg = TrainConfig(data=str(tab_table), images=str(tab_table.parent), batch_size=2, workers=0)
    data = build_train_data(cfg, get_tokenizer("ViT-Tiny-64"), PreprocessConfig(image_size=64))
    assert isinstance(data, MapStyleData) and not isinstance(data, StreamData)
    assert len(data.dataset) == 3
    assert input_kind(tab_table) == "table"
    assert len(open_retrieval(tab_table, None, image_root=tab_table.parent).images) == 3
