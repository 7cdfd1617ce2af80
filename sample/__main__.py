"""Sample pictures from prompts with trained text-to-image checkpoints, whatever the family.

    python -m sample --ckpt runs/diffusion_pixel/ckpt.pt --prompt "a red circle" --n 8 \
        --sampler ddim --steps 50 --guidance 3 --seed 0 --out grid.png
    python -m sample --pipeline ldm --config configs/shapes/pipeline_ldm.yaml --preset quality \
        --prompt "a red circle" --out grid.png
    python -m sample --pipeline ldm --weights stable-diffusion-v1-5 --prompt "an astronaut riding a horse" \
        --n 1 --steps 25 --out sd.png          # Stable Diffusion v1's published weights (models/stable_diffusion.py)

A pipeline (models/pipeline.py) joins separately trained checkpoints. --ckpt names one checkpoint, whose kind
decides the family; --pipeline NAME --config FILE names a pipeline config listing a family's checkpoints and a
preset. The latent (Stable Diffusion) pipeline: the diffusion checkpoint holds the tokenizer, the text encoder
(joint, or a frozen CLIP / LM copied in) and the U-Net; the VAE checkpoint holds the decoder. The diffusion
checkpoint remembers which VAE it was trained on (config, scale factor, a hash of the weights) and refuses
another. Presets (models/text2image.py PRESETS):
    fast      DDIM 20 steps, guidance 3      a quick look
    quality   DDIM 100 steps, guidance 5     more steps and stronger guidance: closer to the prompt
    creative  DDIM 50 steps, guidance 1.5    weaker guidance: more varied pictures, looser to the prompt
Any flag (--steps, --guidance, ...) overrides the preset; without a preset the sampler settings stored in the
checkpoint are used.

unCLIP (--pipeline unclip, models/unclip.py) also decodes CLIP image embeddings that no prompt gave:
    --variations A.png [B.png ...]   each image's CLIP embedding decoded with --n noises (one row per image, the
                                     image itself first)                            (Ramesh et al. 2022, Sec. 3.1)
    --interpolate X Y                two prompts, or two image files: --n pictures along the slerp of their
                                     embeddings (the prior's z_i of a prompt), one noise for all    (Fig. 4)

The creative preset's prompt model (models/prompt_lm.py, train/prompt_lm.py): with --preset creative,
--prompt-lm runs/prompt_lm/ckpt.pt [--prompt-temperature T] extends every prompt by sampling a continuation (the
prompt stays its prefix; cut to the pipeline's token limit); the prompts used are printed and are the captions of
metadata.jsonl.

Writes the grid to --out and every image as its own PNG into a folder beside it (grid/0000.png, ...), with
a metadata.jsonl (file_name, text) so the folder is a Hugging Face `imagefolder` that the metrics read.
A cascade (--pipeline imagen) also writes <out stem>_stages.png: one row per image, its stages side by side (each
enlarged to the final size by pixel repetition, so the pixels each stage made stay visible).
The same seed gives the same pixels. Refuses to overwrite existing outputs unless --overwrite is given.
"""
import argparse
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from core.images import image_grid, to_uint8
from core.runtime import run_cli
from models.pipeline import add_pipeline_arguments, add_sampling_flags, pipeline_from_args, settings_from_args
from models.prompt_lm import add_prompt_lm_flags, check_prompt_lm_flags, load_prompt_lm, rewrite_for_pipeline


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
    add_pipeline_arguments(p)
    add_sampling_flags(p)
    p.add_argument("--prompt", action="append", help="a prompt; repeat the flag for several")
    p.add_argument("--prompts-file", help="a text file with one prompt a line")
    p.add_argument("--n", type=int, default=4, help="images per prompt")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=32, help="images generated at once")
    p.add_argument("--truncate", action="store_true", help="cut prompts over the token limit instead of failing")
    p.add_argument("--out", default="samples.png", help="grid image path; single images go to <out stem>/")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.add_argument("--variations", nargs="+", metavar="IMAGE", help="unclip: images whose variations to draw")
    p.add_argument("--interpolate", nargs="+", metavar="X", help="unclip: two prompts or two images to interpolate")
    add_prompt_lm_flags(p)
    return p


def read_images(paths, resolution):
    """Image files -> uint8 (B, 3, R, R); a file that is not an image, or not R x R, is a one-line error."""
    from PIL import UnidentifiedImageError
    images = []
    for path in paths:
        if not Path(path).is_file():
            raise FileNotFoundError(f"image not found: {path}")
        try:
            image = Image.open(path).convert("RGB")
        except (UnidentifiedImageError, OSError):
            raise ValueError(f"{path} is not an image file; give a PNG or JPEG of {resolution}x{resolution}") from None
        if image.size != (resolution, resolution):
            raise ValueError(f"{path} is {image.size[0]}x{image.size[1]} but the CLIP reads {resolution}x{resolution} "
                             f"images; resize it first")
        images.append(torch.from_numpy(np.array(image)).permute(2, 0, 1))
    return torch.stack(images)  # (B, 3, R, R)


def embeddings_grid(pipe, args, settings, g):
    """--variations / --interpolate (unclip only) -> (images (N, 3, H, W), nrow, captions)."""
    if pipe.family != "unclip":
        raise ValueError(f"--variations and --interpolate decode CLIP image embeddings: use --pipeline unclip, not "
                         f"{pipe.family}")
    if args.variations and args.interpolate:
        raise ValueError("pass --variations or --interpolate, not both")
    R = pipe.clip.cfg.vision.image_size
    if args.variations:
        sources = read_images(args.variations, R)
        made = pipe.variations(sources, args.n, settings, g).view(len(sources), args.n, 3, pipe.resolution,
                                                                  pipe.resolution)
        shown = torch.nn.functional.interpolate(sources.float() / 127.5 - 1, size=pipe.resolution)[:, None]
        images = torch.cat([shown, made], dim=1).flatten(0, 1)  # (B * (n + 1), 3, H, W): the source, its variations
        return images, args.n + 1, [f"variation of {Path(p).name}" for p in args.variations for _ in range(args.n + 1)]
    if len(args.interpolate) != 2:
        raise ValueError(f"--interpolate takes two endpoints (two prompts or two image files), got "
                         f"{len(args.interpolate)}")
    if args.n < 2:
        raise ValueError("--interpolate needs --n of at least 2 (the two ends)")
    are_files = [Path(x).is_file() for x in args.interpolate]
    if all(are_files):
        z = embed_images_of(pipe, read_images(args.interpolate, R))
    elif any(are_files):
        raise ValueError("--interpolate takes two prompts or two image files, not one of each")
    else:
        pipe.check_prompts(args.interpolate, truncate=args.truncate)
        z = pipe.image_embeddings(args.interpolate, settings, g, truncate=args.truncate)  # (2, E)
    images = pipe.interpolate(z[:1], z[1:], args.n, settings, g)
    return images, args.n, [f"{args.interpolate[0]} -> {args.interpolate[1]} ({i}/{args.n - 1})" for i in range(args.n)]


def embed_images_of(pipe, images):
    from models.clip import embed_images
    return embed_images(pipe.clip, images)


def main(argv=None):
    args = build_parser().parse_args(argv)
    embeddings = bool(args.variations or args.interpolate)
    prompts = [] if embeddings else read_prompts(args)
    if args.n < 1 or args.batch_size < 1:
        raise ValueError("--n and --batch-size must be at least 1")
    out = Path(args.out)
    if out.suffix.lower() != ".png":
        raise ValueError(f"--out must be a .png path, got {out}")
    single_dir = out.with_suffix("")
    if not args.overwrite and (out.exists() or single_dir.exists()):
        raise ValueError(f"{out} or {single_dir}/ already exists; pass --overwrite or choose another --out")
    check_prompt_lm_flags(args)
    prompt_lm = load_prompt_lm(args.prompt_lm) if args.prompt_lm else None
    pipe, preset, device = pipeline_from_args(args)
    settings = settings_from_args(pipe, args, preset)
    pipe.check_prompts(prompts, truncate=args.truncate)  # fail on every bad prompt before any compute
    if prompt_lm:  # the creative preset's prompt model: each prompt extended by sampling (models/prompt_lm.py)
        prompts = rewrite_for_pipeline(prompt_lm, pipe, args.preset or preset, prompts, args)

    g = torch.Generator(device).manual_seed(args.seed)
    print(f"{pipe.family} pipeline, {pipe.resolution} px: {settings}", flush=True)
    nrow, stages = args.n, []
    if embeddings:
        images, nrow, all_prompts = embeddings_grid(pipe, args, settings, g)
        images = images.cpu()
    else:
        all_prompts = [p for p in prompts for _ in range(args.n)]
        images = []
        for i in range(0, len(all_prompts), args.batch_size):
            chunk = all_prompts[i: i + args.batch_size]
            print(f"sampling {i + len(chunk)}/{len(all_prompts)}", flush=True)
            images.append(pipe(chunk, settings, generator=g, truncate=args.truncate).cpu())
            stages.append([x.cpu() for x in getattr(pipe, "stage_images", [])[:-1]])  # a cascade's earlier stages
        images = torch.cat(images)  # (len(prompts) * n, 3, H, W)

    out.parent.mkdir(parents=True, exist_ok=True)
    image_grid(images, nrow=nrow).save(out)
    if stages and stages[0]:  # a cascade: (N, 3, h_k, h_k) per earlier stage k
        R = images.shape[-1]
        columns = [F.interpolate(torch.cat(s), size=(R, R), mode="nearest") for s in zip(*stages)] + [images]
        rows = torch.stack(columns, 1).flatten(0, 1)  # (N * stages, 3, R, R): image 0's stages, image 1's, ...
        image_grid(rows, nrow=len(columns)).save(out.with_name(f"{out.stem}_stages.png"))
    single_dir.mkdir(parents=True, exist_ok=True)
    for old in single_dir.glob("[0-9][0-9][0-9][0-9].png"):  # --overwrite: an earlier, larger run's images
        old.unlink()                                          # must not stay behind without a caption
    with open(single_dir / "metadata.jsonl", "w") as meta:
        for j, (arr, prompt) in enumerate(zip(to_uint8(images), all_prompts)):
            Image.fromarray(arr).save(single_dir / f"{j:04d}.png")
            meta.write(json.dumps({"file_name": f"{j:04d}.png", "text": prompt}) + "\n")
    print(f"wrote {out} (one row per prompt) and {len(images)} images in {single_dir}/")


if __name__ == "__main__":
    run_cli(main)
