"""Seconds per 1024 px image of an Imagen cascade, 64 -> 256 -> 1024, on this machine (issue 19's figure).

    .venv/bin/python -m tests.bench_imagen                  # the tiny preset's U-Nets at the paper's sides
    .venv/bin/python -m tests.bench_imagen --suffix _gpu    # the paper-shaped U-Nets (imagen_*_gpu.yaml; a GPU's job)
    .venv/bin/python -m tests.bench_imagen --sides 16 32 64 # the tiny cascade as the demo runs it

The tiny preset trains a 16 -> 32 -> 64 cascade (configs/shapes/imagen_*.yaml). Its super-resolution U-Nets are
fully convolutional and the base's attention runs on any grid, so the same U-Nets, built at the paper's sides
(image_size, attention_resolutions and self_attention_max_resolution scaled with the side, so that every level keeps
its blocks), give the cost of a 1024 px picture with the tiny preset's widths: the least a 1024 px cascade costs here.
Each stage's U-Net evaluation is timed on random weights (the time does not depend on them) with its guidance's
batch (--images pictures at once, 2 rows each when the guidance scale is not 1: conditional and unconditional;
one picture by default, as a user asks for one at 1024 px, while the demo samples 32 at a time), best of --repeats, and
multiplied by the stage's sampling steps from the pipeline config (configs/shapes/pipeline_imagen.yaml; the sampler
loop adds element-wise updates only). Prints each stage's seconds per image and their sum. Target of issue 19: a
1024 px image in at most 60 s here.
"""
import argparse
import time
from dataclasses import replace

import torch
import yaml

from core.config import load_config
from models.conditioning import Conditioning
from models.unet import UNet
from train.diffusion import DiffusionConfig

STAGES = ("imagen_base", "imagen_sr1", "imagen_sr2")


def unet_at(cfg, side):
    """The U-Net config of a stage built for output side `side`: the sizes that name feature maps scale with it."""
    k = side / cfg.image_size
    if k != int(k) and 1 / k != int(1 / k):
        raise ValueError(f"side {side} is neither a multiple nor a divisor of the config's image_size {cfg.image_size}; "
                         f"give sides such as {cfg.image_size * 4}")
    scale = lambda r: max(1, int(r * k))
    return replace(cfg, image_size=side, attention_resolutions=tuple(scale(r) for r in cfg.attention_resolutions),
                   self_attention_max_resolution=(scale(cfg.self_attention_max_resolution)
                                                  if cfg.self_attention_max_resolution > 1
                                                  else cfg.self_attention_max_resolution))


def seconds_per_evaluation(unet, side, rows, low_side, repeats, tokens=16, dtype=torch.float32):
    """Best time of one forward pass for `rows` rows at `side` px (no gradient), the U-Net and its inputs in dtype
    (as `python -m sample --dtype` casts the networks)."""
    cfg = unet.cfg
    unet = unet.to(dtype)
    x = torch.randn(rows, cfg.in_channels, side, side, dtype=dtype)
    cond = Conditioning(tokens=torch.randn(rows, tokens, cfg.context_dim, dtype=dtype),
                        mask=torch.ones(rows, tokens, dtype=torch.bool),
                        pooled=torch.randn(rows, cfg.pooled_dim, dtype=dtype) if cfg.pooled_dim else None,
                        low_res=(torch.randn(rows, 3, low_side, low_side, dtype=dtype) if cfg.low_res_channels
                                 else None),
                        aug_level=torch.zeros(rows, dtype=torch.long) if cfg.low_res_channels else None)
    t = torch.full((rows,), 500)
    best = float("inf")
    with torch.no_grad():
        for _ in range(repeats + 1):  # the first is a warm-up (oneDNN picks its kernels)
            t0 = time.perf_counter()
            unet(x, t, cond)
            best = min(best, time.perf_counter() - t0)
    return best


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--suffix", default="", help="'' = the tiny preset's configs; _gpu = the paper-shaped ones")
    p.add_argument("--sides", type=int, nargs=3, default=(64, 256, 1024), help="output side of base, sr1, sr2")
    p.add_argument("--pipeline", default=None, help="steps and guidance per stage (default: pipeline_imagen<suffix>)")
    p.add_argument("--images", type=int, default=1, help="pictures per batch")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                   help="the networks' dtype, as `python -m sample --dtype` (bfloat16: AVX-512 BF16 / AMX CPUs, GPUs)")
    args = p.parse_args(argv)
    if args.images < 1 or args.repeats < 1:
        p.error(f"--images and --repeats must be at least 1, got {args.images} and {args.repeats}")
    if args.threads:
        torch.set_num_threads(args.threads)
    pipe = yaml.safe_load(open(args.pipeline or f"configs/shapes/pipeline_imagen{args.suffix}.yaml"))
    torch.manual_seed(0)
    total, previous = 0.0, None
    print(f"Imagen cascade {' -> '.join(map(str, args.sides))} px, the U-Nets of configs/shapes/imagen_*{args.suffix}"
          f".yaml, {args.dtype}, {torch.get_num_threads()} threads; steps {pipe['steps']}, guidance {pipe['guidance']}")
    for i, (name, side) in enumerate(zip(STAGES, args.sides)):
        cfg = load_config(DiffusionConfig, f"configs/shapes/{name}{args.suffix}.yaml")
        unet = UNet(unet_at(cfg.unet, side)).eval()
        rows = args.images * (1 if float(pipe["guidance"][i]) == 1.0 else 2)
        steps = int(pipe["steps"][i])
        each = seconds_per_evaluation(unet, side, rows, previous or side, args.repeats, dtype=getattr(torch, args.dtype))
        params = sum(q.numel() for q in unet.parameters())
        per_image = each * steps / args.images
        total += per_image
        print(f"  {name:12s} {side:5d} px  {params / 1e6:8.2f}M parameters  {each:8.3f} s per evaluation of {rows} "
              f"rows x {steps:3d} steps = {per_image:8.2f} s per image")
        previous = side
    print(f"seconds per {args.sides[-1]} px image: {total:.2f} ({args.images} per batch)")
    return total


if __name__ == "__main__":
    main()
