"""What a shapes caption claims, and whether a scene shows it: the reading side of data/shapes.py.

A caption of data/shapes.py ("a small blue square to the left of a green triangle") makes claims about the
scene: objects with a colour and a shape (and maybe a size), a count, a relation, a background. parse_caption
turns a caption back into those claims in the attributes format of data/shapes.py; judge checks each claim
against a scene's attributes (the true ones of a render, or the ones the shapes classifier sees in a generated
image); eval_prompts lists the prompts that prompt accuracy (metrics/prompt_accuracy.py) asks for. The claim
by claim scoring is the GenEval idea (Ghosh et al. 2023, arXiv 2310.11513).
"""
import numpy as np

from data.shapes import (BACKGROUNDS, COLOURS, NUMBER_WORDS, PLURALS, PREFIXES, RELATION_PHRASES, RELATIONS, SHAPES,
                         SIZES, SPLIT_PAIRS, article, relation_holds)


def parse_caption(caption):
    """What a caption claims, in the attributes format; unclaimed fields are None (size, x, y, background).
    Inverse of the caption templates above; raises ValueError on text they cannot produce."""
    text = caption.strip()
    for prefix in sorted(set(PREFIXES), key=len, reverse=True):
        if prefix and text.startswith(prefix):
            text = text[len(prefix):]
            break
    background = None
    if text.endswith(" background"):
        text, _, bg = text[: -len(" background")].rpartition(" on ")
        background = bg.split(" ", 1)[-1]
        if background not in BACKGROUNDS:
            raise ValueError(f"unknown background {bg!r} in caption {caption!r}")
    relation = None
    for rel, phrase in RELATION_PHRASES.items():
        if f" {phrase} " in text:
            relation, chunks = rel, text.split(f" {phrase} ")
            break
    else:
        chunks = text.replace(" and ", ", ").split(", ")
    objects = []
    for chunk in chunks:
        words = chunk.split()
        if len(words) < 3 or words[0] not in ("a", "an", "two", "three"):
            raise ValueError(f"cannot parse {chunk!r} in caption {caption!r}")
        n = {"a": 1, "an": 1, "two": 2, "three": 3}[words[0]]
        size = words[1] if words[1] in SIZES else None
        colour, noun = words[-2], words[-1]
        shape = noun if n == 1 else {p: s for s, p in PLURALS.items()}.get(noun)
        if colour not in COLOURS or shape not in SHAPES or len(words) != 3 + (size is not None):
            raise ValueError(f"cannot parse {chunk!r} in caption {caption!r}")
        objects += [{"shape": shape, "colour": colour, "size": size, "x": None, "y": None}] * n
    objects = [dict(o) for o in objects]
    return {"objects": objects, "count": len(objects), "relation": relation, "background": background}


def eval_prompts(split="train", max_objects=1, per_kind=8, seed=0):
    """Prompts for prompt-accuracy evaluation, as (caption, expected attributes) in parse_caption's format.

    split "train": every held-in (colour, shape) pair once ("a red circle"); "heldout": every pair of
    HELDOUT_PAIRS. With max_objects >= 2, also `per_kind` prompts for each relation and for each count
    2..max_objects, built from the same pairs (drawn with `seed`, so the list is fixed).
    """
    if split not in ("train", "heldout"):
        raise ValueError(f"eval_prompts split must be 'train' or 'heldout', got {split!r}")
    pairs = SPLIT_PAIRS[split]
    captions = [f"{article(c)} {c} {s}" for c, s in pairs]
    rng = np.random.default_rng([seed, 10_007])
    if max_objects >= 2:
        for relation in RELATIONS:
            for _ in range(per_kind):
                (c1, s1), (c2, s2) = [pairs[i] for i in rng.choice(len(pairs), size=2, replace=False)]
                captions.append(f"{article(c1)} {c1} {s1} {RELATION_PHRASES[relation]} {article(c2)} {c2} {s2}")
        for n in range(2, max_objects + 1):
            for _ in range(per_kind):
                c, s = pairs[rng.integers(len(pairs))]
                captions.append(f"{NUMBER_WORDS[n]} {c} {PLURALS[s]}")
    return [(caption, parse_caption(caption)) for caption in captions]


# ---------------------------------------------------------------- judging a scene against a caption's claims

def pair_objects(expected, detected):
    """Pair each expected object with a distinct detected one: exact (colour, shape) first, then shape,
    then colour, then any. Returns a list aligned with `expected` (None where nothing was left)."""
    left = list(range(len(detected)))
    pairs = [None] * len(expected)
    rules = (lambda e, d: e["colour"] == d["colour"] and e["shape"] == d["shape"],
             lambda e, d: e["shape"] == d["shape"], lambda e, d: e["colour"] == d["colour"], lambda e, d: True)
    for rule in rules:
        for i, e in enumerate(expected):
            if pairs[i] is None:
                match = next((j for j in left if rule(e, detected[j])), None)
                if match is not None:
                    pairs[i] = detected[match]
                    left.remove(match)
    return pairs


def judge(expected, detected):
    """One image: {claim: True/False} for each claim the prompt makes (claims it does not make are absent)."""
    pairs = pair_objects(expected["objects"], detected["objects"])
    result = {"count": detected["count"] == expected["count"]}
    exact = []
    for e, d in zip(expected["objects"], pairs):
        for key in ("colour", "shape") + (("size",) if e["size"] is not None else ()):
            result.setdefault(key, []).append(d is not None and d[key] == e[key])
        exact.append(d is not None and all(d[k] == e[k] for k in ("colour", "shape"))
                     and (e["size"] is None or d["size"] == e["size"]))
    for key in ("colour", "shape", "size"):
        if key in result:
            result[key] = all(result[key])
    if expected["relation"] is not None:
        result["relation"] = exact[0] and exact[1] and relation_holds(pairs[0], pairs[1], expected["relation"])
    result["overall"] = all(exact) and all(result.values())
    return result


def caption_holds(caption, attributes):
    """Whether a scene agrees with every claim of a caption (judge() on the true attributes, plus background)."""
    claims = parse_caption(caption)
    return judge(claims, attributes)["overall"] and claims["background"] in (None, attributes["background"])
