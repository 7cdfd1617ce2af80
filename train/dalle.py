"""Train DALL-E's transformer (models/dalle.py) on the tokens of a frozen dVAE (train/dvae.py).

Paper: Ramesh et al. 2021, "Zero-Shot Text-to-Image Generation", arXiv 2102.12092, Sec. 2.2 and App. B.

    python -m train.dvae --config configs/shapes/dvae.yaml
    python -m train.dalle --config configs/shapes/dalle.yaml          # 16 text + 64 image tokens, K 512

Every training image is turned into its dVAE tokens once, at start (the argmax of the encoder's logits; kept in
memory as the latent U-Net keeps its latents; taken from the dVAE's train_tokens.pt when its decoder phase left the
codes of these very images, from this very encoder, there), and the BPE tokenizer is trained on the captions (or
taken from the checkpoint when resuming). Loss per step (Sec. 2.2): text_loss_weight * CE(text) + (1 - it) * CE(image), the
caption of a fraction train.cond_drop_prob of the rows replaced by the null caption (classifier-free guidance).

Writes into train.out_dir (default runs/<config name>): ckpt.pt (kind "dalle": weights, EMA, tokenizer, the dVAE's
fingerprint and path), config.yaml, tensorboard events (loss, text and image cross-entropy, lr, gradient norm,
sample grids) and samples/step_XXXXXXX.png (train.sample_prompts, two each). `train.resume=auto` continues.
A dVAE whose K or factor does not fit model.image_vocab / model.image_size is refused with one line.

Data parallel: `torchrun --standalone --nproc_per_node N -m train.dalle --config ...` (one process per GPU, or per
core on a CPU): each rank encodes a share of the images' tokens and trains on a share of every batch, and the ranks
average their gradients before each step (train/common.Ranks), so the step is that of the whole batch's mean loss;
the caption dropout is drawn per rank.
"""
import time
from dataclasses import dataclass, field

import torch
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from core.checkpoint import save_checkpoint
from core.config import config_to_dict, format_config, parse_config
from core.images import image_grid
from core.runtime import autocast, get_device, run_cli, seed_everything
from data.dataset import DataConfig, load_data
from models.dalle import DalleConfig, DalleTransformer, check_config as check_model_config
from models.dalle_pipeline import DalleSampling, DallePipeline, check_dvae_fits
from models.dvae import load_dvae, token_fingerprint
from models.tokenizer import BPETokenizer, TokenizerConfig
from train.common import (EMA, Ranks, TrainConfig, batch_indices, end_step, log_grid, open_run, resume_state,
                          set_learning_rate, step_generator, training_state)
from train.dvae import TOKENS_FILE, load_train_tokens


@dataclass
class DalleTrain(TrainConfig):
    steps: int = 2000
    batch_size: int = 64
    lr: float = 1e-3
    warmup_steps: int = 100
    grad_clip: float = 1.0
    weight_decay: float = 0.01
    log_every: int = 100
    ema_decay: float = 0.0        # EMA of the weights (0 = off); sampling uses the EMA when on
    cond_drop_prob: float = 0.1   # rows whose caption becomes the null caption (classifier-free guidance)
    sample_every: int = 500       # steps between sample grids (0 = only at the end)
    sample_prompts: tuple[str, ...] = ("a red circle", "a blue square", "a green triangle", "a yellow star")


@dataclass
class DalleTrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    model: DalleConfig = field(default_factory=DalleConfig)
    dvae: str = "runs/dvae/ckpt.pt"  # the frozen dVAE whose tokens are modelled (train/dvae.py)
    sampling: DalleSampling = field(default_factory=DalleSampling)  # the pipeline's default sampling settings
    train: DalleTrain = field(default_factory=DalleTrain)


FILLED_IN = ("model.text_vocab",)  # set here from the tokenizer


def encode_tokens(dvae, images, device, ranks, batch_size=256):
    """The argmax tokens (N, h, w) of every uint8 image (N, 3, H, W), once, on the CPU (under torchrun each rank
    encodes its share of the batches: Ranks.map_batches)."""
    return ranks.map_batches(lambda idx: dvae.encode(images[idx].to(device).float() / 127.5 - 1), len(images),
                             batch_size, device, "dVAE tokens")


def main(argv=None):
    cfg, config_path = parse_config(DalleTrainConfig, argv, description=__doc__.split("\n")[0])
    check_model_config(cfg.model)
    cfg.sampling.check()
    tc = cfg.train
    if not 0 <= tc.cond_drop_prob < 1:
        raise ValueError(f"train.cond_drop_prob must be in [0, 1), got {tc.cond_drop_prob}")
    dvae, dvae_ckpt = load_dvae(cfg.dvae)  # a bad dVAE fails before the data loads
    check_dvae_fits(dvae, cfg.model, cfg.data.resolution, cfg.dvae)
    fingerprint = token_fingerprint(dvae)  # the tokens' meaning: config and encoder weights
    out_dir, resumed = open_run(cfg, config_path, "dalle", ("data", "tokenizer", "model", "dvae"), "dalle",
                                FILLED_IN)
    if resumed and resumed.get("dvae") != fingerprint:
        raise ValueError(f"cannot resume: {out_dir / 'ckpt.pt'} was trained on the tokens of another dVAE than "
                         f"{cfg.dvae}; give the same dVAE or choose another train.out_dir")
    ckpt_path = out_dir / "ckpt.pt"
    ranks = Ranks(tc.batch_size)  # torchrun: this process's share (rank 0 of 1 otherwise)
    say = print if ranks.is_main else lambda *a, **k: None
    device = get_device(tc.device)
    seed_everything(tc.seed)

    # ---- data: captions tokenized once, images turned into dVAE tokens once
    data = load_data(cfg.data, progress=ranks.is_main)
    if resumed:
        tokenizer = BPETokenizer.from_state_dict(resumed["tokenizer"])
    else:
        tokenizer = BPETokenizer.train(data.captions, cfg.tokenizer.vocab_size, progress=ranks.is_main)
    cfg.model.text_vocab = tokenizer.vocab_size
    all_ids, all_mask = tokenizer(data.captions, max_length=cfg.model.text_length, truncate=True)  # (N, T)
    cut = tokenizer.truncation_report(data.captions, cfg.model.text_length)
    if cut:
        say(cut, flush=True)
    dvae = dvae.to(device)
    t_enc = time.time()
    image_tokens = load_train_tokens(cfg.dvae, fingerprint, cfg.data, len(data))  # the dVAE's own, if it kept them
    how = f"took the dVAE's codes of the {len(data)} images ({TOKENS_FILE} beside {cfg.dvae}):"
    if image_tokens is None:
        image_tokens = encode_tokens(dvae, data.images, device, ranks)
        how = f"encoded {len(data)} images in {time.time() - t_enc:.0f}s:"
    image_tokens = image_tokens.flatten(1)  # (N, h*w)
    say(f"{how} {cfg.model.image_size}x{cfg.model.image_size} tokens, {int(image_tokens.unique().numel())} of "
        f"{cfg.model.image_vocab} codes used", flush=True)

    # ---- model, optimizer, EMA
    model = DalleTransformer(cfg.model).to(device)
    ema = EMA(model, tc.ema_decay) if tc.ema_decay > 0 else None
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "pos" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "pos" not in n)]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": tc.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=tc.lr, betas=tc.betas)
    start_step = resume_state(resumed, model, optimizer, ema, "DALL-E checkpoint weights")
    sample_model = ema.model if ema else model
    writer = None
    if ranks.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.yaml").write_text(format_config(cfg) + "\n")
        writer = SummaryWriter(str(out_dir / "tensorboard"))
    n_params = sum(p.numel() for p in model.parameters())
    say(f"{len(data)} images, {n_params / 1e6:.2f}M parameters, {cfg.model.text_length} text + "
        f"{cfg.model.image_tokens} image tokens, device {device}, {ranks.world} process(es), writing to {out_dir}",
        flush=True)

    def checkpoint(step):
        save_checkpoint(ckpt_path, training_state("dalle", cfg, step, model, optimizer, ema,
                                                  tokenizer=tokenizer.state_dict(), dvae=fingerprint))

    def sample_grid(step):
        pipe = DallePipeline(sample_model.eval(), tokenizer, dvae, cfg.sampling, config_to_dict(cfg.data))
        prompts = [p for p in tc.sample_prompts for _ in range(2)]
        images = pipe(prompts, generator=torch.Generator(device).manual_seed(0), progress=False)
        grid = image_grid(images, nrow=len(images) // 2 if len(images) > 4 else None)
        log_grid(writer, out_dir, "samples", grid, step)
        model.train()

    # ---- the loop
    model.train()
    end = end_step(tc, start_step)
    bar = tqdm(range(start_step, end), initial=start_step, total=tc.steps, desc="dalle", dynamic_ncols=True,
               disable=not ranks.is_main)
    t0 = time.time()
    for step in bar:
        idx = ranks.share(batch_indices(step, tc.batch_size, len(data), tc.seed))  # (B / world,)
        g = step_generator(tc.seed, step, ranks.rank, device)  # the caption dropout of this step
        text = model.text_ids(all_ids[idx].to(device), all_mask[idx].to(device))  # (B, T), pads per position
        drop = torch.rand(len(idx), generator=g, device=device) < tc.cond_drop_prob  # (B,)
        text = torch.where(drop[:, None], model.null_text(len(idx), device), text)
        image = image_tokens[idx].to(device)  # (B, N)
        set_learning_rate(optimizer, tc, step)
        with autocast(device, tc.bf16):
            loss, text_ce, image_ce = model.loss(text, image)  # Sec. 2.2
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        ranks.average_gradients(model)  # torchrun: the gradient of the global batch's mean loss on every rank
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip if tc.grad_clip > 0 else 1e9)
        optimizer.step()
        if ema:
            ema.update(model)

        done = step + 1
        if done % tc.log_every == 0 or done == tc.steps:
            loss, text_ce, image_ce = (ranks.mean(v) for v in (loss, text_ce, image_ce))  # every rank: all-reduce
        if ranks.is_main and (done % tc.log_every == 0 or done == tc.steps):
            lr = optimizer.param_groups[0]["lr"]
            for k, v in (("loss", loss.item()), ("text_ce", text_ce.item()), ("image_ce", image_ce.item()),
                         ("lr", lr), ("grad_norm", grad_norm.item())):
                writer.add_scalar(f"train/{k}", v, done)
            bar.set_postfix(loss=f"{loss.item():.4f}")
            tqdm.write(f"step {done} | loss {loss.item():.4f} | text {text_ce.item():.4f} | image {image_ce.item():.4f}"
                       f" | lr {lr:.2e} | grad norm {grad_norm.item():.3f} | {time.time() - t0:.0f}s")
        if ranks.is_main and (done % tc.ckpt_every == 0 or done in (tc.steps, end)):
            checkpoint(done)
        if ranks.is_main and ((tc.sample_every and done % tc.sample_every == 0) or done == tc.steps):
            sample_grid(done)
    ranks.check_replicas(model)
    if not ranks.is_main:
        ranks.close()
        return
    writer.close()
    print(f"saved {ckpt_path} at step {end} of {tc.steps} ({time.time() - t0:.0f}s of training this run); final "
          f"text loss {text_ce.item():.4f}, image loss {image_ce.item():.4f}", flush=True)
    ranks.close()


if __name__ == "__main__":
    run_cli(main)
