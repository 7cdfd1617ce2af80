"""Prompt accuracy: does the picture show what the prompt asked for? (the GenEval idea, on our shapes)

Ghosh et al. 2023, "GenEval: An Object-Focused Framework for Evaluating Text-to-Image Alignment",
arXiv 2310.11513: generate images for templated prompts, detect the objects, and check each claim of the
prompt (object, count, colour, position) separately. Their detector is Mask2Former; ours is the shapes
attribute classifier of models/classifier.py (train it with `python -m train.classifier`), which is at least
99% right per attribute on fresh renders, so its errors barely move these figures.

    python -m metrics.prompt_accuracy --ckpt runs/diffusion_pixel/ckpt.pt \
        --classifier runs/shapes_classifier/ckpt.pt --n 4 --sampler ddim --steps 50 --guidance 3
    python -m metrics.prompt_accuracy --pipeline ldm --config configs/shapes/pipeline_ldm.yaml --n 4

Any pipeline (models/pipeline.py) is judged the same way; its sampling settings are the checkpoint's defaults
(for a diffusion model DDIM 50 steps, guidance 3), changed by the same flags as `python -m sample`.

Prompts: data.claims.eval_prompts for the held-in (colour, shape) pairs ("heldin") and for the held-out pairs
that never appear in training ("heldout": compositional generalisation). Per image and per claim:
    count      the number of detected objects equals the prompt's
    colour     each object of the prompt is paired with a detected object (exact colour+shape match first,
    shape      then shape, then colour, then any) and the pair agrees on that attribute
    size       likewise, only for objects whose size the prompt states
    relation   both objects found exactly and data.shapes.relation_holds on the detected centres
    overall    every claim of the prompt right (GenEval's per-image score)
Prints one line per split, writes the figures to --out (JSON) and a grid per split beside it.
"""
import argparse
import json
from dataclasses import asdict
from pathlib import Path

import torch

from core.images import image_grid
from core.runtime import run_cli
from data.claims import eval_prompts, judge
from models.classifier import load_classifier, predict_attributes
from models.pipeline import add_pipeline_arguments, add_sampling_flags, pipeline_from_args, settings_from_args

ATTRIBUTES = ("count", "colour", "shape", "size", "relation", "overall")


def summarise(judgements):
    """Mean of each claim over the images that make it."""
    out = {}
    for key in ATTRIBUTES:
        values = [j[key] for j in judgements if key in j]
        if values:
            out[key] = sum(values) / len(values)
    out["images"] = len(judgements)
    return out


def build_parser():
    p = argparse.ArgumentParser(description="Per-attribute prompt accuracy of a text-to-image pipeline.")
    add_pipeline_arguments(p)
    add_sampling_flags(p)
    p.add_argument("--classifier", default="runs/shapes_classifier/ckpt.pt", help="shapes classifier checkpoint")
    p.add_argument("--n", type=int, default=4, help="images per prompt")
    p.add_argument("--max-objects", type=int, help="prompt kinds to include (default: the training data's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--out", help="JSON file for the figures (default: prompt_accuracy.json beside --ckpt, else in "
                   "the current folder)")
    return p


def check_trained_on_shapes(pipe, what):
    if pipe.data["dataset"] != "shapes":
        raise ValueError(f"this {pipe.family} pipeline was trained on {pipe.data['dataset']}; {what} needs a model "
                         f"trained on the built-in shapes")


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.n < 1:
        raise ValueError("--n must be at least 1")
    pipe, preset, device = pipeline_from_args(args)
    check_trained_on_shapes(pipe, "prompt accuracy")
    classifier, _ = load_classifier(args.classifier, device)
    settings = settings_from_args(pipe, args, preset)
    max_objects = args.max_objects or pipe.data["max_objects"]
    out = Path(args.out) if args.out else (Path(args.ckpt).parent if args.ckpt else Path(".")) / "prompt_accuracy.json"

    g = torch.Generator(device).manual_seed(args.seed)
    report = {"pipeline": pipe.family, "ckpt": args.ckpt, "config": args.config, "settings": asdict(settings),
              "n_per_prompt": args.n}
    print(f"prompt accuracy of the {pipe.family} pipeline ({args.n} images per prompt; {settings})")
    for split, name in (("train", "heldin"), ("heldout", "heldout")):
        prompts = eval_prompts(split, max_objects)
        expected = [attrs for _, attrs in prompts for _ in range(args.n)]
        captions = [caption for caption, _ in prompts for _ in range(args.n)]
        images, judgements = [], []
        for i in range(0, len(captions), args.batch_size):
            batch = pipe(captions[i: i + args.batch_size], settings, generator=g, progress=False)
            detected = predict_attributes(classifier, batch)
            judgements += [judge(e, d) for e, d in zip(expected[i: i + args.batch_size], detected)]
            images.append(batch.cpu())
            print(f"  {name}: {min(i + args.batch_size, len(captions))}/{len(captions)} images", flush=True)
        report[name] = summarise(judgements)
        grid_path = out.with_name(out.stem + f"_{name}.png")
        out.parent.mkdir(parents=True, exist_ok=True)
        image_grid(torch.cat(images), nrow=args.n * 8 if args.n <= 2 else args.n * 2).save(grid_path)
        report[name]["grid"] = str(grid_path)
        figures = " | ".join(f"{k} {v:.3f}" for k, v in report[name].items() if k in ATTRIBUTES)
        print(f"{name:8s} {figures} | {len(judgements)} images ({len(prompts)} prompts) | grid {grid_path}")
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    run_cli(main)
