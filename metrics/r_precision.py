"""R-precision: is an image's own prompt the one a CLIP ranks first among 100 candidates?

Papers: Xu et al. 2018, "AttnGAN", arXiv 1711.10485, Sec. 4 ("R-precision ... we use generated images to query
their corresponding natural language descriptions ... for each generated image ... the ground truth and 99
randomly selected mismatched descriptions ... we compute the cosine similarities between the global image vector
and the 100 candidate sentence vectors, rank the candidates ... R-precision is r/R"; they report R = 1, top-1, with
their DAMSM encoders); Park et al. 2021, "Benchmark for Compositional Text-to-Image Synthesis" (NeurIPS Datasets
and Benchmarks) and DALL-Eval / later work compute it with a CLIP instead of DAMSM ("CLIP R-precision"), as here.

    R-precision (R = 1) = mean over images i of  [ cos(I_i, T_true) > max over the 99 mismatched d of cos(I_i, T_d) ]

with I, T the l2-normalised CLIP embeddings (models/clip.py). Chance is 1 / candidates (0.01). A tie counts as a
miss. The mismatched captions are drawn, for each image independently, from the evaluated set's own distinct
captions (AttnGAN draws them from the test set) that do not match the image's caption:
    --mismatch text     any caption whose text differs (for any image-caption folder)
    --mismatch objects  any caption asking for other objects (data.claims.parse_caption: another colour, shape,
                        count or relation; size and background words ignored): "a photo of a red circle" is no
                        mismatch for "a red circle on a black background", which the same picture may show. The
                        default, for the built-in shapes.

    python -m metrics.r_precision --images runs/demo/ldm/generated --clip runs/clip_demo/ckpt.pt
    python -m metrics.r_precision --images runs/demo/ldm/real --clip runs/clip_demo/ckpt.pt   # the renders' ceiling
"""
import argparse
import json
from pathlib import Path

import numpy as np
import torch

from core.runtime import get_device, run_cli
from data.claims import parse_caption
from data.dataset import DataConfig, load_data
from models.clip import embed_images, embed_texts, load_clip

MISMATCH = ("objects", "text")


def mismatch_key(caption, mismatch):
    """What two captions must differ in to be a mismatch: the text, or the objects asked for (see the docstring)."""
    if mismatch == "text":
        return caption
    if mismatch != "objects":
        raise ValueError(f"unknown --mismatch {mismatch!r}; use one of {', '.join(MISMATCH)}")
    try:
        claims = parse_caption(caption)
    except ValueError:
        raise ValueError(f"caption {caption!r} is not one of the built-in shapes' captions; use --mismatch text for "
                         f"other captions") from None
    return (tuple((o["colour"], o["shape"]) for o in claims["objects"]), claims["relation"])


def most_candidates(captions, mismatch="objects"):
    """The most candidates a set of captions allows: 1 + the fewest mismatched distinct captions any caption has
    (a small evaluation set, such as the demo's --smoke one, has fewer than 99)."""
    keys = [repr(mismatch_key(c, mismatch)) for c in sorted(set(captions))]
    counts = {k: keys.count(k) for k in set(keys)}
    return 1 + len(keys) - max(counts.values())


def r_precision(image_embeds, text_embeds, caption_index, keys, candidates=100, seed=0):
    """Top-1 R-precision of N images among `candidates` captions each.

    image_embeds (N, E) and text_embeds (U, E): l2-normalised; caption_index (N,): the row of text_embeds that is
    image i's caption; keys (U,): captions with equal keys are no mismatch for each other (mismatch_key). For each
    image, candidates - 1 rows with another key are drawn without replacement (numpy RandomState(seed), in image
    order). Returns (rate, hits (N,) bool)."""
    N, U = len(image_embeds), len(text_embeds)
    caption_index = torch.as_tensor(caption_index)
    assert caption_index.shape == (N,) and len(keys) == U, "one caption index per image, one key per caption"
    key_ids = np.unique(np.array([repr(k) for k in keys]), return_inverse=True)[1]  # (U,) equal keys, equal ids
    sims = image_embeds.float() @ text_embeds.float().T  # (N, U) cosines
    rng = np.random.RandomState(seed)
    hits = torch.zeros(N, dtype=torch.bool)
    for i in range(N):
        true = int(caption_index[i])
        pool = np.flatnonzero(key_ids != key_ids[true])  # the mismatched captions
        if len(pool) < candidates - 1:
            raise ValueError(f"R-precision needs {candidates - 1} mismatched captions per image but image {i}'s "
                             f"caption has only {len(pool)} in this set; evaluate more images or fewer candidates")
        drawn = torch.from_numpy(rng.choice(pool, candidates - 1, replace=False))  # (candidates - 1,)
        hits[i] = sims[i, true] > sims[i, drawn].max()  # a tie is a miss
    return hits.float().mean().item(), hits


def folder_r_precision(model, tokenizer, images, captions, candidates=100, mismatch="objects", seed=0):
    """The R-precision of uint8 images (N, 3, H, W) against their captions (N strings) with a CLIP: the distinct
    captions are embedded once. Returns a dict for JSON files."""
    distinct = sorted(set(captions))
    row = {c: u for u, c in enumerate(distinct)}
    keys = [mismatch_key(c, mismatch) for c in distinct]
    rate, _ = r_precision(embed_images(model, images), embed_texts(model, tokenizer, distinct),
                          [row[c] for c in captions], keys, candidates, seed)
    return {"r_precision": rate, "candidates": candidates, "mismatch": mismatch, "images": len(captions),
            "distinct_captions": len(distinct)}


def build_parser():
    p = argparse.ArgumentParser(description="CLIP R-precision (top-1 among 100 captions) of an image folder.")
    p.add_argument("--clip", default="runs/clip_demo/ckpt.pt", help="CLIP checkpoint of train/clip.py (the judge)")
    p.add_argument("--images", required=True, help="folder with images and metadata.jsonl / metadata.csv")
    p.add_argument("--candidates", type=int, default=100, help="the true caption + this many - 1 mismatched ones")
    p.add_argument("--mismatch", choices=MISMATCH, default="objects", help="what makes a caption a mismatch")
    p.add_argument("--seed", type=int, default=0, help="seed of the draw of mismatched captions")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", help="also write the figures to this JSON file (refuses to overwrite)")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.candidates < 2:
        raise ValueError(f"--candidates must be at least 2 (the true caption and a mismatched one), got "
                         f"{args.candidates}")
    if args.out and Path(args.out).exists():
        raise ValueError(f"{args.out} exists; choose another --out or remove it (nothing was overwritten)")
    model, tokenizer, cfg = load_clip(args.clip, get_device(args.device))
    import datasets
    datasets.disable_progress_bars()
    data = load_data(DataConfig(dataset=f"folder:{args.images}", resolution=cfg.vision.image_size, num_images=0),
                     progress=False)
    figures = folder_r_precision(model, tokenizer, data.images, list(data.captions), args.candidates,
                                 args.mismatch, args.seed)
    print(f"R-precision (top-1 among {args.candidates} captions, mismatched by {args.mismatch}) of "
          f"{figures['images']} images in {args.images}: {figures['r_precision']:.4f} (chance "
          f"{1 / args.candidates:.4f}; CLIP {args.clip})")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"clip": args.clip, "images_folder": args.images, **figures}, indent=2)
                                  + "\n")
        print(f"wrote {args.out}")
    return figures


if __name__ == "__main__":
    run_cli(main)
