"""Convert models between our checkpoint format and the published layouts, both ways (Stable Diffusion: Rombach et
al. 2022, arXiv 2112.10752; the layouts: models/weight_names.py).

    python -m models.convert --pipeline ldm --weights stable-diffusion-v1-5 --to ours --out runs/sd15
        Stable Diffusion v1 (a diffusers folder or a CompVis .safetensors / .ckpt) -> runs/sd15/diffusion.pt and
        runs/sd15/vae.pt, which every command reads: python -m sample --ckpt runs/sd15/diffusion.pt ...
    python -m models.convert --ckpt runs/diffusion_latent/ckpt.pt --to diffusers --out runs/latent_diffusers
        a model trained here (any pipeline the sampling flags name) -> a diffusers folder in safetensors: unet/,
        vae/, scheduler/, text_encoder/ and tokenizer/ where CLIPTextModel and CLIPTokenizer can hold them, and
        null_context.safetensors (the null condition, for diffusers' negative_prompt_embeds)

Reading is models/stable_diffusion.py's, writing diffusers folders models/diffusers_export.py's. With --to ours,
--dtype float16 writes half-size files (loaded into float32 models unless sampled with --dtype float16); diffusers
folders are written in float32. An existing --out is never overwritten.
"""
import argparse
from pathlib import Path

from core.runtime import run_cli
from models.pipeline import add_pipeline_arguments, pipeline_from_args
from models.diffusers_export import export_diffusers
from models.stable_diffusion import write_checkpoints


def build_parser():
    p = argparse.ArgumentParser(description="Convert Stable Diffusion v1 weights to our checkpoints, or a model "
                                            "trained here to a diffusers folder.")
    add_pipeline_arguments(p)
    p.add_argument("--to", required=True, choices=["ours", "diffusers"],
                   help="ours: diffusion.pt + vae.pt (from --weights); diffusers: a diffusers folder (from any model)")
    p.add_argument("--out", required=True, help="output folder (must not exist yet)")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    out = Path(args.out)
    if out.exists():
        raise ValueError(f"{out} already exists; choose another --out (nothing is overwritten)")
    if args.to == "ours" and not args.weights:
        raise ValueError("--to ours converts published weights: pass --pipeline ldm --weights PATH (a model trained "
                         "here is already in our format)")
    if args.device is None:
        args.device = "cpu"  # conversion is reading and writing: no need for an accelerator
    pipe, _, _ = pipeline_from_args(args)  # published weights are read in --dtype, and written so by --to ours
    if args.to == "ours":
        for path in write_checkpoints(pipe, out, args.weights):
            print(f"wrote {path}")
        print(f"sample it with: python -m sample --ckpt {out / 'diffusion.pt'} --prompt \"...\"")
        return
    for note in export_diffusers(pipe, out):
        print(f"note: {note}")
    print(f"wrote the diffusers folder {out}/ (unet/, scheduler/, ... in safetensors)")


if __name__ == "__main__":
    run_cli(main)
