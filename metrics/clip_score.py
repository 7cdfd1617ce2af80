"""CLIP score: how well generated images agree with their prompts, as judged by a CLIP.

Papers: Radford et al. 2021, arXiv 2103.00020 (CLIP); Hessel et al. 2021, "CLIPScore: A Reference-free
Evaluation Metric for Image Captioning", arXiv 2104.08718, Sec. 3: CLIP-S(c, v) = w * max(cos(c, v), 0) with
w = 2.5, averaged over the (image, caption) pairs. Two conventions are in use and both are printed, named:
    torchmetrics  100 * mean_i cos(I_i, T_i), clamped at 0 after the mean (torchmetrics' CLIPScore.compute:
                  max(score / n_samples, 0)); the figure text-to-image papers usually quote
    CLIP-S        mean_i 2.5 * max(cos(I_i, T_i), 0), clamped per sample (Hessel et al. Eq. 1)
where cos(I, T) = <I_e, T_e> of the l2-normalised CLIP embeddings (models/clip.py). Hessel et al.'s code also
prepends "A photo depicts" to every caption; here, as in torchmetrics, the caption is scored as given. Unlike
torchmetrics, which keeps the first 77 token ids and so can drop the end token, a caption over CLIP's context
length is cut to its first max_length - 1 tokens followed by <end> (CLIP's tokenize(truncate=True)); the count is
printed.

    python -m metrics.clip_score --clip runs/clip_eval/ckpt.pt --images runs/demo/samples
    python -m metrics.clip_score --images runs/demo/samples --shuffle      # captions permuted: the chance level
    python -m data.shapes --export runs/shapes_renders --num-images 1000 --seed 7   # true renders, to compare
    python -m metrics.clip_score --images runs/shapes_renders   # torchmetrics 90.77, CLIP-S 2.2692 (clip_eval.yaml)

--images is a folder written by `python -m sample` (a metadata.jsonl of file_name, text), or any Hugging Face
imagefolder (metadata.jsonl or metadata.csv). Images are resized and centre-cropped to the CLIP's resolution.
The default CLIP, runs/clip_eval/ckpt.pt (configs/shapes/clip_eval.yaml), is trained separately from the one a
generator conditions on (configs/shapes/clip.yaml: another seed and another image tower), so a generator is not
scored by its own text encoder.
"""
import argparse
import json
from pathlib import Path

import torch

from core.runtime import get_device, run_cli
from data.dataset import DataConfig, load_data
from models.clip import embed_images, embed_texts, load_clip

HESSEL_W = 2.5  # Hessel et al. Sec. 3: w = 2.5 stretches the range of cos (rarely above 0.4) towards [0, 1]


def cosines(model, tokenizer, images, captions):
    """Cosine similarity of each image (uint8 (N, 3, H, W)) with its own caption -> (N,)."""
    return (embed_images(model, images) * embed_texts(model, tokenizer, captions)).sum(-1).cpu()  # (N,)


def torchmetrics_clip_score(cos):
    """torchmetrics' CLIPScore: 100 * cos averaged, then max(., 0)."""
    return max(100 * cos.mean().item(), 0.0)


def clip_s(cos):
    """Hessel et al. Eq. 1, averaged: mean of 2.5 * max(cos, 0)."""
    return (HESSEL_W * cos.clamp(min=0)).mean().item()


def build_parser():
    p = argparse.ArgumentParser(description="CLIP score of an image folder against its captions.")
    p.add_argument("--clip", default="runs/clip_eval/ckpt.pt",
                   help="CLIP checkpoint of train/clip.py (default: the separately trained evaluation CLIP)")
    p.add_argument("--images", required=True, help="folder with images and metadata.jsonl / metadata.csv")
    p.add_argument("--shuffle", action="store_true", help="pair every image with another image's caption")
    p.add_argument("--seed", type=int, default=0, help="seed of the --shuffle permutation")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", help="also write the figures to this JSON file (refuses to overwrite)")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.out and Path(args.out).exists():
        raise ValueError(f"{args.out} exists; choose another --out or remove it (nothing was overwritten)")
    device = get_device(args.device)
    model, tokenizer, cfg = load_clip(args.clip, device)
    import datasets
    datasets.disable_progress_bars()  # its "Generating train split" bar would precede a one-line error on stderr
    data = load_data(DataConfig(dataset=f"folder:{args.images}", resolution=cfg.vision.image_size, num_images=0),
                     progress=False)
    captions = list(data.captions)
    for i, caption in enumerate(captions):
        if not caption.strip():
            raise ValueError(f"empty caption for image {i} in {args.images}; give every image a caption")
    L = cfg.text.max_length
    n_cut = sum(len(tokenizer.encode(c)) + 2 > L for c in captions)
    if args.shuffle:
        if len(captions) < 2:
            raise ValueError("--shuffle needs at least 2 images")
        perm = torch.randperm(len(captions), generator=torch.Generator().manual_seed(args.seed))
        captions = [captions[j] for j in perm.tolist()]  # a random permutation (a few may keep a matching one)
    cos = cosines(model, tokenizer, data.images, captions)
    figures = {"torchmetrics_clip_score": torchmetrics_clip_score(cos), "clip_s": clip_s(cos),
               "mean_cos": cos.mean().item(), "images": len(captions), "truncated_captions": n_cut}
    pairs = "shuffled pairs" if args.shuffle else "true pairs"
    print(f"CLIP score of {len(captions)} images in {args.images} ({pairs}; CLIP {args.clip}, {cfg.vision.kind} "
          f"image tower, {cfg.vision.image_size} px)")
    print(f"torchmetrics  100*cos clamped at 0 after the mean  {figures['torchmetrics_clip_score']:.2f}")
    print(f"CLIP-S        2.5*max(cos, 0) per sample (Hessel)   {figures['clip_s']:.4f}")
    print(f"mean cos      unclamped, for reference              {figures['mean_cos']:+.4f}")
    print(f"{n_cut} caption(s) over {L} tokens, cut to the first {L - 1} tokens + <end>")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"clip": args.clip, "images": args.images, "shuffled": args.shuffle,
                                              **figures}, indent=2) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    run_cli(main)
