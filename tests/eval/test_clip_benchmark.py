"""A real OpenCLIP client on ldmclip: CLIP_benchmark 1.6.2 (``clip-benchmark`` on PyPI) evaluates the same
model with ``open_clip`` replaced by ldmclip, and reports what it reports with OpenCLIP itself and what
``ldmclip eval`` reports on the same files (fp32).

The data: 10 CIFAR-10 test images per class (zero-shot) and 50 Flickr8k test images with their 5
captions each (retrieval), from ``../shared/data`` (skipped when absent), converted to CLIP_benchmark's
webdataset layout by its own converter, and evaluated by its own command line (``clip_benchmark eval``,
unmodified but for its ``accuracy()``, which fails on NumPy 2.x). Every step runs in a subprocess
(``clip_benchmark_runner.py``) with a timeout, so a hang fails the test rather than blocking the suite."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ..conftest import REPO, shared_data_dir

RUNNER = Path(__file__).with_name("clip_benchmark_runner.py")
TIMEOUT = 300  # seconds per step; each takes 10-30 s on two busy cores
RECALL_K = (1, 5, 10)


def _run(*args: str) -> str:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]),
           "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    done = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=TIMEOUT, env=env)
    assert done.returncode == 0, f"{args[:3]} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


@pytest.fixture(scope="module")
def benchmark_data(tmp_path_factory) -> Path:
    if importlib.util.find_spec("clip_benchmark") is None:
        pytest.skip("clip-benchmark is not installed (pip install clip-benchmark==1.6.2, in the test extras)")
    data = shared_data_dir()
    if data is None or not (data / "cifar10-test").is_dir() or not (data / "flickr8k" / "captions.csv").is_file():
        pytest.skip("../shared/data/cifar10-test and flickr8k not found (or set LDMCLIP_DATA)")
    out = tmp_path_factory.mktemp("clip_benchmark")
    _run(str(RUNNER), "build", str(data / "cifar10-test"), str(data / "flickr8k"), str(out))
    return out


def _clip_benchmark(lib: str, model_dir: Path, data: Path) -> dict:
    out = data.parent / f"{data.name}_{lib}.json"
    _run(str(RUNNER), "eval", lib, f"local-dir:{model_dir}", str(data), str(out))
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def with_openclip(benchmark_data, model_dir) -> dict:
    return _clip_benchmark("open_clip", model_dir, benchmark_data)


@pytest.fixture(scope="module")
def with_ldmclip(benchmark_data, model_dir) -> dict:
    return _clip_benchmark("ldmclip", model_dir, benchmark_data)


def test_clip_benchmark_on_ldmclip_reports_what_it_reports_on_openclip(with_openclip, with_ldmclip):
    assert set(with_ldmclip) == {"cifar10", "flickr8k"}
    for dataset, metrics in with_openclip.items():
        assert set(with_ldmclip[dataset]) == set(metrics)
        for key, value in metrics.items():
            assert with_ldmclip[dataset][key] == pytest.approx(value, abs=1e-9), (dataset, key)
    # not a vacuous agreement: the numbers are neither all zero nor all one
    zs, rt = with_openclip["cifar10"], with_openclip["flickr8k"]
    assert 0 < zs["acc5"] < 1 and 0 < rt["image_retrieval_recall@10"] < 1 and 0 < rt["text_retrieval_recall@10"] < 1


def test_ldmclip_eval_reports_what_clip_benchmark_reports(benchmark_data, model_dir, with_openclip):
    out = benchmark_data.parent / f"{benchmark_data.name}_ldmclip_eval.json"
    _run("-m", "ldmclip", "eval", "--model", f"local-dir:{model_dir}", "--zeroshot", str(benchmark_data / "cifar10"),
         "--retrieval", str(benchmark_data / "flickr8k"), "--precision", "fp32", "--workers", "0", "--quiet",
         "--json", str(out))
    results = json.loads(out.read_text())
    zs, rt = results["zeroshot"], results["retrieval"]
    reference_zs, reference_rt = with_openclip["cifar10"], with_openclip["flickr8k"]
    # the dataset's own classnames.txt and 18 CIFAR-10 templates ({c}), as CLIP_benchmark uses them
    assert zs["num_images"] == 100 and zs["num_classes"] == 10 and zs["num_templates"] == 18
    assert zs["top1"] == pytest.approx(reference_zs["acc1"], abs=1e-6)
    assert zs["top5"] == pytest.approx(reference_zs["acc5"], abs=1e-6)
    assert zs["mean_per_class_accuracy"] == pytest.approx(reference_zs["mean_per_class_recall"], abs=1e-9)
    # five captions per image, each line of the txt one caption (not one long caption per image)
    assert rt["num_images"] == 50 and rt["num_captions"] == 250
    for k in RECALL_K:
        # CLIP_benchmark's image retrieval is text->image (per caption), its text retrieval image->text
        assert rt[f"text_to_image_R@{k}"] == pytest.approx(reference_rt[f"image_retrieval_recall@{k}"], abs=1e-6)
        assert rt[f"image_to_text_R@{k}"] == pytest.approx(reference_rt[f"text_retrieval_recall@{k}"], abs=1e-6)
