"""The benchmark suite at tiny sizes (tiny model configs, a few captions, small images): every
benchmark runs, its numerical checks hold (identical token ids, equal outputs on the same weights) and
the JSON has every row. Times are never asserted: they mean nothing at these sizes."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("open_clip")
pytest.importorskip("open_clip_train")
pytest.importorskip("transformers")
pytest.importorskip("webdataset")
pytest.importorskip("torchvision")

from benchmarks.common import PROFILES  # noqa: E402
from benchmarks.run import BENCHMARKS, _registry, format_rows, main, run_suite  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def result():
    return run_suite(PROFILES["tiny"], verbose=False)


def _expected_ids() -> set[str]:
    ids = set()
    for name in BENCHMARKS:
        for row_id in _registry()[name][1]:
            if row_id.endswith("*"):  # one row per loss size
                ids |= {row_id[:-1] + str(n) for n in PROFILES["tiny"].loss_sizes}
            else:
                ids.add(row_id)
    return ids


def test_every_row_ran(result):
    rows = {r["id"]: r for r in result["rows"]}
    assert set(rows) == _expected_ids()
    failed = {i: r["note"] for i, r in rows.items() if r["status"] == "failed"}
    assert not failed
    for row in rows.values():
        assert row["status"] in ("met", "missed", "report", "skipped")
        assert row["ours"] is not None and row["ours"] >= 0


def test_numerical_checks_hold(result):
    for row in result["rows"]:
        assert row["checks"], f"{row['id']} has no numerical check"
        bad = {k: v for k, v in row["checks"].items() if not v["ok"]}
        assert not bad, f"{row['id']}: {bad}"
    checks = {row["id"]: row["checks"] for row in result["rows"]}
    assert checks["tokenizer_openclip"]["token_ids_identical"]["ok"]
    assert checks["tokenizer_hf"]["token_ids_identical"]["ok"]
    assert checks["conditioning"]["token_ids_identical"]["ok"]
    assert checks["conditioning"]["hidden_equal_fp32"]["ok"]
    assert checks["pooled"]["embeddings_equal_fp32"]["ok"]
    assert checks["train_vitb16"]["loss_equal_fp32"]["ok"]
    assert checks["loader"]["same_samples_same_token_ids"]["ok"]
    assert checks["decode"]["eval_preprocess_equal"]["ok"]


def test_interleaved_repeats_and_ratios(result):
    repeats = PROFILES["tiny"].repeats
    for row in result["rows"]:
        if row["status"] == "skipped" or row["id"] == "train_mfu":
            continue
        assert len(row["ours_all"]) == repeats
        if row["theirs_all"]:
            assert len(row["theirs_all"]) == repeats
            if row["theirs"]:  # the in-process loss memory of the smoke test can be 0
                assert row["ratio"] == pytest.approx(row["ours"] / row["theirs"])


def test_table_and_json(result, tmp_path):
    table = format_rows(result["rows"])
    assert table.count("\n") == len(result["rows"]) + 1
    json.loads(json.dumps(result, default=str))
    out = tmp_path / "tok.json"
    assert main(["--profile", "tiny", "--only", "tokenizer", "--json", str(out)]) == 0
    written = json.loads(out.read_text())
    assert {r["id"] for r in written["rows"]} == {"tokenizer_openclip", "tokenizer_hf"}
    assert written["environment"]["torch"]


def test_json_dash_is_standard_output(capsys, tmp_path, monkeypatch):
    # '-' once meant "no file" in run.py and a file literally named '-' in the other scripts.
    monkeypatch.chdir(tmp_path)
    assert main(["--profile", "tiny", "--only", "tokenizer", "--json", "-"]) == 0
    written = json.loads(capsys.readouterr().out)  # the table goes to standard error
    assert {r["id"] for r in written["rows"]} == {"tokenizer_openclip", "tokenizer_hf"}
    assert not (tmp_path / "-").exists()
