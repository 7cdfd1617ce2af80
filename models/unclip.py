"""The unCLIP (DALL-E 2) pipeline: CLIP text tower -> diffusion prior -> decoder, and what only unCLIP can do with
the image embedding in the middle: variations of an image, interpolations between two images or two prompts.

Paper: Ramesh et al. 2022, "Hierarchical Text-Conditional Image Generation with CLIP Latents", arXiv 2204.06125:
Fig. 2 (the stack), Sec. 2.2 (the prior; models/prior.py), Sec. 2.1 (the decoder; models/unclip_decoder.py),
Sec. 3.1 (variations: decode the CLIP image embedding of an image with other noise), Sec. 3.2 and Fig. 4
(interpolations: spherical interpolation z_theta = slerp(z_i1, z_i2, theta) of two image embeddings, decoded with
the same noise).

    python -m sample --pipeline unclip --config configs/shapes/pipeline_unclip.yaml --prompt "a red circle"
    python -m sample --pipeline unclip --config ... --variations image.png --n 8 --out variations.png
    python -m sample --pipeline unclip --config ... --interpolate "a red circle" "a blue square" --n 8 --out i.png

Three separately trained checkpoints are joined here (configs/shapes/pipeline_unclip.yaml names them): the CLIP
(train/clip.py), the prior (train/prior.py) and the decoder (train/diffusion.py with image_embed_dim; its VAE in
latent space). The prior and the decoder each store the fingerprint of the CLIP they were trained on; parts of
different CLIPs are refused, as their embedding spaces differ.

Settings (UnCLIPSettings): each stage has its own steps and guidance (--prior-steps, --prior-guidance; --steps,
--guidance and the other sampler flags are the decoder's), the prior draws `candidates` z_i per prompt and keeps the
one nearest z_t (Sec. 2.2), and `embedding` chooses what the decoder reads (--embedding):
    prior   the prior's z_i (unCLIP)
    text    z_t itself in place of z_i: no prior, the paper's question of whether the prior is needed (Sec. 5.1)
    true    the z_i of a fresh render that shows the prompt (shapes captions only): an upper bound for the prior
"""
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from core.checkpoint import load_checkpoint
from core.config import config_from_dict
from data.claims import caption_holds, parse_caption
from data.shapes import render, sample_scene
from models.clip import clip_fingerprint, embed_images, load_clip, text_conditions
from models.conditioning import Conditioning, guided_prediction
from models.prior import load_prior, sample_image_embeddings
from models.samplers import SamplerConfig, sample
from models.text2image import PRESETS, load_text2image

EMBEDDINGS = ("prior", "text", "true")
PRIOR_PRESETS = {"fast": {"num_inference_steps": 25}, "quality": {"num_inference_steps": 64},
                 "creative": {"guidance_scale": 1.0}}  # with the decoder's (models/text2image.py PRESETS)


@dataclass
class UnCLIPPipelineConfig:
    """configs/shapes/pipeline_unclip.yaml: the checkpoints of the unCLIP family and how to sample them."""
    prior: str = "runs/prior/ckpt.pt"              # train/prior.py (it names its CLIP)
    decoder: str = "runs/decoder_unclip/ckpt.pt"   # train/diffusion.py with image_embed_dim
    clip: str = ""         # the CLIP checkpoint; '' = the path stored in the prior
    vae: str = ""          # the decoder's VAE (latent space); '' = the path stored in the decoder
    preset: str = "fast"   # fast | quality | creative; '' = the checkpoints' own settings
    device: str = "auto"   # auto | cpu | cuda | cuda:N | mps


@dataclass
class UnCLIPSettings:
    prior: SamplerConfig     # the prior's sampler (DDPM, 25 linspace steps, x0 clipped to +-5, guidance 2)
    decoder: SamplerConfig   # the decoder's (DDIM 50 steps, guidance 3)
    candidates: int = 2      # z_i drawn per prompt, the one with the largest <z_i, z_t> kept (Sec. 2.2)
    embedding: str = "prior"  # prior | text | true (see the module docstring)

    def __str__(self):
        return f"prior: {self.prior}, best of {self.candidates}; decoder: {self.decoder}; z_i from {self.embedding}"


def slerp(a, b, theta):
    """Spherical interpolation of unit vectors a, b (B, E) at theta in [0, 1] (Shoemake 1985; unCLIP Sec. 3.2):
    sin((1 - theta) w) / sin(w) a + sin(theta w) / sin(w) b, w = arccos(<a, b>)."""
    a, b = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
    w = torch.acos((a * b).sum(-1, keepdim=True).clamp(-1 + 1e-7, 1 - 1e-7))  # (B, 1)
    return (torch.sin((1 - theta) * w) * a + torch.sin(theta * w) * b) / torch.sin(w)


def renders_for_prompts(prompts, resolution, seed=11, tries=20000):
    """uint8 (B, 3, R, R): for each shapes caption, the first scene of `seed` (split "all", held-out pairs included)
    that agrees with every claim of the caption, rendered: the image whose z_i is the 'true' embedding."""
    images = []
    for prompt in prompts:
        count = parse_caption(prompt)["count"]  # ValueError for a caption the shapes templates cannot produce
        for index in range(tries):
            _, attributes = sample_scene(seed, index, "all", max_objects=count)
            if attributes["count"] == count and caption_holds(prompt, attributes):
                images.append(torch.from_numpy(render(attributes, resolution)).permute(2, 0, 1))
                break
        else:
            raise ValueError(f"no scene of {tries} shows {prompt!r}; --embedding true needs a shapes caption")
    return torch.stack(images)


class UnCLIPPipeline:
    """The pipeline contract of models/pipeline.py, for CLIP -> prior -> decoder."""
    family = "unclip"

    def __init__(self, clip, tokenizer, prior, prior_schedule, prior_train, decoder, decoder_train, settings):
        self.clip, self.tokenizer = clip, tokenizer
        self.prior, self.prior_schedule = prior, prior_schedule
        self.prior_train = prior_train  # the prior's train config (its caption dropout)
        self.decoder = decoder  # models.text2image.Text2Image around the UnCLIPDecoder (and its VAE)
        self.decoder_train = decoder_train  # the decoder's train config (its dropout probabilities)
        self.settings = settings
        self.data = decoder.data
        self.presets = {name: {"prior": PRIOR_PRESETS[name], "decoder": PRESETS[name]} for name in PRIOR_PRESETS}

    @property
    def resolution(self):
        return self.decoder.resolution

    def check_prompts(self, prompts, truncate=False):
        self.tokenizer(list(prompts), max_length=self.clip.cfg.text.max_length, truncate=truncate)

    def settings_with(self, preset=None, prior_steps=None, prior_guidance=None, embedding=None, **flags):
        """The checkpoints' settings, then the preset's, then the flags' (None = not given); the decoder's sampler
        flags (sampler, steps, eta, guidance, ...) are models.text2image's."""
        decoder = self.decoder.settings_with(preset=preset, **flags)
        prior = replace(self.settings.prior, **PRIOR_PRESETS[preset]) if preset else self.settings.prior
        prior = replace(prior, **{k: v for k, v in (("num_inference_steps", prior_steps),
                                                    ("guidance_scale", prior_guidance)) if v is not None})
        if embedding is not None and embedding not in EMBEDDINGS:
            raise ValueError(f"unknown --embedding {embedding!r}; use one of {', '.join(EMBEDDINGS)}")
        if prior.guidance_scale != 1 and self.prior_train["cond_drop_prob"] == 0:
            raise ValueError(f"prior guidance {prior.guidance_scale} needs a prior trained with dropped captions "
                             f"(its train.cond_drop_prob is 0); pass --prior-guidance 1")
        train = self.decoder_train  # guidance contrasts the full condition with both parts dropped
        if decoder.guidance_scale != 1 and (train["cond_drop_prob"] == 0 or train["image_drop_prob"] == 0):
            raise ValueError(f"decoder guidance {decoder.guidance_scale} needs a decoder trained with dropped captions "
                             f"and image embeddings (its train.cond_drop_prob and image_drop_prob); pass --guidance 1")
        return replace(self.settings, prior=prior, decoder=decoder, embedding=embedding or self.settings.embedding)

    @torch.no_grad()
    def image_embeddings(self, prompts, settings, generator=None, truncate=False, progress=False):
        """Prompts -> the unit z_i (B, E) the decoder reads, per settings.embedding."""
        tokens, mask, z_t = text_conditions(self.clip, self.tokenizer, list(prompts), truncate=truncate)
        if settings.embedding == "text":
            return z_t
        if settings.embedding == "true":
            return embed_images(self.clip, renders_for_prompts(prompts, self.clip.cfg.vision.image_size))
        return sample_image_embeddings(self.prior, self.prior_schedule, Conditioning(tokens=tokens, mask=mask,
                                       pooled=z_t), settings.prior, settings.candidates, generator, progress)

    @torch.no_grad()
    def decode(self, z_i, prompts, settings, generator=None, truncate=False, progress=True, x_T=None):
        """Unit z_i (B, E) and their captions (None: the null caption the decoder learned from the 50% caption
        dropout, as for variations and interpolations) -> pictures (B, 3, H, W) in [-1, 1]."""
        pipe = self.decoder
        model, s = pipe.model, settings.decoder
        weight = next(model.unet.parameters())
        device, dtype = weight.device, weight.dtype
        B = z_i.shape[0]
        L = model.text_encoder.cfg.max_length
        if prompts is None:  # any tokens: every row's caption is replaced by the null caption (drop_text)
            ids, mask = self.tokenizer(["a"] * B, max_length=L)
        else:
            ids, mask = self.tokenizer(list(prompts), max_length=L, truncate=truncate)
        cond = model.encode_text(ids.to(device), mask.to(device), Conditioning(image_embed=z_i.to(device, dtype)))
        denoise_fn = model.denoise
        if prompts is None:
            denoise_fn = lambda x, t, c: model.denoise(x, t, c, drop_text=torch.ones(len(x), dtype=torch.bool,
                                                                                      device=device))
        u = model.unet.cfg
        if x_T is None:
            x_T = torch.randn(B, u.out_channels, u.image_size, u.image_size, generator=generator, device=device)
        denoise = lambda x_t, t: guided_prediction(denoise_fn, x_t.to(dtype), t, cond, s.guidance_scale).float()
        x0 = sample(denoise, x_T, pipe.schedule, s, generator=generator, progress=progress)
        if pipe.vae is None:
            return x0
        return pipe.vae.decode((x0 / pipe.scale_factor).to(dtype)).float().clamp(-1, 1)

    def __call__(self, prompts, settings=None, generator=None, truncate=False, progress=True):
        settings = settings or self.settings
        z_i = self.image_embeddings(prompts, settings, generator, truncate)
        self.intermediate = z_i  # what the prior made: the unit CLIP image embeddings (B, E) the decoder reads
        return self.decode(z_i, prompts, settings, generator, truncate, progress)

    @torch.no_grad()
    def variations(self, images, n, settings=None, generator=None):
        """Sec. 3.1: uint8 (B, 3, R, R) images -> (B * n, 3, H, W): each image's z_i decoded with n noises."""
        settings = settings or self.settings
        z_i = embed_images(self.clip, images).repeat_interleave(n, dim=0)  # (B * n, E)
        return self.decode(z_i, None, settings, generator, progress=False)

    @torch.no_grad()
    def interpolate(self, z_a, z_b, n, settings=None, generator=None):
        """Fig. 4: unit z_a, z_b (1, E) -> (n, 3, H, W), slerp at theta = 0, 1 / (n - 1), ..., 1, one noise for all."""
        settings = settings or self.settings
        theta = torch.linspace(0, 1, n, device=z_a.device)[:, None]  # (n, 1)
        z = slerp(z_a.expand(n, -1), z_b.expand(n, -1), theta)  # (n, E)
        u = self.decoder.model.unet.cfg
        device = next(self.decoder.model.parameters()).device
        x_T = torch.randn(1, u.out_channels, u.image_size, u.image_size, generator=generator, device=device)
        return self.decode(z, None, replace(settings, decoder=replace(settings.decoder, eta=0.0)), generator,
                           progress=False, x_T=x_T.expand(n, -1, -1, -1))

    def cast(self, dtype):
        """The decoder's networks in `dtype` (models/text2image.py); the CLIP and the prior (a few hundred thousand
        weights, a small share of the time) stay in float32."""
        self.decoder.cast(dtype)
        return self


def load_unclip(cfg: UnCLIPPipelineConfig, device, use_ema=True):
    """The three checkpoints of `cfg` -> UnCLIPPipeline in eval mode on `device`; parts of different CLIPs refused."""
    prior, schedule, prior_ckpt = load_prior(cfg.prior, device, use_ema)
    stored = prior_ckpt["config"]  # train/prior.py's PriorTrainConfig, as a dict
    decoder_ckpt = load_checkpoint(cfg.decoder, "diffusion")
    if not decoder_ckpt["config"].get("image_embed_dim"):
        raise ValueError(f"{cfg.decoder} is a text-to-image U-Net, not an unCLIP decoder; train one with "
                         f"configs/shapes/decoder_unclip.yaml")
    clip_path = cfg.clip or prior_ckpt["clip"]["path"]
    if prior_ckpt["clip"]["sha256"] != decoder_ckpt["clip"]["sha256"]:
        raise ValueError(f"the prior {cfg.prior} was trained on the CLIP {prior_ckpt['clip']['path']} and the decoder "
                         f"{cfg.decoder} on the CLIP {decoder_ckpt['clip']['path']}, whose embeddings differ; train "
                         f"both on one CLIP")
    clip, tokenizer, _ = load_clip(clip_path, device)
    if clip_fingerprint(clip) != prior_ckpt["clip"]["sha256"]:
        raise ValueError(f"{clip_path} is not the CLIP the prior {cfg.prior} and the decoder {cfg.decoder} were "
                         f"trained on ({prior_ckpt['clip']['path']}); pass that one as clip")
    decoder = load_text2image(decoder_ckpt, device, use_ema=use_ema, vae_path=cfg.vae or None)
    settings = UnCLIPSettings(prior=config_from_dict(SamplerConfig, stored["sampler"], "sampler."),
                              decoder=decoder.settings, candidates=stored["candidates"])
    return UnCLIPPipeline(clip, tokenizer, prior, schedule, stored["train"], decoder, decoder_ckpt["config"]["train"],
                          settings)
