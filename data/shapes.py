"""The built-in captioned dataset: coloured shapes on plain backgrounds, rendered at any resolution.

A procedural stand-in for LAION/COCO small enough to train on a laptop CPU in minutes, yet with the
compositional structure that text-to-image papers probe: attribute binding (colour <-> shape), counting and
spatial relations (the GenEval idea, Ghosh et al. 2023, arXiv 2310.11513), plus a held-out set of
(colour, shape) pairs that never appears in training, to measure compositional generalisation.

Every item is a pure function of (seed, index): the scene (objects, caption) is drawn from
numpy.random.default_rng([seed, index]) and does not depend on the resolution, so the same item can be
rendered at 16 px or 1024 px. Rendering is anti-aliased: polygons are drawn on a canvas `ss` times larger and
box-filtered down (ss = 4, less above 512 px so the canvas stays at most MAX_CANVAS pixels wide).

Coordinates: x to the right, y downwards (image rows), both in [0, 1]; an object's (x, y) is the centre of
its bounding box and `diameter` the side of that box as a fraction of the image side. So "A above B" means
A's y is smaller.

Each item comes with its attributes, a plain dict:
    {"objects": [{"shape", "colour", "size", "x", "y", "diameter"}, ...],   # in caption order
     "count": number of objects,
     "relation": None or "left of" | "right of" | "above" | "below"   (objects[0] <relation> objects[1]),
     "background": a BACKGROUNDS name}

    from data.shapes import make_item, render_dataset
    image, caption, attrs = make_item(seed=0, index=7, resolution=32)   # (32, 32, 3) uint8, str, dict

As an image folder (PNGs + metadata.jsonl, the layout `python -m sample` writes and metrics/*.py read):
    python -m data.shapes --export runs/shapes_eval --num-images 1000 --seed 7
"""
import math

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

# ---------------------------------------------------------------- vocabulary

# Shapes keep a fixed orientation (no rotation, so a diamond is never a rotated square) and were chosen to
# stay distinguishable when small at 32 px (a hexagon was left out: at 8 px it is a circle).
SHAPES = ("circle", "square", "triangle", "star", "diamond", "heart", "cross")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "star": "stars",
           "diamond": "diamonds", "heart": "hearts", "cross": "crosses"}

# Saturated, well separated in hue or lightness; none is close to a background colour.
COLOURS = {
    "red": (220, 30, 30),
    "orange": (245, 140, 20),
    "yellow": (245, 225, 30),
    "green": (40, 175, 60),
    "cyan": (40, 215, 225),
    "blue": (40, 80, 235),
    "purple": (145, 60, 210),
    "pink": (255, 135, 200),
    "white": (245, 245, 245),
}

# Dark or neutral, so every object colour stands out on every background.
BACKGROUNDS = {
    "black": (10, 10, 10),
    "gray": (105, 105, 105),
    "navy": (20, 25, 70),
    "brown": (75, 50, 35),
}

# Side of an object's bounding box as a fraction of the image side: nominal value, jittered by +-SIZE_JITTER.
SIZES = {"small": 0.27, "large": 0.43}
SIZE_JITTER = 0.05        # relative; keeps the two sizes far apart (0.26-0.28 vs 0.41-0.45)
BORDER = 0.03             # minimum gap between an object's box and the image border
GAP = 0.03                # minimum gap between the boxes of two objects (they never touch)

RELATIONS = ("left of", "right of", "above", "below")
RELATION_PHRASES = {"left of": "to the left of", "right of": "to the right of", "above": "above", "below": "below"}
NUMBER_WORDS = {1: "one", 2: "two", 3: "three"}
PREFIXES = ("", "", "", "a photo of ", "an image of ", "a picture of ", "a drawing of ")

# One (colour, shape) pair per shape that never appears in the "train" split, each colour used at most once.
# The "heldout" split draws every object from these pairs only; "all" draws from every pair (for training
# the attribute classifier, which must recognise held-out pairs too).
HELDOUT_PAIRS = (
    ("purple", "circle"),
    ("yellow", "square"),
    ("blue", "triangle"),
    ("red", "star"),
    ("green", "diamond"),
    ("orange", "heart"),
    ("cyan", "cross"),
)
ALL_PAIRS = tuple((c, s) for c in COLOURS for s in SHAPES)
SPLIT_PAIRS = {
    "train": tuple(p for p in ALL_PAIRS if p not in HELDOUT_PAIRS),
    "heldout": HELDOUT_PAIRS,
    "all": ALL_PAIRS,
}

# Caption kinds for 2-3 objects and their probabilities (one object is always "single").
P_COUNT = 0.25            # all objects share colour and shape: "two yellow stars"
P_RELATION = 0.45         # two objects only: "a small blue square to the left of a green triangle"
P_MENTION_SIZE = 0.35     # per object, "small"/"large" appears in the caption
P_MENTION_BACKGROUND = 0.3

MIN_RESOLUTION, MAX_RESOLUTION = 16, 1024
SUPERSAMPLE = 4           # anti-aliasing factor
MAX_CANVAS = 2048         # cap on the supersampled canvas side (1024 px renders at 2x)


# ---------------------------------------------------------------- shape outlines

def _star(points=5, inner=0.42):
    angles = -math.pi / 2 + np.arange(2 * points) * math.pi / points
    radii = np.where(np.arange(2 * points) % 2 == 0, 1.0, inner)
    xy = np.stack([radii * np.cos(angles), radii * np.sin(angles)], 1)
    return xy - [0, (xy[:, 1].max() + xy[:, 1].min()) / 2]        # centre the box vertically


def _heart(n=48):
    t = np.linspace(0, 2 * math.pi, n, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))  # y down: lobes on top
    xy = np.stack([x, y], 1)
    xy = xy - (xy.max(0) + xy.min(0)) / 2
    return xy / np.abs(xy).max()


# Polygons in a unit box [-1, 1]^2 (y down); the circle is drawn as an ellipse. Each roughly fills its box.
OUTLINES = {
    "square": np.array([[-0.85, -0.85], [0.85, -0.85], [0.85, 0.85], [-0.85, 0.85]]),
    "triangle": np.array([[0.0, -1.0], [1.0, 0.8], [-1.0, 0.8]]),
    "star": _star(),
    "diamond": np.array([[0.0, -1.0], [0.85, 0.0], [0.0, 1.0], [-0.85, 0.0]]),
    "heart": _heart(),
    "cross": np.array([[-0.3, -0.95], [0.3, -0.95], [0.3, -0.3], [0.95, -0.3], [0.95, 0.3], [0.3, 0.3],
                       [0.3, 0.95], [-0.3, 0.95], [-0.3, 0.3], [-0.95, 0.3], [-0.95, -0.3], [-0.3, -0.3]]),
}


# ---------------------------------------------------------------- geometry

def _along_across(a, b, relation):
    """Offset of b from a along the relation's direction (positive when a `relation` b) and across it."""
    dx, dy = b["x"] - a["x"], b["y"] - a["y"]           # y grows downwards: "a above b" means dy > 0
    return {"left of": (dx, dy), "right of": (-dx, dy), "above": (dy, dx), "below": (-dy, dx)}[relation]


def relation_holds(a, b, relation):
    """Whether object a is `relation` object b, judged from the centres alone (usable on predicted objects):
    the offset along the relation's direction is at least 0.1 of the image and larger than the offset across.
    Generated relation scenes satisfy a stricter rule (_strict_relation)."""
    along, across = _along_across(a, b, relation)
    return along >= 0.1 and abs(across) < along


def _separated(a, b):
    """Boxes of a and b apart by at least GAP along x or along y (so they neither overlap nor touch).
    b's centre may be arrays of candidates."""
    reach = (a["diameter"] + b["diameter"]) / 2 + GAP
    return (np.abs(a["x"] - b["x"]) >= reach) | (np.abs(a["y"] - b["y"]) >= reach)


def _strict_relation(a, b, relation):
    """The rule for generated relation scenes: the two boxes are apart along the relation's direction and the
    offset across is at most half the offset along, so that no reader would hesitate."""
    along, across = _along_across(a, b, relation)
    return (along >= (a["diameter"] + b["diameter"]) / 2 + GAP) & (np.abs(across) <= along / 2)


def _place(rng, objects, relation, tries=20, candidates=64):
    """Give every object a centre inside the image, no two touching, and objects[0] `relation` objects[1].
    Rejection sampling, `candidates` centres at a time; returns False when no layout was found (the caller
    then redraws the sizes)."""
    for _ in range(tries):
        placed = []
        for obj in objects:
            half = obj["diameter"] / 2
            xy = rng.uniform(BORDER + half, 1 - BORDER - half, size=(candidates, 2))  # (candidates, 2)
            candidate = {"x": xy[:, 0], "y": xy[:, 1], "diameter": obj["diameter"]}
            ok = np.ones(candidates, dtype=bool)
            for p in placed:
                ok &= _separated(p, candidate)
            if relation and len(placed) == 1:
                ok &= _strict_relation(placed[0], candidate, relation)
            if not ok.any():
                break
            obj["x"], obj["y"] = (float(v) for v in xy[ok.argmax()])                  # first valid candidate
            placed.append(obj)
        if len(placed) == len(objects):
            return True
    return False


# ---------------------------------------------------------------- scenes and captions

def article(word):
    """'an' before a vowel, else 'a' (the shapes vocabulary has no exceptions)."""
    return "an" if word[0] in "aeiou" else "a"


def _phrase(obj, mention_size):
    words = ([obj["size"]] if mention_size else []) + [obj["colour"], obj["shape"]]
    return f"{article(words[0])} {' '.join(words)}"


def sample_scene(seed, index, split="train", max_objects=1):
    """Draw the scene of item (seed, index): (caption, attributes). No pixels; see render()."""
    if split not in SPLIT_PAIRS:
        raise ValueError(f"unknown shapes split {split!r}; use one of {sorted(SPLIT_PAIRS)}")
    if not 1 <= max_objects <= 3:
        raise ValueError(f"max_objects must be 1, 2 or 3, got {max_objects}")
    rng = np.random.default_rng([seed, index])
    pairs = SPLIT_PAIRS[split]
    count = int(rng.integers(1, max_objects + 1))
    kind = "single"
    if count >= 2:
        u = rng.random()
        kind = "count" if u < P_COUNT else ("relation" if count == 2 and u < P_COUNT + P_RELATION else "list")
    if kind == "count":
        chosen = [pairs[rng.integers(len(pairs))]] * count
    else:  # distinct pairs, so "the red circle" names one object
        chosen = [pairs[i] for i in rng.choice(len(pairs), size=count, replace=False)]
    relation = RELATIONS[rng.integers(len(RELATIONS))] if kind == "relation" else None
    while True:
        objects = []
        for colour, shape in chosen:
            size = ("small", "large")[rng.integers(2)]
            diameter = SIZES[size] * (1 + SIZE_JITTER * rng.uniform(-1, 1))
            objects.append({"shape": shape, "colour": colour, "size": size, "x": 0.0, "y": 0.0,
                            "diameter": float(diameter)})
        if _place(rng, objects, relation):
            break
    background = list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]

    mention = rng.random(count) < P_MENTION_SIZE
    if kind == "count":
        text = f"{NUMBER_WORDS[count]} {chosen[0][0]} {PLURALS[chosen[0][1]]}"
    elif kind == "relation":
        text = f"{_phrase(objects[0], mention[0])} {RELATION_PHRASES[relation]} {_phrase(objects[1], mention[1])}"
    else:
        phrases = [_phrase(o, m) for o, m in zip(objects, mention)]
        text = phrases[0] if count == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
    if rng.random() < P_MENTION_BACKGROUND:
        text += f" on {article(background)} {background} background"
    caption = PREFIXES[rng.integers(len(PREFIXES))] + text
    attributes = {"objects": objects, "count": count, "relation": relation, "background": background}
    return caption, attributes


# ---------------------------------------------------------------- rendering

def check_resolution(resolution):
    if not (isinstance(resolution, int) and MIN_RESOLUTION <= resolution <= MAX_RESOLUTION):
        raise ValueError(f"shapes resolution must be an integer from {MIN_RESOLUTION} to {MAX_RESOLUTION}, "
                         f"got {resolution!r}")


def render(attributes, resolution):
    """Draw a scene: (resolution, resolution, 3) uint8, anti-aliased by supersampling."""
    check_resolution(resolution)
    ss = max(1, min(SUPERSAMPLE, MAX_CANVAS // resolution))
    S = resolution * ss                                     # canvas side in pixels
    canvas = Image.new("RGB", (S, S), BACKGROUNDS[attributes["background"]])
    draw = ImageDraw.Draw(canvas)
    for obj in attributes["objects"]:
        r = obj["diameter"] * S / 2                         # half the box side, in canvas pixels
        cx, cy = obj["x"] * S, obj["y"] * S
        colour = COLOURS[obj["colour"]]
        if obj["shape"] == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
        else:
            xy = OUTLINES[obj["shape"]] * r + [cx, cy]      # (K, 2) canvas coordinates
            draw.polygon([tuple(p) for p in xy.tolist()], fill=colour)
    if ss > 1:
        canvas = canvas.reduce(ss)                          # box filter: mean of ss x ss sub-pixels
    return np.array(canvas)                                 # (R, R, 3) uint8, writable


def make_item(seed, index, resolution, split="train", max_objects=1):
    """Item (seed, index): (image (H, W, 3) uint8, caption, attributes)."""
    caption, attributes = sample_scene(seed, index, split, max_objects)
    return render(attributes, resolution), caption, attributes


def render_dataset(num_images, resolution, seed=0, split="train", max_objects=1, progress=True, start=0):
    """Items start .. start+num_images-1: (images (N, H, W, 3) uint8, captions, attributes)."""
    check_resolution(resolution)
    images = np.empty((num_images, resolution, resolution, 3), dtype=np.uint8)
    captions, attributes = [], []
    for i in tqdm(range(num_images), desc=f"rendering shapes {resolution}px", disable=not progress,
                  dynamic_ncols=True):
        images[i], caption, attrs = make_item(seed, start + i, resolution, split, max_objects)
        captions.append(caption)
        attributes.append(attrs)
    return images, captions, attributes


# ---------------------------------------------------------------- export as an image folder

def export_folder(out_dir, num_images, resolution, seed=0, split="train", max_objects=1):
    """Write items 0..num_images-1 as out_dir/0000.png, ... and out_dir/metadata.jsonl (file_name, text): a
    Hugging Face `imagefolder`, like the folder `python -m sample` writes. Refuses a non-empty out_dir."""
    import json
    from pathlib import Path

    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ValueError(f"{out_dir} exists and is not empty; choose another --export folder (nothing was written)")
    if num_images < 1:
        raise ValueError(f"--num-images must be at least 1, got {num_images}")
    images, captions, _ = render_dataset(num_images, resolution, seed, split, max_objects)
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "metadata.jsonl", "w") as meta:
        for i, (image, caption) in enumerate(zip(images, captions)):
            Image.fromarray(image).save(out_dir / f"{i:04d}.png")
            meta.write(json.dumps({"file_name": f"{i:04d}.png", "text": caption}) + "\n")
    print(f"wrote {num_images} {resolution} px shapes renders (seed {seed}, split {split}, max_objects "
          f"{max_objects}) and metadata.jsonl to {out_dir}/")


def main(argv=None):
    import argparse

    p = argparse.ArgumentParser(description="Export built-in shapes renders as an image folder with metadata.jsonl.")
    p.add_argument("--export", required=True, help="output folder (must not exist or be empty)")
    p.add_argument("--num-images", type=int, default=1000)
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--seed", type=int, default=7, help="rendering seed (training uses data.seed=0 by default)")
    p.add_argument("--split", default="train", choices=sorted(SPLIT_PAIRS))
    p.add_argument("--max-objects", type=int, default=1)
    args = p.parse_args(argv)
    export_folder(args.export, args.num_images, args.resolution, args.seed, args.split, args.max_objects)


if __name__ == "__main__":
    from core.runtime import run_cli

    run_cli(main)
