"""Train unCLIP's diffusion prior (models/prior.py): the CLIP text embedding z_t -> the CLIP image embedding z_i.

Paper: Ramesh et al. 2022, "Hierarchical Text-Conditional Image Generation with CLIP Latents", arXiv 2204.06125,
Sec. 2.2: a decoder-only transformer predicts the clean z_i from its noised version, the caption's tokens and z_t,
with the mean-squared error; the text conditioning is dropped 10% of the time (classifier-free guidance).

    python -m train.prior --config configs/shapes/prior.yaml

The CLIP (`clip`, a checkpoint of train/clip.py) is frozen: the image embeddings of every training image and the
text conditions (tokens, mask, z_t) of every distinct caption are computed once before training and kept in memory.
Writes out_dir/ckpt.pt (kind "prior": config, weights, EMA, the CLIP's path and fingerprint). At the end it
evaluates the prior on fresh renders (evaluate(); measured figures in configs/shapes/prior.yaml):
    cosine(z_i_hat, z_i)   the prior's z_i against the true z_i of each caption's own image, and two baselines:
                           z_t itself (the "modality gap": what the decoder would get without a prior) and the mean
                           unit z_i of the training set (a prior that ignores the caption)
    retrieval              for each caption, the image nearest to the prior's z_i among the fresh renders: does it
                           agree with every claim of the caption (colour, shape, stated size and background)?
Run again with train.resume=auto on a finished checkpoint to print the figures only.
"""
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from core.checkpoint import save_checkpoint
from core.config import config_from_dict, format_config, parse_config
from core.runtime import get_device, run_cli, seed_everything
from data.claims import caption_holds
from data.dataset import DataConfig, load_data
from models.clip import clip_fingerprint, embed_images, load_clip, text_conditions
from models.conditioning import Conditioning
from models.prior import DiffusionPrior, PriorConfig, sample_image_embeddings
from models.prior import load_prior as load_prior_model
from models.samplers import SamplerConfig
from models.schedule import NoiseSchedule, ScheduleConfig
from train.clip import render
from train.common import (EMA, TrainConfig, batch_indices, end_step, open_run, resume_state, set_learning_rate,
                          step_generator, training_state)

FILLED_IN = ("prior.embed_dim", "prior.text_width", "prior.text_length")  # taken from the CLIP by main()


@dataclass
class PriorTrain(TrainConfig):
    steps: int = 3000             # optimizer steps
    batch_size: int = 256         # (z_t, z_i) pairs per step
    lr: float = 1e-3              # peak AdamW learning rate
    weight_decay: float = 0.0     # AdamW decoupled weight decay
    warmup_steps: int = 100       # linear warm-up, then cosine decay
    grad_clip: float = 1.0        # max global gradient norm (0 = off)
    ema_decay: float = 0.999      # EMA of the weights, used for sampling
    cond_drop_prob: float = 0.1   # Sec. 2.2: the text conditioning dropped 10% of the time (0 = no guidance)
    log_every: int = 100          # steps between log lines / tensorboard scalars
    eval_images: int = 500        # fresh renders per split for the final evaluation (shapes only; 0 = skip)
    eval_seed: int = 3            # their rendering seed (must differ from data.seed)


@dataclass
class PriorTrainConfig:
    clip: str = "runs/clip/ckpt.pt"  # the frozen CLIP (train/clip.py) whose embeddings the prior maps
    data: DataConfig = field(default_factory=DataConfig)
    prior: PriorConfig = field(default_factory=PriorConfig)  # embed_dim, text_width, text_length: from the CLIP
    # Karlo's prior schedule (diffusers' UnCLIPScheduler): cosine betas, the model predicts x_0 (Sec. 2.2)
    schedule: ScheduleConfig = field(default_factory=lambda: ScheduleConfig(beta_schedule="cosine",
                                                                            prediction_type="sample"))
    # the pipeline's default sampling of the prior: DDPM over Karlo's evenly spaced steps ("linspace"), x0_hat
    # clipped to +-5 (in the standardised space) as Karlo's prior scheduler does, guidance 2
    sampler: SamplerConfig = field(default_factory=lambda: SamplerConfig(
        sampler="ddpm", num_inference_steps=25, timestep_spacing="linspace", clip_sample=True,
        clip_sample_range=5.0, guidance_scale=2.0))
    candidates: int = 2           # Sec. 2.2: z_i drawn per caption, the one with the largest <z_i, z_t> kept
    train: PriorTrain = field(default_factory=PriorTrain)


def load_prior(path, device="cpu", use_ema=True):
    """A checkpoint of this script -> (prior in eval mode, its NoiseSchedule, its PriorTrainConfig, the checkpoint)."""
    prior, schedule, ckpt = load_prior_model(path, device, use_ema)
    return prior, schedule, config_from_dict(PriorTrainConfig, ckpt["config"]), ckpt


# ---------------------------------------------------------------- evaluation

@torch.no_grad()
def evaluate(prior, schedule, settings, candidates, clip, tokenizer, num_images, seed, split,
             generator=None):
    """The prior's figures on `num_images` fresh single-object renders of `split` (see the module docstring)."""
    images, captions, attributes = render(num_images, clip.cfg.vision.image_size, seed, split, max_objects=1)
    z_i = embed_images(clip, images)  # (N, E) unit
    tokens, mask, z_t = text_conditions(clip, tokenizer, captions, truncate=True)  # (N, L, W), (N, L), (N, E)
    device = z_i.device
    z_hat = sample_image_embeddings(prior, schedule, Conditioning(tokens=tokens, mask=mask, pooled=z_t), settings,
                                    candidates, generator=generator)  # (N, E) unit
    mean = F.normalize(prior.clip_mean, dim=-1).expand_as(z_i)  # (N, E): the mean unit z_i of the training set
    shuffled = z_i[torch.randperm(len(z_i), generator=torch.Generator().manual_seed(seed)).to(device)]

    def retrieval(queries):  # top-1 image among the renders; a hit agrees with every claim of the caption
        nearest = (queries @ z_i.t()).argmax(1).tolist()  # (N,)
        return sum(caption_holds(c, attributes[j]) for c, j in zip(captions, nearest)) / len(captions)

    cos = lambda a, b: (a * b).sum(-1).mean().item()
    return {"cosine prior": cos(z_hat, z_i), "cosine z_t": cos(z_t, z_i), "cosine train mean": cos(mean, z_i),
            "cosine random pair": cos(shuffled, z_i), "retrieval prior": retrieval(z_hat),
            "retrieval z_t": retrieval(z_t), "retrieval train mean": retrieval(mean)}


def print_evaluation(results, num_images, seed):
    print(f"prior evaluation on {num_images} fresh renders per split (seed {seed}); cosine with the true z_i of each "
          f"caption's own image, and top-1 retrieval among the renders:")
    for split, figures in results.items():
        print(f"  {split:8s} " + " | ".join(f"{k} {v:.3f}" for k, v in figures.items()), flush=True)


# ---------------------------------------------------------------- training

def main(argv=None):
    cfg, config_path = parse_config(PriorTrainConfig, argv, description=__doc__.split("\n")[0])
    tc = cfg.train
    if not 0 <= tc.cond_drop_prob < 1 or cfg.candidates < 1:
        raise ValueError("train.cond_drop_prob must be in [0, 1) and candidates at least 1")
    if tc.eval_images and cfg.data.seed == tc.eval_seed:
        raise ValueError(f"train.eval_seed ({tc.eval_seed}) must differ from data.seed so that the evaluation "
                         f"renders are unseen")
    if cfg.sampler.guidance_scale != 1 and tc.cond_drop_prob == 0:
        raise ValueError(f"sampler.guidance_scale={cfg.sampler.guidance_scale} needs a prior trained with dropped "
                         f"captions; set train.cond_drop_prob > 0 or sampler.guidance_scale=1")
    device = get_device(tc.device)
    clip, tokenizer, clip_cfg = load_clip(cfg.clip, device)  # fails on a bad CLIP before anything is written
    if clip_cfg.vision.image_size != cfg.data.resolution:
        raise ValueError(f"data.resolution ({cfg.data.resolution}) must be the CLIP's image size "
                         f"({clip_cfg.vision.image_size})")
    cfg.prior.embed_dim, cfg.prior.text_width = clip_cfg.embed_dim, clip_cfg.text.width  # FILLED_IN
    cfg.prior.text_length = clip_cfg.text.max_length
    out_dir, resumed = open_run(cfg, config_path, "prior", ("clip", "data", "prior", "schedule"), "prior", FILLED_IN)
    fingerprint = clip_fingerprint(clip)
    if resumed and resumed["clip"]["sha256"] != fingerprint:
        raise ValueError(f"cannot resume: {out_dir / 'ckpt.pt'} was trained on another CLIP than {cfg.clip}")
    ckpt_path = out_dir / "ckpt.pt"
    seed_everything(tc.seed)

    # ---- data: the frozen CLIP's embeddings, computed once
    t0 = time.time()
    data = load_data(cfg.data)
    z_i_all = embed_images(clip, data.images).cpu()  # (N, E) unit image embeddings
    captions = sorted(set(data.captions))
    caption_index = {c: u for u, c in enumerate(captions)}
    tokens_u, mask_u, z_t_u = (x.cpu() for x in text_conditions(clip, tokenizer, captions, truncate=True))
    # (U, L, W), (U, L), (U, E): one row per distinct caption
    row = torch.tensor([caption_index[c] for c in data.captions])  # (N,): image -> its caption's row
    print(f"cached the CLIP embeddings of {len(data)} images and {len(captions)} distinct captions "
          f"({time.time() - t0:.0f}s)", flush=True)

    # ---- model, optimizer, EMA
    prior = DiffusionPrior(cfg.prior).to(device)
    prior.clip_mean.copy_(z_i_all.mean(0))  # the statistics of the normalisation (models/prior.py)
    prior.clip_std.copy_(z_i_all.std(0))
    ema = EMA(prior, tc.ema_decay)
    optimizer = torch.optim.AdamW(prior.parameters(), lr=tc.lr, betas=tc.betas, weight_decay=tc.weight_decay)
    start_step = resume_state(resumed, prior, optimizer, ema, "prior checkpoint weights")
    schedule = NoiseSchedule(cfg.schedule).to(device)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.yaml").write_text(format_config(cfg) + "\n")
    writer = SummaryWriter(str(out_dir / "tensorboard"))
    n_params = sum(p.numel() for p in prior.parameters())
    print(f"{len(data)} pairs, {n_params / 1e6:.2f}M parameters, device {device}, writing to {out_dir}", flush=True)

    def checkpoint(step):
        save_checkpoint(ckpt_path, training_state("prior", cfg, step, prior, optimizer, ema,
                                                  clip={"path": cfg.clip, "sha256": fingerprint}))

    # ---- the loop
    prior.train()
    end = end_step(tc, start_step)
    bar = tqdm(range(start_step, end), initial=start_step, total=tc.steps, desc="prior", dynamic_ncols=True)
    t0 = time.time()
    for step in bar:
        idx = batch_indices(step, tc.batch_size, len(data), tc.seed)  # (B,)
        u = row[idx]
        cond = Conditioning(tokens=tokens_u[u].to(device), mask=mask_u[u].to(device), pooled=z_t_u[u].to(device))
        g = step_generator(tc.seed, step, 0, device)
        x0 = prior.normalise(z_i_all[idx].to(device))  # (B, E)
        t = torch.randint(0, cfg.schedule.num_train_timesteps, (len(idx),), generator=g, device=device)
        noise = torch.randn(x0.shape, generator=g, device=device)
        cond.drop = torch.rand(len(idx), generator=g, device=device) < tc.cond_drop_prob
        set_learning_rate(optimizer, tc, step)
        pred = prior(schedule.q_sample(x0, t, noise), t, cond)  # (B, E)
        loss = F.mse_loss(pred, x0)  # Sec. 2.2: || f_theta(z_i^(t), t, y) - z_i ||^2
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(prior.parameters(), tc.grad_clip if tc.grad_clip > 0 else 1e9)
        optimizer.step()
        ema.update(prior)
        done = step + 1
        if done % tc.log_every == 0 or done == tc.steps:
            lr = optimizer.param_groups[0]["lr"]
            writer.add_scalar("train/loss", loss.item(), done)
            writer.add_scalar("train/lr", lr, done)
            bar.set_postfix(loss=f"{loss.item():.4f}")
            tqdm.write(f"step {done} | loss {loss.item():.4f} | lr {lr:.2e} | grad norm {grad_norm.item():.3f} | "
                       f"{time.time() - t0:.0f}s")
        if done % tc.ckpt_every == 0 or done == end:
            checkpoint(done)
    print(f"saved {ckpt_path} at step {end} of {tc.steps} ({time.time() - t0:.0f}s of training this run)", flush=True)
    if end < tc.steps or cfg.data.dataset != "shapes" or not tc.eval_images:
        writer.close()
        return

    # ---- evaluation through the checkpoint
    prior, schedule, cfg, _ = load_prior(ckpt_path, device)
    g = torch.Generator(device).manual_seed(0)
    results = {name: evaluate(prior, schedule, cfg.sampler, cfg.candidates, clip, tokenizer, tc.eval_images,
                              tc.eval_seed, split, g)
               for split, name in (("train", "heldin"), ("heldout", "heldout"))}
    for split, figures in results.items():
        for k, v in figures.items():
            writer.add_scalar(f"eval_{split}/{k.replace(' ', '_')}", v, end)
    writer.close()
    print_evaluation(results, tc.eval_images, tc.eval_seed)
    return results


if __name__ == "__main__":
    run_cli(main)
