"""``benchmarks/gpu.py`` in its tiny CPU mode, in a subprocess (as it runs on a device machine): the JSON
has every row of every check, each with a value or a recorded skip/failure reason, no row failed, the
only skip is the one the script documents ("needs CUDA"), and the markdown table parses into the same
rows. Times are never asserted: they mean nothing at these sizes."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

pytest.importorskip("open_clip")
pytest.importorskip("transformers")
pytest.importorskip("torchvision")

from benchmarks.gpu import CHECKS, SIZES, markdown  # noqa: E402
from tests.conftest import REPO  # noqa: E402

pytestmark = pytest.mark.slow

CELL_SPLIT = re.compile(r"(?<!\\)\|")  # a bar escaped as \| belongs to its cell


def _table(text: str) -> list[dict[str, str]]:
    """The rows of the one markdown table in ``text``, as {column: cell}."""
    lines = [line for line in text.splitlines() if line.startswith("|")]
    header, rule, *body = [[c.strip() for c in CELL_SPLIT.split(line)[1:-1]] for line in lines]
    assert all(set(c) <= set("-:") and c for c in rule), rule
    for cells in body:
        assert len(cells) == len(header), cells
    return [dict(zip(header, cells)) for cells in body]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu")
    command = [sys.executable, str(REPO / "benchmarks" / "gpu.py"), "--device", "cpu", "--profile", "tiny",
               "--json", str(out / "gpu.json"), "--markdown", str(out / "gpu.md"), "--commit", "abc1234", "--quiet"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=REPO)
    return done, json.loads((out / "gpu.json").read_text()), (out / "gpu.md").read_text()


def test_every_row_has_a_value_or_a_reason(run):
    done, result, _ = run
    expected = [i for check in CHECKS for i in check.ids(SIZES["tiny"])]
    rows = {r["id"]: r for r in result["rows"]}
    assert [r["id"] for r in result["rows"]] == expected
    assert result["finished"] and result["device"] == "cpu" and result["commit"] == "abc1234"
    failed = {i: r["note"] for i, r in rows.items() if r["status"] == "failed"}
    assert not failed, (failed, done.stderr[-3000:])
    assert done.returncode == 0, done.stderr[-3000:]
    skipped = {i for i, r in rows.items() if r["status"] == "skipped"}
    assert skipped == {"train_b16_compile"}
    assert rows["train_b16_compile"]["note"].startswith("needs CUDA")
    for row_id, row in rows.items():
        if row["status"] != "skipped":
            assert row["ours"] is not None, row_id
            assert row["checks"] and row["checks_ok"], (row_id, row["checks"])
            assert row["extra"]["row_peak_memory_mb"] > 0, row_id


def test_rows_check_what_they_claim(run):
    rows = {r["id"]: r for r in run[1]["rows"]}
    assert rows["parity_b16_fp32"]["checks"]["loss_equal_fp32"]["ok"]
    assert rows["parity_b16_fp32"]["ours"] < 1e-4  # fp32: the same weights give the same numbers
    assert "image_features_cosine_bf16" in rows["parity_l14_bf16"]["checks"]
    assert rows["train_b16_tiled"]["config"]["tile_size"] == SIZES["tiny"].tile_size
    assert rows["cache_text"]["checks"]["every_caption_cached"]["ok"]
    for row_id in ("torchrun_ddp", "torchrun_fsdp"):  # 2 gloo processes on CPU: really wrapped
        assert rows[row_id]["config"]["processes"] == 2
        assert any(k.startswith("wrapped_in_") for k in rows[row_id]["checks"]), rows[row_id]["checks"]


def test_markdown_table_parses_into_the_json_rows(run):
    _, result, text = run
    assert "Commit `abc1234`" in text.splitlines()[0]
    table = _table(text)
    assert [r["row"] for r in table] == [r["id"] for r in result["rows"]]
    by_id = {r["row"]: r for r in table}
    assert by_id["train_b16_compile"]["result"] == "skipped"
    assert by_id["parity_b16_fp32"]["checks"] == "ok"
    assert text == markdown(result)


def test_a_spent_budget_skips_with_a_reason(tmp_path):
    out = tmp_path / "gpu.json"
    command = [sys.executable, str(REPO / "benchmarks" / "gpu.py"), "--device", "cpu", "--profile", "tiny",
               "--only", "parity_b16", "loss", "--budget-s", "0", "--json", str(out), "--quiet"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert [r["id"] for r in rows] == ["parity_b16_fp32", "parity_b16_bf16", "loss_memory_256", "loss_time_256"]
    assert all(r["status"] == "skipped" and "budget" in r["note"] for r in rows)


def test_a_check_that_overruns_or_raises_is_recorded_and_the_run_goes_on():
    import time

    from benchmarks.gpu import Check, _fixed, _run_one

    def slow(sizes):
        time.sleep(30)

    def broken(sizes):
        raise ValueError("something broke")

    overran = _run_one(Check("slow", "a slow check", _fixed("slow_a", "slow_b"), slow, 1), SIZES["tiny"], False, 0.5)
    assert [(r.id, r.status) for r in overran] == [("slow_a", "failed"), ("slow_b", "failed")]
    assert overran[0].note.startswith("RowTimeout: stopped after")
    raised = _run_one(Check("broken", "a broken check", _fixed("broken"), broken, 1), SIZES["tiny"], False, None)
    assert raised[0].status == "failed" and raised[0].note == "ValueError: something broke"
