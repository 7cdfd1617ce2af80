"""Train the KL-regularised autoencoder of latent diffusion (models/vae.py).

Paper: Rombach et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion Models", arXiv 2112.10752,
Sec. 3.1 and App. G; the loss is LDM's LPIPSWithDiscriminator without LPIPS (models/vae.py says why).

    python -m train.vae --config configs/shapes/vae.yaml                   # 32 px shapes, f = 4, about 3 minutes
    python -m train.vae --config configs/shapes/vae.yaml data.max_objects=3 train.out_dir=runs/vae_3obj  # 28.3 dB
    python -m train.vae --config configs/shapes/vae_gpu.yaml               # 64 px, with the patch GAN

Writes into train.out_dir (default runs/<config name>): ckpt.pt (atomic, every train.ckpt_every steps and at the
end; kind "vae"), config.yaml, tensorboard events (reconstruction loss, KL, GAN losses and weight, learning
rate, gradient norm, reconstruction grids) and reconstructions/step_XXXXXXX.png (held-out originals above their
reconstructions). `train.resume=auto` continues out_dir/ckpt.pt exactly (on the CPU the losses after a resume
equal those of an uninterrupted run; tests/test_vae.py), `train.resume=<path>` continues another checkpoint.
At the end it prints the reconstruction PSNR on held-out images and the latent scale factor and stores both in
ckpt.pt (`psnr`, `scale_factor`; None in checkpoints saved before the last step). The tiny preset, measured on a shared 2-core CPU with OMP_NUM_THREADS=1 (162 s of training,
2 min 58 s wall), ends with
    PSNR 31.38 dB on 1000 held-out images (posterior mean, [0, 1] range, per image)
    scale_factor 0.5929 = 1 / std of posterior samples over 4096 training images (1 / std of the means: 0.5939)

Loss per step (LDM's LPIPSWithDiscriminator with perceptual_weight = 0 and its logvar fixed at 0, as LDM's
optimizer leaves it):
    z ~ q(z | x) by reparameterisation;  x_rec = D(z)
    L_rec = sum over pixels of |x - x_rec|  (or squared), averaged over the batch  (LDM sums, not averages, per
            image: kl_weight = 1e-6 is relative to that sum)
    L = L_rec + kl_weight * KL(q(z | x) || N(0, I))                              (KL summed over the latent)
        + [step >= disc_start] * lambda * L_G,   L_G = -mean D_phi(x_rec),
          lambda = disc_weight * ||grad_GL L_rec|| / (||grad_GL L_G|| + 1e-4)     (taming Eq. 7)
    and, from disc_start, a discriminator step on the hinge loss 0.5 * (E relu(1 - D(x)) + E relu(1 + D(x_rec))).

Held-out images: for shapes, fresh renders of train.eval_seed (never data.seed); for folder:/hub: data, the
last train.eval_images images, which are then left out of training.
Scale factor (LDM's scale_by_std, the way SD's 0.18215 was found): 1 / std of posterior *samples* z (all their
numbers pooled, std about their mean) over train.scale_images training images, with the weights the checkpoint
serves (EMA if on). The std of the means alone is printed next to it.
"""
import dataclasses
import time
from dataclasses import dataclass, field

import torch
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from core.checkpoint import load_weights, save_checkpoint
from core.config import format_config, parse_config
from core.images import image_grid
from core.runtime import autocast, get_device, run_cli, seed_everything
from data.dataset import DataConfig, load_data
from models.vae import AutoencoderKL, NLayerDiscriminator, VAEConfig, adaptive_weight, hinge_d_loss
from train.common import (EMA, TrainConfig, batch_indices, check_train_config, end_step, log_grid, memory_format,
                          open_run, resume_state, set_learning_rate, step_generator, stopped_early, training_state)


@dataclass
class LossConfig:
    rec: str = "l1"               # l1 | l2: pixel reconstruction loss (LDM: l1, plus LPIPS which we do not have)
    kl_weight: float = 1e-6       # weight of the KL term (LDM / SD kl-f8: 1e-6, relative to the per-image pixel sum)
    disc_weight: float = 0.0      # 0 = no discriminator; else the factor on the adaptive weight (LDM kl-f8: 0.5)
    disc_start: int = 50001       # step at which the discriminator starts to train and the GAN term joins (kl-f8: 50001)
    disc_layers: int = 3          # stride-2 layers of the patch discriminator (taming / LDM: 3)
    disc_channels: int = 64       # width of its first conv (ndf; taming: 64)
    disc_norm: str = "batch"      # batch (taming, LDM) | group


@dataclass
class VAETrain(TrainConfig):
    steps: int = 2000             # optimizer steps
    batch_size: int = 32          # images per step
    lr: float = 1e-3              # peak Adam learning rate, for the autoencoder and the discriminator
    betas: tuple[float, float] = (0.5, 0.9)  # Adam moments (LDM's autoencoder and discriminator)
    warmup_steps: int = 50        # linear warm-up, then cosine decay (LDM keeps the rate constant)
    log_every: int = 50           # steps between a log line / tensorboard scalars
    ema_decay: float = 0.0        # EMA of the autoencoder's weights (0 = off); used for evaluation and by load_vae
    image_every: int = 500        # steps between reconstruction grids (0 = only at the end)
    eval_images: int = 1000       # held-out images for the final PSNR (and the first 8 for the grids)
    eval_seed: int = 1            # shapes: rendering seed of the held-out images (must differ from data.seed)
    scale_images: int = 4096      # training images whose latents set the scale factor


@dataclass
class VAETrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: VAETrain = field(default_factory=VAETrain)


def check_config(cfg):
    f = cfg.vae.factor
    if cfg.data.resolution % f:
        raise ValueError(f"data.resolution ({cfg.data.resolution}) must be divisible by the VAE's factor {f} "
                         f"(2**(len(vae.channel_mult) - 1)); change one of them")
    if cfg.loss.rec not in ("l1", "l2"):
        raise ValueError(f"loss.rec must be l1 or l2, got {cfg.loss.rec!r}")
    tc = cfg.train
    check_train_config(tc)
    if tc.eval_images < 1 or tc.scale_images < 1:
        raise ValueError("train.eval_images and train.scale_images must be at least 1")
    if cfg.data.dataset == "shapes" and tc.eval_seed == cfg.data.seed:
        raise ValueError(f"train.eval_seed ({tc.eval_seed}) must differ from data.seed so that the held-out "
                         f"images are unseen")
    if cfg.loss.disc_weight > 0:
        NLayerDiscriminator(3, 8, cfg.loss.disc_layers, cfg.loss.disc_norm)  # a bad norm fails here, before the data


def to_float(images_uint8, device):
    return images_uint8.to(device).float() / 127.5 - 1  # (B, 3, H, W) in [-1, 1]


@torch.no_grad()
def psnr(model, images, device, batch_size=250):
    """Mean over images of 10 log10(1 / MSE), images and reconstructions (posterior mean, clamped) in [0, 1]."""
    values = []
    for i in range(0, len(images), batch_size):
        x = to_float(images[i: i + batch_size], device)
        rec = model.decode(model.encode(x).mode()).clamp(-1, 1)  # (b, 3, H, W)
        mse = ((rec.float() - x) / 2).pow(2).flatten(1).mean(1)  # (b,) in [0, 1] units
        values.append(10 * torch.log10(1 / mse.clamp_min(1e-10)))
    return torch.cat(values).mean().item()


@torch.no_grad()
def latent_scale(model, images, device, seed, batch_size=250):
    """(1 / std of posterior samples, 1 / std of posterior means) over `images`."""
    g = torch.Generator(device).manual_seed(seed)
    samples, means = [], []
    for i in range(0, len(images), batch_size):
        posterior = model.encode(to_float(images[i: i + batch_size], device))
        samples.append(posterior.sample(g).double().flatten())
        means.append(posterior.mode().double().flatten())
    return 1 / torch.cat(samples).std().item(), 1 / torch.cat(means).std().item()


def main(argv=None):
    cfg, config_path = parse_config(VAETrainConfig, argv, description=__doc__.split("\n")[0])
    check_config(cfg)
    tc, lc = cfg.train, cfg.loss
    out_dir, resumed = open_run(cfg, config_path, "vae", ("data", "vae", "loss"), "vae")
    ckpt_path = out_dir / "ckpt.pt"
    device = get_device(tc.device)
    seed_everything(tc.seed)

    # ---- data: training images in memory; held-out images rendered with another seed (or split off)
    images = load_data(cfg.data).images  # (N, 3, H, W) uint8
    if cfg.data.dataset == "shapes":
        eval_cfg = dataclasses.replace(cfg.data, seed=tc.eval_seed, num_images=tc.eval_images)
        eval_images = load_data(eval_cfg, progress=False).images
    else:
        if len(images) < tc.eval_images + tc.batch_size:
            raise ValueError(f"{len(images)} images are too few to hold out train.eval_images={tc.eval_images} and "
                             f"still fill a batch of {tc.batch_size}; lower train.eval_images")
        images, eval_images = images[:-tc.eval_images], images[-tc.eval_images:]
    N = len(images)
    if N < tc.batch_size:
        raise ValueError(f"{N} training images are fewer than train.batch_size={tc.batch_size}")

    # ---- model, discriminator, optimizers, EMA
    model = AutoencoderKL(cfg.vae).to(device)
    disc = NLayerDiscriminator(cfg.vae.in_channels, lc.disc_channels, lc.disc_layers, lc.disc_norm).to(device) \
        if lc.disc_weight > 0 else None
    layout = memory_format(tc, model, disc)  # train.channels_last
    ema = EMA(model, tc.ema_decay) if tc.ema_decay > 0 else None
    optimizer = torch.optim.AdamW(model.parameters(), lr=tc.lr, betas=tc.betas, weight_decay=tc.weight_decay)
    disc_optimizer = None
    if disc is not None:
        disc_optimizer = torch.optim.AdamW(disc.parameters(), lr=tc.lr, betas=tc.betas, weight_decay=tc.weight_decay)
    start_step = resume_state(resumed, model, optimizer, ema, "VAE checkpoint weights")
    if resumed and disc:
        load_weights(disc, resumed["disc"], "discriminator weights")
        disc_optimizer.load_state_dict(resumed["disc_optimizer"])
    eval_model = ema.model if ema else model

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.yaml").write_text(format_config(cfg) + "\n")
    writer = SummaryWriter(str(out_dir / "tensorboard"))
    n_params = sum(p.numel() for p in model.parameters())
    f = model.factor
    print(f"{N} training images, {len(eval_images)} held-out, {n_params / 1e6:.2f}M parameters, factor {f} "
          f"(latents {cfg.vae.latent_channels}x{cfg.data.resolution // f}x{cfg.data.resolution // f}), "
          f"device {device}, writing to {out_dir}", flush=True)

    def checkpoint(step, scale_factor=None, psnr_db=None):
        save_checkpoint(ckpt_path, training_state(
            "vae", cfg, step, model, optimizer, ema, scale_factor=scale_factor, psnr=psnr_db,
            disc=disc.state_dict() if disc else None,
            disc_optimizer=disc_optimizer.state_dict() if disc else None))

    def reconstruction_grid(step):
        eval_model.eval()
        with torch.no_grad():
            x = to_float(eval_images[:8], device)  # (8, 3, H, W)
            rec = eval_model.decode(eval_model.encode(x).mode())
        grid = image_grid(torch.cat([x, rec.float()]), nrow=len(x))  # originals above reconstructions
        log_grid(writer, out_dir, "reconstructions", grid, step)
        model.train()

    # ---- the loop
    model.train()
    end = end_step(tc, start_step)
    bar = tqdm(range(start_step, end), initial=start_step, total=tc.steps, desc="vae", dynamic_ncols=True)
    t0 = time.time()
    for step in bar:
        x = layout(to_float(images[batch_indices(step, tc.batch_size, N, tc.seed)], device))  # (B, 3, H, W)
        # posterior noise from a generator seeded by (seed, step): the run is a function of its seed
        g = step_generator(tc.seed, step, device=device)
        gan_on = disc is not None and step >= lc.disc_start
        for opt in (optimizer, disc_optimizer):
            if opt is not None:
                set_learning_rate(opt, tc, step)

        # -- autoencoder step
        with autocast(device, tc.bf16):
            rec, posterior = model(x, sample_posterior=True, generator=g)  # (B, 3, H, W)
            err = (rec.float() - x).abs() if lc.rec == "l1" else (rec.float() - x).pow(2)
            rec_loss = err.flatten(1).sum(1).mean()  # per-image sum, batch mean (LDM)
            kl = posterior.kl().mean()
            loss = rec_loss + lc.kl_weight * kl
            if gan_on:
                disc.requires_grad_(False)  # the generator's loss must not train the discriminator
                g_loss = -disc(rec).float().mean()
                d_weight = adaptive_weight(rec_loss, g_loss, model.last_layer, lc.disc_weight)  # taming Eq. 7
                loss = loss + d_weight * g_loss
                disc.requires_grad_(True)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip if tc.grad_clip > 0 else 1e9)
        optimizer.step()
        if ema:
            ema.update(model)

        # -- discriminator step (hinge loss) on the same real images and the detached reconstructions
        if gan_on:
            with autocast(device, tc.bf16):
                d_loss = hinge_d_loss(disc(x).float(), disc(rec.detach()).float())
            disc_optimizer.zero_grad(set_to_none=True)
            d_loss.backward()
            disc_optimizer.step()

        done = step + 1
        if done % tc.log_every == 0 or done == tc.steps:
            lr = optimizer.param_groups[0]["lr"]
            rec_pixel = err.mean().item()  # per pixel and channel, in [-1, 1] units
            scalars = {"rec": rec_pixel, "kl": kl.item(), "lr": lr, "grad_norm": grad_norm.item()}
            if gan_on:
                scalars.update(g_loss=g_loss.item(), d_loss=d_loss.item(), d_weight=d_weight.item())
            for k, v in scalars.items():
                writer.add_scalar(f"train/{k}", v, done)
            line = f"step {done} | rec {rec_pixel:.6f} | kl {kl.item():.2f}"
            if gan_on:
                line += f" | g {g_loss.item():.4f} | d {d_loss.item():.4f} | d_weight {d_weight.item():.4f}"
            bar.set_postfix(rec=f"{rec_pixel:.4f}")
            tqdm.write(line + f" | lr {lr:.2e} | grad norm {grad_norm.item():.3f} | {time.time() - t0:.0f}s")
        if (tc.image_every and done % tc.image_every == 0) or done == tc.steps:
            reconstruction_grid(done)
        if done % tc.ckpt_every == 0 or done == end:
            checkpoint(done)
    train_time = time.time() - t0

    if stopped_early(writer, ckpt_path, end, tc, train_time):
        return

    # ---- held-out PSNR and the latent scale factor, with the weights the checkpoint serves
    eval_model.eval()
    value = psnr(eval_model, eval_images, device)
    scale_idx = torch.randperm(N, generator=torch.Generator().manual_seed(tc.seed))[:tc.scale_images]
    scale_factor, scale_of_means = latent_scale(eval_model, images[scale_idx], device, tc.seed)
    checkpoint(tc.steps, scale_factor, value)
    writer.add_scalar("eval/psnr", value, tc.steps)
    writer.close()
    print(f"saved {ckpt_path} at step {tc.steps} ({train_time:.0f}s of training this run)", flush=True)
    print(f"PSNR {value:.2f} dB on {len(eval_images)} held-out images (posterior mean, [0, 1] range, per image)",
          flush=True)
    print(f"scale_factor {scale_factor:.4f} = 1 / std of posterior samples over {len(scale_idx)} training images "
          f"(1 / std of the means: {scale_of_means:.4f})", flush=True)


if __name__ == "__main__":
    run_cli(main)
