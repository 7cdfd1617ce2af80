"""Does a picture drawn from a rewritten prompt show what the prompt LM added, and still what the user asked for?

The creative preset's prompt model (models/prompt_lm.py) extends each held-in evaluation prompt of
data.claims.eval_prompts ("a red circle", one per colour-shape pair) at each temperature; the pipeline draws
--n pictures of each with the creative preset; the shapes classifier (models/classifier.py) reads them. Per
temperature (and "off": the prompts as given, the same preset and seed):
    well-formed    rewritten prompts that data.claims.parse_caption reads (a caption the shapes templates make)
    extended       rewritten prompts longer than the given one; "+ background": of these, those that add one
    user's claims  pictures that show every claim of the prompt as given (colour, shape, size)   (judge)
    used claims    pictures that show every claim of the prompt used, background included (caption_holds;
                   a prompt that is not well-formed counts as not shown)
    background     of the pictures whose used prompt names a background, those that show it

    python -m tests.bench_prompt_lm --ckpt runs/diffusion_latent/ckpt.pt --prompt-lm runs/prompt_lm/ckpt.pt \
        --classifier runs/shapes_classifier/ckpt.pt --n 4
"""
import argparse
import time

import torch

from core.runtime import run_cli
from data.claims import caption_holds, eval_prompts, judge, parse_caption
from models.classifier import load_classifier, predict_attributes
from models.pipeline import add_pipeline_arguments, pipeline_from_args
from models.prompt_lm import load_prompt_lm, pipeline_fits, rewrite


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_pipeline_arguments(p)
    p.add_argument("--prompt-lm", default="runs/prompt_lm/ckpt.pt")
    p.add_argument("--classifier", default="runs/shapes_classifier/ckpt.pt")
    p.add_argument("--temperatures", type=float, nargs="+", default=[0.7, 1.0, 1.5])
    p.add_argument("--n", type=int, default=4, help="pictures per prompt")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    lm, tokenizer = load_prompt_lm(args.prompt_lm)
    pipe, _, device = pipeline_from_args(args)
    classifier, _ = load_classifier(args.classifier, device)
    settings = pipe.settings_with(preset="creative")
    given = [caption for caption, _ in eval_prompts("train", 1)]
    print(f"{len(given)} held-in prompts x {args.n} pictures, {pipe.family} pipeline, creative preset: {settings}")
    for temperature in [None, *args.temperatures]:
        t0 = time.time()
        used = given if temperature is None else rewrite(lm, tokenizer, given, temperature,
                                                         generator=torch.Generator().manual_seed(args.seed),
                                                         fits=pipeline_fits(pipe))
        parsed = []
        for u in used:
            try:
                parsed.append(parse_caption(u))
            except ValueError:
                parsed.append(None)
        g = torch.Generator(device).manual_seed(args.seed)
        rows = [i for i in range(len(given)) for _ in range(args.n)]
        detected = []
        for k in range(0, len(rows), 64):
            images = pipe([used[i] for i in rows[k: k + 64]], settings, generator=g, progress=False)
            detected += predict_attributes(classifier, images)
        user = [judge(parse_caption(given[i]), d)["overall"] for i, d in zip(rows, detected)]
        holds = [parsed[i] is not None and caption_holds(used[i], d) for i, d in zip(rows, detected)]
        named = [(parsed[i]["background"], d["background"]) for i, d in zip(rows, detected)
                 if parsed[i] is not None and parsed[i]["background"]]
        extended = [u != v for u, v in zip(used, given)]
        with_bg = [bool(p and p["background"]) for p, e in zip(parsed, extended) if e]
        name = "off" if temperature is None else f"T {temperature:g}"
        print(f"{name:6s} well-formed {sum(p is not None for p in parsed)}/{len(used)} | extended {sum(extended)} "
              f"(+ background {sum(with_bg)}) | user's claims {sum(user) / len(user):.3f} | used claims "
              f"{sum(holds) / len(holds):.3f} | background {sum(a == b for a, b in named)}/{len(named)} | "
              f"{time.time() - t0:.0f}s", flush=True)
        if temperature is not None:
            print("        e.g. " + "; ".join(f"{u!r}" for u in used[:3]), flush=True)


if __name__ == "__main__":
    run_cli(main)
