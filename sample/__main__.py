"""Sample pictures from prompts with trained text-to-image checkpoints.

    python -m sample --ckpt runs/diffusion_pixel/ckpt.pt --prompt "a red circle" --n 8 \
        --sampler ddim --steps 50 --guidance 3 --seed 0 --out grid.png
    python -m sample --pipeline ldm --config configs/shapes/pipeline_ldm.yaml --preset quality \
        --prompt "a red circle" --out grid.png

The latent (Stable Diffusion) pipeline joins separately trained checkpoints: the diffusion checkpoint holds the
tokenizer, the text encoder (joint, or a frozen CLIP / LM copied in) and the U-Net; the VAE checkpoint holds
the decoder. The diffusion checkpoint remembers which VAE it was trained on (config, scale factor, a hash of
the weights) and refuses another. A pipeline config (PipelineConfig) names both files and a preset:
    fast      DDIM 20 steps, guidance 3      a quick look
    quality   DDIM 100 steps, guidance 5     more steps and stronger guidance: closer to the prompt
    creative  DDIM 50 steps, guidance 1.5    weaker guidance: more varied pictures, looser to the prompt
(the usual advice for such models: guidance trades diversity for prompt agreement, Ho & Salimans 2022 Fig. 3;
DDIM quality saturates with steps, Song et al. 2020 Table 1). Any flag (--steps, --guidance, ...) overrides
the preset; without a preset the sampler settings stored in the diffusion checkpoint are used.

Writes the grid to --out and every image as its own PNG into a folder beside it (grid/0000.png, ...), with
a metadata.jsonl (file_name, text) so the folder is a Hugging Face `imagefolder` that the metrics read.
The same seed gives the same pixels. Sampler settings not given as flags come from the checkpoint's config.
Refuses to overwrite existing outputs unless --overwrite is given.
"""
import argparse
import json
import math
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from core.checkpoint import load_checkpoint
from core.config import load_config
from core.images import image_grid, to_uint8
from core.runtime import get_device, run_cli
from models.samplers import SamplerConfig
from models.text2image import load_text2image

PRESETS = {
    "fast": {"sampler": "ddim", "num_inference_steps": 20, "guidance_scale": 3.0},
    "quality": {"sampler": "ddim", "num_inference_steps": 100, "guidance_scale": 5.0},
    "creative": {"sampler": "ddim", "num_inference_steps": 50, "guidance_scale": 1.5},
}


@dataclass
class PipelineConfig:
    diffusion: str = "runs/diffusion_latent/ckpt.pt"  # tokenizer + text encoder + U-Net
    vae: str = ""              # the decoder; '' = the VAE path stored in the diffusion checkpoint
    preset: str = "fast"       # fast | quality | creative (see the module docstring)
    device: str = "auto"       # auto | cpu | cuda | cuda:N | mps


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
    p.add_argument("--ckpt", help="diffusion checkpoint (runs/<name>/ckpt.pt); with --pipeline, overrides the config's")
    p.add_argument("--pipeline", choices=["pixel", "ldm"], help="ldm: latent diffusion + VAE decoder, read from "
                   "--config (default configs/shapes/pipeline_ldm.yaml); pixel: a pixel-space checkpoint")
    p.add_argument("--config", help="pipeline config (YAML with diffusion, vae, preset, device)")
    p.add_argument("--preset", choices=sorted(PRESETS), help="sampler preset; flags override it")
    p.add_argument("--vae", help="latent diffusion: the VAE checkpoint (default: the config's, else the one "
                   "stored at training)")
    p.add_argument("--prompt", action="append", help="a prompt; repeat the flag for several")
    p.add_argument("--prompts-file", help="a text file with one prompt a line")
    p.add_argument("--n", type=int, default=4, help="images per prompt")
    p.add_argument("--sampler", choices=["ddpm", "ddim"], help="default: the checkpoint's sampler.sampler")
    p.add_argument("--steps", type=int, help="number of sampling steps")
    p.add_argument("--eta", type=float, help="DDIM eta (0 = deterministic)")
    p.add_argument("--guidance", type=float, help="classifier-free guidance scale (1 = conditional only)")
    p.add_argument("--spacing", choices=["leading", "trailing", "linspace"], help="timestep spacing")
    p.add_argument("--dynamic-threshold", action="store_true",
                   help="Imagen's dynamic thresholding of x0_hat (Sec. 2.3): s = the --threshold-ratio percentile of "
                        "|x0_hat|, at least 1 and at most --threshold-max; x0_hat <- clip(x0_hat, -s, s) / s")
    p.add_argument("--threshold-ratio", type=float, help="dynamic thresholding: the percentile p (default 0.995, "
                   "Imagen's 99.5%%)")
    p.add_argument("--threshold-max", type=float, help="dynamic thresholding: the cap on s (default: none, as in "
                   "Imagen; DeepFloyd IF uses 1.5; 1 would be static clipping)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=32, help="images generated at once")
    p.add_argument("--truncate", action="store_true", help="cut prompts over the token limit instead of failing")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA weights")
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N | mps (default: the config's, else auto)")
    p.add_argument("--out", default="samples.png", help="grid image path; single images go to <out stem>/")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    return p


def pipeline_config(args) -> PipelineConfig:
    """--pipeline ldm reads a pipeline config (default configs/shapes/pipeline_ldm.yaml); --ckpt alone needs none."""
    if args.config and not args.pipeline:
        raise ValueError("--config is a pipeline config; pass --pipeline ldm (or pixel) with it")
    if not args.pipeline:
        if not args.ckpt:
            raise ValueError("no checkpoint given; pass --ckpt runs/<name>/ckpt.pt or --pipeline ldm --config FILE")
        return PipelineConfig(diffusion=args.ckpt, preset="")
    if args.pipeline == "pixel" and not (args.config or args.ckpt):
        raise ValueError("--pipeline pixel needs --ckpt runs/<name>/ckpt.pt or a pipeline --config")
    config = args.config or ("configs/shapes/pipeline_ldm.yaml" if args.pipeline == "ldm" else None)
    cfg = load_config(PipelineConfig, config)
    if args.ckpt:
        cfg = replace(cfg, diffusion=args.ckpt)
    if cfg.preset and cfg.preset not in PRESETS:
        raise ValueError(f"unknown preset '{cfg.preset}' in {config}; use one of {', '.join(sorted(PRESETS))}")
    return cfg


def sampler_settings(args, stored: SamplerConfig, preset, space) -> SamplerConfig:
    """The checkpoint's sampler settings, then the preset's, then the flags'."""
    cfg = replace(stored, **PRESETS[preset]) if preset else stored
    overrides = {"sampler": args.sampler, "num_inference_steps": args.steps, "eta": args.eta,
                 "guidance_scale": args.guidance, "timestep_spacing": args.spacing}
    cfg = replace(cfg, **{k: v for k, v in overrides.items() if v is not None})
    if not args.dynamic_threshold:
        if args.threshold_ratio is not None or args.threshold_max is not None:
            raise ValueError("--threshold-ratio and --threshold-max set dynamic thresholding; add --dynamic-threshold")
        return cfg
    if space == "latent":
        raise ValueError("--dynamic-threshold is for pixel space (latents are not bounded to [-1, 1]); drop it")
    ratio = 0.995 if args.threshold_ratio is None else args.threshold_ratio
    cap = math.inf if args.threshold_max is None else args.threshold_max
    if not (0 < ratio <= 1 and cap >= 1):
        raise ValueError(f"--threshold-ratio must be in (0, 1] and --threshold-max at least 1, got {ratio} and {cap}")
    return replace(cfg, thresholding=True, clip_sample=False, dynamic_thresholding_ratio=ratio, sample_max_value=cap)


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
    pipe_cfg = pipeline_config(args)
    device = get_device(args.device or pipe_cfg.device)
    ckpt = load_checkpoint(pipe_cfg.diffusion, "diffusion")
    space = ckpt["config"].get("space", "pixel")
    if args.pipeline and space != {"ldm": "latent", "pixel": "pixel"}[args.pipeline]:
        raise ValueError(f"--pipeline {args.pipeline} needs a {'latent' if args.pipeline == 'ldm' else 'pixel'}-"
                         f"space diffusion checkpoint but {pipe_cfg.diffusion} is {space}-space")
    pipe = load_text2image(ckpt, device, use_ema=not args.no_ema, vae_path=args.vae or pipe_cfg.vae or None)
    preset = args.preset or (pipe_cfg.preset if args.pipeline else None)
    sampler_cfg = sampler_settings(args, pipe.sampler_cfg, preset, space)
    pipe.check_prompts(prompts, truncate=args.truncate)  # fail on every bad prompt before any compute

    all_prompts = [p for p in prompts for _ in range(args.n)]
    g = torch.Generator(device).manual_seed(args.seed)
    images = []
    for i in range(0, len(all_prompts), args.batch_size):
        chunk = all_prompts[i: i + args.batch_size]
        print(f"sampling {i + len(chunk)}/{len(all_prompts)}: {sampler_cfg.sampler}, "
              f"{sampler_cfg.num_inference_steps} steps, guidance {sampler_cfg.guidance_scale}", flush=True)
        images.append(pipe(chunk, sampler_cfg, generator=g, truncate=args.truncate).cpu())
    images = torch.cat(images)  # (len(prompts) * n, C, H, W)

    out.parent.mkdir(parents=True, exist_ok=True)
    image_grid(images, nrow=args.n).save(out)
    single_dir.mkdir(parents=True, exist_ok=True)
    for old in single_dir.glob("[0-9][0-9][0-9][0-9].png"):  # --overwrite: an earlier, larger run's images
        old.unlink()                                          # must not stay behind without a caption
    from PIL import Image
    with open(single_dir / "metadata.jsonl", "w") as meta:
        for j, (arr, prompt) in enumerate(zip(to_uint8(images), all_prompts)):
            Image.fromarray(arr).save(single_dir / f"{j:04d}.png")
            meta.write(json.dumps({"file_name": f"{j:04d}.png", "text": prompt}) + "\n")
    print(f"wrote {out} (one row per prompt) and {len(images)} images in {single_dir}/")


if __name__ == "__main__":
    run_cli(main)
