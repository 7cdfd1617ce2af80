"""The diffusion family's pipeline: tokenizer -> text encoder -> U-Net denoiser (-> VAE decoder), and sampling.

Stable Diffusion, DALL-E and Imagen share this pattern (see README.md). The text encoder is chosen by
`text_encoder` (ModelConfig):
    joint        the small transformer of models/text_encoder.py, trained jointly with the U-Net, as latent
                 diffusion's text model was (Rombach et al. 2022, arXiv 2112.10752, Sec. 3.3)
    lstm         the bidirectional LSTM of models/rnn_text_encoder.py (AttnGAN's text encoder, Xu et al. 2018,
                 arXiv 1711.10485), trained jointly the same way
    clip:<ckpt>  the text tower of a CLIP trained by train/clip.py, frozen (Stable Diffusion conditions on CLIP's
                 per-token outputs after the final LayerNorm; Rombach et al. Sec. 4.3.2 / SD v1)
    lm:<ckpt>    the encoder of the masked language model of train/text_lm.py, frozen (Imagen's frozen T5,
                 Saharia et al. 2022, arXiv 2205.11487, Sec. 2.1)
The U-Net only ever sees (tokens, mask, pooled), so any of them can take the text encoder's place. A frozen
encoder brings its own tokenizer and sizes (text.* is taken from its checkpoint; unet.context_dim must equal its
width) and its weights are stored inside the diffusion checkpoint, so that checkpoint alone rebuilds the model.
Its outputs for the training captions are computed once and cached (FrozenTextEncoder.cache_outputs), one entry
per distinct caption: the single-object shapes train split has 4,200 possible captions (56 pairs x 3 size
mentions x 5 prefixes x 5 background mentions), a dataset of N captions at most N.

The denoiser takes (x_t, t, cond) with cond a models.conditioning.Conditioning (text tokens, mask and pooled
vector from the text encoder, plus whatever else a model reads: a low-resolution image and its augmentation level
for super-resolution). Classifier-free guidance (Ho & Salimans 2022, arXiv 2207.12598) is
models.conditioning.guided_prediction: conditional and unconditional rows in one batch of 2B.

Text2Image keeps the pipeline contract of models/pipeline.py (family, resolution, settings, presets,
check_prompts, settings_with, __call__), so `python -m sample`, the metrics and the demo drive it like any other.
"""
import math
from dataclasses import dataclass, field, replace

import torch
import torch.nn as nn

from core.checkpoint import load_checkpoint, load_weights, weights_sha256
from core.config import config_from_dict, config_to_dict
from models.clip import CLIP, CLIPConfig
from models.conditioning import Conditioning, guided_prediction
from models.samplers import SamplerConfig, sample
from models.schedule import NoiseSchedule, ScheduleConfig
from models.rnn_text_encoder import LSTMTextEncoder
from models.text_encoder import TextEncoder, TextEncoderConfig
from models.tokenizer import BPETokenizer, TokenizerConfig
from models.unet import UNet, UNetConfig


JOINT = ("joint", "lstm")  # the text encoders trained with the U-Net; the others are frozen checkpoints


@dataclass
class ModelConfig:
    """Everything needed to rebuild the text-conditional denoiser from a checkpoint."""
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    text: TextEncoderConfig = field(default_factory=TextEncoderConfig)  # text.width = unet.context_dim
    unet: UNetConfig = field(default_factory=UNetConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    text_encoder: str = "joint"  # joint | lstm (trained with the U-Net) | clip:<ckpt> | lm:<ckpt> (frozen; see above)
    padding: str = "masked"  # masked: padding is hidden from the text encoder and from cross-attention (ours) |
    #                          attended: all max_length positions are read, padding included (Stable Diffusion v1:
    #                          CLIP pads with <|endoftext|> to 77 tokens, and the U-Net attends to all 77)
    image_embed_dim: int = 0  # >0: unCLIP's decoder (models/unclip_decoder.py), also conditioned on a CLIP image
    #                           embedding z_i of this width (the embed_dim of the frozen CLIP of text_encoder)


class FrozenTextEncoder(nn.Module):
    """A separately trained text encoder, frozen: CLIP's text tower (kind "clip") or the masked LM's encoder
    ("lm"), built from its TextEncoderConfig. Always in eval mode, no gradients. After cache_outputs(ids, mask),
    a batch whose every row of ids was cached is looked up instead of computed."""

    def __init__(self, kind, text_cfg: TextEncoderConfig):
        super().__init__()
        self.cfg = text_cfg
        if kind == "clip":
            self.encoder = CLIP(CLIPConfig(text=text_cfg), text_only=True)
        elif kind == "lm":
            self.encoder = TextEncoder(text_cfg)
        else:
            raise ValueError(f"unknown frozen text encoder kind {kind!r}; use clip or lm")
        self.requires_grad_(False)
        self.cache_index = {}  # bytes of a row of ids -> row of cache_tokens / cache_pooled
        self.cache_tokens = self.cache_pooled = None  # (U, L, D), (U, D) on the CPU; not in the state_dict

    def train(self, mode=True):
        return super().train(False)  # frozen: no dropout, whatever the surrounding model does

    @torch.no_grad()
    def cache_outputs(self, ids, mask, batch_size=256):
        """Compute the outputs of every distinct row of ids (N, L) once."""
        unique_ids, inverse = torch.unique(ids, dim=0, return_inverse=True)
        unique_mask = torch.zeros_like(unique_ids, dtype=torch.bool)
        unique_mask[inverse] = mask  # (U, L): rows with equal ids have equal masks
        device = next(self.parameters()).device
        tokens, pooled = [], []
        for i in range(0, len(unique_ids), batch_size):
            t, p = self.encoder(unique_ids[i: i + batch_size].to(device), unique_mask[i: i + batch_size].to(device))
            tokens.append(t.cpu())
            pooled.append(p.cpu())
        self.cache_tokens, self.cache_pooled = torch.cat(tokens), torch.cat(pooled)  # (U, L, D), (U, D)
        self.cache_index = {row.tobytes(): u for u, row in enumerate(unique_ids.numpy())}
        return len(unique_ids)

    def forward(self, ids, mask):
        rows = [self.cache_index.get(row.tobytes()) for row in ids.cpu().numpy()] if self.cache_index else [None]
        if None in rows:
            with torch.no_grad():
                return self.encoder(ids, mask)  # (B, L, D), (B, D)
        rows = torch.tensor(rows)
        return self.cache_tokens[rows].to(ids.device), self.cache_pooled[rows].to(ids.device)


class TextConditionedUNet(nn.Module):
    """Text encoder + U-Net as one module (so DDP and the optimizer see one set of parameters)."""

    def __init__(self, text_cfg: TextEncoderConfig, unet_cfg: UNetConfig, text_encoder="joint", padding="masked"):
        super().__init__()
        if padding not in ("masked", "attended"):
            raise ValueError(f"unknown padding {padding!r}; use masked or attended")
        self.padding = padding
        width = "text.width" if text_encoder in JOINT else f"the width of the frozen encoder {text_encoder}"
        if unet_cfg.context_dim != text_cfg.width:
            raise ValueError(f"unet.context_dim ({unet_cfg.context_dim}) must equal {width} ({text_cfg.width}); "
                             f"set unet.context_dim={text_cfg.width}")
        if unet_cfg.pooled_dim not in (0, text_cfg.width):
            raise ValueError(f"unet.pooled_dim ({unet_cfg.pooled_dim}) must be 0 (off) or {width} "
                             f"({text_cfg.width})")
        if text_encoder == "joint":
            self.text_encoder = TextEncoder(text_cfg)
        elif text_encoder == "lstm":
            self.text_encoder = LSTMTextEncoder(text_cfg)
        else:
            self.text_encoder = FrozenTextEncoder(text_encoder.partition(":")[0], text_cfg)
        self.unet = UNet(unet_cfg)

    def encode_text(self, ids, mask, cond=None):
        """(B, L) token ids and mask -> Conditioning with tokens (B, L, D), mask (B, L) and pooled (B, D) (None when
        the U-Net reads no pooled vector), and the other fields of `cond` (drop, low_res, aug_level) kept.
        padding="attended" (SD v1): every position is a real input, so the mask is all True for the text encoder
        (whose pooled vector is then the last position's) and absent (None) for the U-Net."""
        if self.padding == "attended":
            mask = torch.ones_like(mask)
        tokens, pooled = self.text_encoder(ids, mask)
        return replace(cond or Conditioning(), tokens=tokens, mask=mask if self.padding == "masked" else None,
                       pooled=pooled if self.unet.cfg.pooled_dim else None)

    def denoise(self, x_t, t, cond):
        return self.unet(x_t, t, cond)

    def forward(self, x_t, t, ids, mask, cond=None):
        """Training: the text encoder and the U-Net in one call (DDP sees one module)."""
        return self.denoise(x_t, t, self.encode_text(ids, mask, cond))


def load_frozen_text_encoder(spec):
    """'clip:<ckpt>' or 'lm:<ckpt>' -> dict(kind, text (TextEncoderConfig), weights (of the encoder alone),
    tokenizer). Bad specs and checkpoints raise ValueError / FileNotFoundError with one line."""

    kind, _, path = spec.partition(":")
    if kind not in ("clip", "lm") or not path:
        raise ValueError(f"text_encoder must be joint, lstm, clip:<ckpt> or lm:<ckpt>, got {spec!r}")
    ckpt = load_checkpoint(path, {"clip": "clip", "lm": "text_lm"}[kind])
    if kind == "clip":  # CLIP's text tower: every weight but the image tower, the projection and the scale
        text = ckpt["config"]["model"]["text"]
        weights = {k: v for k, v in ckpt["model"].items()
                   if not k.startswith("visual.") and k not in ("text_projection", "logit_scale")}
    else:  # the masked LM's encoder, without its prediction head
        text = ckpt["config"]["text"]
        weights = {k[len("encoder."):]: v for k, v in ckpt["model"].items() if k.startswith("encoder.")}
    return {"kind": kind, "text": config_from_dict(TextEncoderConfig, text), "weights": weights,
            "tokenizer": BPETokenizer.from_state_dict(ckpt["tokenizer"])}


def use_frozen_text_encoder(cfg):
    """For a training config with `text_encoder` clip:<ckpt> or lm:<ckpt>: load the encoder and take its sizes
    into cfg.text and cfg.tokenizer (so they are printed, stored and checked on resume). None for joint and lstm."""
    if cfg.text_encoder in JOINT:
        return None
    frozen = load_frozen_text_encoder(cfg.text_encoder)
    cfg.text = frozen["text"]
    cfg.tokenizer = TokenizerConfig(vocab_size=frozen["tokenizer"].vocab_size)
    t = cfg.text
    unclip = getattr(cfg, "image_embed_dim", 0)  # unCLIP's decoder projects the CLIP outputs (models/unclip_decoder.py)
    if not unclip and (cfg.unet.context_dim != t.width or cfg.unet.pooled_dim not in (0, t.width)):  # before the data
        raise ValueError(f"unet.context_dim ({cfg.unet.context_dim}) must equal the width of the frozen encoder "
                         f"{cfg.text_encoder} ({t.width}) and unet.pooled_dim ({cfg.unet.pooled_dim}) be 0 or that "
                         f"width; set unet.context_dim={t.width}")
    print(f"text encoder: frozen {frozen['kind']} from {cfg.text_encoder.partition(':')[2]} (width {t.width}, "
          f"{t.layers} layers, {t.heads} heads, {t.max_length} tokens, vocab {t.vocab_size}); text.* and "
          f"tokenizer.* are taken from it", flush=True)
    return frozen


def build_model(model_cfg: ModelConfig, vocab_size: int, frozen=None) -> TextConditionedUNet:
    """frozen: the dict of load_frozen_text_encoder, whose weights go into the frozen encoder (None: joint or lstm,
    or the weights come later from a diffusion checkpoint)."""
    if model_cfg.image_embed_dim:  # unCLIP's decoder: the frozen CLIP text tower, the z_i projections, the U-Net
        from models.unclip_decoder import UnCLIPDecoder  # (imported here: it builds on this module's classes)
        if not model_cfg.text_encoder.startswith("clip:"):
            raise ValueError(f"unCLIP's decoder (image_embed_dim={model_cfg.image_embed_dim}) reads the caption "
                             f"through its CLIP: set text_encoder=clip:<the CLIP checkpoint>")
        model = UnCLIPDecoder(FrozenTextEncoder("clip", model_cfg.text), model_cfg.unet, model_cfg.image_embed_dim)
        if frozen is not None:
            load_weights(model.text_encoder.encoder, frozen["weights"], "clip text encoder weights")
        return model
    if model_cfg.text_encoder not in JOINT:
        model = TextConditionedUNet(model_cfg.text, model_cfg.unet, model_cfg.text_encoder, model_cfg.padding)
        if frozen is not None:
            load_weights(model.text_encoder.encoder, frozen["weights"], f"{frozen['kind']} text encoder weights")
        return model
    text_cfg = model_cfg.text
    if text_cfg.vocab_size not in (0, vocab_size):
        raise ValueError(f"text.vocab_size ({text_cfg.vocab_size}) differs from the tokenizer's ({vocab_size}); "
                         f"leave text.vocab_size at 0 to take the tokenizer's")
    text_cfg = TextEncoderConfig(**{**text_cfg.__dict__, "vocab_size": vocab_size})
    return TextConditionedUNet(text_cfg, model_cfg.unet, model_cfg.text_encoder, model_cfg.padding)


def vae_fingerprint(vae, scale_factor):
    """What a latent U-Net remembers of the VAE it was trained on: the VAE's config, its latent scale factor and
    a SHA-256 of its weights, so that sampling with another VAE (whose latents mean something else) is refused."""
    return {"config": config_to_dict(vae.cfg), "scale_factor": float(scale_factor), "sha256": weights_sha256(vae)}


def load_latent_vae(path, expected, device):
    """The VAE checkpoint at `path`, checked against the fingerprint a latent diffusion checkpoint stores.
    Returns (vae in eval mode, scale_factor)."""
    from models.vae import load_vae
    vae, scale_factor, _ = load_vae(path, device)
    if vae_fingerprint(vae, scale_factor) != expected:
        raise ValueError(f"{path} is not the VAE this latent U-Net was trained on (its config, scale factor or "
                         f"weights differ); pass the VAE checkpoint given at training with --vae")
    return vae, scale_factor


# Sampler presets (the usual advice for such models: guidance trades diversity for prompt agreement, Ho & Salimans
# 2022 Fig. 3; DDIM's quality saturates with steps, Song et al. 2020 Table 1). Flags given with a preset win.
PRESETS = {
    "fast": {"sampler": "ddim", "num_inference_steps": 20, "guidance_scale": 3.0},       # a quick look
    "quality": {"sampler": "ddim", "num_inference_steps": 100, "guidance_scale": 5.0},   # closer to the prompt
    "creative": {"sampler": "ddim", "num_inference_steps": 50, "guidance_scale": 1.5},   # more varied, looser
}


@dataclass
class Text2Image:
    """The parts joined for sampling: tokenizer -> text encoder -> U-Net (-> VAE decoder in latent space).

    Pixel space: the sampler's x_0 is the picture. Latent space (Rombach et al. 2022, Sec. 3-4): the sampler's
    x_0 is a latent z scaled by the VAE's scale factor (so that it has unit variance, their Sec. 4.3.2), and the
    picture is D(z / scale_factor). `settings` is a SamplerConfig (the checkpoint's defaults)."""
    model: TextConditionedUNet
    tokenizer: BPETokenizer
    schedule: NoiseSchedule
    model_cfg: ModelConfig
    settings: SamplerConfig  # the checkpoint's defaults
    data: dict  # the data config the model was trained on (dataset, resolution, max_objects, ...)
    vae: nn.Module | None = None
    scale_factor: float = 1.0
    presets = PRESETS

    @property
    def family(self):
        return "pixel" if self.vae is None else "ldm"

    @property
    def resolution(self):
        return self.model.unet.cfg.image_size * (1 if self.vae is None else self.vae.cfg.factor)

    def check_prompts(self, prompts, truncate=False):
        """Raise the one-line error of the first bad prompt (empty, over the token limit) before any compute."""
        self.tokenizer(list(prompts), max_length=self.model.text_encoder.cfg.max_length, truncate=truncate)

    def settings_with(self, preset=None, sampler=None, steps=None, eta=None, guidance=None, spacing=None,
                      dynamic_threshold=False, threshold_ratio=None, threshold_max=None):
        """The checkpoint's sampler settings, then the preset's, then the flags' (None = not given).
        dynamic_threshold: Imagen's dynamic thresholding (Sec. 2.3), percentile threshold_ratio (default 0.995)
        and cap threshold_max (default none, as in Imagen), pixel space only."""
        if preset is not None and preset not in PRESETS:
            raise ValueError(f"unknown preset '{preset}'; use one of {', '.join(sorted(PRESETS))}")
        cfg = replace(self.settings, **PRESETS[preset]) if preset else self.settings
        flags = {"sampler": sampler, "num_inference_steps": steps, "eta": eta, "guidance_scale": guidance,
                 "timestep_spacing": spacing}
        cfg = replace(cfg, **{k: v for k, v in flags.items() if v is not None})
        if not dynamic_threshold:
            if threshold_ratio is not None or threshold_max is not None:
                raise ValueError("--threshold-ratio and --threshold-max set dynamic thresholding; add --dynamic-threshold")
            return cfg
        if self.vae is not None:
            raise ValueError("--dynamic-threshold is for pixel space (latents are not bounded to [-1, 1]); drop it")
        ratio = 0.995 if threshold_ratio is None else threshold_ratio
        cap = math.inf if threshold_max is None else threshold_max
        if not (0 < ratio <= 1 and cap >= 1):
            raise ValueError(f"--threshold-ratio must be in (0, 1] and --threshold-max at least 1, got {ratio} and {cap}")
        return replace(cfg, thresholding=True, clip_sample=False, dynamic_thresholding_ratio=ratio,
                       sample_max_value=cap)

    @torch.no_grad()
    def __call__(self, prompts, settings=None, generator=None, truncate=False, progress=True, image_embed=None,
                 desc=None):
        """Prompts -> pictures (B, 3, H, W) in [-1, 1]. Noise and sampler noise come only from `generator`, so the
        same seed gives the same pixels. image_embed (B, E): the CLIP image embeddings an unCLIP decoder reads
        (models/unclip.py gives them); guidance then contrasts them and the prompt with both dropped. desc: the
        progress bar's label."""
        settings = settings or self.settings
        weight = next(self.model.unet.parameters())
        device, dtype = weight.device, weight.dtype  # the networks run in their weights' dtype (see cast)
        ids, mask = self.tokenizer(list(prompts), max_length=self.model.text_encoder.cfg.max_length, truncate=truncate)
        if (image_embed is None) != (self.model_cfg.image_embed_dim == 0):
            raise ValueError("an unCLIP decoder samples from CLIP image embeddings and a text-to-image U-Net without "
                             "them; use --pipeline unclip for a decoder")
        cond = self.model.encode_text(ids.to(device), mask.to(device), Conditioning(
            image_embed=None if image_embed is None else image_embed.to(device, dtype)))
        u = self.model.unet.cfg
        x_T = torch.randn(len(prompts), u.out_channels, u.image_size, u.image_size, generator=generator,
                          device=device)  # (B, C, H, W), float32: the sampler's arithmetic stays in float32
        denoise = lambda x_t, t: guided_prediction(self.model.denoise, x_t.to(dtype), t, cond,
                                                   settings.guidance_scale).float()
        x0 = sample(denoise, x_T, self.schedule, settings, generator=generator, progress=progress, desc=desc)
        self.intermediate = x0  # what the generation model made: the latents (B, c, h, w) of a latent model
        if self.vae is None:
            return x0
        return self.vae.decode((x0 / self.scale_factor).to(dtype)).float().clamp(-1, 1)

    def cast(self, dtype):
        """The networks' weights in `dtype` (float16 / bfloat16 halve the memory and, on a GPU, the time);
        noise, schedule and sampler stay in float32. Returns self."""
        self.model.to(dtype)
        if self.vae is not None:
            self.vae.to(dtype)
        return self


def load_text2image(ckpt, device, use_ema=True, vae_path=None) -> Text2Image:
    """A diffusion checkpoint dict -> Text2Image in eval mode. A latent checkpoint also loads its VAE: from
    `vae_path`, else from the path stored at training, and checks it is the VAE the U-Net was trained on."""
    model_cfg = config_from_dict(ModelConfig, {k: ckpt["config"][k] for k in ("tokenizer", "text", "unet",
                                                                            "schedule", "text_encoder", "padding",
                                                                            "image_embed_dim")
                                               if k in ckpt["config"]})  # text_encoder: absent before issue 3
    sampler_cfg = config_from_dict(SamplerConfig, ckpt["config"]["sampler"])
    tokenizer = BPETokenizer.from_state_dict(ckpt["tokenizer"])
    with torch.device("meta"):  # no memory and no initialisation: the checkpoint's tensors become the weights
        model = build_model(model_cfg, tokenizer.vocab_size)
    weights = ckpt["ema"]["weights"] if use_ema and ckpt.get("ema") else ckpt["model"]
    load_weights(model, weights, "diffusion checkpoint weights", assign=True)
    model.float()  # a checkpoint written in float16 (python -m models.convert --dtype float16) samples in float32
    schedule = NoiseSchedule(model_cfg.schedule).to(device)
    vae, scale_factor = None, 1.0
    if ckpt["config"].get("space", "pixel") == "latent":
        vae, scale_factor = load_latent_vae(vae_path or ckpt["config"]["vae"], ckpt["vae"], device)
    elif vae_path:
        raise ValueError("a VAE was given but this diffusion checkpoint is pixel-space; drop --vae")
    return Text2Image(model.to(device).eval(), tokenizer, schedule, model_cfg, sampler_cfg, ckpt["config"]["data"], vae,
                      scale_factor)
