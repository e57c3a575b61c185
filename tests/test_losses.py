"""ldmclip.losses against OpenCLIP 3.3.0's ClipLoss / SigLipLoss, the tiled CLIP loss against the
dense one, and the tiled loss's memory behaviour (checked by inspecting tensors, not by timing)."""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from ldmclip.losses import (SIGLIP_INIT_LOGIT_BIAS, SIGLIP_INIT_LOGIT_SCALE, ClipLoss, SigLipLoss, build_loss,
                            clamp_logit_scale_, tiled_clip_cross_entropy)
from tests.conftest import REPO, relative_error

open_clip_loss = pytest.importorskip("open_clip.loss")

TOL = 1e-5


def features(n: int, d: int, seed: int = 0, correlation: float = 0.0):
    """Normalised image and text features in fp64; text rows lean towards their image rows."""
    g = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1)
    text = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64) + correlation * image, dim=-1)
    return image, text


def loss_and_grads(loss_fn, image, text, scale, bias=None, dtype=torch.float32):
    """Loss value and gradients w.r.t. (image, text, logit_scale[, logit_bias]), all as fp64."""
    leaves = [image.to(dtype).detach().requires_grad_(), text.to(dtype).detach().requires_grad_(),
              torch.tensor(float(scale), requires_grad=True)]
    if bias is not None:
        leaves.append(torch.tensor(float(bias), requires_grad=True))
    loss = loss_fn(*leaves[:3], leaves[3] if bias is not None else None)
    loss.backward()
    return [loss.detach().double()] + [leaf.grad.double() for leaf in leaves]


def assert_close(ours, ref, tol=TOL, label="", grad_floor=1e-6):
    names = ["loss", "grad image", "grad text", "grad logit_scale", "grad logit_bias"]
    for name, a, b in zip(names, ours, ref):
        # Relative to the reference's largest magnitude, with a floor (the quantity's natural
        # size) for those that are 0 by symmetry and come out as rounding noise: a loss of 0
        # (N=1), the logit_bias gradient of the CLIP loss (shift-invariant), and all gradients of
        # a batch of identical rows (``grad_floor`` for the features).
        floor = {"loss": 1.0, "grad logit_scale": 0.1, "grad logit_bias": 1.0}.get(name, grad_floor)
        err = float((a - b).abs().max() / b.abs().max().clamp_min(floor))
        assert err <= tol, f"{label} {name}: relative error {err:.2e} > {tol:.0e}"


CASES = [  # (N, D, tile size, logit_scale)
    (1, 64, 4, 1 / 0.07),
    (7, 64, 3, 100.0),
    (100, 512, 32, 1 / 0.07),
    (257, 64, 64, 100.0),   # N not divisible by the tile
    (300, 512, 100, 50.0),
    (64, 64, 256, 100.0),   # tile larger than N
]


# ------------------------------------------------------------------------------------------
# ClipLoss against OpenCLIP
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n,d,tile,scale", CASES)
@pytest.mark.parametrize("use_bias", [False, True])
def test_clip_loss_matches_openclip(n, d, tile, scale, use_bias):
    image, text = features(n, d, seed=n, correlation=0.5)
    bias = -2.5 if use_bias else None
    ref = loss_and_grads(open_clip_loss.ClipLoss(), image, text, scale, bias)
    assert_close(loss_and_grads(ClipLoss(), image, text, scale, bias), ref, label="dense")
    assert_close(loss_and_grads(ClipLoss(tile_size=tile), image, text, scale, bias), ref, label="tiled")


def test_clip_loss_output_dict_and_float_scale():
    image, text = (x.float() for x in features(16, 64))
    ref = open_clip_loss.ClipLoss()(image, text, torch.tensor(10.0))
    for loss in (ClipLoss(), ClipLoss(tile_size=5)):
        assert torch.allclose(loss(image, text, 10.0), ref, rtol=TOL)
        assert torch.allclose(loss(image, text, torch.tensor(10.0), output_dict=True)["contrastive_loss"], ref,
                              rtol=TOL)


# ------------------------------------------------------------------------------------------
# Tiled against dense, hard cases
# ------------------------------------------------------------------------------------------

def _hard_case(kind: str, n: int = 200, d: int = 64):
    image, text = features(n, d, seed=1, correlation=1.0)
    if kind == "identical_rows":  # every logit equal: uniform softmax, loss = log N
        image = image[:1].expand(n, d).clone()
        text = text[:1].expand(n, d).clone()
    elif kind == "aligned":  # text = image: positives dominate by up to 2·scale
        text = image.clone()
    elif kind == "anti_aligned":  # text = -image: positives are the smallest logits (loss ≈ 2·scale)
        text = -image
    elif kind == "duplicates":  # half the batch repeats the other half
        image[n // 2:] = image[: n - n // 2]
        text[n // 2:] = text[: n - n // 2]
    return image, text


@pytest.mark.parametrize("kind", ["identical_rows", "aligned", "anti_aligned", "duplicates", "random"])
@pytest.mark.parametrize("scale,bias", [(100.0, None), (100.0, 40.0), (1.0, None)])
def test_tiled_equals_dense_hard_cases(kind, scale, bias):
    image, text = _hard_case(kind)
    dense = loss_and_grads(ClipLoss(), image, text, scale, bias)
    tiled = loss_and_grads(ClipLoss(tile_size=48), image, text, scale, bias)
    # A row's gradient is of order logit_scale/N when the softmax is spread out; where it is 0 by
    # symmetry (identical rows) both fp32 paths return rounding noise, compared on that scale.
    natural = scale / len(image)
    assert_close(tiled, dense, label=f"{kind} scale={scale} bias={bias}", grad_floor=natural)
    if kind == "identical_rows":
        assert math.isclose(float(tiled[0]), math.log(len(image)), rel_tol=1e-6)
        assert float(tiled[1].abs().max()) <= TOL * natural


@pytest.mark.parametrize("scale,bias", [(1000.0, None), (100.0, 500.0)])
def test_tiled_very_large_logits(scale, bias):
    """Logits of ~1e3 are beyond what fp32 resolves to 1e-5 (its spacing there is 6e-5), so both
    fp32 paths are compared with the fp64 truth, and the tiled one must be as good as the dense."""
    image, text = features(256, 64, seed=2, correlation=0.3)
    truth = loss_and_grads(ClipLoss(), image, text, scale, bias, dtype=torch.float64)
    dense = loss_and_grads(ClipLoss(), image, text, scale, bias)
    tiled = loss_and_grads(ClipLoss(tile_size=64), image, text, scale, bias)
    assert_close(dense, truth, tol=1e-4, label="dense vs fp64")
    assert_close(tiled, truth, tol=1e-4, label="tiled vs fp64")
    assert_close(tiled, dense, tol=1e-4, label="tiled vs dense")
    assert all(torch.isfinite(t).all() for t in tiled)


def test_tiled_kernel_rectangular_offset_and_gradcheck():
    """The kernel takes Na local rows against Nb gathered columns with the positives at an offset
    (the shape of the coming distributed loss), or a square batch with both directions; its
    gradients are checked numerically in fp64."""
    g = torch.Generator().manual_seed(3)
    a = torch.randn(13, 4, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(21, 4, generator=g, dtype=torch.float64, requires_grad=True)
    scale = torch.tensor(2.5, dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(-0.7, dtype=torch.float64, requires_grad=True)
    logits = scale * a @ b.T + bias
    rows, empty = tiled_clip_cross_entropy(a, b, scale, bias, tile_size=5, with_cols=False, offset=7)
    assert empty.numel() == 0
    assert torch.allclose(rows, F.cross_entropy(logits, torch.arange(13) + 7, reduction="none"))
    assert torch.autograd.gradcheck(
        lambda *x: tiled_clip_cross_entropy(*x, tile_size=4, with_cols=False, offset=8)[0], (a, b, scale, bias))

    sq = b[:13].detach().clone().requires_grad_()
    logits = scale * a @ sq.T + bias
    rows, cols = tiled_clip_cross_entropy(a, sq, scale, bias, tile_size=5)
    assert torch.allclose(rows, F.cross_entropy(logits, torch.arange(13), reduction="none"))
    assert torch.allclose(cols, F.cross_entropy(logits.T, torch.arange(13), reduction="none"))
    assert torch.autograd.gradcheck(lambda *x: tiled_clip_cross_entropy(*x, tile_size=5), (a, sq, scale, bias))
    with pytest.raises(ValueError):
        tiled_clip_cross_entropy(a, b, scale, tile_size=5)  # both directions need a square batch
    with pytest.raises(ValueError):
        tiled_clip_cross_entropy(a, b, scale, tile_size=5, with_cols=False, offset=9)


# ------------------------------------------------------------------------------------------
# Low precision
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tile", [None, 64])
def test_low_precision_close_to_fp32(dtype, tile):
    image, text = features(200, 256, seed=4, correlation=0.5)
    ref = loss_and_grads(ClipLoss(), image, text, 1 / 0.07)
    loss_fn = ClipLoss(tile_size=tile)
    ours = loss_and_grads(loss_fn, image, text, 1 / 0.07, dtype=dtype)
    assert relative_error(ours[0], ref[0]) <= 1e-2
    for a, b in zip(ours[1:3], ref[1:3]):
        assert relative_error(a, b) <= 5e-2
    assert relative_error(ours[3], ref[3]) <= 5e-2
    # Gradients come back in the features' dtype; the tiled loss itself is an fp32 scalar.
    i, t = image.to(dtype).requires_grad_(), text.to(dtype).requires_grad_()
    loss = loss_fn(i, t, torch.tensor(10.0))
    loss.backward()
    assert i.grad.dtype == dtype and t.grad.dtype == dtype
    if tile is not None:
        assert loss.dtype == torch.float32


def test_tiled_under_autocast_uses_autocast_dtype():
    """Under autocast the tiles' matmuls run in autocast's dtype, like a dense ``a @ b.T`` would:
    the same numbers as bf16 features, with fp32 statistics, and fp32 gradients for fp32 inputs."""
    image, text = (x.float() for x in features(128, 64, seed=5, correlation=0.5))
    scale = torch.tensor(30.0)
    as_bf16 = ClipLoss(tile_size=32)(image.bfloat16(), text.bfloat16(), scale)
    i, t = image.clone().requires_grad_(), text.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ClipLoss(tile_size=32)(i, t, scale)
        dense = ClipLoss()(image, text, scale)
    out.backward()
    assert out.dtype == torch.float32 and i.grad.dtype == torch.float32
    out = out.detach()
    assert relative_error(out, as_bf16) <= 1e-6
    assert relative_error(out, dense.float()) <= 1e-2
    assert relative_error(out, ClipLoss()(image, text, scale)) <= 1e-2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tiled_on_cuda(dtype):
    """The same code on a GPU: tiled equals dense (fp32), bf16 close; N×N never allocated."""
    torch.backends.cuda.matmul.allow_tf32 = False
    image, text = features(3000, 512, seed=7, correlation=0.5)
    image, text = image.cuda(), text.cuda()
    ref = [t.cpu() for t in loss_and_grads(ClipLoss(), image, text, 100.0, 3.0)]
    tiled = [t.cpu() for t in loss_and_grads(ClipLoss(tile_size=512), image, text, 100.0, 3.0, dtype=dtype)]
    if dtype == torch.float32:
        assert_close(tiled, ref, label="cuda tiled")
    else:
        assert relative_error(tiled[0], ref[0]) <= 1e-2
        assert all(relative_error(a, b) <= 5e-2 for a, b in zip(tiled[1:4], ref[1:4]))
    n, d, k = 65536, 512, 1024
    x = F.normalize(torch.randn(n, d, device="cuda"), dim=-1).to(dtype).requires_grad_()
    y = F.normalize(torch.randn(n, d, device="cuda"), dim=-1).to(dtype).requires_grad_()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    ClipLoss(tile_size=k)(x, y, torch.tensor(14.0, device="cuda")).backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    # O(N·D + k²): fp32 gradient accumulators and the gradients, a few fp32 tiles. One N×N
    # matrix would be 8 GiB (bf16) / 16 GiB (fp32).
    assert extra <= 8 * n * d * 4 + 16 * k * k * 4, f"{extra / 2**20:.0f} MiB extra"


# ------------------------------------------------------------------------------------------
# SigLIP
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n,d", [(1, 64), (7, 64), (100, 512), (257, 64)])
@pytest.mark.parametrize("use_bias", [True, False])
def test_siglip_loss_matches_openclip(n, d, use_bias):
    image, text = features(n, d, seed=n + 1, correlation=0.5)
    scale, bias = math.exp(SIGLIP_INIT_LOGIT_SCALE), (SIGLIP_INIT_LOGIT_BIAS if use_bias else None)
    ref = loss_and_grads(open_clip_loss.SigLipLoss(), image, text, scale, bias)
    ours = loss_and_grads(SigLipLoss(), image, text, scale, bias)
    assert_close(ours, ref, label="siglip")
    # And the definition: -sum(logsigmoid(±logits)) / N (normalised by N, not N²).
    logits = scale * image @ text.T + (bias or 0.0)
    labels = 2 * torch.eye(n, dtype=torch.float64) - 1
    assert math.isclose(float(ours[0]), float(-F.logsigmoid(labels * logits).sum() / n), rel_tol=1e-5)


def test_siglip_constants():
    assert SIGLIP_INIT_LOGIT_SCALE == pytest.approx(math.log(10))
    assert SIGLIP_INIT_LOGIT_BIAS == -10.0


# ------------------------------------------------------------------------------------------
# clamp_logit_scale_, build_loss, distributed guard
# ------------------------------------------------------------------------------------------

class _Tiny(torch.nn.Module):
    def __init__(self, value):
        super().__init__()
        self.logit_scale = torch.nn.Parameter(torch.tensor(value))


class _Wrapper(torch.nn.Module):  # the shape of DDP / DataParallel: the model under `.module`
    def __init__(self, module):
        super().__init__()
        self.module = module


@pytest.mark.parametrize("value,expected", [(10.0, math.log(100)), (-3.0, 0.0), (2.0, 2.0)])
def test_clamp_logit_scale(value, expected):
    for wrap in (lambda m: m, _Wrapper, lambda m: _Wrapper(_Wrapper(m))):
        tiny = _Tiny(value)
        model = wrap(tiny)
        (tiny.logit_scale * 2).backward()  # a graph-connected parameter: the clamp must not track grad
        returned = clamp_logit_scale_(model)
        assert returned is tiny.logit_scale
        assert float(tiny.logit_scale.detach()) == pytest.approx(expected)
        assert tiny.logit_scale.is_leaf and tiny.logit_scale.requires_grad
    tiny = _Tiny(5.0)
    clamp_logit_scale_(tiny, max_log_scale=1.0)
    assert float(tiny.logit_scale.detach()) == 1.0


def test_clamp_logit_scale_on_ldmclip_model_and_missing():
    import ldmclip
    model = ldmclip.create_model("ViT-Tiny-64")
    with torch.no_grad():
        model.logit_scale.fill_(7.0)
    clamp_logit_scale_(model)
    assert float(model.logit_scale.detach()) == pytest.approx(math.log(100))
    with pytest.raises(AttributeError, match="logit_scale"):
        clamp_logit_scale_(torch.nn.Linear(2, 2))


def test_build_loss():
    assert isinstance(build_loss("clip"), ClipLoss) and build_loss("clip").tile_size is None
    assert build_loss("CLIP", tile_size=128).tile_size == 128
    assert isinstance(build_loss("siglip"), SigLipLoss)
    with pytest.raises(ValueError, match="'clip', 'siglip'"):
        build_loss("infonce")
    with pytest.raises(ValueError, match="tile_size"):
        build_loss("siglip", tile_size=64)
    with pytest.raises(ValueError):
        ClipLoss(tile_size=0)


def test_world_size_above_one_needs_a_process_group():
    # the multi-process paths themselves are tested with 2 gloo processes in tests/train/test_distributed.py
    for make in (lambda: ClipLoss(world_size=2, rank=2), lambda: SigLipLoss(rank=-1, world_size=2),
                 lambda: build_loss("clip", world_size=0)):
        with pytest.raises(ValueError, match="rank"):
            make()
    features = F.normalize(torch.randn(4, 8), dim=-1)
    for loss_fn in (ClipLoss(world_size=2, rank=1), ClipLoss(tile_size=2, world_size=2), SigLipLoss(world_size=2)):
        with pytest.raises(RuntimeError, match="process group"):
            loss_fn(features, features, torch.tensor(10.0))
    loss = ClipLoss(tile_size=8, rank=0, world_size=1)
    assert (loss.rank, loss.world_size) == (0, 1)


# ------------------------------------------------------------------------------------------
# Memory: the tiled path never makes (or keeps) an N×N tensor
# ------------------------------------------------------------------------------------------

class _LargestTensor(TorchDispatchMode):
    """Records the largest tensor any aten op produces, separately per phase."""

    def __init__(self):
        super().__init__()
        self.phase = "forward"
        self.largest = {"forward": 0, "backward": 0}
        self.ops = {"forward": 0, "backward": 0}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops[self.phase] += 1
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.largest[self.phase] = max(self.largest[self.phase], t.numel())
        return out


def _largest_tensors(loss_fn, n: int, d: int):
    image, text = (x.float().requires_grad_() for x in features(n, d, seed=6, correlation=0.5))
    scale = torch.tensor(1 / 0.07, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    mode = _LargestTensor()
    with mode, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_fn(image, text, scale)
        mode.phase = "backward"
        loss.backward()
    assert mode.ops["backward"] > 0, "the dispatch mode did not see the backward pass"
    return mode.largest, max(saved)


def test_tiled_never_materialises_nxn():
    n, d, tile = 2048, 64, 256
    largest, largest_saved = _largest_tensors(ClipLoss(tile_size=tile), n, d)
    bound = max(n * d, tile * tile)  # O(N·D + k²); N² is 32× larger here
    assert largest_saved <= n * d, f"a saved tensor has {largest_saved} elements"
    assert largest["forward"] <= bound, f"forward made a tensor of {largest['forward']} elements"
    assert largest["backward"] <= bound, f"backward made a tensor of {largest['backward']} elements"
    # The same probe sees the N×N logits of the dense loss, so it would catch them.
    dense_largest, dense_saved = _largest_tensors(ClipLoss(), 512, d)
    assert dense_largest["forward"] >= 512 * 512 and dense_saved >= 512 * 512


# ------------------------------------------------------------------------------------------
# Benchmark smoke test
# ------------------------------------------------------------------------------------------

def test_benchmark_runs_at_small_n():
    spec = importlib.util.spec_from_file_location("loss_memory", REPO / "benchmarks" / "loss_memory.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = bench.run(quick=True, sizes=[256], dim=64, tile_size=64, isolate=False, device="cpu")
    assert {r["impl"] for r in rows} == set(bench.IMPLS)
    assert all(r["status"] == "ok" and r["time_s"] > 0 for r in rows)
    losses = [r["loss"] for r in rows]
    assert max(losses) - min(losses) <= 1e-4 * abs(losses[0])
    assert "ldmclip-tiled" in bench.format_table(rows)
    assert bench.dense_estimate_bytes("ldmclip-dense", 32768) >= 16 * 2**30
