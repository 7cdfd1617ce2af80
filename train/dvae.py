"""Train DALL-E's discrete VAE (models/dvae.py): images -> a grid of tokens from a codebook of K, and back.

Paper: Ramesh et al. 2021, "Zero-Shot Text-to-Image Generation", arXiv 2102.12092, Sec. 2.1, App. A.2-A.3.

    python -m train.dvae --config configs/shapes/dvae.yaml        # 32 px shapes -> 8x8 tokens, K 512

Writes into train.out_dir (default runs/<config name>): ckpt.pt (kind "dvae"; atomic, every train.ckpt_every steps
and at the end), config.yaml, tensorboard events (loss, nll, KL, beta, tau, codebook perplexity of the batch,
learning rate, reconstruction grids) and reconstructions/step_XXXXXXX.png (held-out originals above the
reconstructions from their argmax tokens), and, after a decoder phase, train_tokens.pt (the codes of the training
images that phase decoded; train.dalle takes them instead of encoding the images again). `train.resume=auto`
continues out_dir/ckpt.pt.
At the end it prints, and stores in ckpt.pt (`psnr`, `perplexity`, `codes_used`), the reconstruction PSNR of
held-out images decoded from their argmax tokens and the codebook usage over those tokens: the perplexity
exp(H) of the token histogram and the number of codes used.

Loss per step (-ELB of Eq. 1, per pixel; models/dvae.py):
    z ~ gumbel-softmax(logits, tau)  (hard: one-hot forward, soft gradient: the straight-through variant)
    L = [ sum -log p_logit-Laplace(x | D(z)) + beta * sum KL(q(z | x) || uniform) ] / pixels
    tau:  cosine from loss.tau_start (1) to loss.tau_end (1/16) over loss.tau_steps      (App. A.2)
    beta: cosine from 0 to loss.kl_weight over loss.kl_warmup_steps                   (App. A.2: 6.6 over 5k)
The paper's schedules span 150k updates (tau) and 5k (beta); a run of a few thousand steps scales both to its
length (configs/shapes/dvae.yaml says what was measured).
The last train.decoder_share of the steps (0 = none, the paper) train the decoder alone on the encoder's argmax codes,
    L = -log p_logit-Laplace(x | D(one_hot(argmax q(z | x)))) / pixels,   the encoder frozen,
so that it is trained on the hard codes the transformer's tokens give it at sampling time.

Data parallel: `torchrun --standalone --nproc_per_node N -m train.dvae --config ...` (one process per GPU, or per
core on a CPU) gives each rank its share of the batch and averages the ranks' gradients before every step
(train/common.Ranks). The gumbel noise is drawn per rank, and the diversity term is over each rank's share of the
batch (a term over the whole batch would need an all-reduce inside the loss), so the run depends on the number of
ranks as well as the seed.
"""
import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from core.checkpoint import load_checkpoint, save_checkpoint
from core.config import config_to_dict, format_config, parse_config
from core.images import image_grid
from core.runtime import autocast, get_device, run_cli, seed_everything
from data.dataset import DataConfig, load_data
from models.dvae import DiscreteVAE, DVAEConfig, codebook_usage, cosine_schedule, token_fingerprint
from train.common import (EMA, Ranks, TrainConfig, batch_indices, end_step, log_grid, memory_format, open_run,
                          resume_state, step_generator, stopped_early, training_state, warmup_cosine)


@dataclass
class DVAELossConfig:
    kl_weight: float = 6.6        # beta after warm-up (paper: 6.6)
    kl_warmup_steps: int = 5000   # beta rises from 0 along a cosine over these steps (paper: 5000)
    tau_start: float = 1.0        # gumbel-softmax temperature at step 0 (paper: 1)
    tau_end: float = 1 / 16       # ... and after tau_steps (paper: 1/16)
    tau_steps: int = 150000       # cosine annealing length of the temperature (paper: 150000)
    hard: bool = False            # straight-through: one-hot codes forward, the relaxed gradient backward
    diversity_weight: float = 0.0  # weight of KL(batch-mean posterior || uniform), wav2vec 2.0's diversity loss
                                   # (not in DALL-E; models/dvae.py diversity_penalty): keeps the codebook in use
    diversity_steps: int = 0       # 0 = a constant diversity weight; else it falls to 0 along a cosine over these
                                   # steps: the codebook is spread early, then each posterior may sharpen (the term
                                   # is also lowest when every q(z | x) is uniform, which blurs the codes)
    logit_init_scale: float = 1.0  # the encoder's last conv starts this many times larger: logits that outweigh
                                   # the gumbel noise (std 1.28) from step 0, so codes depend on the image (else
                                   # the decoder learns the mean image and the codebook collapses; dvae.yaml)


@dataclass
class DVAETrain(TrainConfig):
    steps: int = 3000
    batch_size: int = 32
    lr: float = 1e-3
    warmup_steps: int = 50
    log_every: int = 100
    ema_decay: float = 0.0        # EMA of the weights (0 = off); the checkpoint serves the EMA when on
    image_every: int = 500        # steps between reconstruction grids (0 = only at the end)
    eval_images: int = 1000       # held-out images for the final PSNR and codebook usage
    eval_seed: int = 1            # shapes: rendering seed of the held-out images (must differ from data.seed)
    decoder_share: float = 0.0    # the last this share of train.steps train the decoder alone on the encoder's argmax
                                  # codes (DiscreteVAE.decoder_loss; encoder frozen): the one-hot codes it is given at
                                  # sampling time, not the relaxed ones of the joint phase. Not in the paper (dvae.yaml).
                                  # A share, so that a budget or a smoke run that scales train.steps keeps both phases
    decoder_lr: float = 1e-3      # the rate of that phase, constant, with fresh AdamW moments


@dataclass
class DVAETrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    dvae: DVAEConfig = field(default_factory=DVAEConfig)
    loss: DVAELossConfig = field(default_factory=DVAELossConfig)
    train: DVAETrain = field(default_factory=DVAETrain)


def check_config(cfg):
    f = cfg.dvae.factor
    if cfg.data.resolution % f:
        raise ValueError(f"data.resolution ({cfg.data.resolution}) must be divisible by the dVAE's factor {f} "
                         f"(2**(dvae.group_count - 1)); change one of them")
    lc = cfg.loss
    if not (lc.tau_start > 0 and lc.tau_end > 0) or lc.kl_weight < 0 or lc.tau_steps < 0 or lc.kl_warmup_steps < 0:
        raise ValueError("loss.tau_start and loss.tau_end must be > 0, loss.kl_weight, loss.tau_steps and "
                         "loss.kl_warmup_steps >= 0")
    if cfg.dvae.vocab_size < 2 or cfg.dvae.n_hid % 4 or cfg.dvae.group_count < 1 or cfg.dvae.n_blk_per_group < 1:
        raise ValueError("dvae.vocab_size must be at least 2, dvae.n_hid divisible by 4, dvae.group_count and "
                         "dvae.n_blk_per_group at least 1")
    if cfg.train.eval_images < 1:
        raise ValueError("train.eval_images must be at least 1")
    if not 0 <= cfg.train.decoder_share < 1:
        raise ValueError(f"train.decoder_share ({cfg.train.decoder_share}) must be in [0, 1): the share of the steps "
                         f"that train the decoder alone (the joint phase needs the rest)")
    if cfg.data.dataset == "shapes" and cfg.train.eval_seed == cfg.data.seed:
        raise ValueError(f"train.eval_seed ({cfg.train.eval_seed}) must differ from data.seed so that the held-out "
                         f"images are unseen")


def learning_rate(tc: DVAETrain, step):
    """train.lr along a warm-up and cosine over the joint phase (train.decoder_share = 0: train.common's
    set_learning_rate schedule), then train.decoder_lr, constant, over the decoder phase."""
    joint = joint_steps(tc)
    if step < joint:
        return tc.lr * warmup_cosine(step, tc.warmup_steps, joint, tc.min_lr_ratio)
    return tc.decoder_lr


def joint_steps(tc: DVAETrain):
    """The steps of the joint phase: train.steps less the decoder phase's round(share * steps), at least 1."""
    return max(1, tc.steps - round(tc.decoder_share * tc.steps))


def make_optimizer(model, tc: DVAETrain, decoder_phase):
    """AdamW over every parameter (the joint phase), or over the decoder's alone (the decoder phase)."""
    params = model.decoder.parameters() if decoder_phase else model.parameters()
    return torch.optim.AdamW(params, lr=tc.lr, betas=tc.betas, weight_decay=tc.weight_decay)


def to_float(images_uint8, device):
    return images_uint8.to(device).float() / 127.5 - 1  # (B, 3, H, W) in [-1, 1]


def encode_codes(model, images, device, layout, ranks, batch_size=256):
    """The encoder's argmax codes (N, h, w) of every training image (uint8), on the CPU: what the decoder phase
    decodes, computed once since the encoder no longer changes, so that each step runs the decoder alone (under
    torchrun each rank encodes its share, Ranks.map_batches)."""
    return ranks.map_batches(lambda idx: model.encode(layout(to_float(images[idx], device))), len(images), batch_size,
                             device, "dVAE codes")


TOKENS_FILE = "train_tokens.pt"  # beside the dVAE's ckpt.pt: its codes of the training images (train/dalle.py reads)


def save_train_tokens(out_dir, model, data_cfg, codes):
    """Keep the decoder phase's codes (N, h, w) of the training images beside the checkpoint, atomically, with what
    they depend on: the encoder that computed them (token_fingerprint) and the data config. train.dalle takes them
    instead of encoding the same images again (35 s at the tiny preset)."""
    dtype = torch.int16 if model.cfg.vocab_size <= torch.iinfo(torch.int16).max else torch.int32
    save_checkpoint(Path(out_dir) / TOKENS_FILE, {"kind": "dvae_tokens", "dvae": token_fingerprint(model),
                                                  "data": config_to_dict(data_cfg), "tokens": codes.to(dtype)})


def load_train_tokens(dvae_path, fingerprint, data_cfg, n):
    """The codes (n, h, w) that save_train_tokens kept beside the dVAE checkpoint dvae_path, or None where there are
    none or they belong to another encoder (fingerprint: token_fingerprint of the dVAE loaded from dvae_path), other
    data or another number of images."""
    path = Path(dvae_path).parent / TOKENS_FILE
    if not path.is_file():
        return None
    kept = load_checkpoint(path, "dvae_tokens")
    if kept["dvae"] != fingerprint or kept["data"] != config_to_dict(data_cfg) or len(kept["tokens"]) != n:
        return None
    return kept["tokens"].long()


@torch.no_grad()
def evaluate(model, images, device, batch_size=250):
    """Held-out PSNR of decode(argmax tokens) ([0, 1] range, mean over images) and (perplexity, codes used) of
    those tokens."""
    values, tokens = [], []
    for i in range(0, len(images), batch_size):
        x = to_float(images[i: i + batch_size], device)
        t = model.encode(x)  # (b, h, w)
        rec = model.decode(t)  # (b, 3, H, W)
        mse = ((rec - x) / 2).pow(2).flatten(1).mean(1)  # (b,)
        values.append(10 * torch.log10(1 / mse.clamp_min(1e-10)))
        tokens.append(t.cpu())
    perplexity, used = codebook_usage(torch.cat(tokens), model.cfg.vocab_size)
    return torch.cat(values).mean().item(), perplexity, used


def main(argv=None):
    cfg, config_path = parse_config(DVAETrainConfig, argv, description=__doc__.split("\n")[0])
    check_config(cfg)
    tc, lc = cfg.train, cfg.loss
    out_dir, resumed = open_run(cfg, config_path, "dvae", ("data", "dvae", "loss"), "dvae")
    joint = joint_steps(tc)
    # a checkpoint saved inside the decoder phase holds the decoder phase's optimizer (one saved at its first step,
    # the joint phase's); train.* may change on resuming, but not so that the step moves to the other phase
    resumed_in_decoder_phase = resumed is not None and resumed["step"] > joint
    if resumed is not None:
        optimized = [k for k in resumed["model"] if k.startswith("decoder.") or not resumed_in_decoder_phase]
        if len(resumed["optimizer"]["param_groups"][0]["params"]) != len(optimized):
            raise ValueError(f"cannot resume: the checkpoint at step {resumed['step']} was saved in the other phase "
                             f"than train.decoder_share={tc.decoder_share} puts that step in (joint phase: the first "
                             f"{joint} steps); resume with the train.steps and train.decoder_share it was trained "
                             f"with (nothing was overwritten)")
    ckpt_path = out_dir / "ckpt.pt"
    ranks = Ranks(tc.batch_size)  # torchrun: this process's share (rank 0 of 1 otherwise)
    device = get_device(tc.device)
    seed_everything(tc.seed)

    # ---- data: training images in memory; held-out images rendered with another seed (or split off)
    images = load_data(cfg.data, progress=ranks.is_main).images  # (N, 3, H, W) uint8
    if cfg.data.dataset == "shapes":
        eval_images = load_data(dataclasses.replace(cfg.data, seed=tc.eval_seed, num_images=tc.eval_images),
                                progress=False).images
    else:
        if len(images) < tc.eval_images + tc.batch_size:
            raise ValueError(f"{len(images)} images are too few to hold out train.eval_images={tc.eval_images} and "
                             f"still fill a batch of {tc.batch_size}; lower train.eval_images")
        images, eval_images = images[:-tc.eval_images], images[-tc.eval_images:]
    N = len(images)
    if N < tc.batch_size:
        raise ValueError(f"{N} training images are fewer than train.batch_size={tc.batch_size}")

    # ---- model, optimizer, EMA
    model = DiscreteVAE(cfg.dvae).to(device)
    with torch.no_grad():
        model.encoder.blocks.output.conv.w.mul_(lc.logit_init_scale)
    layout = memory_format(tc, model)  # train.channels_last
    ema = EMA(model, tc.ema_decay) if tc.ema_decay > 0 else None
    optimizer = make_optimizer(model, tc, decoder_phase=resumed_in_decoder_phase)
    start_step = resume_state(resumed, model, optimizer, ema, "dVAE checkpoint weights")
    eval_model = ema.model if ema else model

    f, K = cfg.dvae.factor, cfg.dvae.vocab_size
    h = cfg.data.resolution // f
    writer = None
    if ranks.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.yaml").write_text(format_config(cfg) + "\n")
        writer = SummaryWriter(str(out_dir / "tensorboard"))
        print(f"{N} training images, {len(eval_images)} held-out, "
              f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, factor {f} ({h}x{h} tokens of "
              f"K {K}), device {device}, {ranks.world} process(es), writing to {out_dir}", flush=True)

    def checkpoint(step, **extra):
        save_checkpoint(ckpt_path, training_state("dvae", cfg, step, model, optimizer, ema, **extra))

    def reconstruction_grid(step):
        eval_model.eval()
        with torch.no_grad():
            x = to_float(eval_images[:8], device)  # (8, 3, H, W)
            rec = eval_model.decode(eval_model.encode(x))
        grid = image_grid(torch.cat([x, rec]), nrow=len(x))  # originals above reconstructions
        log_grid(writer, out_dir, "reconstructions", grid, step)
        model.train()

    # ---- the loop
    model.train()
    end = end_step(tc, start_step)
    bar = tqdm(range(start_step, end), initial=start_step, total=tc.steps, desc="dvae", dynamic_ncols=True,
               disable=not ranks.is_main)
    t0 = time.time()
    codes = None
    for step in bar:
        idx = ranks.share(batch_indices(step, tc.batch_size, N, tc.seed))  # (B / world,)
        x = layout(to_float(images[idx], device))  # (b, 3, H, W)
        g = step_generator(tc.seed, step, ranks.rank, device)  # the gumbel noise of this step, on this rank
        tau = cosine_schedule(step, lc.tau_steps, lc.tau_start, lc.tau_end)    # App. A.2
        beta = cosine_schedule(step, lc.kl_warmup_steps, 0.0, lc.kl_weight)   # App. A.2
        diversity = (cosine_schedule(step, lc.diversity_steps, lc.diversity_weight, 0.0) if lc.diversity_steps
                     else lc.diversity_weight)
        decoder_phase = step >= joint
        if step == joint:  # the decoder phase starts with fresh moments (measured: continuing the joint
            optimizer = make_optimizer(model, tc, decoder_phase=True)  # phase's moments gained no shape; dvae.yaml)
        if decoder_phase and codes is None:  # the frozen encoder's codes of every training image, once
            codes = encode_codes(model, images, device, layout, ranks)  # (N, h, w)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(tc, step)
        with autocast(device, tc.bf16):
            if decoder_phase:  # -log p(x | D(argmax codes)) per pixel; the encoder's parameters get no gradient
                loss, parts = model.decoder_loss(x, codes[idx].to(device))
            else:  # -ELB (Eq. 1) per pixel
                loss, parts = model(x, tau, beta, hard=lc.hard, generator=g, diversity=diversity)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        ranks.average_gradients(model)  # torchrun: every rank steps with the mean of the ranks' gradients
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip if tc.grad_clip > 0 else 1e9)
        optimizer.step()
        if ema:
            ema.update(model)

        done = step + 1
        if ranks.is_main and (done % tc.log_every == 0 or done == tc.steps):  # rank 0's share of the batch
            batch_ppl, batch_used = codebook_usage(parts["tokens"] if decoder_phase else parts["logits"].argmax(1), K)
            mse = ((parts["rec"].detach() - x) / 2).pow(2).mean().item()
            scalars = {"loss": loss.item(), "nll": parts["nll"].item(), "batch_perplexity": batch_ppl,
                       "batch_codes_used": batch_used, "lr": optimizer.param_groups[0]["lr"],
                       "grad_norm": grad_norm.item()}
            if decoder_phase:
                phase = "decoder on argmax codes | psnr(hard)"
            else:
                scalars.update(kl=parts["kl"].item(), beta=beta, diversity=parts["diversity"].item(), tau=tau)
                phase = (f"kl {parts['kl'].item():.3f} | div {parts['diversity'].item():.2f} | beta {beta:.3f} | "
                         f"tau {tau:.3f} | psnr(soft)")
            for k, v in scalars.items():
                writer.add_scalar(f"train/{k}", v, done)
            bar.set_postfix(loss=f"{loss.item():.4f}")
            tqdm.write(f"step {done} | loss {loss.item():.4f} | nll {parts['nll'].item():.4f} | {phase} "
                       f"{10 * np.log10(1 / max(mse, 1e-10)):.2f} | batch codes {batch_used} (ppl {batch_ppl:.1f}) | "
                       f"{time.time() - t0:.0f}s")
        if ranks.is_main and ((tc.image_every and done % tc.image_every == 0) or done == tc.steps):
            reconstruction_grid(done)
        if ranks.is_main and (done % tc.ckpt_every == 0 or done == end):
            checkpoint(done)
    train_time = time.time() - t0
    ranks.check_replicas(model)
    ranks.close()
    if not ranks.is_main:
        return

    if stopped_early(writer, ckpt_path, end, tc, train_time):
        return

    # ---- held-out reconstruction and codebook usage, with the weights the checkpoint serves
    eval_model.eval()
    value, perplexity, used = evaluate(eval_model, eval_images, device)
    checkpoint(tc.steps, psnr=value, perplexity=perplexity, codes_used=used)
    if codes is not None:  # the decoder phase's codes, from this run's (frozen) encoder
        save_train_tokens(out_dir, model, cfg.data, codes)
    for k, v in (("psnr", value), ("perplexity", perplexity), ("codes_used", used)):
        writer.add_scalar(f"eval/{k}", v, tc.steps)
    writer.close()
    print(f"saved {ckpt_path} at step {tc.steps} ({train_time:.0f}s of training this run)", flush=True)
    print(f"PSNR {value:.2f} dB on {len(eval_images)} held-out images (decoded from their argmax tokens)", flush=True)
    print(f"codebook: perplexity {perplexity:.1f}, {used} of {K} codes used over the held-out tokens", flush=True)


if __name__ == "__main__":
    run_cli(main)
