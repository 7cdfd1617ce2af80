"""What a training preset costs: parameters, FLOPs per training image (forward + backward, counted by
torch.utils.flop_counter on the built model), the total for the preset's steps x batch, the pure-compute time on
a GPU at a given throughput, and the measured time per step here.

    .venv/bin/python -m tests.bench_preset --config configs/shapes/diffusion_latent_gpu.yaml
    .venv/bin/python -m tests.bench_preset --config configs/shapes/vae_gpu.yaml --batch 4

Diffusion configs (pixel or latent: the U-Net's input is built at its image_size and in_channels, with the text
encoder) and VAE configs (reconstruction + KL; the discriminator is not counted). The GPU time is a lower bound:
small feature maps keep a GPU far from its peak.
"""
import argparse
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from core.config import load_config


def build(config_path):
    """-> (model, a function batch -> loss, steps, batch size)."""
    from train.diffusion import DiffusionConfig
    from train.vae import VAETrainConfig
    name = config_path.split("/")[-1]
    if name.startswith("vae"):
        from models.vae import AutoencoderKL
        cfg = load_config(VAETrainConfig, config_path)
        model = AutoencoderKL(cfg.vae)
        R = cfg.data.resolution

        def loss(B):
            x = torch.randn(B, 3, R, R)
            rec, posterior = model(x)
            return (rec - x).pow(2).flatten(1).sum(1).mean() + 1e-6 * posterior.kl().mean()
        return model, loss, cfg.train.steps, cfg.train.batch_size
    from models.text2image import ModelConfig, build_model
    cfg = load_config(DiffusionConfig, config_path)
    model = build_model(ModelConfig(cfg.tokenizer, cfg.text, cfg.unet, cfg.schedule), cfg.tokenizer.vocab_size)
    u = cfg.unet

    def loss(B):
        x = torch.randn(B, u.in_channels, u.image_size, u.image_size)
        ids = torch.randint(3, cfg.tokenizer.vocab_size, (B, cfg.text.max_length))
        out = model(x, torch.randint(0, 1000, (B,)), ids, torch.ones_like(ids, dtype=torch.bool))
        return (out - x).pow(2).mean()
    return model, loss, cfg.train.steps, cfg.train.batch_size


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", required=True, help="a diffusion or VAE config file")
    p.add_argument("--batch", type=int, default=8, help="images per timed step here (scaled to the preset's batch)")
    p.add_argument("--tflops", type=float, nargs=2, default=[25, 50], help="GPU throughput range, TFLOP/s")
    args = p.parse_args(argv)
    model, loss, steps, batch = build(args.config)
    with FlopCounterMode(display=False) as counter:
        loss(2).backward()
    per_image = counter.get_total_flops() / 2
    total = per_image * steps * batch
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        optimizer.zero_grad()
        loss(args.batch).backward()
        optimizer.step()
        times.append(time.perf_counter() - t0)
    per_step = min(times[1:]) * batch / args.batch
    lo, hi = args.tflops
    print(f"{args.config}: {sum(q.numel() for q in model.parameters()) / 1e6:.1f}M parameters, "
          f"{per_image / 1e9:.2f} GFLOP per image (forward + backward)")
    print(f"  {steps} steps x {batch} images: {total / 1e15:.1f} PFLOP -> {total / hi / 1e12 / 60:.0f}-"
          f"{total / lo / 1e12 / 60:.0f} min of pure compute at {lo:g}-{hi:g} TFLOP/s")
    print(f"  here ({torch.get_num_threads()} threads, fp32): {per_step:.1f} s per step of {batch} "
          f"(timed at batch {args.batch}) -> {per_step * steps / 3600:.1f} h")


if __name__ == "__main__":
    main()
