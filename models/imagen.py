"""Imagen's cascade: a text-conditional base model, then super-resolution stages, each a diffusion model of its own.

Papers: Saharia et al. 2022, "Photorealistic Text-to-Image Diffusion Models with Deep Language Understanding"
(Imagen), arXiv 2205.11487: Sec. 2.4 (cascade, noise-conditioning augmentation), Sec. 2.3 (dynamic thresholding),
Sec. 2.5 and App. F (the U-Nets); Ho et al. 2021, "Cascaded Diffusion Models for High Fidelity Image Generation",
arXiv 2106.15282, Sec. 3-4 (conditioning augmentation: Gaussian noise on the low-resolution input).

    prompt -> frozen text encoder -> base (64 px in the paper) -> SR stage 1 (64 -> 256) -> SR stage 2 (256 -> 1024)

Every stage is a train/diffusion.py checkpoint; a super-resolution stage is one trained with `low_res: r` (its
config), whose U-Net reads the r x r image upsampled bilinearly to its own size and concatenated to x_t as 3 more
channels (models/unet.py), plus the augmentation level embedded like a timestep and added to the time embedding.
With `low_res_residual: true` (not Imagen's; SRDiff, Li et al. 2022, arXiv 2104.14951, Sec. 3.2) the stage's diffusion
runs on the residual x_0 - upsample(z) of the clean low-resolution image z, and sampling adds upsample(z) back: the
flat colours and the layout come from the input for free, and the model spends its steps on the edges.

Noise-conditioning augmentation (Imagen Sec. 2.4; Ho et al. 2021 Sec. 4.1): in training, the low-resolution input
z = downsample(x_0) is replaced by q(z_s | z), z_s = sqrt(abar_s) z + sqrt(1 - abar_s) eps', with s drawn per sample
on the augmentation schedule (its own NoiseSchedule, cosine by default as DeepFloyd IF's image_noising_scheduler),
and the model is told s. At sampling the level is fixed: a level a in [0, 1] is the timestep s = round(a (T' - 1)).
The model then learns to ignore detail in z at the noise scale s: the base's artefacts, which a model trained on
clean downsampled images would copy and enlarge (the compounding error of a cascade), look like that noise.

Interpolation: the low-resolution image is made from the high-resolution one by area averaging (a box filter, as the
shapes renderer's supersampling and the Inception resize's antialias), and upsampled back by the U-Net bilinearly
(align_corners=False). Bilinear, not nearest: nearest hands the network a blocky image whose block edges are
artefacts at every factor-th pixel, and bilinear is what DeepFloyd IF's super-resolution pipeline does too
(imagen-pytorch uses the same through its resize_image_to).

The pipeline (ImagenPipeline) keeps the contract of models/pipeline.py; `stage_images` holds every stage's output of
the last call (python -m sample saves them beside the final ones). A stage whose input size differs from the
previous stage's output is refused when the pipeline is built.
"""
import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from core.checkpoint import load_checkpoint
from core.config import config_from_dict
from models.conditioning import Conditioning, guided_prediction
from models.samplers import TIMESTEP_SPACINGS, SamplerConfig, sample
from models.schedule import NoiseSchedule, ScheduleConfig, check_choice
from models.text2image import Text2Image, load_text2image
from models.unet import upsample


def downsample(x, low_res):
    """(B, C, H, H) -> (B, C, low_res, low_res) by area averaging (a box filter over each factor x factor block)."""
    B, C, H, W = x.shape
    if H % low_res or W % low_res:
        raise ValueError(f"images of {H}x{W} cannot be averaged down to {low_res}x{low_res}; the side must be a "
                         f"multiple of {low_res}")
    return F.interpolate(x, size=(H * low_res // W, low_res), mode="area")  # (B, C, h, w)


def aug_timestep(level, num_timesteps):
    """An augmentation level a in [0, 1] -> the timestep round(a (T' - 1)) of the augmentation schedule."""
    if not 0.0 <= level <= 1.0:
        raise ValueError(f"the augmentation level must be in [0, 1] (0 = none; Imagen samples with 0 for FID, "
                         f"0.1-0.3 for looks), got {level}")
    return round(level * (num_timesteps - 1))


def noise_augment(aug_schedule: NoiseSchedule, low_res, s, noise):
    """Imagen Sec. 2.4 / CDM Sec. 4.1: z_s = sqrt(abar_s) z + sqrt(1 - abar_s) eps' (DDPM Eq. 4 on the augmentation
    schedule). low_res (B, C, h, w); s int or (B,) long. Equals diffusers' DDPMScheduler.add_noise (tests)."""
    return aug_schedule.q_sample(low_res, s, noise)


@dataclass
class Stage:
    """One trained stage: its pipeline parts (text encoder, U-Net, schedule, defaults), the side of its low-resolution
    input (0 for the base) and the augmentation schedule it was trained with (None for the base)."""
    pipe: Text2Image
    low_res: int
    aug_schedule: NoiseSchedule | None
    path: str = ""
    residual: bool = False  # it denoises x_0 - upsample(low-res input), and adds the upsample back (SRDiff)

    @property
    def resolution(self):
        return self.pipe.resolution


def load_stage(path, device="cpu", use_ema=True):
    """A train/diffusion.py checkpoint (pixel space) -> Stage."""
    ckpt = load_checkpoint(path, "diffusion")
    config = ckpt["config"]
    if config.get("space", "pixel") != "pixel":
        raise ValueError(f"{path} is a latent diffusion checkpoint; an Imagen cascade is in pixel space")
    pipe = load_text2image(ckpt, device, use_ema=use_ema)
    low_res = config.get("low_res", 0)
    aug = NoiseSchedule(config_from_dict(ScheduleConfig, config["aug_schedule"])).to(device) if low_res else None
    return Stage(pipe, low_res, aug, str(path), bool(config.get("low_res_residual", False)))


@torch.no_grad()
def super_resolve(stage: Stage, prompts, low_res, settings: SamplerConfig, aug_level=0.0, generator=None,
                  truncate=False, progress=True, desc=None):
    """One super-resolution stage: low_res (B, 3, r, r) in [-1, 1] -> (B, 3, R, R), R = the stage's resolution times
    low_res's side / the side it was trained on (it is fully convolutional; crops in training, the whole image here).
    The low-res image is noise-augmented at `aug_level` in [0, 1] and the model told so; noise from `generator`.
    A residual stage samples the residual and returns upsample(low_res) + residual (the clean input's upsample)."""
    if stage.low_res == 0:
        raise ValueError(f"{stage.path} is a base model, not a super-resolution stage (its config has no low_res)")
    pipe, B = stage.pipe, len(prompts)
    if low_res.shape[0] != B or low_res.shape[1] != 3:
        raise ValueError(f"low_res must be ({B}, 3, r, r) for {B} prompts, got {tuple(low_res.shape)}")
    weight = next(pipe.model.unet.parameters())
    device, dtype = weight.device, weight.dtype
    s = aug_timestep(aug_level, stage.aug_schedule.num_train_timesteps)
    low_res = low_res.to(device).float()
    eps = torch.randn(low_res.shape, generator=generator, device=device)
    z_s = noise_augment(stage.aug_schedule, low_res, s, eps)  # (B, 3, r, r)
    ids, mask = pipe.tokenizer(list(prompts), max_length=pipe.model.text_encoder.cfg.max_length, truncate=truncate)
    levels = torch.full((B,), s, dtype=torch.long, device=device)  # (B,)
    cond = pipe.model.encode_text(ids.to(device), mask.to(device), Conditioning(low_res=z_s.to(dtype), aug_level=levels))
    R = low_res.shape[-1] * (stage.resolution // stage.low_res)
    x_T = torch.randn(B, 3, R, R, generator=generator, device=device)  # (B, 3, R, R)
    denoise = lambda x_t, t: guided_prediction(pipe.model.denoise, x_t.to(dtype), t, cond,
                                               settings.guidance_scale).float()
    out = sample(denoise, x_T, pipe.schedule, settings, generator=generator, progress=progress, desc=desc)
    return upsample(low_res, (R, R)) + out if stage.residual else out


# ---------------------------------------------------------------- the pipeline

@dataclass
class ImagenPipelineConfig:
    """configs/shapes/pipeline_imagen.yaml: the stages' checkpoints and how each is sampled (one value per stage)."""
    base: str = "runs/imagen_base/ckpt.pt"   # the text-conditional base model
    sr1: str = "runs/imagen_sr1/ckpt.pt"     # first super-resolution stage (base -> x factor)
    sr2: str = "runs/imagen_sr2/ckpt.pt"     # second super-resolution stage; '' = the cascade ends after sr1
    preset: str = "fast"                     # fast (stops after sr1) | quality | creative; '' = the values below
    steps: tuple = (50, 25, 25)              # DDIM steps of base, sr1, sr2
    guidance: tuple = (3.0, 3.0, 3.0)        # classifier-free guidance scale of each stage
    aug_levels: tuple = (0.0, 0.0)           # noise-conditioning augmentation level of sr1's and sr2's input, in [0, 1]
    spacing: tuple = ("", "", "")            # DDIM timestep spacing per stage: leading | trailing | linspace; '' = the
                                             # stage's own (its config's sampler.timestep_spacing)
    dynamic_threshold: bool = True           # Imagen Sec. 2.3: dynamic thresholding (p = 99.5%) in every stage but
                                             # a residual one (low_res_residual), whose samples are not images;
                                             # false: each stage's own sampler settings (its config's sampler.*)
    device: str = "auto"                     # auto | cpu | cuda | cuda:N | mps


@dataclass
class ImagenSettings:
    """The sampling settings of a cascade: one SamplerConfig per stage that runs, the augmentation level of each SR
    stage's input, and how many stages run (1 = base only, 2 = base + sr1, ...)."""
    stages: tuple                      # SamplerConfig per stage (base first)
    aug_levels: tuple                  # float in [0, 1] per SR stage
    num_stages: int                    # stages run, from the base

    def __str__(self):
        parts = [f"base: {self.stages[0]}"] + [f"sr{i}: {self.stages[i]}, aug level {self.aug_levels[i - 1]}"
                                               for i in range(1, self.num_stages)]
        return "; ".join(parts)


# In the seed-004 spirit: fast stops one stage short of the end (256 px in the paper's cascade), quality runs every
# stage with more steps and stronger guidance, creative every stage with weak guidance and some augmentation.
PRESETS = {
    "fast": {"stop_early": True, "steps": (25, 15, 15)},
    "quality": {"stop_early": False, "steps": (100, 50, 50), "guidance": (5.0, 3.0, 3.0)},
    "creative": {"stop_early": False, "steps": (50, 25, 25), "guidance": (1.5, 1.5, 1.5), "aug_levels": (0.2, 0.2)},
}


class ImagenPipeline:
    """base -> sr1 (-> sr2), joined for sampling; the pipeline contract of models/pipeline.py."""
    family = "imagen"
    presets = PRESETS

    def __init__(self, stages, cfg: ImagenPipelineConfig):
        self.stages, self.cfg = stages, cfg
        base = stages[0]
        if base.low_res:
            raise ValueError(f"base={base.path} is a super-resolution stage (low_res {base.low_res}); give a base model")
        for i in range(1, len(stages)):
            prev, stage = stages[i - 1], stages[i]
            if not stage.low_res:
                raise ValueError(f"sr{i}={stage.path} is a base model, not a super-resolution stage; give one trained "
                                 f"with low_res")
            if stage.low_res != prev.resolution:
                raise ValueError(f"sr{i}={stage.path} takes {stage.low_res} px inputs but the stage before it gives "
                                 f"{prev.resolution} px; give a stage trained with low_res={prev.resolution}")
        n = len(stages)
        for name, values, want in (("steps", cfg.steps, 3), ("guidance", cfg.guidance, 3),
                                   ("aug_levels", cfg.aug_levels, 2), ("spacing", cfg.spacing, 3)):
            if len(values) < min(want, n - (name == "aug_levels")):
                raise ValueError(f"{name} needs one value per stage, got {list(values)}")
        for a in cfg.aug_levels:
            aug_timestep(a, 1000)  # the range check
        for spacing in filter(None, cfg.spacing):  # '' = the stage's own
            check_choice("spacing", spacing, TIMESTEP_SPACINGS)
        self.data = base.pipe.data
        self.settings = self._settings(cfg.steps, cfg.guidance, cfg.aug_levels, n)
        self.stage_images = []

    def _settings(self, steps, guidance, aug_levels, num_stages):
        stages = []
        for i, stage in enumerate(self.stages):
            s = replace(stage.pipe.settings, sampler="ddim", num_inference_steps=int(steps[i]),
                        guidance_scale=float(guidance[i]),
                        timestep_spacing=self.cfg.spacing[i] or stage.pipe.settings.timestep_spacing)
            if self.cfg.dynamic_threshold and not stage.residual:  # a residual is not an image: never thresholded
                s = replace(s, clip_sample=False, thresholding=True, dynamic_thresholding_ratio=0.995,
                            sample_max_value=math.inf)
            stages.append(s)
        return ImagenSettings(tuple(stages), tuple(float(a) for a in aug_levels), num_stages)

    @property
    def resolution(self):
        return self.stages[self.settings.num_stages - 1].resolution

    def check_prompts(self, prompts, truncate=False):
        for stage in self.stages:
            stage.pipe.check_prompts(prompts, truncate=truncate)

    def settings_with(self, preset=None, sampler=None, steps=None, eta=None, guidance=None, spacing=None,
                      dynamic_threshold=False, threshold_ratio=None, threshold_max=None):
        """The config's per-stage values, then the preset's, then the flags' (a flag applies to every stage)."""
        cfg, n = self.cfg, len(self.stages)
        if preset is not None and preset not in PRESETS:
            raise ValueError(f"unknown preset '{preset}'; use one of {', '.join(sorted(PRESETS))}")
        p = PRESETS[preset] if preset else {}
        num = max(1, n - 1) if p.get("stop_early") else n
        out = self._settings(p.get("steps", cfg.steps), p.get("guidance", cfg.guidance),
                             p.get("aug_levels", cfg.aug_levels), num)
        flags = {"sampler": sampler, "num_inference_steps": steps, "eta": eta, "guidance_scale": guidance,
                 "timestep_spacing": spacing}
        flags = {k: v for k, v in flags.items() if v is not None}
        if dynamic_threshold or threshold_ratio is not None or threshold_max is not None:
            if not dynamic_threshold:
                raise ValueError("--threshold-ratio and --threshold-max set dynamic thresholding; add --dynamic-threshold")
            ratio = 0.995 if threshold_ratio is None else threshold_ratio
            cap = math.inf if threshold_max is None else threshold_max
            flags.update(thresholding=True, clip_sample=False, dynamic_thresholding_ratio=ratio, sample_max_value=cap)
        return replace(out, stages=tuple(replace(s, **flags) for s in out.stages))

    @torch.no_grad()
    def __call__(self, prompts, settings=None, generator=None, truncate=False, progress=True):
        """Prompts -> the last stage's pictures (B, 3, R, R) in [-1, 1]; every stage's in self.stage_images."""
        settings = settings or self.settings
        base = self.stages[0]
        images = base.pipe(prompts, settings.stages[0], generator=generator, truncate=truncate, progress=progress,
                           desc=f"base {base.resolution}px")
        self.stage_images = [images.clamp(-1, 1)]
        for i in range(1, settings.num_stages):
            stage = self.stages[i]
            images = super_resolve(stage, prompts, self.stage_images[-1], settings.stages[i],
                                   settings.aug_levels[i - 1], generator, truncate, progress,
                                   desc=f"sr{i} {stage.low_res}->{stage.resolution}px")
            self.stage_images.append(images.clamp(-1, 1))
        self.intermediate = self.stage_images[0]  # what the base made: the small picture the SR stages enlarge
        return self.stage_images[-1]

    def cast(self, dtype):
        for stage in self.stages:
            stage.pipe.cast(dtype)
        return self


def load_imagen(cfg: ImagenPipelineConfig, device="cpu", use_ema=True):
    """The stages a pipeline config names -> ImagenPipeline (stage sizes checked)."""
    paths = [cfg.base, cfg.sr1] + ([cfg.sr2] if cfg.sr2 else [])
    if not cfg.sr1:
        raise ValueError("sr1 is empty; an Imagen cascade needs at least one super-resolution stage")
    return ImagenPipeline([load_stage(p, device, use_ema) for p in paths], cfg)
