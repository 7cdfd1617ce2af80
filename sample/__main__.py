"""Sample pictures from prompts with a trained text-to-image checkpoint.

    python -m sample --ckpt runs/diffusion_pixel/ckpt.pt --prompt "a red circle" --n 8 \
        --sampler ddim --steps 50 --guidance 3 --seed 0 --out grid.png

Writes the grid to --out and every image as its own PNG into a folder beside it (grid/0000.png, ...), with
a metadata.jsonl (file_name, text) so the folder is a Hugging Face `imagefolder` that the metrics read.
The same seed gives the same pixels. Sampler settings not given as flags come from the checkpoint's config.
Refuses to overwrite existing outputs unless --overwrite is given.
"""
import argparse
import json
from dataclasses import replace
from pathlib import Path

import torch

from models.text2image import generate, load_text2image
from train.common import get_device, image_grid, load_checkpoint, run_cli, to_uint8


def read_prompts(args):
    prompts = list(args.prompt or [])
    if args.prompts_file:
        path = Path(args.prompts_file)
        if not path.is_file():
            raise FileNotFoundError(f"prompts file not found: {path}; give a text file with one prompt a line")
        prompts += [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise ValueError("no prompt given; pass --prompt \"a red circle\" or --prompts-file FILE")
    return prompts


def build_parser():
    p = argparse.ArgumentParser(description="Sample images from prompts with a trained checkpoint.")
    p.add_argument("--ckpt", required=True, help="diffusion checkpoint (runs/<name>/ckpt.pt)")
    p.add_argument("--prompt", action="append", help="a prompt; repeat the flag for several")
    p.add_argument("--prompts-file", help="a text file with one prompt a line")
    p.add_argument("--n", type=int, default=4, help="images per prompt")
    p.add_argument("--sampler", choices=["ddpm", "ddim"], help="default: the checkpoint's sampler.sampler")
    p.add_argument("--steps", type=int, help="number of sampling steps")
    p.add_argument("--eta", type=float, help="DDIM eta (0 = deterministic)")
    p.add_argument("--guidance", type=float, help="classifier-free guidance scale (1 = conditional only)")
    p.add_argument("--spacing", choices=["leading", "trailing", "linspace"], help="timestep spacing")
    p.add_argument("--dynamic-threshold", action="store_true", help="Imagen's dynamic thresholding of x0")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=32, help="images generated at once")
    p.add_argument("--truncate", action="store_true", help="cut prompts over the token limit instead of failing")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA weights")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default="samples.png", help="grid image path; single images go to <out stem>/")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    prompts = read_prompts(args)
    if args.n < 1 or args.batch_size < 1:
        raise ValueError("--n and --batch-size must be at least 1")
    out = Path(args.out)
    if out.suffix.lower() != ".png":
        raise ValueError(f"--out must be a .png path, got {out}")
    single_dir = out.with_suffix("")
    if not args.overwrite and (out.exists() or single_dir.exists()):
        raise ValueError(f"{out} or {single_dir}/ already exists; pass --overwrite or choose another --out")
    device = get_device(args.device)
    ckpt = load_checkpoint(args.ckpt, "diffusion")
    model, tokenizer, schedule, _, sampler_cfg = load_text2image(ckpt, device, use_ema=not args.no_ema)
    overrides = {"sampler": args.sampler, "num_inference_steps": args.steps, "eta": args.eta,
                 "guidance_scale": args.guidance, "timestep_spacing": args.spacing}
    sampler_cfg = replace(sampler_cfg, **{k: v for k, v in overrides.items() if v is not None})
    if args.dynamic_threshold:
        sampler_cfg = replace(sampler_cfg, thresholding=True, clip_sample=False)
    # fail on every bad prompt before any compute
    tokenizer(prompts, max_length=model.text_encoder.cfg.max_length, truncate=args.truncate)

    all_prompts = [p for p in prompts for _ in range(args.n)]
    g = torch.Generator(device).manual_seed(args.seed)
    images = []
    for i in range(0, len(all_prompts), args.batch_size):
        chunk = all_prompts[i: i + args.batch_size]
        print(f"sampling {i + len(chunk)}/{len(all_prompts)}: {sampler_cfg.sampler}, "
              f"{sampler_cfg.num_inference_steps} steps, guidance {sampler_cfg.guidance_scale}", flush=True)
        images.append(generate(model, tokenizer, schedule, chunk, sampler_cfg, generator=g,
                               truncate=args.truncate).cpu())
    images = torch.cat(images)  # (len(prompts) * n, C, H, W)

    out.parent.mkdir(parents=True, exist_ok=True)
    image_grid(images, nrow=args.n).save(out)
    single_dir.mkdir(parents=True, exist_ok=True)
    from PIL import Image
    with open(single_dir / "metadata.jsonl", "w") as meta:
        for j, (arr, prompt) in enumerate(zip(to_uint8(images), all_prompts)):
            Image.fromarray(arr).save(single_dir / f"{j:04d}.png")
            meta.write(json.dumps({"file_name": f"{j:04d}.png", "text": prompt}) + "\n")
    print(f"wrote {out} (one row per prompt) and {len(images)} images in {single_dir}/")


if __name__ == "__main__":
    run_cli(main)
