"""The built-in shapes dataset: determinism, held-out pairs, geometry behind relation captions, counts, captions
that parse back to the attributes, rendering at every resolution."""
import itertools
from collections import Counter

import numpy as np
import pytest

from data import shapes
from data.claims import eval_prompts, parse_caption
from data.shapes import (BACKGROUNDS, BORDER, COLOURS, GAP, HELDOUT_PAIRS, make_item, relation_holds, render,
                         render_dataset, sample_scene)

MULTI = [sample_scene(seed=3, index=i, split="train", max_objects=3) for i in range(1500)]


def test_same_seed_and_index_give_identical_pixels_and_others_differ():
    image, caption, attrs = make_item(0, 5, 32, max_objects=2)
    image2, caption2, attrs2 = make_item(0, 5, 32, max_objects=2)
    assert image.dtype == np.uint8 and image.shape == (32, 32, 3)
    assert np.array_equal(image, image2) and caption == caption2 and attrs == attrs2
    assert not np.array_equal(image, make_item(0, 6, 32, max_objects=2)[0])
    assert not np.array_equal(image, make_item(1, 5, 32, max_objects=2)[0])
    # a range rendered in one go equals the items rendered one by one
    images, captions, _ = render_dataset(4, 32, seed=0, max_objects=2, progress=False, start=3)
    assert np.array_equal(images[2], image) and captions[2] == caption


def test_the_scene_does_not_depend_on_the_resolution():
    """Rendering at 64 px and averaging 2x2 blocks gives the 32 px render (both are area averages)."""
    for index in range(20):
        small = make_item(0, index, 32)[0].astype(float)
        big = make_item(0, index, 64)[0].astype(float)
        pooled = big.reshape(32, 2, 32, 2, 3).mean(axis=(1, 3))
        assert np.abs(pooled - small).mean() < 2.0


def test_heldout_pairs_never_in_train_always_in_heldout():
    assert len(HELDOUT_PAIRS) == len(shapes.SHAPES) and {s for _, s in HELDOUT_PAIRS} == set(shapes.SHAPES)
    train_pairs = {(o["colour"], o["shape"]) for _, a in MULTI for o in a["objects"]}
    assert not train_pairs & set(HELDOUT_PAIRS)
    assert len(train_pairs) == len(COLOURS) * len(shapes.SHAPES) - len(HELDOUT_PAIRS)  # every other pair occurs
    heldout = [sample_scene(3, i, "heldout", 3)[1] for i in range(400)]
    heldout_pairs = [(o["colour"], o["shape"]) for a in heldout for o in a["objects"]]
    assert set(heldout_pairs) == set(HELDOUT_PAIRS)
    every = {(o["colour"], o["shape"]) for i in range(1500) for o in sample_scene(3, i, "all", 3)[1]["objects"]}
    assert set(HELDOUT_PAIRS) <= every and len(every) == len(COLOURS) * len(shapes.SHAPES)
    with pytest.raises(ValueError, match="split"):
        sample_scene(0, 0, "validation")


def test_objects_inside_the_image_and_apart():
    for _, a in MULTI:
        for o in a["objects"]:
            half = o["diameter"] / 2
            assert BORDER - 1e-9 <= o["x"] - half and o["x"] + half <= 1 - BORDER + 1e-9
            assert BORDER - 1e-9 <= o["y"] - half and o["y"] + half <= 1 - BORDER + 1e-9
        for p, q in itertools.combinations(a["objects"], 2):
            reach = (p["diameter"] + q["diameter"]) / 2 + GAP
            assert abs(p["x"] - q["x"]) >= reach - 1e-9 or abs(p["y"] - q["y"]) >= reach - 1e-9
    small = [o["diameter"] for _, a in MULTI for o in a["objects"] if o["size"] == "small"]
    large = [o["diameter"] for _, a in MULTI for o in a["objects"] if o["size"] == "large"]
    assert max(small) < 0.8 * min(large)


def test_relation_captions_satisfy_the_geometry():
    seen = Counter()
    for caption, a in MULTI:
        if a["relation"] is None:
            continue
        seen[a["relation"]] += 1
        first, second = a["objects"]
        assert relation_holds(first, second, a["relation"]), caption
        # and clearly: the two boxes are apart along the relation's axis
        dx, dy = second["x"] - first["x"], second["y"] - first["y"]
        along = {"left of": dx, "right of": -dx, "above": dy, "below": -dy}[a["relation"]]
        assert along >= (first["diameter"] + second["diameter"]) / 2, caption
        opposite = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
        assert not relation_holds(first, second, opposite[a["relation"]])
        assert shapes.RELATION_PHRASES[a["relation"]] in caption
    assert set(seen) == set(shapes.RELATIONS) and min(seen.values()) > 20


def test_relation_holds_rejects_diagonal_and_close_pairs():
    a = {"x": 0.3, "y": 0.5}
    assert relation_holds(a, {"x": 0.7, "y": 0.55}, "left of")
    assert not relation_holds(a, {"x": 0.7, "y": 0.95}, "left of")   # more below than right
    assert not relation_holds(a, {"x": 0.35, "y": 0.5}, "left of")   # too close to tell
    assert relation_holds({"x": 0.5, "y": 0.2}, {"x": 0.5, "y": 0.8}, "above")


def test_counts_are_right():
    counts = Counter(a["count"] for _, a in MULTI)
    assert set(counts) == {1, 2, 3}
    for caption, a in MULTI:
        assert a["count"] == len(a["objects"])
        for n, word in shapes.NUMBER_WORDS.items():
            if caption.split()[0] == word or f" {word} " in f" {caption} ":
                assert a["count"] == n and len({(o["colour"], o["shape"]) for o in a["objects"]}) == 1, caption
    assert all(a["count"] == 1 for a in (sample_scene(0, i)[1] for i in range(200)))  # single-object mode


def test_captions_parse_back_to_the_attributes_they_claim():
    kinds = Counter()
    for caption, a in MULTI:
        claimed = parse_caption(caption)
        assert claimed["count"] == a["count"] and claimed["relation"] == a["relation"], caption
        assert claimed["background"] in (None, a["background"]), caption
        for c, o in zip(claimed["objects"], a["objects"]):  # both in caption order
            assert (c["colour"], c["shape"]) == (o["colour"], o["shape"]), caption
            assert c["size"] in (None, o["size"]), caption
        kinds.update(k for k in ("a photo of", " and ", "two ", "three ", "background", "small", "large", "above")
                     if k in caption)
    assert min(kinds.values()) > 20, kinds  # the templates are varied
    assert parse_caption("an orange heart") == {
        "objects": [{"shape": "heart", "colour": "orange", "size": None, "x": None, "y": None}],
        "count": 1, "relation": None, "background": None}
    for bad in ("a purple elephant", "a red", "five red circles", "a red circle on a pink background"):
        with pytest.raises(ValueError):
            parse_caption(bad)


def test_every_resolution_renders_and_the_pixels_match_the_attributes():
    for resolution in (16, 17, 24, 32, 48, 64, 100, 128, 255, 512, 1024):
        image, _, a = make_item(7, resolution, resolution, max_objects=2)
        assert image.shape == (resolution, resolution, 3) and image.dtype == np.uint8
        if resolution >= 64:  # corner pixels lie inside the border margin: pure background
            assert tuple(image[0, 0]) == BACKGROUNDS[a["background"]]
        for o in a["objects"]:  # every shape covers its box centre
            if o["size"] == "large" and resolution >= 32:
                r, c = int(o["y"] * resolution), int(o["x"] * resolution)
                assert np.abs(image[r, c].astype(int) - COLOURS[o["colour"]]).max() <= 1
    for bad in (15, 1025, 32.0):
        with pytest.raises(ValueError, match="resolution"):
            render(sample_scene(0, 0)[1], bad)


def test_eval_prompts():
    held_in, held_out = eval_prompts("train"), eval_prompts("heldout")
    assert len(held_in) == len(COLOURS) * len(shapes.SHAPES) - len(HELDOUT_PAIRS) and len(held_out) == len(HELDOUT_PAIRS)
    assert all((a["objects"][0]["colour"], a["objects"][0]["shape"]) not in HELDOUT_PAIRS for _, a in held_in)
    assert all((a["objects"][0]["colour"], a["objects"][0]["shape"]) in HELDOUT_PAIRS for _, a in held_out)
    assert ("an orange circle", parse_caption("an orange circle")) in held_in
    multi = eval_prompts("heldout", max_objects=3, per_kind=4)
    assert eval_prompts("heldout", max_objects=3, per_kind=4) == multi  # a fixed list
    assert Counter(a["relation"] for _, a in multi) == {None: 7 + 8, "left of": 4, "right of": 4, "above": 4, "below": 4}
    assert Counter(a["count"] for _, a in multi) == {1: 7, 2: 16 + 4, 3: 4}
    assert all((o["colour"], o["shape"]) in HELDOUT_PAIRS for _, a in multi for o in a["objects"])
