"""What a training preset costs: parameters, FLOPs per training image (forward + backward, counted by
torch.utils.flop_counter on the built model), the total for the preset's steps x batch, the pure-compute time on
a GPU at a given throughput, and the measured time per step here; with --mfu the model FLOP utilisation here
(achieved GFLOP/s of a training step at the preset's own batch against this machine's fp32 GEMM peak, measured in
the same run), with --profile torch.profiler's top operators of one step.

    .venv/bin/python -m tests.bench_preset --config configs/shapes/diffusion_latent_gpu.yaml
    .venv/bin/python -m tests.bench_preset --config configs/shapes/vae_gpu.yaml --batch 4
    .venv/bin/python -m tests.bench_preset --config configs/shapes/diffusion_latent.yaml --mfu --profile
    .venv/bin/python -m tests.bench_preset --config configs/shapes/dvae.yaml --channels-last --repeats 8

Diffusion configs (pixel or latent: the U-Net's input is built at its image_size and in_channels, with the text
encoder and, for a super-resolution stage, its low-resolution input), VAE configs (reconstruction + KL; the
discriminator is not counted), dVAE, classifier and CLIP configs. Frozen text encoders are not loaded: give such a
config `text_encoder=joint` and the encoder's text.* sizes as overrides. The GPU time is a lower bound:
small feature maps keep a GPU far from its peak.
"""
import argparse
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from core.config import load_config


def build(config_path, overrides=(), layout=lambda x: x):
    """-> (model, a function batch -> loss, steps, batch size). `layout` is applied to each image batch the model
    reads (--channels-last passes NHWC); `overrides` are the config's key=value overrides."""
    name = config_path.split("/")[-1]
    if name.startswith("vae"):
        from models.vae import AutoencoderKL
        from train.vae import VAETrainConfig
        cfg = load_config(VAETrainConfig, config_path, overrides)
        model = AutoencoderKL(cfg.vae)
        R = cfg.data.resolution

        def loss(B):
            x = torch.randn(B, 3, R, R)
            rec, posterior = model(layout(x))
            return (rec - x).pow(2).flatten(1).sum(1).mean() + 1e-6 * posterior.kl().mean()
        return model, loss, cfg.train.steps, cfg.train.batch_size
    if name.startswith("dvae"):
        from models.dvae import DiscreteVAE
        from train.dvae import DVAETrainConfig
        cfg = load_config(DVAETrainConfig, config_path, overrides)
        model, R, lc = DiscreteVAE(cfg.dvae), cfg.data.resolution, cfg.loss

        def loss(B):  # the joint phase's loss at its end (tau_end, beta = kl_weight)
            x = torch.rand(B, 3, R, R) * 2 - 1
            return model(layout(x), lc.tau_end, lc.kl_weight, hard=lc.hard, diversity=lc.diversity_weight)[0]
        return model, loss, cfg.train.steps, cfg.train.batch_size
    if name.startswith("classifier"):
        from models.classifier import ShapesClassifier
        from train.classifier import ClassifierTrainConfig
        cfg = load_config(ClassifierTrainConfig, config_path, overrides)
        model, R = ShapesClassifier(cfg.model), cfg.model.resolution

        def loss(B):  # every head's logits squared: the same backward as the detection loss, without targets
            return sum(v.float().pow(2).mean() for v in model(layout(torch.rand(B, 3, R, R) * 2 - 1)).values())
        return model, loss, cfg.train.steps, cfg.train.batch_size
    if name.startswith("clip"):
        from models.clip import CLIP, CLIPConfig, contrastive_loss
        from models.text_encoder import TextEncoderConfig
        from train.clip import ClipTrainConfig
        cfg = load_config(ClipTrainConfig, config_path, overrides)
        text = TextEncoderConfig(**{**cfg.model.text.__dict__, "vocab_size": cfg.tokenizer.vocab_size})
        model, R = CLIP(CLIPConfig(**{**cfg.model.__dict__, "text": text})), cfg.data.resolution

        def loss(B):
            ids = torch.randint(3, cfg.tokenizer.vocab_size, (B, text.max_length))
            images = model.encode_image(layout(torch.rand(B, 3, R, R) * 2 - 1))
            return contrastive_loss(images, model.encode_text(ids, torch.ones_like(ids, dtype=torch.bool)),
                                    model.logit_scale)[0]
        return model, loss, cfg.train.steps, cfg.train.batch_size
    from models.conditioning import Conditioning
    from models.text2image import ModelConfig, build_model
    from train.diffusion import DiffusionConfig
    cfg = load_config(DiffusionConfig, config_path, overrides)
    model = build_model(ModelConfig(cfg.tokenizer, cfg.text, cfg.unet, cfg.schedule), cfg.tokenizer.vocab_size)
    u = cfg.unet

    def loss(B):
        x = torch.randn(B, u.out_channels, u.image_size, u.image_size)
        ids = torch.randint(3, cfg.tokenizer.vocab_size, (B, cfg.text.max_length))
        cond = None
        if cfg.low_res:  # a super-resolution stage: the noised low-resolution input and its level
            cond = Conditioning(low_res=layout(torch.rand(B, 3, cfg.low_res, cfg.low_res) * 2 - 1),
                                aug_level=torch.zeros(B, dtype=torch.long))
        out = model(layout(x), torch.randint(0, 1000, (B,)), ids, torch.ones_like(ids, dtype=torch.bool), cond)
        return (out - x).pow(2).mean()
    return model, loss, cfg.train.steps, cfg.train.batch_size


def compare_layouts(config_path, overrides, repeats):
    """Median seconds of a training step at the preset's batch in NCHW and in channels_last (train.channels_last),
    the two models built alike and stepped in turn, so that background load hits both."""
    steps = []
    for nhwc in (False, True):
        torch.manual_seed(0)
        layout = (lambda x: x.contiguous(memory_format=torch.channels_last)) if nhwc else (lambda x: x)
        model, loss, _, batch = build(config_path, overrides, layout)
        if nhwc:
            model.to(memory_format=torch.channels_last)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step(loss=loss, optimizer=optimizer, batch=batch):
            optimizer.zero_grad()
            loss(batch).backward()
            optimizer.step()
        steps.append(step)
    times = ([], [])
    for i in range(repeats + 2):
        for fn, out in zip(steps, times):
            t0 = time.perf_counter()
            fn()
            if i >= 2:  # two warm-up steps each
                out.append(time.perf_counter() - t0)
    return statistics.median(times[0]), statistics.median(times[1]), batch


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
    p.add_argument("--config", required=True, help="a diffusion, VAE, dVAE, classifier or CLIP config file")
    p.add_argument("overrides", nargs="*", help="the config's key=value overrides (e.g. text_encoder=joint)")
    p.add_argument("--batch", type=int, default=8, help="images per timed step here (scaled to the preset's batch)")
    p.add_argument("--tflops", type=float, nargs=2, default=[25, 50], help="GPU throughput range, TFLOP/s")
    p.add_argument("--mfu", action="store_true",
                   help="time steps at the preset's batch and print achieved GFLOP/s against the measured GEMM peak")
    p.add_argument("--repeats", type=int, default=5, help="timed steps for --mfu (the fastest counts)")
    p.add_argument("--profile", action="store_true", help="print torch.profiler's top 10 operators of one step")
    p.add_argument("--channels-last", action="store_true",
                   help="only time a training step in NCHW against channels_last (train.channels_last), --repeats "
                        "steps each in turn, and print the medians")
    args = p.parse_args(argv)
    if args.channels_last:
        nchw, nhwc, batch = compare_layouts(args.config, args.overrides, args.repeats)
        print(f"{args.config}: a training step of {batch} ({torch.get_num_threads()} threads, median of "
              f"{args.repeats}): NCHW {nchw * 1e3:.0f} ms, channels_last {nhwc * 1e3:.0f} ms: {nchw / nhwc:.2f}x")
        return
    model, loss, steps, batch = build(args.config, args.overrides)
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
