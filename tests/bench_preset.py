"""What a training preset costs: parameters, FLOPs per training image (forward + backward, counted by
torch.utils.flop_counter on the built model), the total for the preset's steps x batch, the pure-compute time on
a GPU at a given throughput, and the measured time per step here; with --mfu the model FLOP utilisation here
(achieved GFLOP/s of a training step at the preset's own batch against this machine's fp32 GEMM peak, measured in
the same run), with --profile torch.profiler's top operators of one step.

    .venv/bin/python -m tests.bench_preset --config configs/shapes/diffusion_latent_gpu.yaml
    .venv/bin/python -m tests.bench_preset --config configs/shapes/vae_gpu.yaml --batch 4
    .venv/bin/python -m tests.bench_preset --config configs/shapes/diffusion_latent.yaml --mfu --profile

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


def gemm_peak(n=1024, repeats=20):
    """This machine's fp32 matrix-multiply throughput, GFLOP/s: the best of `repeats` (n x n) @ (n x n) products
    (2 n^3 FLOPs each) on torch's current threads; the ceiling MFU is measured against."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b  # warm-up: thread pool, caches
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best / 1e9


def time_steps(model, loss, batch, repeats):
    """Seconds of the fastest of `repeats` training steps (forward, backward, AdamW) at `batch`, after a warm-up."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    times = []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        optimizer.zero_grad()
        loss(batch).backward()
        optimizer.step()
        times.append(time.perf_counter() - t0)
    return min(times[1:])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", required=True, help="a diffusion or VAE config file")
    p.add_argument("--batch", type=int, default=8, help="images per timed step here (scaled to the preset's batch)")
    p.add_argument("--tflops", type=float, nargs=2, default=[25, 50], help="GPU throughput range, TFLOP/s")
    p.add_argument("--mfu", action="store_true",
                   help="time steps at the preset's batch and print achieved GFLOP/s against the measured GEMM peak")
    p.add_argument("--repeats", type=int, default=5, help="timed steps for --mfu (the fastest counts)")
    p.add_argument("--profile", action="store_true", help="print torch.profiler's top 10 operators of one step")
    args = p.parse_args(argv)
    model, loss, steps, batch = build(args.config)
    with FlopCounterMode(display=False) as counter:
        loss(2).backward()
    per_image = counter.get_total_flops() / 2
    total = per_image * steps * batch
    per_step = time_steps(model, loss, args.batch, 2) * batch / args.batch
    lo, hi = args.tflops
    print(f"{args.config}: {sum(q.numel() for q in model.parameters()) / 1e6:.1f}M parameters, "
          f"{per_image / 1e9:.2f} GFLOP per image (forward + backward)")
    print(f"  {steps} steps x {batch} images: {total / 1e12:.1f} TFLOP -> {total / hi / 1e12 / 60:.2g}-"
          f"{total / lo / 1e12 / 60:.2g} min of pure compute at {lo:g}-{hi:g} TFLOP/s")
    print(f"  here ({torch.get_num_threads()} threads, fp32): {per_step:.1f} s per step of {batch} "
          f"(timed at batch {args.batch}) -> {per_step * steps / 3600:.1f} h")
    if args.mfu:
        step = time_steps(model, loss, batch, args.repeats)
        peak = gemm_peak()
        achieved = per_image * batch / step / 1e9
        print(f"  MFU here ({torch.get_num_threads()} threads, fp32, batch {batch}): {step * 1e3:.0f} ms per step, "
              f"{achieved:.1f} GFLOP/s achieved against a {peak:.0f} GFLOP/s GEMM peak (1024^3 matmul, same run): "
              f"{100 * achieved / peak:.1f}%")
    if args.profile:
        from torch.profiler import ProfilerActivity, profile
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        loss(batch).backward()
        optimizer.step()  # warm-up (optimizer state allocated)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            optimizer.zero_grad()
            loss(batch).backward()
            optimizer.step()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=10))


if __name__ == "__main__":
    main()
