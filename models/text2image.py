"""The three parts joined: tokenizer -> text encoder -> U-Net denoiser, and sampling from them.

Stable Diffusion, DALL-E and Imagen share this pattern (see ../README.md). Here the text encoder is the small
transformer of models/text_encoder.py trained jointly with the U-Net, as latent diffusion's text model was
(Rombach et al. 2022, arXiv 2112.10752, Sec. 3.3). The U-Net only ever sees (tokens, mask, pooled), so a
frozen, separately trained encoder can take the text encoder's place.

Classifier-free guidance (Ho & Salimans 2022, arXiv 2207.12598): the conditional and unconditional
predictions are computed in one batch of 2B, the unconditional half with `drop_cond=True` (the U-Net's
learned null context), and combined by `models.samplers.guidance` (their Eq. 6).
"""
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from models.samplers import SamplerConfig, guidance, sample
from models.schedule import NoiseSchedule, ScheduleConfig
from models.text_encoder import TextEncoder, TextEncoderConfig
from models.tokenizer import BPETokenizer
from models.unet import UNet, UNetConfig


@dataclass
class TokenizerConfig:
    vocab_size: int = 512  # byte-level BPE: 256 bytes + merges + 3 special tokens


@dataclass
class ModelConfig:
    """Everything needed to rebuild the text-conditional denoiser from a checkpoint."""
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    text: TextEncoderConfig = field(default_factory=TextEncoderConfig)  # text.width = unet.context_dim
    unet: UNetConfig = field(default_factory=UNetConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)


class TextConditionedUNet(nn.Module):
    """Text encoder + U-Net as one module (so DDP and the optimizer see one set of parameters)."""

    def __init__(self, text_cfg: TextEncoderConfig, unet_cfg: UNetConfig):
        super().__init__()
        if unet_cfg.context_dim != text_cfg.width:
            raise ValueError(f"unet.context_dim ({unet_cfg.context_dim}) must equal text.width "
                             f"({text_cfg.width}); set both to the same value")
        if unet_cfg.pooled_dim not in (0, text_cfg.width):
            raise ValueError(f"unet.pooled_dim ({unet_cfg.pooled_dim}) must be 0 (off) or text.width "
                             f"({text_cfg.width})")
        self.text_encoder = TextEncoder(text_cfg)
        self.unet = UNet(unet_cfg)

    def encode_text(self, ids, mask):
        """(B, L) token ids and mask -> tokens (B, L, D), mask (B, L), pooled (B, D) or None."""
        tokens, pooled = self.text_encoder(ids, mask)
        return tokens, mask, (pooled if self.unet.cfg.pooled_dim else None)

    def denoise(self, x_t, t, text, drop_cond=None):
        tokens, mask, pooled = text
        return self.unet(x_t, t, tokens, context_mask=mask, pooled=pooled, drop_cond=drop_cond)

    def forward(self, x_t, t, ids, mask, drop_cond=None):
        return self.denoise(x_t, t, self.encode_text(ids, mask), drop_cond)


def build_model(model_cfg: ModelConfig, vocab_size: int) -> TextConditionedUNet:
    text_cfg = model_cfg.text
    if text_cfg.vocab_size not in (0, vocab_size):
        raise ValueError(f"text.vocab_size ({text_cfg.vocab_size}) differs from the tokenizer's ({vocab_size}); "
                         f"leave text.vocab_size at 0 to take the tokenizer's")
    text_cfg = TextEncoderConfig(**{**text_cfg.__dict__, "vocab_size": vocab_size})
    return TextConditionedUNet(text_cfg, model_cfg.unet)


@torch.no_grad()
def generate(model, tokenizer, schedule, prompts, sampler_cfg: SamplerConfig, generator=None,
             truncate=False, progress=True):
    """Prompts -> images (B, C, H, W) in [-1, 1]. Noise and sampler noise come only from `generator`,
    so the same seed gives the same pixels."""
    device = next(model.parameters()).device
    ucfg = model.unet.cfg
    ids, mask = tokenizer(list(prompts), max_length=model.text_encoder.cfg.max_length, truncate=truncate)
    text = model.encode_text(ids.to(device), mask.to(device))
    B = len(prompts)
    x_T = torch.randn(B, ucfg.out_channels, ucfg.image_size, ucfg.image_size, generator=generator,
                      device=device)  # (B, C, H, W)
    scale = sampler_cfg.guidance_scale

    def denoise(x_t, t):
        if scale == 1.0:  # conditional only: no second pass
            return model.denoise(x_t, t, text)
        tokens, mask_, pooled = text
        both = (torch.cat([tokens, tokens]), torch.cat([mask_, mask_]),
                None if pooled is None else torch.cat([pooled, pooled]))
        drop = torch.cat([torch.zeros(B, dtype=torch.bool), torch.ones(B, dtype=torch.bool)]).to(device)
        out = model.denoise(torch.cat([x_t, x_t]), torch.cat([t, t]), both, drop_cond=drop)  # (2B, C, H, W)
        cond, uncond = out.chunk(2)
        return guidance(cond, uncond, scale)

    return sample(denoise, x_T, schedule, sampler_cfg, generator=generator, progress=progress)


def load_text2image(ckpt, device, use_ema=True):
    """A diffusion checkpoint dict -> (model in eval mode, tokenizer, schedule, ModelConfig, SamplerConfig)."""
    from train.common import load_weights
    from train.config import config_from_dict

    model_cfg = config_from_dict(ModelConfig, {k: ckpt["config"][k] for k in ("tokenizer", "text", "unet",
                                                                            "schedule")})
    sampler_cfg = config_from_dict(SamplerConfig, ckpt["config"]["sampler"])
    tokenizer = BPETokenizer.from_state_dict(ckpt["tokenizer"])
    model = build_model(model_cfg, tokenizer.vocab_size)
    weights = ckpt["ema"]["weights"] if use_ema and ckpt.get("ema") else ckpt["model"]
    load_weights(model, weights, "diffusion checkpoint weights")
    schedule = NoiseSchedule(model_cfg.schedule).to(device)
    return model.to(device).eval(), tokenizer, schedule, model_cfg, sampler_cfg
