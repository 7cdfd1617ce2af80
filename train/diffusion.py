"""Train a text-conditional diffusion model: a U-Net with cross-attention and its text encoder, jointly.

Papers: Ho et al. 2020, "Denoising Diffusion Probabilistic Models", arXiv 2006.11239 (Algorithm 1, the
simple loss Eq. 14); Rombach et al. 2022, arXiv 2112.10752 (text conditioning by cross-attention);
Ho & Salimans 2022, arXiv 2207.12598 (conditioning dropout for classifier-free guidance, Algorithm 1).

    python -m train.diffusion --config configs/shapes/diffusion_pixel.yaml
    python -m train.diffusion --config configs/shapes/diffusion_latent.yaml   # space: latent, vae: <ckpt>
    python -m train.diffusion --config configs/shapes/imagen_sr1.yaml         # low_res: 16, an Imagen SR stage
    torchrun --nproc_per_node 2 -m train.diffusion --config ... train.device=cpu   # DDP (gloo on CPUs)

Writes into train.out_dir (default runs/<config name>): ckpt.pt (atomic, every train.ckpt_every steps and at
the end), config.yaml, tensorboard events (loss, learning rate, gradient norm, sample grids) and
samples/step_XXXXXXX.png. `train.resume=auto` continues from out_dir/ckpt.pt exactly where it stopped: on
the CPU the losses after a resume equal those of an uninterrupted run (tests/test_train_diffusion.py).
The tiny preset ends with a line like `step 3000 | loss 0.0xx | ...` and `saved runs/diffusion_pixel/ckpt.pt`.

Latent diffusion (Rombach et al. 2022, Sec. 3-4): with `space: latent` and `vae: <ckpt>` (train/vae.py) the
model denoises z = scale_factor * (mu + sigma * eps') instead of pixels, where N(mu, sigma^2) is the frozen VAE
encoder's posterior of the image; mu and sigma of every training image are computed once before the loop,
and z is drawn afresh at each step (as LDM's DiagonalGaussianDistribution.sample). The U-Net works at
resolution / factor with the VAE's latent channels; the checkpoint keeps the VAE's path and fingerprint.

unCLIP's decoder (Ramesh et al. 2022, arXiv 2204.06125, Sec. 2.1; models/unclip_decoder.py): with
`image_embed_dim: E` and `text_encoder: clip:<ckpt>` the U-Net also reads the CLIP image embedding z_i of its
training image (computed once with the frozen CLIP's image tower); z_i is dropped with probability
train.image_drop_prob (the paper: 0.1) and, independently, the caption with train.cond_drop_prob (0.5). The
checkpoint keeps the CLIP's fingerprint, so the unclip pipeline refuses a prior trained on another CLIP.
    python -m train.diffusion --config configs/shapes/decoder_unclip.yaml

Super-resolution (Imagen, Saharia et al. 2022, arXiv 2205.11487, Sec. 2.4-2.5; Cascaded Diffusion Models, Ho et al.
2021, arXiv 2106.15282): with `low_res: r` the model is a stage of a cascade (models/imagen.py). Its images are made
per batch (data/crops.py: rendered or read on the fly, train.crop = random crops), z = the image averaged down by
resolution / r, noise-augmented at a level s ~ U{0 .. train.aug_max (T' - 1)} per sample on `aug_schedule`, and given
to the U-Net (unet.low_res_channels = 3) with s. train.aug_max = 0 turns the augmentation off (the ablation).

Loop (Algorithm 1 with conditioning dropout):
    x_0, caption ~ data;  t ~ Uniform{0..T-1};  eps ~ N(0, I)
    x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps                (Eq. 4)
    caption replaced by the null context with probability p_uncond
    loss = || target - model(x_t, t, caption) ||^2              (Eq. 14; target eps, x_0 or v)
           optionally weighted per sample by Min-SNR-gamma          (Hang et al. 2023, arXiv 2303.09556)
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
from data.crops import CropSource
from models.conditioning import Conditioning
from models.imagen import Stage, downsample, noise_augment, super_resolve
from models.samplers import SamplerConfig
from models.schedule import NoiseSchedule, ScheduleConfig
from models.text2image import ModelConfig, Text2Image, build_model, use_frozen_text_encoder, vae_fingerprint
from models.unet import upsample
from models.text_encoder import TextEncoderConfig
from models.tokenizer import BPETokenizer, TokenizerConfig
from models.unet import UNetConfig
from train.common import (EMA, Ranks, TrainConfig, batch_indices, check_train_config, end_step, log_grid,
                          memory_format, open_run, resume_state, set_learning_rate, step_generator, training_state)


@dataclass
class DiffusionTrain(TrainConfig):
    steps: int = 3000             # optimizer steps
    batch_size: int = 64          # global batch, split evenly across DDP ranks
    lr: float = 1e-3              # peak AdamW learning rate
    warmup_steps: int = 100       # linear warm-up, then cosine decay
    min_lr_ratio: float = 0.1     # final learning rate as a fraction of lr
    grad_clip: float = 1.0        # max global gradient norm (0 = off)
    log_every: int = 50           # steps between a log line / tensorboard scalars
    ema_decay: float = 0.999      # EMA of the weights (0 = off); sampling uses the EMA when on
    cond_drop_prob: float = 0.1   # p_uncond: caption replaced by the null context (classifier-free guidance)
    image_drop_prob: float = 0.0  # unCLIP's decoder: z_i replaced by its learned null (the paper: 0.1, the caption 0.5)
    snr_gamma: float = 0.0        # Min-SNR-gamma loss weights (Hang et al. 2023; the paper uses 5); 0 = off, Eq. 14 as is
    snr_plus_one: bool = False    # v-prediction: clamp SNR + 1, not SNR (sd-scripts' variant; see min_snr_weight)
    timesteps: str = "uniform"    # uniform (DDPM Algorithm 1) | logit_normal (SD3 Sec. 3.1; see sample_timesteps)
    logit_mean: float = 0.0       # logit_normal: location m; m > 0 trains the noisier steps more
    logit_std: float = 1.0        # logit_normal: scale s
    uniform_mix: float = 0.0      # logit_normal: this fraction of the steps drawn uniformly instead (a mixture that
                                  # keeps the ends of the range trained; see sample_timesteps)
    sample_every: int = 1000      # steps between sample grids (0 = only at the end)
    sample_steps: int = 25        # DDIM steps for the training-time grids
    sample_prompts: tuple[str, ...] = ("a red circle", "a blue square", "a green triangle", "a yellow star")
    crop: int = 0                 # super-resolution: random crop side at data.resolution (0 = whole images)
    aug_max: float = 1.0          # super-resolution: augmentation level ~ U[0, aug_max] per sample (0 = no augmentation)


@dataclass
class DiffusionConfig:
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    text: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    unet: UNetConfig = field(default_factory=UNetConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    text_encoder: str = "joint"  # joint (transformer) | lstm (bi-LSTM): trained here | clip:<ckpt> | lm:<ckpt>: frozen
                                 # (models/text2image.py)
    space: str = "pixel"         # pixel | latent (denoise the latents of the frozen VAE `vae`)
    image_embed_dim: int = 0     # >0: unCLIP's decoder, also conditioned on the CLIP image embedding z_i of the frozen
                                 # CLIP of text_encoder=clip:<ckpt> (its embed_dim); 0: text only
    vae: str = ""                # latent space: the VAE checkpoint of train/vae.py
    low_res: int = 0             # >0: a super-resolution stage whose input is the image at low_res x low_res (Imagen)
    low_res_residual: bool = False  # super-resolution: denoise x0 - upsample(low-res image) and add the upsample back
                                    # at sampling (SRDiff, arXiv 2104.14951; models/imagen.py)
    # the noise-conditioning augmentation's own schedule (DeepFloyd IF's image_noising_scheduler: cosine, 1000 steps)
    aug_schedule: ScheduleConfig = field(default_factory=lambda: ScheduleConfig(beta_schedule="cosine"))
    # the pipeline's default settings (python -m sample, the metrics): DDIM 50 steps, guidance 3; in pixel space
    # x0_hat is clipped to [-1, 1] as in DDPM's code and diffusers' default (an undertrained model's x0_hat at high
    # noise is far outside the data range)
    sampler: SamplerConfig = field(default_factory=lambda: SamplerConfig(clip_sample=True, guidance_scale=3.0))
    train: DiffusionTrain = field(default_factory=DiffusionTrain)


def check_config(cfg):
    if cfg.space not in ("pixel", "latent"):
        raise ValueError(f"space must be pixel or latent, got '{cfg.space}'")
    if cfg.space == "pixel":
        if cfg.vae:
            raise ValueError(f"vae is set ({cfg.vae}) but space is pixel; set space=latent or drop vae")
        if cfg.unet.image_size != cfg.data.resolution:
            raise ValueError(f"unet.image_size ({cfg.unet.image_size}) must equal data.resolution "
                             f"({cfg.data.resolution}) in pixel space; set both")
    else:
        if not cfg.vae:
            raise ValueError("space is latent but no VAE is given; pass vae=runs/vae/ckpt.pt (made by train.vae)")
        if cfg.sampler.clip_sample or cfg.sampler.thresholding:
            raise ValueError("latents are not bounded to [-1, 1]; set sampler.clip_sample=false and "
                             "sampler.thresholding=false for space=latent")
    check_train_config(cfg.train)
    if cfg.image_embed_dim and not cfg.text_encoder.startswith("clip:"):
        raise ValueError(f"image_embed_dim={cfg.image_embed_dim} (unCLIP's decoder) reads its CLIP's embeddings: set "
                         f"text_encoder=clip:<the CLIP checkpoint>")
    if cfg.train.image_drop_prob and not cfg.image_embed_dim:
        raise ValueError("train.image_drop_prob drops unCLIP's image embedding; set image_embed_dim or drop it")
    if cfg.low_res and cfg.image_embed_dim:
        raise ValueError("a super-resolution stage (low_res) reads the low-res image, not CLIP image embeddings; set "
                         "image_embed_dim=0 or low_res=0")
    if cfg.low_res:
        check_super_resolution_config(cfg)
    elif cfg.unet.low_res_channels or cfg.train.crop or cfg.low_res_residual:
        raise ValueError("unet.low_res_channels, train.crop and low_res_residual are for super-resolution stages; set "
                         "low_res (the input side) or drop them")
    if not 0 <= cfg.train.ema_decay < 1:
        raise ValueError(f"train.ema_decay must be in [0, 1) (0 = no EMA: sampling uses the trained weights), got "
                         f"{cfg.train.ema_decay}")
    if cfg.train.timesteps not in ("uniform", "logit_normal") or cfg.train.logit_std <= 0:
        raise ValueError(f"train.timesteps must be uniform or logit_normal (with train.logit_std > 0), got "
                         f"'{cfg.train.timesteps}' (logit_std {cfg.train.logit_std})")
    if not 0 <= cfg.train.uniform_mix <= 1:
        raise ValueError(f"train.uniform_mix is the fraction of uniform timesteps, in [0, 1]; got "
                         f"{cfg.train.uniform_mix}")
    if cfg.train.snr_gamma:  # fails here, not after the data is loaded
        NoiseSchedule(cfg.schedule).min_snr_weight(torch.zeros(1, dtype=torch.long), cfg.train.snr_gamma,
                                                   cfg.train.snr_plus_one)


def check_super_resolution_config(cfg):
    R, r, c = cfg.data.resolution, cfg.low_res, cfg.train.crop or cfg.data.resolution
    factor = cfg.unet.patch_size * 2 ** (len(cfg.unet.channel_mult) - 1)  # the U-Net's sides must divide by it
    if cfg.space != "pixel":
        raise ValueError("a super-resolution stage (low_res > 0) works in pixel space; set space=pixel")
    if r >= R or R % r:
        raise ValueError(f"low_res ({r}) must divide data.resolution ({R}) and be smaller; e.g. low_res={R // 4}")
    if cfg.unet.low_res_channels != 3:
        raise ValueError(f"a super-resolution stage needs unet.low_res_channels=3 (got {cfg.unet.low_res_channels})")
    if c > R:
        raise ValueError(f"train.crop={c} is larger than the images (data.resolution={R}); set train.crop <= {R}")
    if c % (R // r) or c % factor:
        raise ValueError(f"train.crop={c} must be a multiple of the upsampling factor {R // r} and of the U-Net's "
                         f"{factor}; e.g. train.crop={R // 2}")
    if not 0.0 <= cfg.train.aug_max <= 1.0:
        raise ValueError(f"train.aug_max must be in [0, 1] (0 = no augmentation), got {cfg.train.aug_max}")
    if cfg.low_res_residual and (cfg.sampler.clip_sample or cfg.sampler.thresholding):
        raise ValueError("a residual stage (low_res_residual) samples x0 - upsample(low-res), which is not an image in "
                         "[-1, 1]; set sampler.clip_sample=false and sampler.thresholding=false")


def sample_timesteps(tc, num_timesteps, n, generator, device):
    """Training timesteps (n,). uniform: t ~ U{0..T-1} (DDPM Algorithm 1). logit_normal: Esser et al. 2024,
    "Scaling Rectified Flow Transformers for High-Resolution Image Synthesis" (SD3), arXiv 2403.03206, Sec. 3.1:
    u ~ N(m, s^2), t = floor(sigmoid(u) T), which puts the training steps in the middle of the noise range (m > 0
    shifts them to the noisy end, where the layout, and so the prompt's shape, is decided) and, unlike a loss
    weight, spends the compute there instead of scaling the gradient down elsewhere.
    The density is near 0 at both ends (m -0.5: t > 0.95 T in 0.03% of the draws); where the steps there matter (the
    global layout, e.g. a picture's background colour, is decided at the noisiest steps), `uniform_mix` p draws each
    step uniformly with probability p: the mixture (1 - p) logit-normal + p uniform, at least p / T per step."""
    if tc.timesteps == "uniform":
        return torch.randint(0, num_timesteps, (n,), generator=generator, device=device)
    u = tc.logit_mean + tc.logit_std * torch.randn(n, generator=generator, device=device)  # (n,)
    t = (torch.sigmoid(u) * num_timesteps).long().clamp(max=num_timesteps - 1)  # (n,)
    if tc.uniform_mix > 0:  # drawn only then: runs without the mixture keep their random stream
        pick = torch.rand(n, generator=generator, device=device) < tc.uniform_mix  # (n,)
        t = torch.where(pick, torch.randint(0, num_timesteps, (n,), generator=generator, device=device), t)
    return t


def check_latent_config(cfg, vae_cfg):
    """The U-Net's input must be the VAE's latent: channels and resolution / factor."""
    factor, ch = vae_cfg.factor, vae_cfg.latent_channels
    size = cfg.data.resolution // factor
    if cfg.data.resolution % factor or cfg.unet.image_size != size:
        raise ValueError(f"unet.image_size ({cfg.unet.image_size}) must be data.resolution / the VAE's factor "
                         f"({cfg.data.resolution} / {factor}); set unet.image_size={size}")
    if cfg.unet.in_channels != ch or cfg.unet.out_channels != ch:
        raise ValueError(f"unet.in_channels and unet.out_channels ({cfg.unet.in_channels}, {cfg.unet.out_channels}) "
                         f"must equal the VAE's latent_channels ({ch}); set both to {ch}")


def encode_latents(vae, data, device, ranks, batch_size=256, progress=True):
    """The VAE posterior of every image, once: mean and std (N, c, h, w) on the CPU (under torchrun each rank
    encodes its share of the batches: Ranks.map_batches)."""
    def encode(idx):
        posterior = vae.encode(data.batch(idx)[0].to(device))
        return torch.stack([posterior.mean.float(), posterior.std.float()], 1)  # (b, 2, c, h, w)

    return ranks.map_batches(encode, len(data), batch_size, device, "encoding latents", progress).unbind(1)


def main(argv=None):
    cfg, config_path = parse_config(DiffusionConfig, argv, description=__doc__.split("\n")[0])
    check_config(cfg)
    vae = None
    if cfg.space == "latent":  # fail on a bad VAE before the data loads
        from models.vae import load_vae
        vae, scale_factor, vae_cfg = load_vae(cfg.vae, "cpu")
        check_latent_config(cfg, vae_cfg)
        fingerprint = vae_fingerprint(vae, scale_factor)
    frozen = use_frozen_text_encoder(cfg)  # None for joint and lstm; else the encoder, its tokenizer, its sizes in cfg.text
    clip = None
    if cfg.image_embed_dim:  # unCLIP's decoder: the whole CLIP, for the image embeddings of the training images
        from models.clip import clip_fingerprint, embed_images, load_clip
        clip, _, clip_cfg = load_clip(cfg.text_encoder.partition(":")[2])
        if clip_cfg.embed_dim != cfg.image_embed_dim:
            raise ValueError(f"image_embed_dim ({cfg.image_embed_dim}) must be the CLIP's embed_dim "
                             f"({clip_cfg.embed_dim}); set image_embed_dim={clip_cfg.embed_dim}")
        clip_print = {"path": cfg.text_encoder.partition(":")[2], "sha256": clip_fingerprint(clip)}
    tc = cfg.train
    fixed = ("data", "tokenizer", "text", "unet", "schedule", "text_encoder", "space", "image_embed_dim", "low_res",
             "low_res_residual", "aug_schedule")  # (train and sampler may change)
    out_dir, resumed = open_run(cfg, config_path, "diffusion", fixed, "diffusion")
    if resumed and vae is not None and resumed.get("vae") != fingerprint:
        raise ValueError(f"cannot resume: {out_dir / 'ckpt.pt'} was trained on the latents of another VAE than "
                         f"{cfg.vae}; give the same VAE or choose another train.out_dir")
    ckpt_path = out_dir / "ckpt.pt"
    ranks = Ranks(tc.batch_size)  # torchrun: this process's share (rank 0 of 1 otherwise)
    rank, world, is_main = ranks.rank, ranks.world, ranks.is_main
    device = get_device(tc.device)
    seed_everything(tc.seed)

    # ---- data: images in memory, captions tokenized once
    data = CropSource(cfg.data, cfg.train.crop) if cfg.low_res else load_data(cfg.data, progress=is_main)
    if resumed:
        tokenizer = BPETokenizer.from_state_dict(resumed["tokenizer"])
    elif frozen:
        tokenizer = frozen["tokenizer"]
    else:
        tokenizer = BPETokenizer.train(data.captions, cfg.tokenizer.vocab_size, progress=is_main)
    all_ids, all_mask = tokenizer(data.captions, max_length=cfg.text.max_length, truncate=True)  # (N, L)
    cut = tokenizer.truncation_report(data.captions, cfg.text.max_length)
    if cut and is_main:
        print(cut, flush=True)
    if vae is not None:
        vae = vae.to(device)
        latent_mean, latent_std = encode_latents(vae, data, device, ranks)
        if is_main:
            print(f"encoded {len(data)} images to {tuple(latent_mean.shape[1:])} latents; scale factor "
                  f"{scale_factor:.4f} (scaled latent std {(latent_mean * scale_factor).std():.3f})", flush=True)

    if clip is not None:
        image_embeds = embed_images(clip.to(device), data.images).cpu()  # (N, E) unit z_i, computed once
        del clip
        if is_main:
            print(f"cached the CLIP image embeddings of {len(data)} images", flush=True)

    # ---- model, optimizer, EMA
    model_cfg = ModelConfig(cfg.tokenizer, cfg.text, cfg.unet, cfg.schedule, cfg.text_encoder,
                            image_embed_dim=cfg.image_embed_dim)
    model = build_model(model_cfg, tokenizer.vocab_size, frozen).to(device)
    layout = memory_format(tc, model)  # train.channels_last
    ema = EMA(model, tc.ema_decay) if tc.ema_decay > 0 else None
    optimizer = torch.optim.AdamW(model.parameters(), lr=tc.lr, betas=tc.betas, weight_decay=tc.weight_decay)
    start_step = resume_state(resumed, model, optimizer, ema, "diffusion checkpoint weights")
    if frozen:  # the frozen encoder's outputs for the training captions, computed once
        n_cached = model.text_encoder.cache_outputs(all_ids, all_mask)
        print(f"cached the frozen text encoder's outputs for {n_cached} distinct captions", flush=True)
    ddp_model = ranks.wrap(model)
    schedule = NoiseSchedule(cfg.schedule).to(device)
    aug_schedule = NoiseSchedule(cfg.aug_schedule).to(device) if cfg.low_res else None
    n_params = sum(p.numel() for p in model.parameters())

    writer = None
    if is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.yaml").write_text(format_config(cfg) + "\n")
        writer = SummaryWriter(str(out_dir / "tensorboard"))
        print(f"{len(data)} images, {n_params / 1e6:.2f}M parameters, device {device}, {world} process(es), "
              f"writing to {out_dir}", flush=True)

    def checkpoint(step):
        save_checkpoint(ckpt_path, training_state("diffusion", cfg, step, model, optimizer, ema,
                                                  tokenizer=tokenizer.state_dict(),
                                                  **({"vae": fingerprint} if vae is not None else {}),
                                                  **({"clip": clip_print} if cfg.image_embed_dim else {})))

    def sample_grid(step):
        sampler = SamplerConfig(**{**cfg.sampler.__dict__, "num_inference_steps": tc.sample_steps})
        g = torch.Generator(device).manual_seed(0)
        prompts = [p for p in tc.sample_prompts for _ in range(2)]
        pipe = Text2Image(ema.model if ema else model, tokenizer, schedule, model_cfg, sampler,
                          config_to_dict(cfg.data), vae, scale_factor if vae is not None else 1.0)
        if cfg.low_res:  # rows: the low-res input (upsampled), the model's output, the ground truth
            truth = data.whole(range(4)).to(device)  # (4, 3, R, R)
            stage = Stage(pipe, cfg.low_res, aug_schedule, residual=cfg.low_res_residual)
            low = downsample(truth, cfg.low_res)  # (4, 3, r, r)
            out = super_resolve(stage, data.captions[:4], low, sampler, 0.0, g, truncate=True, progress=False)
            up = upsample(low, out.shape[-2:])
            images = torch.cat([up.clamp(-1, 1), out.clamp(-1, 1), truth]).cpu()
        else:
            embeds = None
            if cfg.image_embed_dim:  # unCLIP's decoder: the first training images' z_i with their captions, twice each
                n = len(tc.sample_prompts)
                prompts = [data.captions[i] for i in range(n) for _ in range(2)]
                embeds = image_embeds[torch.arange(n).repeat_interleave(2)]  # (2n, E)
            images = pipe(prompts, generator=g, progress=False, truncate=True, image_embed=embeds)
        grid = image_grid(images, nrow=len(images) // 2 if len(images) > 4 else None)
        log_grid(writer, out_dir, "samples", grid, step)

    # ---- the loop
    local_batch = tc.batch_size // world
    model.train()
    end = end_step(tc, start_step)
    bar = tqdm(range(start_step, end), initial=start_step, total=tc.steps, disable=not is_main,
               desc="diffusion", dynamic_ncols=True)
    t0 = time.time()
    for step in bar:
        idx = ranks.share(batch_indices(step, tc.batch_size, len(data), tc.seed))  # (B/world,)
        ids, mask = all_ids[idx].to(device), all_mask[idx].to(device)  # (b, L)
        # noise, timesteps and conditioning dropout are drawn from a generator seeded by (seed, step, rank),
        # so the run is a function of its seed, whatever the resumption points
        g = step_generator(tc.seed, step, rank, device)
        if cfg.low_res:  # crops made now (data/crops.py), offsets from a CPU generator of (seed, step, rank)
            x0 = data.batch(idx, torch.Generator().manual_seed(tc.seed * 1_000_003 + step * 1009 + rank))[0].to(device)
        elif vae is None:
            x0 = data.batch(idx)[0].to(device)  # (b, 3, H, W) in [-1, 1]
        else:  # z ~ N(mu, sigma^2) of the frozen encoder, scaled to unit variance (LDM Sec. 4.3.2)
            mean, std = latent_mean[idx].to(device), latent_std[idx].to(device)  # (b, c, h, w)
            x0 = scale_factor * (mean + std * torch.randn(mean.shape, generator=g, device=device))
        t = sample_timesteps(tc, cfg.schedule.num_train_timesteps, local_batch, g, device)  # (b,)
        noise = torch.randn(x0.shape, generator=g, device=device)
        drop = torch.rand(local_batch, generator=g, device=device) < tc.cond_drop_prob
        cond, drops = Conditioning(drop=drop), {}
        if cfg.image_embed_dim:  # unCLIP Sec. 2.1: z_i and the caption dropped independently
            drop_image = torch.rand(local_batch, generator=g, device=device) < tc.image_drop_prob
            cond = Conditioning(image_embed=image_embeds[idx].to(device))
            drops = {"drop_text": drop, "drop_image": drop_image}
        if cfg.low_res:  # Imagen Sec. 2.4: the low-res input, noised at a random level s that the model is told
            low = downsample(x0, x0.shape[-1] * cfg.low_res // cfg.data.resolution)  # (b, 3, c r / R, c r / R)
            s_max = round(tc.aug_max * (cfg.aug_schedule.num_train_timesteps - 1))
            s = torch.randint(0, s_max + 1, (local_batch,), generator=g, device=device)  # (b,)
            eps_low = torch.randn(low.shape, generator=g, device=device)
            cond = Conditioning(drop=drop, low_res=layout(noise_augment(aug_schedule, low, s, eps_low)), aug_level=s)
            if cfg.low_res_residual:  # SRDiff: the diffusion runs on what the clean input's upsample lacks
                x0 = x0 - upsample(low, x0.shape[-2:])
        set_learning_rate(optimizer, tc, step)
        with autocast(device, tc.bf16):
            x_t = layout(schedule.q_sample(x0, t, noise))  # Eq. 4
            pred = ddp_model(x_t, t, ids, mask, cond, **drops)
            err = (pred.float() - schedule.training_target(x0, noise, t)).pow(2).flatten(1).mean(1)  # (b,) Eq. 14
            if tc.snr_gamma:
                err = err * schedule.min_snr_weight(t, tc.snr_gamma, tc.snr_plus_one)  # Hang et al. Eq. 9
            loss = err.mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip if tc.grad_clip > 0 else 1e9)
        optimizer.step()
        if ema:
            ema.update(model)

        done = step + 1
        loss = ranks.mean(loss)  # the logged loss: the mean over ranks
        if is_main and (done % tc.log_every == 0 or done == tc.steps):
            lr = optimizer.param_groups[0]["lr"]
            writer.add_scalar("train/loss", loss.item(), done)
            writer.add_scalar("train/lr", lr, done)
            writer.add_scalar("train/grad_norm", grad_norm.item(), done)
            bar.set_postfix(loss=f"{loss.item():.4f}")
            tqdm.write(f"step {done} | loss {loss.item():.4f} | lr {lr:.2e} | grad norm {grad_norm.item():.3f} | "
                       f"{time.time() - t0:.0f}s")
        if is_main and (done % tc.ckpt_every == 0 or done in (tc.steps, end)):
            checkpoint(done)
        if is_main and ((tc.sample_every and done % tc.sample_every == 0) or done == tc.steps):
            sample_grid(done)
            model.train()
    ranks.check_replicas(model)  # DDP keeps the replicas identical; check it rather than trust it
    if is_main:
        writer.close()
        print(f"saved {ckpt_path} at step {end} of {tc.steps} ({time.time() - t0:.0f}s this run)", flush=True)
    ranks.close()


if __name__ == "__main__":
    run_cli(main)
