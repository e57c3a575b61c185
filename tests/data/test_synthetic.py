"""The embedded synthetic dataset: determinism, held-out compositions, captions true to the scenes."""

from __future__ import annotations

import pickle
import re

import numpy as np
import pytest
import torch

from ldmclip.data.synthetic import (ALL_PAIRS, COLOURS, HELD_OUT_PAIRS, INVERSE_RELATION, POSITION_PHRASES,
                                    RELATION_PHRASES, SEEN_PAIRS, SHAPES, SIZE_WORDS, Scene, SyntheticScenes,
                                    SyntheticZeroShot, render_scene, synthetic_retrieval_pairs,
                                    zero_shot_templates)
from ldmclip.data.synthetic import _TWO_OBJECT_PROB

N_TRAIN_SCENES = 5000
_SIZE_WORD_SET = {w for words in SIZE_WORDS.values() for w in words}
_POSITION_WORDS = {"left": {"left"}, "right": {"right"}, "top": {"top"}, "bottom": {"bottom"},
                   "center": {"center", "middle"}}
_EXTENT = 1.1   # every shape lies within 1.1 x its radius of its centre


def _pixels(image) -> np.ndarray:
    return np.asarray(image)


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z]+", text.lower())


@pytest.fixture(scope="module")
def train_scenes() -> list[Scene]:
    ds = SyntheticScenes("train", length=N_TRAIN_SCENES)
    return [ds.scene(i) for i in range(N_TRAIN_SCENES)]


@pytest.fixture(scope="module")
def val_scenes() -> list[Scene]:
    ds = SyntheticScenes("val", length=2000)
    return [ds.scene(i) for i in range(2000)]


# --------------------------------------------------------------------------------------------------
# Vocabulary and held-out pairs
# --------------------------------------------------------------------------------------------------

def test_vocabulary_and_held_out_pairs():
    assert len(COLOURS) == 8 and len(SHAPES) == 6 and len(set(COLOURS)) == 8 and len(set(SHAPES)) == 6
    assert len(ALL_PAIRS) == 48
    assert len(HELD_OUT_PAIRS) == len(set(HELD_OUT_PAIRS)) == 6
    assert set(HELD_OUT_PAIRS) <= set(ALL_PAIRS)
    assert set(SEEN_PAIRS) == set(ALL_PAIRS) - set(HELD_OUT_PAIRS)
    # Every colour and every shape keeps partners in training.
    for colour in COLOURS:
        assert sum(c == colour for c, _ in SEEN_PAIRS) >= len(SHAPES) - 1
    for shape in SHAPES:
        assert sum(s == shape for _, s in SEEN_PAIRS) >= len(COLOURS) - 1


# --------------------------------------------------------------------------------------------------
# Determinism
# --------------------------------------------------------------------------------------------------

def test_same_index_same_sample_across_objects():
    a = SyntheticScenes("train", length=100, seed=3)
    b = SyntheticScenes("train", length=100, seed=3)
    for i in [0, 1, 7, 42, 99, 5, 0]:          # any access order
        (ia, ca), (ib, cb) = a[i], b[i]
        assert ca == cb
        np.testing.assert_array_equal(_pixels(ia), _pixels(ib))
    # Negative indices behave like a sequence.
    np.testing.assert_array_equal(_pixels(a[-1][0]), _pixels(a[99][0]))


def test_different_seeds_and_splits_differ():
    base = SyntheticScenes("train", length=50, seed=0)
    other_seed = SyntheticScenes("train", length=50, seed=1)
    other_split = SyntheticScenes("val", length=50, seed=0)
    for other in (other_seed, other_split):
        differing = sum(base[i][1] != other[i][1] or not np.array_equal(_pixels(base[i][0]), _pixels(other[i][0]))
                        for i in range(50))
        assert differing == 50
    assert len({base[i][1] for i in range(50)}) > 30        # captions vary from index to index


def test_sample_is_its_scene_rendered_and_independent_of_image_size():
    ds64 = SyntheticScenes("val", image_size=64, length=20, seed=5)
    ds96 = SyntheticScenes("val", image_size=96, length=20, seed=5)
    for i in range(20):
        scene = ds64.scene(i)
        assert scene == ds96.scene(i)
        image, caption = ds64[i]
        assert caption == scene.caption
        np.testing.assert_array_equal(_pixels(image), _pixels(render_scene(scene, 64)))
        assert ds96[i][0].size == (96, 96)


def test_dataset_pickles_for_worker_processes():
    ds = SyntheticScenes("train", length=10, seed=2)
    clone = pickle.loads(pickle.dumps(ds))
    assert clone[3][1] == ds[3][1]
    np.testing.assert_array_equal(_pixels(clone[3][0]), _pixels(ds[3][0]))


# --------------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("size", [32, 64, 80])
def test_images_are_rgb_of_the_requested_size(size):
    ds = SyntheticScenes("train", image_size=size, length=8)
    for i in range(8):
        image, caption = ds[i]
        assert image.mode == "RGB" and image.size == (size, size)
        assert isinstance(caption, str) and caption
        pixels = _pixels(image)
        assert pixels.std() > 5          # an object was drawn on the background


def test_objects_are_drawn_in_their_colour_where_the_scene_says():
    ds = SyntheticScenes("val", image_size=64, length=40, seed=11)
    for i in range(40):
        scene = ds.scene(i)
        pixels = _pixels(ds[i][0]).astype(int)
        for obj in scene.objects:
            x, y = (int(obj.center[0] * 64), int(obj.center[1] * 64))
            if obj.shape == "ring":                      # the centre of a ring is background: sample the band
                x = int((obj.center[0] + 0.8 * obj.radius) * 64)
            assert np.abs(pixels[y, x] - np.array(obj.rgb)).max() <= 2, (i, obj)


def test_transform_is_applied():
    def to_tensor(image):
        return torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255

    ds = SyntheticScenes("train", image_size=32, length=4, transform=to_tensor)
    image, _ = ds[0]
    assert isinstance(image, torch.Tensor) and image.shape == (3, 32, 32)
    batch = torch.utils.data.default_collate([ds[i] for i in range(4)])
    assert batch[0].shape == (4, 3, 32, 32) and len(batch[1]) == 4


def test_bad_arguments():
    with pytest.raises(ValueError):
        SyntheticScenes("training")
    with pytest.raises(ValueError):
        SyntheticScenes(caption_mode="short")
    with pytest.raises(ValueError):
        SyntheticZeroShot(classes="unseen")
    ds = SyntheticScenes(length=3)
    with pytest.raises(IndexError):
        ds[3]
    with pytest.raises(IndexError):
        ds.scene(-4)
    assert len(ds) == 3 and len(list(iter(ds))) == 3


# --------------------------------------------------------------------------------------------------
# Held-out compositions and coverage
# --------------------------------------------------------------------------------------------------

def test_held_out_pairs_never_in_train(train_scenes):
    held_out = set(HELD_OUT_PAIRS)
    for scene in train_scenes:
        for obj in scene.objects:
            assert obj.pair not in held_out


def test_train_covers_every_colour_shape_and_seen_pair(train_scenes):
    pairs = {obj.pair for scene in train_scenes for obj in scene.objects}
    assert pairs == set(SEEN_PAIRS)
    assert {c for c, _ in pairs} == set(COLOURS)
    assert {s for _, s in pairs} == set(SHAPES)
    n_objects = [len(scene.objects) for scene in train_scenes]
    assert set(n_objects) == {1, 2}
    # the share of two-object scenes is the module's setting (6 standard errors of slack at 5,000 scenes)
    assert abs(n_objects.count(2) / len(n_objects) - _TWO_OBJECT_PROB) < 0.03


def test_val_contains_held_out_pairs(val_scenes):
    pairs = {obj.pair for scene in val_scenes for obj in scene.objects}
    assert pairs == set(ALL_PAIRS)


# --------------------------------------------------------------------------------------------------
# Scenes: geometry agrees with positions and relations
# --------------------------------------------------------------------------------------------------

def test_geometry_matches_positions_and_relations(train_scenes):
    for scene in train_scenes:
        for obj in scene.objects:
            x, y = obj.center
            assert 0 <= x - _EXTENT * obj.radius and x + _EXTENT * obj.radius <= 1
            assert 0 <= y - _EXTENT * obj.radius and y + _EXTENT * obj.radius <= 1
            if obj.size == "small":
                assert obj.radius < 0.14
            else:
                assert obj.radius > 0.16
        if len(scene.objects) == 1:
            assert scene.relation is None
            obj = scene.objects[0]
            x, y = obj.center
            expected = {"left": x < 0.35 and abs(y - 0.5) < 0.05, "right": x > 0.65 and abs(y - 0.5) < 0.05,
                        "top": y < 0.35 and abs(x - 0.5) < 0.05, "bottom": y > 0.65 and abs(x - 0.5) < 0.05,
                        "center": abs(x - 0.5) < 0.05 and abs(y - 0.5) < 0.05}
            assert expected[obj.position], obj
        else:
            a, b = scene.objects
            dx, dy = b.center[0] - a.center[0], b.center[1] - a.center[1]
            expected = {"left of": dx > 0.4, "right of": dx < -0.4, "above": dy > 0.4, "below": dy < -0.4}
            assert expected[scene.relation], scene
            assert (dx * dx + dy * dy) ** 0.5 >= _EXTENT * (a.radius + b.radius) - 1e-9    # no overlap
            assert a.pair != b.pair


# --------------------------------------------------------------------------------------------------
# Captions
# --------------------------------------------------------------------------------------------------

def _check_noun_phrase(words: list[str], obj, mentioned) -> None:
    colours = [w for w in words if w in COLOURS]
    shapes = [w for w in words if w in SHAPES]
    sizes = [w for w in words if w in _SIZE_WORD_SET]
    assert colours == ([obj.colour] if "colour" in mentioned else [])
    assert shapes == ([obj.shape] if "shape" in mentioned else [])
    assert sizes in ([[w] for w in SIZE_WORDS[obj.size]] if "size" in mentioned else [[]])


def _check_caption(scene: Scene) -> None:
    caption = scene.caption
    assert caption == caption.strip() and "  " not in caption
    assert not re.search(r"\ba [aeiou]|\ban [^aeiou ]", caption), caption    # a / an
    position_phrases = [p for phrases in POSITION_PHRASES.values() for p in phrases]
    if len(scene.objects) == 1:
        obj, mentioned = scene.objects[0], scene.mentioned[0]
        assert {"colour", "shape"} & mentioned
        _check_noun_phrase(_words(caption), obj, mentioned)
        found = [p for p in position_phrases if re.search(rf"\b{p}\b", caption)]
        if "position" in mentioned:
            assert any(p in found for p in POSITION_PHRASES[obj.position]), caption
            assert {w for p in found for w in p.split()} & _POSITION_WORDS[obj.position], caption
            others = set().union(*(_POSITION_WORDS[q] for q in _POSITION_WORDS if q != obj.position))
            assert not set(_words(caption)) & others, caption
        else:
            assert not found, caption
        assert scene.caption_relation is None
        return
    # Two objects: split at the stated relation (or "and") and check each half against its object.
    first, second = (scene.objects[k] for k in scene.caption_order)
    m_first, m_second = (scene.mentioned[k] for k in scene.caption_order)
    assert sorted(scene.caption_order) == [0, 1]
    assert not any(re.search(rf"\b{p}\b", caption) for p in position_phrases)
    if scene.caption_relation is None:
        connectors = [" and "]
    else:
        expected = scene.relation if scene.caption_order == (0, 1) else INVERSE_RELATION[scene.relation]
        assert scene.caption_relation == expected
        connectors = [f" {p} " for p in sorted(RELATION_PHRASES[scene.caption_relation], key=len, reverse=True)]
        for relation, phrases in RELATION_PHRASES.items():           # no other relation is stated
            if relation != scene.caption_relation:
                assert not any(re.search(rf"\b{p}\b", caption) for p in phrases
                               if p not in " ".join(RELATION_PHRASES[scene.caption_relation])), caption
    connector = next(c for c in connectors if c in caption)
    left, right = caption.split(connector, 1)
    _check_noun_phrase(_words(left), first, m_first)
    _check_noun_phrase(_words(right), second, m_second)


def test_captions_describe_the_drawn_objects(train_scenes, val_scenes):
    for scene in train_scenes + val_scenes:
        _check_caption(scene)


def test_captions_are_varied(train_scenes):
    captions = [scene.caption for scene in train_scenes]
    assert len(set(captions)) > 0.5 * len(captions)
    mentioned = [m for scene in train_scenes for m in scene.mentioned]
    for attribute in ("colour", "shape", "size", "position"):
        share = sum(attribute in m for m in mentioned) / len(mentioned)
        assert 0.2 < share < 1.0, attribute
    assert sum("colour" in m and "shape" in m for m in mentioned) / len(mentioned) > 0.85
    starts = {" ".join(_words(c)[:2]) for c in captions}
    assert {"a photo", "there is", "an image"} <= starts


def test_full_captions_mention_everything():
    ds = SyntheticScenes("val", length=300, seed=4, caption_mode="full")
    varied = SyntheticScenes("val", length=300, seed=4)
    for i in range(300):
        scene = ds.scene(i)
        assert scene.objects == varied.scene(i).objects          # same scenes, other captions
        _check_caption(scene)
        if len(scene.objects) == 1:
            assert scene.mentioned == (frozenset({"colour", "shape", "size", "position"}),)
        else:
            assert scene.caption_relation == scene.relation and scene.caption_order == (0, 1)
            assert all(m == {"colour", "shape", "size"} for m in scene.mentioned)
        # One fixed template: canonical words only.
        assert not set(_words(scene.caption)) & {"little", "big", "side", "middle", "over", "under", "beneath"}
        assert scene.caption.startswith("a ") or scene.caption.startswith("an ")
        assert not scene.caption.endswith(".")


# --------------------------------------------------------------------------------------------------
# Zero-shot set and retrieval pairs
# --------------------------------------------------------------------------------------------------

def test_zero_shot_labels_consistent_and_balanced():
    ds = SyntheticZeroShot(image_size=32, per_class=3)
    assert ds.num_classes == 48 and len(ds) == 144 and len(ds.classnames) == 48
    assert ds.classnames[0] == f"{COLOURS[0]} {SHAPES[0]}"
    counts = np.bincount(ds.labels, minlength=48)
    assert (counts == 3).all()
    for i in range(len(ds)):
        scene = ds.scene(i)
        assert len(scene.objects) == 1
        obj = scene.objects[0]
        label = ds.labels[i]
        assert ds.classnames[label] == f"{obj.colour} {obj.shape}"
    image, label = ds[50]
    assert image.mode == "RGB" and image.size == (32, 32) and label == ds.labels[50] == 2
    # Varied sizes, positions, backgrounds within a class.
    scenes = [ds.scene(k * 48) for k in range(3)]
    assert len({(s.objects[0].center, s.background.rgb0) for s in scenes}) == 3


def test_zero_shot_subsets():
    held = SyntheticZeroShot(image_size=32, per_class=2, classes="held_out")
    seen = SyntheticZeroShot(image_size=32, per_class=2, classes="seen")
    full = SyntheticZeroShot(image_size=32, per_class=2, classes="all")
    assert held.classnames == [f"{c} {s}" for c, s in HELD_OUT_PAIRS]
    assert len(seen.classnames) == 42 and not set(seen.classnames) & set(held.classnames)
    assert set(seen.classnames) | set(held.classnames) == set(full.classnames)
    # The k-th image of a class is the same whichever subset it is in.
    label_full = full.classnames.index(held.classnames[1])
    np.testing.assert_array_equal(_pixels(held[1][0]), _pixels(full[label_full][0]))
    np.testing.assert_array_equal(_pixels(held[1 + 6][0]), _pixels(full[label_full + 48][0]))
    other_seed = SyntheticZeroShot(image_size=32, per_class=2, classes="held_out", seed=2)
    assert not np.array_equal(_pixels(held[0][0]), _pixels(other_seed[0][0]))


def test_zero_shot_templates():
    templates = zero_shot_templates()
    assert len(templates) >= 2 and all("{}" in t for t in templates)
    assert "a photo of a {}." in templates
    assert templates[0].format("red circle") == "a photo of a red circle."


def test_retrieval_pairs():
    pairs = synthetic_retrieval_pairs(60, image_size=32, seed=0)
    assert len(pairs) == 60
    captions = [c for _, c in pairs]
    assert len(set(captions)) == 60
    assert all(im.size == (32, 32) and im.mode == "RGB" for im, _ in pairs)
    again = synthetic_retrieval_pairs(60, image_size=32, seed=0)
    assert [c for _, c in again] == captions
    np.testing.assert_array_equal(_pixels(again[7][0]), _pixels(pairs[7][0]))
    # They are 'val' scenes (full captions): the first one is val sample 0.
    val = SyntheticScenes("val", image_size=32, length=1, seed=0, caption_mode="full")
    assert pairs[0][1] == val[0][1]
    np.testing.assert_array_equal(_pixels(pairs[0][0]), _pixels(val[0][0]))
    plain = synthetic_retrieval_pairs(5, image_size=32, seed=0, detailed=False)
    assert [c for _, c in plain] == [SyntheticScenes("val", length=5, seed=0)[i][1] for i in range(5)]
