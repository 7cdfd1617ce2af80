"""How good is one super-resolution stage of a cascade: against bicubic, against its input, and on the base's output.

Saharia et al. 2022 (Imagen), arXiv 2205.11487, Sec. 2.4 and Ho et al. 2021 (Cascaded Diffusion Models), arXiv
2106.15282, Sec. 4: a super-resolution model trained on clean downsampled images meets, in the cascade, the samples
of the stage before it, whose errors it copies and enlarges; noise-conditioning augmentation is meant to reduce that.

    python -m metrics.super_resolution --ckpt runs/imagen_sr1/ckpt.pt --n 200
    python -m metrics.super_resolution --ckpt runs/imagen_sr1/ckpt.pt --base runs/imagen_base/ckpt.pt \
        --features runs/shapes_classifier/ckpt.pt          # + the compounding-error FID

Prints, on n fresh renders of the held-in split (not training items: seed 7) at the stage's resolution R, with the
low-resolution input z = the render averaged down to the stage's input side r:
    PSNR (dB) and SSIM of SR(z) and of bicubic(z) against the render (SSIM: Wang et al. 2004, Gaussian window
        11, sigma 1.5, on [0, 1] pixels, averaged over channels; PSNR on [0, 1] pixels)
    consistency: RMSE of downsample(SR(z)) - z on [0, 1] pixels (how much of its input the stage keeps; bicubic
        followed by area averaging is not exactly consistent either, and is printed beside it)
    colour error: the mean absolute difference of each image's mean colour from the render's, on 0-255
    with --base: FID (on --features) between SR(z of the renders) and SR(the base's samples for the same captions):
        the compounding error; 0 would mean the stage cannot tell the base's output from real images
"""
import argparse

import torch
import torch.nn.functional as F

from core.images import to_uint8
from core.runtime import get_device, run_cli
from data.crops import CropSource
from data.dataset import DataConfig
from models.imagen import downsample, load_stage, super_resolve
from models.samplers import SAMPLERS, TIMESTEP_SPACINGS


def gaussian_window(size=11, sigma=1.5):
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-x**2 / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).float()  # (size, size)


def ssim(a, b, size=11, sigma=1.5):
    """Wang et al. 2004, "Image Quality Assessment: From Error Visibility to Structural Similarity", Eq. 13, with their
    constants C1 = (0.01 L)^2, C2 = (0.03 L)^2, L = 1: a, b (B, C, H, W) in [0, 1] -> (B,) mean SSIM ('valid' windows;
    a side under `size` uses a window of the side)."""
    B, C, H, W = a.shape
    a, b = a.double(), b.double()  # E[x^2] - E[x]^2 in float32 leaves ~1e-5 of noise, next to C2 = 9e-4
    size = min(size, H, W)
    w = gaussian_window(size, sigma).to(a)[None, None].expand(C, 1, size, size)  # (C, 1, k, k) depthwise
    mu_a, mu_b = F.conv2d(a, w, groups=C), F.conv2d(b, w, groups=C)
    var_a = F.conv2d(a * a, w, groups=C) - mu_a**2
    var_b = F.conv2d(b * b, w, groups=C) - mu_b**2
    cov = F.conv2d(a * b, w, groups=C) - mu_a * mu_b
    c1, c2 = 0.01**2, 0.03**2
    s = (2 * mu_a * mu_b + c1) * (2 * cov + c2) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))  # Eq. 13
    return s.flatten(1).mean(1).float()


def psnr(a, b):
    """a, b (B, C, H, W) in [0, 1] -> (B,) 10 log10(1 / MSE)."""
    return -10 * torch.log10((a - b).pow(2).flatten(1).mean(1).clamp(min=1e-12))


def scores(sr, truth, low, low_res):
    """sr, truth (B, 3, R, R), low (B, 3, r, r), all in [-1, 1] -> dict of means."""
    a, t, z = (sr.clamp(-1, 1) + 1) / 2, (truth + 1) / 2, (low + 1) / 2  # [0, 1]
    return {"psnr_db": psnr(a, t).mean().item(), "ssim": ssim(a, t).mean().item(),
            "consistency_rmse": (downsample(a, low_res) - z).pow(2).flatten(1).mean(1).sqrt().mean().item(),
            "colour_error": (255 * (a.mean((2, 3)) - t.mean((2, 3))).abs().mean()).item()}


@torch.no_grad()
def evaluate(ckpt, n=200, steps=25, guidance=1.0, aug_level=0.0, base=None, features=None, batch_size=50, seed=7,
             device="cpu", progress=True, base_guidance=2.0, sampler=None, spacing=None):
    """The figures of the module docstring, as a dict {"sr": {...}, "bicubic": {...}, ("fid_compounding")}."""
    stage = load_stage(ckpt, device)
    if stage.low_res == 0:
        raise ValueError(f"{ckpt} is a base model; give a super-resolution stage (trained with low_res)")
    data = dict(stage.pipe.data)
    R, r = stage.resolution, stage.low_res
    source = CropSource(DataConfig(**{**data, "num_images": n, "seed": seed}))
    settings = stage.pipe.settings_with(steps=steps, guidance=guidance, sampler=sampler, spacing=spacing)
    g = torch.Generator(device).manual_seed(0)
    truth, srs, bases_sr = [], [], []
    base_stage = load_stage(base, device) if base else None
    if base_stage is not None and base_stage.resolution != r:
        raise ValueError(f"--base {base} gives {base_stage.resolution} px but {ckpt} takes {r} px inputs")
    for i in range(0, n, batch_size):
        idx = list(range(i, min(n, i + batch_size)))
        x = source.whole(idx).to(device)  # (b, 3, R, R)
        captions = [source.captions[j] for j in idx]
        srs.append(super_resolve(stage, captions, downsample(x, r), settings, aug_level, g, truncate=True,
                                 progress=progress, desc=f"SR of renders {i + len(idx)}/{n}").cpu())
        truth.append(x.cpu())
        if base_stage is not None:
            low = base_stage.pipe(captions, base_stage.pipe.settings_with(guidance=base_guidance), g,
                                  truncate=True, progress=progress, desc="base").clamp(-1, 1)
            bases_sr.append(super_resolve(stage, captions, low, settings, aug_level, g, truncate=True,
                                          progress=progress, desc="SR of base samples").cpu())
    truth, srs = torch.cat(truth), torch.cat(srs)
    low = downsample(truth, r)
    bicubic = F.interpolate(low, size=(R, R), mode="bicubic", align_corners=False).clamp(-1, 1)
    out = {"stage": str(ckpt), "resolution": R, "low_res": r, "n": n, "aug_level": aug_level, "steps": steps,
           "sampler": settings.sampler, "spacing": settings.timestep_spacing,
           "guidance": guidance, "sr": scores(srs, truth, low, r), "bicubic": scores(bicubic, truth, low, r)}
    if base_stage is not None:
        from metrics.features import extract, image_batches, load_feature_net
        from metrics.frechet import frechet_distance, stats_of

        net = load_feature_net(features, device=device)
        feats = [torch.cat(list(extract(net, image_batches(to_uint8_tensor(x), 100), progress=False)))
                 for x in (srs, torch.cat(bases_sr))]
        out["fid_compounding"] = float(frechet_distance(*stats_of(feats[0]),
                                                        *stats_of(feats[1])))
        out["fid_features"] = net.description
    return out


def to_uint8_tensor(x):
    return torch.from_numpy(to_uint8(x)).permute(0, 3, 1, 2).contiguous()  # (B, 3, H, W) uint8


def report_lines(out):
    sr, bi = out["sr"], out["bicubic"]
    lines = [f"{out['stage']}: {out['low_res']} -> {out['resolution']} px, {out['n']} held-in renders, "
             f"aug level {out['aug_level']}, {out['sampler']} {out['steps']} steps ({out['spacing']}), "
             f"guidance {out['guidance']}",
             f"  PSNR   SR {sr['psnr_db']:.2f} dB | bicubic {bi['psnr_db']:.2f} dB",
             f"  SSIM   SR {sr['ssim']:.4f} | bicubic {bi['ssim']:.4f}",
             f"  consistency RMSE ||down(SR) - LR||  SR {sr['consistency_rmse']:.4f} | bicubic {bi['consistency_rmse']:.4f}",
             f"  colour error (0-255)  SR {sr['colour_error']:.2f} | bicubic {bi['colour_error']:.2f}"]
    if "fid_compounding" in out:
        lines.append(f"  FID SR(renders' LR) vs SR(base samples): {out['fid_compounding']:.3f} ({out['fid_features']})")
    return lines


def main(argv=None):
    p = argparse.ArgumentParser(description="PSNR / SSIM of a super-resolution stage against bicubic, and more.")
    p.add_argument("--ckpt", required=True, help="a super-resolution stage (train/diffusion.py with low_res)")
    p.add_argument("--base", help="the stage before it (its samples go through this stage for the FID)")
    p.add_argument("--features", default="runs/shapes_classifier/ckpt.pt", help="feature network of the FID")
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--sampler", choices=SAMPLERS, help="diffusion sampler (default: the stage's own)")
    p.add_argument("--spacing", choices=TIMESTEP_SPACINGS, help="timestep spacing (default: the stage's own)")
    p.add_argument("--guidance", type=float, default=1.0,
                   help="the stage's guidance scale (1 = unguided, as configs/shapes/pipeline_imagen.yaml samples it)")
    p.add_argument("--base-guidance", type=float, default=2.0, help="with --base: the base's guidance scale")
    p.add_argument("--aug-level", type=float, default=0.0, help="noise-conditioning augmentation level in [0, 1]")
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)
    if args.n < 2 or args.steps < 1:
        raise ValueError("--n must be at least 2 and --steps at least 1")
    out = evaluate(args.ckpt, args.n, args.steps, args.guidance, args.aug_level, args.base, args.features,
                   device=get_device(args.device), base_guidance=args.base_guidance, sampler=args.sampler,
                   spacing=args.spacing)
    print("\n".join(report_lines(out)))
    return out


if __name__ == "__main__":
    run_cli(main)
