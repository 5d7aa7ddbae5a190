"""The shapes world: scenes, drawings, captions, batches, and an evaluator that is right and can be wrong."""
import json
import pickle
import re
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import shapes
from shapes import COLORS, HELD_OUT, SHAPES, SIZES, Obj, Scene


def specs(n, seed=0, **kw):
    """n random scene specs from a seeded rng."""
    rng = np.random.default_rng(seed)
    return [shapes.random_spec(rng, **kw) for _ in range(n)]


def images(spec_list, size=32):
    """Drawings of the specs as a (N, 3, size, size) tensor in [-1, 1]."""
    x = np.stack([shapes.draw(s, size) for s in spec_list])
    return torch.from_numpy(x).permute(0, 3, 1, 2).float() / 127.5 - 1


def blur_and_noise(x, seed=0):
    """A 3x3 box blur plus Gaussian noise of std 0.1: about how generated images look."""
    g = torch.Generator().manual_seed(seed)
    return F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1) + 0.1 * torch.randn(
        x.shape, generator=g)


# ---------------------------------------------------------------------------- the world and its specs

def test_constants():
    assert len(COLORS) >= 6 and len(set(COLORS.values())) == len(COLORS)
    assert shapes.NUM_CLASSES == len(SHAPES)
    for n, sides in shapes.SIDE.items():
        assert (sides["large"] / sides["small"]) ** 2 >= 2.5, n     # small vs large: clearly distinct areas
    assert max(s["small"] for s in shapes.SIDE.values()) < shapes.SIZE_SPLIT
    assert min(s["large"] for s in shapes.SIDE.values()) > shapes.SIZE_SPLIT
    train = set(shapes.TRAIN_PAIRS)
    assert {c for c, _ in train} == set(COLORS) and {s for _, s in train} == set(SHAPES)
    assert all(p in shapes.ALL_PAIRS and p not in train for p in HELD_OUT)


def test_training_specs_never_use_held_out_pairs():
    for spec in specs(2000):
        assert all((o.color, o.shape) not in HELD_OUT for o in spec.objects)


def test_held_out_specs_always_use_one():
    for spec in specs(500, held_out=True):
        assert any((o.color, o.shape) in HELD_OUT for o in spec.objects)


def test_geometry_margins_separation_and_relation():
    counts = {1: 0, 2: 0}
    for spec in specs(2000, seed=1):
        n = len(spec.objects)
        counts[n] += 1
        for o in spec.objects:
            half = shapes.SIDE[n][o.size] / 2
            assert shapes.MARGIN <= o.x - half and o.x + half <= 1 - shapes.MARGIN
            assert shapes.MARGIN <= o.y - half and o.y + half <= 1 - shapes.MARGIN
        if n == 1:
            assert spec.relation is None
            continue
        a, b = spec.objects
        assert a.color != b.color and spec.relation in shapes.RELATIONS
        horizontal = spec.relation in ("left of", "right of")
        along, across = (b.x - a.x, b.y - a.y) if horizontal else (b.y - a.y, b.x - a.x)
        assert abs(along) >= (shapes.SIDE[2][a.size] + shapes.SIDE[2][b.size]) / 2 + shapes.GAP - 1e-9
        assert abs(across) <= 0.5 * abs(along)                             # the relation is unambiguous
        assert shapes.relation_of(a, b) == spec.relation
    assert 800 < counts[1] < 1200                                          # about half and half


def test_n_objects_and_bad_input():
    assert all(len(s.objects) == 2 for s in specs(50, n_objects=2))
    assert all(len(s.objects) == 1 for s in specs(50, n_objects=1))
    with pytest.raises(ValueError, match="1 or 2 objects"):
        shapes.random_spec(np.random.default_rng(0), n_objects=3)
    with pytest.raises(TypeError, match="uint8"):
        shapes.evaluate([np.zeros((8, 8, 3), np.float32)], specs(1))
    good = images(specs(1))                                           # (1, 3, 32, 32) in [-1, 1]
    for bad in (good.permute(0, 2, 3, 1), good[:, :1], ((good + 1) * 127.5).to(torch.uint8)):
        with pytest.raises(TypeError, match=r"a \(N, 3, H, W\) float tensor"):
            shapes.evaluate(bad, specs(1))
    with pytest.raises(ValueError, match="values in \\[-1, 1\\] expected"):
        shapes.evaluate((good + 1) * 127.5, specs(1))                   # float pixels in 0..255
    with pytest.warns(UserWarning, match=r"no value below 0; if they are in \[0, 1\]"):
        shapes.evaluate((good + 1) / 2, specs(1))


def test_spec_round_trips_through_json_and_pickle():
    for spec in specs(20):
        assert shapes.spec_from_dict(json.loads(json.dumps(shapes.spec_to_dict(spec)))) == spec
        assert pickle.loads(pickle.dumps(spec)) == spec


# ---------------------------------------------------------------------------- drawing and batches

@pytest.mark.parametrize("size", [32, 64])
def test_drawing_uses_pure_palette_colours_at_the_right_size(size):
    for spec in specs(50, seed=2):
        img = shapes.draw(spec, size)
        assert img.shape == (size, size, 3) and img.dtype == np.uint8
        colours = {tuple(c) for c in img.reshape(-1, 3)}
        assert colours == {shapes.BACKGROUND} | {COLORS[o.color] for o in spec.objects}  # no anti-aliasing
        assert (img[0] == shapes.BACKGROUND).all() and (img[:, -1] == shapes.BACKGROUND).all()  # off borders
    big = shapes.draw(Scene([Obj("square", "red", "large", 0.5, 0.5)]), size)
    small = shapes.draw(Scene([Obj("square", "red", "small", 0.5, 0.5)]), size)
    assert (big.any(-1).sum() / small.any(-1).sum()) >= 2.5


def test_sample_batch_shapes_ranges_and_determinism():
    x, dense, sparse, labels, spec_list = shapes.sample_batch(16, np.random.default_rng(3), size=32)
    assert x.shape == (16, 3, 32, 32) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1 and x.min() == -1 and x.max() == 1
    assert len(dense) == len(sparse) == len(spec_list) == 16
    assert labels.dtype == torch.long and labels.shape == (16,)
    assert labels.tolist() == [SHAPES.index(s.objects[0].shape) for s in spec_list]
    assert 0 <= labels.min() and labels.max() < shapes.NUM_CLASSES
    again = shapes.sample_batch(16, np.random.default_rng(3), size=32)
    assert torch.equal(x, again[0]) and dense == again[1] and sparse == again[2]
    assert torch.equal(labels, again[3]) and spec_list == again[4]
    other = shapes.sample_batch(16, np.random.default_rng(4), size=32)
    assert dense != other[1]
    x64, *_ = shapes.sample_batch(4, np.random.default_rng(0), size=64, n_objects=2, held_out=True)
    assert x64.shape == (4, 3, 64, 64)


@pytest.mark.parametrize("share", [0.0, 0.75, 1.0])
def test_two_share_sets_how_many_scenes_have_two_objects(share):
    *_, spec_list = shapes.sample_batch(400, np.random.default_rng(0), size=16, two_share=share)
    twos = sum(len(s.objects) == 2 for s in spec_list) / 400
    assert abs(twos - share) < 0.06                               # 400 draws: about 2 standard errors at 0.75
    assert all((s.relation is None) == (len(s.objects) == 1) for s in spec_list)
    with pytest.raises(ValueError, match="n_objects or two_share, not both"):
        shapes.sample_batch(4, np.random.default_rng(0), n_objects=1, two_share=share)


# ---------------------------------------------------------------------------- captions

def test_dense_captions_name_every_attribute_and_the_relation():
    for spec in specs(500, seed=5):
        text = shapes.dense_caption(spec)
        for o in spec.objects:
            assert f"a {o.size} {o.color} {o.shape}" in text
        if spec.relation:
            a, b = spec.objects
            assert text == f"a {a.size} {a.color} {a.shape} {spec.relation} a {b.size} {b.color} {b.shape}"
    assert shapes.dense_caption(Scene([Obj("circle", "red", "large", 0.5, 0.5)])) == "a large red circle"


def test_sparse_captions_are_vague_short_and_never_give_the_relation():
    spec_list = specs(2000, seed=6)
    rng = np.random.default_rng(0)
    sparse = [shapes.sparse_caption(s, rng) for s in spec_list]
    dense = [shapes.dense_caption(s) for s in spec_list]
    for text in sparse:
        assert not {"left", "right", "above", "below"} & set(re.findall(r"[a-z0-9]+", text)), text
    n_sparse = np.array([len(re.findall(r"[a-z0-9]+", t)) for t in sparse])
    n_dense = np.array([len(t.split()) for t in dense])
    assert (n_sparse < n_dense).mean() > 0.8 and n_sparse.mean() < 0.6 * n_dense.mean()
    assert len(set(sparse)) > 100                                        # varied, not one template
    assert "object" in " ".join(sparse)                                  # generic words occur
    again = [shapes.sparse_caption(s, np.random.default_rng(0)) for s in spec_list[:1]]
    assert again == sparse[:1]                                            # deterministic given rng


def test_vocab_sentences_cover_every_caption_word_but_the_long_tail():
    vocab = set(re.findall(r"[a-z0-9]+", " ".join(shapes.VOCAB_SENTENCES)))
    rng, unknown = np.random.default_rng(7), []
    for spec in specs(2000, seed=7) + specs(200, seed=8, held_out=True):
        caption = shapes.dense_caption(spec) + " " + shapes.sparse_caption(spec, rng, tail=False)
        words = re.findall(r"[a-z0-9]+", caption)
        assert set(words) <= vocab, set(words) - vocab
        unknown += [w for w in re.findall(r"[a-z0-9]+", shapes.sparse_caption(spec, rng)) if w not in vocab]
    assert 0.05 < len(unknown) / 2200 < 0.5 and len(set(unknown)) > 0.5 * len(unknown)   # a long tail: most once
    for seed in range(20):
        typo = shapes._typo(np.random.default_rng(seed), "square")
        dropped, swapped = len(typo) == 5, sorted(typo) == sorted("square")
        assert typo != "square" and typo not in vocab and (dropped or swapped), typo


# ---------------------------------------------------------------------------- the evaluator is right...

@pytest.mark.parametrize("size", [32, 64])
def test_evaluator_reads_ground_truth(size):
    spec_list = specs(400, seed=10) + specs(200, seed=11, held_out=True)
    scores = shapes.evaluate(images(spec_list, size), spec_list)
    assert set(scores) == {"count", "color", "shape", "size", "relation", "all", *SHAPES,
                           "small_shape", "large_shape"}
    assert all(v >= 0.99 for v in scores.values()), scores


@pytest.mark.parametrize("size", [32, 64])
def test_evaluator_reads_blurred_noisy_ground_truth(size):
    spec_list = specs(500, seed=12)
    scores = shapes.evaluate(blur_and_noise(images(spec_list, size)), spec_list)
    assert scores["all"] >= 0.95, scores


def test_evaluate_each_uint8_input_and_splits():
    spec_list = specs(40, seed=13)
    as_uint8 = [shapes.draw(s) for s in spec_list]
    records = shapes.evaluate_each(as_uint8, spec_list)
    assert shapes.evaluate(images(spec_list), spec_list) == shapes.summarize(records)
    for r, s in zip(records, spec_list):
        assert r["n_objects"] == len(s.objects) and len(r["color"]) == len(s.objects)
        assert (r["relation"] is None) == (len(s.objects) == 1)
    one = shapes.summarize([r for r in records if r["n_objects"] == 1])
    assert np.isnan(one["relation"]) and one["all"] == 1.0
    for found, s in zip(shapes.detect(as_uint8), spec_list):                   # what the evaluator sees
        assert sorted((o.color, o.shape, o.size) for o in found) == sorted(
            (o.color, o.shape, o.size) for o in s.objects)


# ---------------------------------------------------------------------------- ...and can be wrong

def altered(spec, **changes):
    """A copy of spec with object 0's attributes changed."""
    return Scene([Obj(**{**vars(spec.objects[0]), **changes})] + spec.objects[1:], spec.relation)


def swapped(spec):
    """A copy of a two-object spec with the objects' positions swapped: the opposite relation."""
    a, b = spec.objects
    return Scene([Obj(a.shape, a.color, a.size, b.x, b.y), Obj(b.shape, b.color, b.size, a.x, a.y)],
                 spec.relation)


def test_evaluator_scores_wrong_drawings_wrong():
    spec_list, two = specs(100, seed=20), specs(100, seed=21, n_objects=2)
    one = specs(100, seed=22, n_objects=1)
    unused = [next(c for c in COLORS if c not in {o.color for o in s.objects}) for s in spec_list]
    cases = {  # attribute: (what is drawn, what was asked for, the most that attribute may score)
        "color": ([altered(s, color=c) for s, c in zip(spec_list, unused)], spec_list, 0.5),
        "shape": ([altered(s, shape=SHAPES[SHAPES.index(s.objects[0].shape) - 1]) for s in spec_list],
                  spec_list, 0.5),
        "size": ([altered(s, size=SIZES[1 - SIZES.index(s.objects[0].size)]) for s in one], one, 0.0),
        "relation": ([swapped(s) for s in two], two, 0.0),
        "count": ([Scene(s.objects[:1]) for s in two], two, 0.0),               # object 1 missing
    }
    for attr, (drawn, wanted, most) in cases.items():
        scores = shapes.evaluate(images(drawn), wanted)
        assert scores["all"] == 0.0 and scores[attr] <= most, (attr, scores)
    for r in shapes.evaluate_each(images(cases["count"][0]), two):              # a missing object is wrong
        assert r["color"] == [True, False] and r["relation"] is False


def test_shape_per_shape_asked_shows_a_model_that_draws_one_shape():
    one = specs(90, seed=23, n_objects=1)
    scores = shapes.evaluate(images([altered(s, shape="circle") for s in one]), one)   # circles for everything
    assert scores["circle"] == 1.0 and scores["square"] == scores["triangle"] == 0.0, scores
    assert 0.2 < scores["shape"] < 0.5                                          # overall: about chance


def test_shape_per_size_asked_shows_where_shapes_go_wrong():
    one = specs(90, seed=24, n_objects=1)
    wrong_when_small = [altered(s, shape=SHAPES[SHAPES.index(s.objects[0].shape) - 1])
                        if s.objects[0].size == "small" else s for s in one]
    scores = shapes.evaluate(images(wrong_when_small), one)
    assert scores["small_shape"] == 0.0 and scores["large_shape"] == 1.0, scores


def test_noise_and_blank_images_score_nothing():
    spec_list = specs(100, seed=30)
    g = torch.Generator().manual_seed(0)
    for name, x in {
        "uniform noise": torch.rand(100, 3, 32, 32, generator=g) * 2 - 1,
        "gaussian noise": torch.randn(100, 3, 32, 32, generator=g).clamp(-1, 1),
        "black": torch.full((100, 3, 32, 32), -1.0),
        "grey": torch.zeros(100, 3, 32, 32),
        "white": torch.ones(100, 3, 32, 32),
    }.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")                              # grey and white: no value below 0
            scores = shapes.evaluate(x, spec_list)
        assert scores["all"] <= 0.02 and scores["count"] <= 0.05, (name, scores)


def test_new_colours_are_drawn_and_read_back_but_never_in_the_scenes_or_the_vocabulary():
    """NEW_COLORS (white) is the concept notebook 07 teaches: the world draws and reads it, and nothing the bundled
    model trained on uses it (scenes, captions, the toy tokenizer's corpus)."""
    import copy
    scenes = specs(40, seed=5)
    assert not {o.color for s in scenes for o in s.objects} & set(shapes.NEW_COLORS)
    assert not {w for line in shapes.VOCAB_SENTENCES for w in line.replace(",", " ").split()} & set(shapes.NEW_COLORS)
    white = copy.deepcopy(scenes)
    for s in white:
        s.objects[0].color = "white"
    images = torch.from_numpy(np.stack([shapes.draw(s) for s in white])).permute(0, 3, 1, 2).float() / 127.5 - 1
    assert shapes.evaluate(images, white)["all"] >= 0.95                       # read back as white, as drawn
    assert shapes.evaluate(images, scenes)["color"] < 0.8                       # and not as the colour it replaced
