"""Caption variants in the text-embedding cache: several captions per key from a shard's .txt and .json
members or from table columns, each encoded once; reading a variant back; and the per-epoch draw of a
variant and of caption dropout, deterministic from (seed, epoch, key) whatever the worker/rank split."""

from __future__ import annotations

import io
import json
import tarfile

import pytest
import torch
from PIL import Image
from safetensors import safe_open

from tests.conditioning.conftest import TINY_MODEL
from ldmclip.cli import main
from ldmclip.conditioning import TextEmbeddingCache, build_text_cache
from ldmclip.conditioning.cache import CacheMismatchError
from ldmclip.conditioning.cache_reader import CacheJoin
from ldmclip.conditioning.cache_join import VariantJoin, draw_caption
from ldmclip.core.errors import UserError
from ldmclip.data.writer import write_shards

MODEL = TINY_MODEL



def _jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(buf, "JPEG")
    return buf.getvalue()


def _build(cond, source, out, **kw):
    kw.setdefault("precision", "fp32")
    kw.setdefault("dtype", "fp32")
    return build_text_cache(cond, source, out, **kw)


def _reference(cond, caption: str) -> dict[str, torch.Tensor]:
    with torch.inference_mode():
        out = cond([caption])
    return {"hidden": out.hidden[0]} | ({} if out.pooled is None else {"pooled": out.pooled[0]})


def _assert_is(cond, item: dict[str, torch.Tensor], caption: str) -> None:
    ref = _reference(cond, caption)
    assert set(item) == set(ref)
    for name in ref:
        torch.testing.assert_close(item[name].float(), ref[name], rtol=1e-5, atol=1e-5)


# (key, .txt caption or None, .json metadata or None)
SHARD_SAMPLES = [
    ("a", "a red car", {"syn": {"cap": "a small red car parked on a street"}}),
    ("b", "a dog", {"syn": {"cap": "a dog"}}),                # the synthetic caption is the alt-text: one row
    ("c", "a cat", None),                                     # no .json member: no synthetic caption
    ("d", None, {"syn": {"cap": "a bird on a branch"}}),      # no .txt member: stored with its synthetic one
    ("e", "a red car", {"syn": {"cap": "   "}}),              # empty synthetic caption; alt-text as a's
    ("f", "a boat", {"syn": {"cap": 7}}),                     # not text
    ("g", None, {"other": "x"}),                              # neither: skipped
]


@pytest.fixture
def shards(tmp_path) -> str:
    items = [(key, _jpeg(), txt, meta) for key, txt, meta in SHARD_SAMPLES]
    write_shards(items, tmp_path / "shards", max_per_shard=4, verify=False)  # verify=False: keep the caption-less
    return str(tmp_path / "shards" / "shard-{00000..00001}.tar")


# ----------------------------------------------------------------------------------------------------
# writing
# ----------------------------------------------------------------------------------------------------

def test_variants_from_the_txt_member_and_a_nested_json_field(tmp_path, sdxl, shards):
    report = _build(sdxl, shards, tmp_path / "cache", variants=["txt=txt", "synthetic=json:syn.cap"])
    cache = TextEmbeddingCache(tmp_path / "cache")
    assert cache.variants == ["txt", "synthetic"]
    assert cache.manifest["variants"] == [{"name": "txt", "source": "txt"},
                                          {"name": "synthetic", "source": "json:syn.cap"}]
    assert sorted(cache) == ["a", "b", "c", "d", "e", "f"]
    expected = {"a": {"txt", "synthetic"}, "b": {"txt", "synthetic"}, "c": {"txt"}, "d": {"synthetic"},
                "e": {"txt"}, "f": {"txt"}}
    for key, txt, meta in SHARD_SAMPLES[:-1]:
        assert set(cache.variants_of(key)) == expected[key]
        if txt is not None:
            _assert_is(sdxl, cache.variant(key, "txt"), txt)
        if "synthetic" in expected[key]:
            _assert_is(sdxl, cache.variant(key, "synthetic"), meta["syn"]["cap"])
    # cache[key] is the default variant, or the key's first one when it has no default
    assert torch.equal(cache["a"]["hidden"], cache.variant("a", "txt")["hidden"])
    assert torch.equal(cache["d"]["hidden"], cache.variant("d", "synthetic")["hidden"])
    with pytest.raises(KeyError, match="no caption variant 'synthetic'"):
        cache.variant("c", "synthetic")
    with pytest.raises(KeyError, match="unknown caption variant 'long'"):
        cache.variant("a", "long")
    # identical captions of a shard share one row, also across variants; not across shards
    meta0 = json.loads(safe_open(str(tmp_path / "cache/shards/shard-00000.safetensors"), "pt").metadata()["ldmclip"])
    assert meta0["keys"] == ["a", "b", "c", "d"]
    assert meta0["variants"] == {"txt": [0, 2, 3, None], "synthetic": [1, 2, None, 4]}
    assert meta0["rows"] == [0, 2, 3, 4] and meta0["counts"]["unique"] == 5
    # counts per variant, summed in the manifest; a key with no usable variant is skipped
    totals = cache.manifest["totals"]
    assert totals["keys"] == 6 and totals["records"] == 7 and totals["skipped"] == {"missing_caption": 1}
    assert totals["variants"]["txt"] == {"keys": 4 + 1, "skipped": {"missing_caption": 2}}
    assert totals["variants"]["synthetic"] == {"keys": 3, "skipped": {"caption_not_text": 1, "empty_caption": 1,
                                                                      "missing_caption": 2}}
    assert "variant synthetic: 3 keys, without it: caption_not_text 1" in report.summary()


def test_a_json_member_that_is_not_an_object_is_counted(tmp_path, sd2):
    path = tmp_path / "raw-00000.tar"
    with tarfile.open(path, "w") as tar:
        for name, data in [("k1.txt", b"one"), ("k1.json", b"{not json"), ("k2.txt", b"two"), ("k2.json", b"[1]")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    _build(sd2, str(path), tmp_path / "cache", variants=["txt=txt", "syn=json:caption"])
    cache = TextEmbeddingCache(tmp_path / "cache")
    assert cache.variants_of("k1") == cache.variants_of("k2") == ["txt"]
    assert cache.manifest["totals"]["variants"]["syn"]["skipped"] == {"bad_json": 2}


def test_variants_from_two_table_columns(tmp_path, sd2):
    table = tmp_path / "captions.csv"
    table.write_text("image,alt,long\n"
                     "x.jpg,a cat,a grey cat asleep on a sofa\n"
                     "y.jpg,a dog,\n"
                     "z.jpg,a grey cat asleep on a sofa,a cat\n")
    _build(sd2, str(table), tmp_path / "cache", variants=["alt=alt", "long=long"], shard_size=2)
    cache = TextEmbeddingCache(tmp_path / "cache")
    assert sorted(cache) == ["x.jpg#0", "y.jpg#1", "z.jpg#2"]  # CaptionTable's keys, as without variants
    assert cache.variants_of("y.jpg#1") == ["alt"]
    for key, alt, long in [("x.jpg#0", "a cat", "a grey cat asleep on a sofa"), ("z.jpg#2", "a grey cat asleep on a sofa",
                                                                                  "a cat")]:
        _assert_is(sd2, cache.variant(key, "alt"), alt)
        _assert_is(sd2, cache.variant(key, "long"), long)
    _assert_is(sd2, cache["y.jpg#1"], "a dog")
    first = json.loads(safe_open(str(tmp_path / "cache/shards/captions-00000.safetensors"), "pt").metadata()["ldmclip"])
    assert first["variants"] == {"alt": [0, 2], "long": [1, None]}
    assert cache.manifest["totals"]["variants"]["long"]["skipped"] == {"empty_caption": 1}
    with pytest.raises(UserError, match="nope"):
        _build(sd2, str(table), tmp_path / "other", variants=["alt=alt", "x=nope"])
    with pytest.raises(UserError, match="no caption variants"):
        _build(sd2, str(tmp_path / "lines.txt"), tmp_path / "other", variants=["a=b"])


def test_without_variants_a_cache_is_as_before(tmp_path, sd2, shards):
    plain, single = tmp_path / "plain", tmp_path / "single"
    _build(sd2, shards, plain)
    _build(sd2, shards, single, variants=["txt=txt"])
    cache = TextEmbeddingCache(plain)
    assert "variants" not in cache.manifest and "variants" not in cache.manifest["totals"]
    with safe_open(str(plain / "shards/shard-00000.safetensors"), "pt") as f:
        assert "variants" not in json.loads(f.metadata()["ldmclip"])
        plain_hidden = f.get_tensor("hidden")
    with safe_open(str(single / "shards/shard-00000.safetensors"), "pt") as f:
        assert torch.equal(f.get_tensor("hidden"), plain_hidden)  # the same captions, the same rows
    assert cache.variants == ["default"] and cache.variants_of("a") == ["default"]
    assert torch.equal(cache.variant("a", "default")["hidden"], cache["a"]["hidden"])
    assert sorted(cache) == sorted(TextEmbeddingCache(single)) == ["a", "b", "c", "e", "f"]
    joined = cache.join([{"key": "a"}])
    assert type(joined) is CacheJoin and "variant" not in next(iter(joined))


def test_resuming_with_other_variants_is_refused(tmp_path, sd2, shards):
    out = tmp_path / "cache"
    _build(sd2, shards, out, variants=["txt=txt", "syn=json:syn.cap"])
    for other in (["txt=txt"], ["txt=txt", "syn=json:syn"], None):
        with pytest.raises(CacheMismatchError, match="variants"):
            _build(sd2, shards, out, variants=other)
    assert _build(sd2, shards, out, variants=["txt=txt", "syn=json:syn.cap"]).already_done == ["shard-00000",
                                                                                              "shard-00001"]
    plain = tmp_path / "plain"
    _build(sd2, shards, plain)
    with pytest.raises(CacheMismatchError, match="variants"):
        _build(sd2, shards, plain, variants=["txt=txt"])


@pytest.mark.parametrize("spec, message", [("txt", "NAME=SOURCE"), ("=txt", "NAME=SOURCE"), ("a b=txt", "name"),
                                           ("s=json:", "json:FIELD")])
def test_bad_variant_specs(tmp_path, sd2, shards, spec, message):
    with pytest.raises(UserError, match=message):
        _build(sd2, shards, tmp_path / "cache", variants=["txt=txt", spec])
    with pytest.raises(UserError, match="more than once"):
        _build(sd2, shards, tmp_path / "cache", variants=["txt=txt", "txt=json:a"])


def test_cli_caption_variant(tmp_path, shards, capsys):
    options = ["--preset", "sd2", "--model", MODEL, "--precision", "fp32", "--quiet", "--random-init"]
    argv = ["cache-text", shards, "--out", str(tmp_path / "cache"), *options]
    assert main([*argv, "--caption-variant", "txt=txt", "--caption-variant", "syn=json:syn.cap"]) == 0
    assert "variant syn: 3 keys" in capsys.readouterr().out
    assert TextEmbeddingCache(tmp_path / "cache").variants == ["txt", "syn"]
    assert main([*argv, "--caption-variant", "txt=txt"]) == 2
    assert "variants" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------
# draws
# ----------------------------------------------------------------------------------------------------

CHI2_3DF_P001 = 16.27  # chi-square critical value, 3 degrees of freedom, p = 0.001


def _chi2(observed: dict, expected: dict, n: int) -> float:
    return sum((observed.get(k, 0) - n * p) ** 2 / (n * p) for k, p in expected.items())


def test_drawn_frequencies_match_the_probabilities():
    n = 20_000
    weights = {"a": 0.5, "b": 0.3, "c": 0.2}
    counts: dict = {}
    for i in range(n):
        dropped, name = draw_caption(f"key{i}", ["a", "b", "c"], weights, 0.1, seed=0, epoch=0)
        counts[None if dropped else name] = counts.get(None if dropped else name, 0) + 1
    expected = {None: 0.1, "a": 0.9 * 0.5, "b": 0.9 * 0.3, "c": 0.9 * 0.2}
    assert _chi2(counts, expected, n) < CHI2_3DF_P001, counts
    # renormalised over the variants a key has: without b, a : c = 5 : 2
    counts = {}
    for i in range(n):
        dropped, name = draw_caption(f"key{i}", ["a", "c"], weights, 0.0, seed=3, epoch=1)
        assert not dropped
        counts[name] = counts.get(name, 0) + 1
    p_a = 0.5 / 0.7
    sd = (n * p_a * (1 - p_a)) ** 0.5
    assert abs(counts["a"] - n * p_a) < 4 * sd, counts  # binomial: within 4 standard deviations
    assert draw_caption("k", ["b"], weights, 0.0, 0, 0) == (False, "b")
    assert draw_caption("k", ["d"], weights, 0.0, 0, 0) == (False, None)


@pytest.fixture(scope="module")
def table_cache(tmp_path_factory, sd2) -> TextEmbeddingCache:
    tmp_path = tmp_path_factory.mktemp("variants")
    # every fifth row has no synthetic caption
    rows = [f"im{i}.jpg,photo number {i}," + ("" if i % 5 == 0 else f"synthetic caption {i}") for i in range(40)]
    table = tmp_path / "t.csv"
    table.write_text("image,alt,syn\n" + "\n".join(rows) + "\n")
    _build(sd2, str(table), tmp_path / "cache", variants=["alt=alt", "syn=syn"], shard_size=16)
    return TextEmbeddingCache(tmp_path / "cache")


def _draws(dataset) -> dict[str, tuple]:
    return {item["key"]: (item["variant"], item["hidden"].sum().item()) for item in dataset}


def test_same_draws_in_any_worker_or_rank_split_and_new_ones_each_epoch(table_cache):
    keys = sorted(table_cache)
    samples = [{"key": k} for k in keys]
    options = {"variants": {"alt": 0.5, "syn": 0.5}, "drop": 0.2, "seed": 7}
    single = _draws(table_cache.join(samples, **options))
    assert set(single) == set(keys)
    drawn = {v for v, _ in single.values()}
    assert drawn == {"alt", "syn", ""}
    assert all(single[f"im{i}.jpg#{i}"][0] != "syn" for i in range(0, 40, 5))  # those have no synthetic caption
    # two DataLoader workers, two ranks (interleaved halves), two halves in another order: the same draws
    loader = torch.utils.data.DataLoader(table_cache.join(samples, **options), batch_size=None, num_workers=2)
    assert _draws(loader) == single
    batched = torch.utils.data.DataLoader(table_cache.join(samples, **options), batch_size=8)  # default_collate
    assert [v for batch in batched for v in batch["variant"]] == [single[k][0] for k in keys]
    ranks = {}
    for rank in range(2):
        ranks.update(_draws(table_cache.join(samples[rank::2], **options)))
    assert ranks == single
    assert _draws(table_cache.join(samples[20:] + samples[:20], **options)) == single
    # weights that are not normalised give the same draws
    assert _draws(table_cache.join(samples, **{**options, "variants": {"alt": 2, "syn": 2}})) == single
    # another epoch, another seed: other draws
    joined = table_cache.join(samples, **options)
    joined.set_epoch(1)
    epoch1 = _draws(joined)
    assert epoch1 != single and set(epoch1) == set(single)
    assert _draws(table_cache.join(samples, **{**options, "seed": 8})) != single
    # persistent workers see set_epoch
    joined = table_cache.join(samples, **options)
    loader = torch.utils.data.DataLoader(joined, batch_size=None, num_workers=2, persistent_workers=True)
    assert _draws(loader) == single
    joined.set_epoch(1)
    assert _draws(loader) == epoch1


def test_a_dropped_caption_is_the_empty_prompt_or_zeros(table_cache):
    samples = [{"key": k, "image": i} for i, k in enumerate(sorted(table_cache))]
    empty = table_cache.empty_prompt()
    items = list(table_cache.join(samples, variants={"alt": 1.0}, drop=1.0))
    assert len(items) == 40 and all(item["variant"] == "" for item in items)
    assert all(torch.equal(item["hidden"], empty["hidden"]) for item in items)
    assert all(item["image"] == i for i, item in enumerate(items))  # the sample's own entries are kept
    zeros = list(table_cache.join(samples, drop=1.0, drop_to="zeros"))
    assert all(not item["hidden"].any() and item["variant"] == "" for item in zeros)
    # never dropped: each item is the drawn variant's embedding
    joined = table_cache.join(samples, variants={"alt": 0.3, "syn": 0.7}, drop=0.0)
    for item in joined:
        assert torch.equal(item["hidden"], table_cache.variant(item["key"], item["variant"])["hidden"])
    # keys without the only variant asked for are missing: skipped, the empty prompt, or an error
    only_syn = table_cache.join(samples, variants={"syn": 1.0})
    assert len(list(only_syn)) == 32 and only_syn.stats["missing_variant"] == 8
    filled = list(table_cache.join(samples + [{"key": "unknown"}], variants={"syn": 1.0}, missing="empty"))
    assert len(filled) == 41 and sum(item["variant"] == "" for item in filled) == 9
    with pytest.raises(KeyError, match="any of the variants"):
        list(table_cache.join(samples, variants={"syn": 1.0}, missing="error"))


@pytest.mark.parametrize("kwargs, message", [
    ({"variants": {"alt": 0.5, "long": 0.5}}, "unknown caption variant.*'long'.*alt, syn"),
    ({"variants": {"alt": -1}}, ">= 0"),
    ({"variants": {"alt": 0, "syn": 0}}, "all 0"),
    ({"variants": {}}, "dict of caption variant"),
    ({"drop": 1.5}, "between 0 and 1"),
    ({"drop": 0.1, "drop_to": "noise"}, "drop_to"),
])
def test_bad_join_arguments(table_cache, kwargs, message):
    with pytest.raises(UserError, match=message):
        table_cache.join([], **kwargs)


def test_variant_join_type(table_cache):
    assert isinstance(table_cache.join([], drop=0.1), VariantJoin)
