"""The denoising U-Net with cross-attention to text tokens (latent diffusion / Imagen).

Papers:
  Ronneberger, Fischer, Brox 2015, "U-Net", arXiv 1505.04597 (encoder/decoder with skip connections);
  Ho, Jain, Abbeel 2020, "Denoising Diffusion Probabilistic Models", arXiv 2006.11239, Sec. 4 and App. B
    (wide ResNet blocks with GroupNorm, sinusoidal timestep embedding, self-attention at 16x16);
  Nichol, Dhariwal 2021, "Improved DDPM", arXiv 2102.09672 (the timestep scales and shifts the normalised
    features: "use_scale_shift_norm"), as in Dhariwal, Nichol 2021, arXiv 2105.05233, Sec. 3 (AdaGN);
  Rombach et al. 2022, "Latent Diffusion Models", arXiv 2112.10752, Sec. 3.3 (SpatialTransformer:
    cross-attention from image features to the text tokens at chosen resolutions);
  Ho, Salimans 2022, "Classifier-Free Diffusion Guidance", arXiv 2207.12598 (a learned null condition);
  Saharia et al. 2022, "Imagen", arXiv 2205.11487: Sec. 2.5 (a pooled text vector added to the timestep
    embedding; super-resolution U-Nets keep text cross-attention but drop self-attention at high resolution),
    Sec. 2.4 (super-resolution conditioned on an upsampled low-res image and on its noise-augmentation level).
    App. B.1, the Efficient U-Net, as options: skip connections scaled by 1/sqrt(2) (skip_scale) and more
    residual blocks at the low resolutions (level_blocks). Not implemented: its reordered down/up-sampling.

Layout (channels=64, channel_mult=(1, 2, 2), num_res_blocks=2, attention_resolutions=(16, 8), image 32):

    conv_in                                   32x32x64  ----------------------------------- skip
    level 0: [Res]       x2, Downsample       32x32x64  -> 16x16                              |
    level 1: [Res, Attn] x2, Downsample       16x16x128 -> 8x8                                |
    level 2: [Res, Attn] x2                    8x8x128                                        |
    middle:  Res, Attn, Res                    8x8x128                                        |
    level 2: [Res, Attn] x3, Upsample          8x8x128  -> 16x16   (each block eats one skip) |
    level 1: [Res, Attn] x3, Upsample         16x16x128 -> 32x32                              |
    level 0: [Res]       x3                   32x32x64  <-------------------------------------
    GroupNorm, SiLU, conv_out                 32x32xout_channels

The block structure, the parameter shapes and the numbers computed equal diffusers' UNet2DConditionModel
with `resnet_time_scale_shift="scale_shift", use_linear_projection=True` (tests/test_unet.py loads one into
the other and compares outputs).

Timesteps: integer (or fractional) t in [0, T-1] indexing alphas_cumprod, t = 0 least noisy (models/schedule.py);
the network only sees them through the sinusoidal embedding, so any scale works as long as it is consistent.

Memory format: the forward pass runs in channels-last (NHWC) memory, the layout GPU tensor cores and oneDNN's
fastest convolutions use, and in which the (B, C, H, W) -> (B, H*W, C) rearrange into the transformer is a free
view instead of a copy. On a 2-core CPU the 3x3 convs measured 10-15% faster in NHWC but GroupNorm 1.5-3x
slower, so a training step costs about the same as in NCHW. Shapes and results do not change; the output is
returned contiguous NCHW. Throughput vs diffusers: tests/bench_unet.py.

Notation (code <- paper):
    B batch, C channels, H, W feature-map size, L text tokens, D context_dim (text token width)
    emb           time embedding, width 4 * channels (DDPM App. B)
    scale, shift  AdaGN's y_s, y_b: GroupNorm(h) * (1 + y_s) + y_b (improved DDPM; the "1 +" keeps the
                  block an identity-scaled norm at initialisation)
    context       c (text token vectors) -> tau_theta(y) in LDM Eq. 3: K = W_K tau(y), V = W_V tau(y)
    null_context  the learned "empty prompt" token used for classifier-free guidance (Ho & Salimans: the
                  unconditional model is the same network with the condition replaced by a null token); with
                  null_length = L a whole sequence of L tokens (Stable Diffusion v1's null condition is CLIP's
                  output for the empty prompt, 77 x 768: models/stable_diffusion.py fills it in)
"""
import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from models.attention import TransformerBlock
from models.conditioning import Conditioning


def upsample(low_res, size):
    """(B, C, h, w) -> (B, C, H, W) for size (H, W), bilinearly (align_corners=False): how a super-resolution U-Net
    sees its low-resolution input, and (models/imagen.py) what a residual stage adds its output to."""
    return F.interpolate(low_res, size=tuple(size), mode="bilinear", align_corners=False)


@dataclass
class UNetConfig:
    image_size: int = 32  # training resolution (pixels or latent cells); decides where attention goes
    in_channels: int = 3  # channels of x_t (3 for pixels, 4 for SD latents)
    out_channels: int = 3  # channels of the prediction (eps, x0 or v: same as in_channels)
    channels: int = 64  # base width; level i has channels * channel_mult[i]
    channel_mult: tuple = (1, 2, 2)  # width multiplier per level; len = number of levels
    num_res_blocks: int = 2  # residual blocks per level on the way down (up path has one more, DDPM/LDM)
    attention_resolutions: tuple = (16, 8)  # feature-map sizes (image_size / patch_size / 2^level) with transformer blocks
    num_heads: int = 4  # attention heads; head width = level width / num_heads
    transformer_depth: int = 1  # TransformerBlocks per SpatialTransformer
    context_dim: int = 128  # width of the text token vectors for cross-attention
    pooled_dim: int = 0  # >0: a pooled text vector (B, pooled_dim) is projected and added to emb (Imagen)
    dropout: float = 0.0  # dropout in residual blocks (before their last conv) and in attention
    norm_groups: int = 32  # GroupNorm groups; every level width must be divisible by it
    use_scale_shift_norm: bool = True  # True: norm(h)*(1+scale)+shift (iDDPM, Imagen); False: norm(h+emb) (DDPM, SD v1)
    self_attention_max_resolution: int = 0  # >0: no self-attention above this size, cross-attention kept (Imagen SR)
    low_res_channels: int = 0  # >0: super-resolution; a low-res image is upsampled bilinearly and concatenated to x
    null_length: int = 0  # 0: the null condition is one learned token repeated at every position; L > 0: a sequence
    #                       of L token vectors, and prompts must be L tokens long (SD v1: 77, CLIP's empty prompt)
    skip_scale: float = 1.0  # every skip connection times this before the concatenation (Efficient U-Net: 1/sqrt(2))
    level_blocks: tuple = ()  # residual blocks per level on the way down, e.g. (1, 2, 4): more at low resolution
    #                           (Efficient U-Net, Imagen App. B.1); () = num_res_blocks at every level
    patch_size: int = 1  # >1: the first layer folds p x p pixels into channels (pixel_unshuffle) and the last
    #                      unfolds them (pixel_shuffle): no feature map at full resolution (simple diffusion,
    #                      Hoogeboom et al. 2023, "avoiding high resolution feature maps"; DiT's patchify)


def validate_config(cfg: UNetConfig):
    """Raise a ValueError naming the problem and the fix; called by UNet.__init__."""
    levels = len(cfg.channel_mult)
    if levels < 1:
        raise ValueError("channel_mult is empty; give one width multiplier per level, e.g. (1, 2, 2)")
    for mult in cfg.channel_mult:
        width = cfg.channels * mult
        if width % cfg.norm_groups != 0:
            raise ValueError(
                f"level width {width} (channels={cfg.channels} x mult {mult}) is not divisible by "
                f"norm_groups={cfg.norm_groups}; change channels, channel_mult or norm_groups"
            )
        if width % cfg.num_heads != 0:
            raise ValueError(f"level width {width} is not divisible by num_heads={cfg.num_heads}; change num_heads")
    if cfg.patch_size < 1:
        raise ValueError(f"patch_size={cfg.patch_size}; need >= 1 (1 = no patching)")
    factor = cfg.patch_size * 2 ** (levels - 1)
    if cfg.image_size % factor != 0:
        raise ValueError(
            f"image_size={cfg.image_size} is not divisible by 2**(levels-1) * patch_size={factor}; "
            f"change image_size or patch_size, or use fewer levels in channel_mult"
        )
    sizes = [cfg.image_size // cfg.patch_size // 2**i for i in range(levels)]
    for r in cfg.attention_resolutions:
        if r not in sizes:
            raise ValueError(
                f"attention resolution {r} is not a feature-map size of this U-Net {tuple(sizes)}; "
                f"pick attention_resolutions from those sizes"
            )
    if cfg.num_res_blocks < 1:
        raise ValueError(f"num_res_blocks={cfg.num_res_blocks}; need at least 1")
    if cfg.level_blocks and (len(cfg.level_blocks) != levels or min(cfg.level_blocks) < 1):
        raise ValueError(f"level_blocks={tuple(cfg.level_blocks)} needs one count >= 1 per level ({levels} levels, "
                         f"channel_mult); () = num_res_blocks everywhere")
    if not cfg.skip_scale > 0:
        raise ValueError(f"skip_scale={cfg.skip_scale}; need > 0 (1 = plain U-Net, 0.7071 = Imagen's 1/sqrt(2))")
    if cfg.transformer_depth < 1:
        raise ValueError(f"transformer_depth={cfg.transformer_depth}; need >= 1 (attention_resolutions=() for none)")
    if cfg.null_length < 0:
        raise ValueError(f"null_length={cfg.null_length}; need 0 (one null token) or the prompt length L")
    if cfg.context_dim < 1:
        raise ValueError(f"context_dim={cfg.context_dim}; need the width of the text token vectors (> 0)")
    if not 0.0 <= cfg.dropout < 1.0:
        raise ValueError(f"dropout={cfg.dropout}; must be in [0, 1)")
    if cfg.pooled_dim < 0 or cfg.low_res_channels < 0 or cfg.self_attention_max_resolution < 0:
        raise ValueError("pooled_dim, low_res_channels and self_attention_max_resolution must be >= 0 (0 = off)")


def timestep_embedding(t, dim, max_period=10000):
    """Sinusoidal embedding of (possibly fractional) timesteps t (B,) -> (B, dim), float32.

    Transformer positional encoding (Vaswani et al. 2017, Sec. 3.5) used for t by DDPM (App. B):
    freq_i = max_period^(-i / half), i = 0..half-1; emb = [cos(t freq), sin(t freq)].
    (Equals diffusers' get_timestep_embedding(t, dim, flip_sin_to_cos=True, downscale_freq_shift=0).)
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None, :]  # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, 2*half)
    if dim % 2 == 1:
        emb = F.pad(emb, (0, 1))  # (B, dim)
    return emb


class ResBlock(nn.Module):
    """GroupNorm -> SiLU -> conv3x3 -> [time conditioning] -> GroupNorm -> SiLU -> dropout -> conv3x3 (zero-init),
    plus the skip path (identity, or a 1x1 conv when the width changes)."""

    def __init__(self, in_ch, out_ch, emb_dim, dropout, groups, use_scale_shift_norm):
        super().__init__()
        self.use_scale_shift_norm = use_scale_shift_norm
        self.norm1 = nn.GroupNorm(groups, in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        # AdaGN needs a scale and a shift per channel; DDPM's additive conditioning needs one bias per channel
        self.emb_proj = nn.Linear(emb_dim, 2 * out_ch if use_scale_shift_norm else out_ch)
        self.norm2 = nn.GroupNorm(groups, out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)  # the block starts as its skip path (identity or 1x1 conv)
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x, emb):
        B, C, H, W = x.shape
        h = self.conv1(F.silu(self.norm1(x)))  # (B, out, H, W)
        e = self.emb_proj(F.silu(emb))[:, :, None, None]  # (B, 2*out or out, 1, 1)
        if self.use_scale_shift_norm:
            scale, shift = e.chunk(2, dim=1)  # 2 x (B, out, 1, 1)
            h = torch.addcmul(shift, self.norm2(h), 1 + scale)  # AdaGN: GroupNorm(h) * (1 + y_s) + y_b, one fused op
        else:
            h = self.norm2(h + e)  # DDPM: add the time embedding, then normalise
        h = self.conv2(self.dropout(F.silu(h)))  # (B, out, H, W)
        return self.skip(x) + h


class SpatialTransformer(nn.Module):
    """LDM Sec. 3.3: GroupNorm -> proj_in -> TransformerBlocks over the H*W pixels as tokens, attending to
    the text tokens -> proj_out (zero-init, so the block starts as the identity) -> + x."""

    def __init__(self, channels, heads, context_dim, depth, dropout, groups, self_attention):
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, channels)  # a 1x1 conv on the pixels, written as a Linear on tokens
        self.blocks = nn.ModuleList(
            TransformerBlock(channels, heads, context_dim, dropout=dropout, self_attention=self_attention)
            for _ in range(depth)
        )
        self.proj_out = nn.Linear(channels, channels)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def forward(self, x, context, context_mask):
        B, C, H, W = x.shape
        h = rearrange(self.norm(x), "b c h w -> b (h w) c")  # (B, H*W, C); a view in channels-last memory
        h = self.proj_in(h)  # (B, H*W, C)
        for block in self.blocks:
            h = block(h, context, key_mask=context_mask)  # (B, H*W, C)
        h = self.proj_out(h)  # (B, H*W, C)
        return x + rearrange(h, "b (h w) c -> b c h w", h=H, w=W)  # (B, C, H, W)


class UNetBlock(nn.Module):
    """One step of a level: a ResBlock, followed by a SpatialTransformer at attention resolutions."""

    def __init__(self, in_ch, out_ch, emb_dim, cfg: UNetConfig, attention: bool, self_attention: bool):
        super().__init__()
        self.res = ResBlock(in_ch, out_ch, emb_dim, cfg.dropout, cfg.norm_groups, cfg.use_scale_shift_norm)
        self.attn = None
        if attention:
            self.attn = SpatialTransformer(
                out_ch, cfg.num_heads, cfg.context_dim, cfg.transformer_depth, cfg.dropout, cfg.norm_groups,
                self_attention,
            )

    def forward(self, x, emb, context, context_mask):
        h = self.res(x, emb)  # (B, out, H, W)
        if self.attn is not None:
            h = self.attn(h, context, context_mask)  # (B, out, H, W)
        return h


class Downsample(nn.Module):
    """Strided 3x3 conv: (B, C, H, W) -> (B, C, H/2, W/2)."""

    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x):
        return self.conv(x)  # (B, C, H/2, W/2)


class Upsample(nn.Module):
    """Nearest-neighbour x2 then a 3x3 conv: (B, C, H, W) -> (B, C, 2H, 2W)."""

    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))  # (B, C, 2H, 2W)


class UNet(nn.Module):
    """eps_theta(x_t, t, text) (or x0 / v, whichever the training loss asks for): (B, C, H, W) -> same shape.

    H and W may differ from cfg.image_size (fully convolutional; Imagen's super-resolution U-Nets train on crops)
    but must be divisible by 2**(levels-1). Attention sits at the levels chosen by cfg.image_size.
    """

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        validate_config(cfg)
        self.cfg = cfg
        ch = cfg.channels
        emb_dim = 4 * ch  # DDPM App. B: time embedding MLP width 4 x base width
        levels = len(cfg.channel_mult)

        # Time embedding: sinusoid(t) -> Linear -> SiLU -> Linear (DDPM App. B)
        self.time_embed = nn.Sequential(nn.Linear(ch, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        # Classifier-free guidance: a learned null token replaces the whole prompt for dropped samples
        # (random start of norm ~1, then learned like any weight), or a sequence of null_length tokens
        null_shape = (cfg.null_length, cfg.context_dim) if cfg.null_length else (cfg.context_dim,)
        self.null_context = nn.Parameter(torch.randn(null_shape) / math.sqrt(cfg.context_dim))
        if cfg.pooled_dim > 0:
            # Imagen Sec. 2.5: the pooled text embedding is added to the timestep embedding
            self.pooled_proj = nn.Linear(cfg.pooled_dim, emb_dim)
            self.null_pooled = nn.Parameter(torch.randn(cfg.pooled_dim) / math.sqrt(cfg.pooled_dim))
        if cfg.low_res_channels > 0:
            # Imagen Sec. 2.4: the noise-augmentation level of the low-res input, embedded like t and added
            self.aug_embed = nn.Sequential(nn.Linear(ch, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))

        p2 = cfg.patch_size**2  # pixel_unshuffle turns (C, H, W) into (C * p^2, H / p, W / p)
        self.conv_in = nn.Conv2d((cfg.in_channels + cfg.low_res_channels) * p2, ch, 3, padding=1)
        top = cfg.image_size // cfg.patch_size  # side of the top level's feature maps

        def has_attention(level):
            return top // 2**level in cfg.attention_resolutions

        def has_self_attention(level):
            size = top // 2**level
            return cfg.self_attention_max_resolution == 0 or size <= cfg.self_attention_max_resolution

        # Down path: remember the width of every tensor pushed onto the skip stack
        skip_widths = [ch]
        width = ch
        self.down_blocks = nn.ModuleList()
        self.downsamplers = nn.ModuleList()
        blocks_at = cfg.level_blocks or (cfg.num_res_blocks,) * levels  # residual blocks per level (down path)
        for level, mult in enumerate(cfg.channel_mult):
            blocks = nn.ModuleList()
            for _ in range(blocks_at[level]):
                blocks.append(
                    UNetBlock(width, ch * mult, emb_dim, cfg, has_attention(level), has_self_attention(level))
                )
                width = ch * mult
                skip_widths.append(width)
            self.down_blocks.append(blocks)
            if level < levels - 1:
                self.downsamplers.append(Downsample(width))
                skip_widths.append(width)

        # Middle: Res, Attn, Res at the lowest resolution (always with attention, as in LDM)
        self.mid_res1 = ResBlock(width, width, emb_dim, cfg.dropout, cfg.norm_groups, cfg.use_scale_shift_norm)
        self.mid_attn = SpatialTransformer(
            width, cfg.num_heads, cfg.context_dim, cfg.transformer_depth, cfg.dropout, cfg.norm_groups,
            has_self_attention(levels - 1),
        )
        self.mid_res2 = ResBlock(width, width, emb_dim, cfg.dropout, cfg.norm_groups, cfg.use_scale_shift_norm)

        # Up path: num_res_blocks + 1 blocks per level, each concatenating one skip
        self.up_blocks = nn.ModuleList()
        self.upsamplers = nn.ModuleList()
        for level in reversed(range(levels)):
            blocks = nn.ModuleList()
            for _ in range(blocks_at[level] + 1):
                in_width = width + skip_widths.pop()
                width = ch * cfg.channel_mult[level]
                blocks.append(UNetBlock(in_width, width, emb_dim, cfg, has_attention(level), has_self_attention(level)))
            self.up_blocks.append(blocks)
            if level > 0:
                self.upsamplers.append(Upsample(width))
        assert not skip_widths, "every skip connection must be consumed exactly once"

        self.norm_out = nn.GroupNorm(cfg.norm_groups, width)
        self.conv_out = nn.Conv2d(width, cfg.out_channels * p2, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)  # the untrained model predicts 0 (DDPM/ADM convention)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, x, t, cond: Conditioning | None = None):
        """
        x (B, in_channels, H, W); t (B,) or () long/float timesteps; cond (models/conditioning.py), whose fields:
        tokens (B, L, context_dim) text vectors for cross-attention, or None = every sample uses the null context;
        mask (B, L) bool, True = real token (padding is never attended; every row needs a True, e.g. the start
            token, or that sample's attention is undefined);
        pooled (B, pooled_dim), required iff cfg.pooled_dim > 0;
        drop (B,) bool: True samples get the learned null context / null pooled vector (CFG training drops the
            prompt with some probability; CFG sampling runs one batch with [False]*B + [True]*B);
        low_res (B, low_res_channels, h, w), required iff cfg.low_res_channels > 0, upsampled bilinearly
            (align_corners=False) to (H, W); aug_level (B,) the timestep at which low_res was noised, in the same
            units as t (Imagen's noise conditioning augmentation; zeros for none);
        image_embed is not read here: unCLIP's decoder projects it into pooled and extra tokens first.
        Returns (B, out_channels, H, W).
        """
        cfg = self.cfg
        cond = cond or Conditioning()
        B, C, H, W = x.shape
        if C != cfg.in_channels:
            raise ValueError(f"x has {C} channels but cfg.in_channels={cfg.in_channels}")
        factor = cfg.patch_size * 2 ** (len(cfg.channel_mult) - 1)
        if H % factor != 0 or W % factor != 0:
            raise ValueError(f"x is {H}x{W}; height and width must be divisible by 2**(levels-1) * patch_size={factor}")
        t = torch.as_tensor(t, device=x.device)
        if t.ndim == 0:
            t = t.expand(B)  # (B,)
        if t.shape != (B,):
            raise ValueError(f"t must be a scalar or (B,) = ({B},), got shape {tuple(t.shape)}")
        if cond.image_embed is not None:
            raise ValueError("an image embedding reaches the U-Net unprojected; unCLIP's decoder turns it into pooled "
                             "and extra tokens first")
        drop, context, context_mask, pooled = cond.drop, cond.tokens, cond.mask, cond.pooled
        if drop is not None and (drop.shape != (B,) or drop.dtype != torch.bool):
            raise ValueError(f"drop must be bool ({B},), got {drop.dtype} {tuple(drop.shape)}")

        # --- condition: text tokens, with the null token for dropped samples (Ho & Salimans 2022)
        if context is None:
            context = self.null_context.to(x.dtype).expand(B, cfg.null_length or 1, cfg.context_dim)  # (B, L, D)
            context_mask = None
        else:
            if context.ndim != 3 or context.shape[0] != B or context.shape[2] != cfg.context_dim:
                raise ValueError(f"tokens must be (B, L, {cfg.context_dim}) with B={B}, got {tuple(context.shape)}")
            L = context.shape[1]
            if cfg.null_length and L != cfg.null_length:
                raise ValueError(f"this U-Net's null condition is {cfg.null_length} tokens long (null_length); pad "
                                 f"the prompts to {cfg.null_length} tokens, got {L}")
            if context_mask is not None and (context_mask.shape != (B, L) or context_mask.dtype != torch.bool):
                raise ValueError(f"mask must be bool ({B}, {L}), got {context_mask.dtype} {tuple(context_mask.shape)}")
            if drop is not None:
                null = self.null_context.to(context.dtype).expand(B, L, cfg.context_dim)  # (B, L, D)
                context = torch.where(drop[:, None, None], null, context)  # (B, L, D)
                if context_mask is not None:
                    context_mask = context_mask | drop[:, None]  # (B, L): the null token at every position

        # --- time embedding (+ pooled text, + noise-augmentation level)
        emb = self.time_embed(timestep_embedding(t, cfg.channels).to(x.dtype))  # (B, 4*ch), in the weights' dtype
        if cfg.pooled_dim > 0:
            if pooled is None:
                raise ValueError(f"this U-Net has pooled_dim={cfg.pooled_dim}: pass pooled (B, {cfg.pooled_dim})")
            if pooled.shape != (B, cfg.pooled_dim):
                raise ValueError(f"pooled must be ({B}, {cfg.pooled_dim}), got {tuple(pooled.shape)}")
            if drop is not None:
                pooled = torch.where(drop[:, None], self.null_pooled.to(pooled.dtype), pooled)  # (B, P)
            emb = emb + self.pooled_proj(pooled)  # (B, 4*ch)
        elif pooled is not None:
            raise ValueError("pooled was given but cfg.pooled_dim=0; set pooled_dim to use a pooled text vector")

        # --- super-resolution input (Imagen): upsample the low-res image and concatenate it to x
        low_res, aug_level = cond.low_res, cond.aug_level
        if cfg.low_res_channels > 0:
            if low_res is None or aug_level is None:
                raise ValueError(
                    "this is a super-resolution U-Net (low_res_channels>0): pass low_res (B, "
                    f"{cfg.low_res_channels}, h, w) and aug_level (B,) (zeros for no augmentation)"
                )
            if low_res.ndim != 4 or low_res.shape[:2] != (B, cfg.low_res_channels):
                raise ValueError(f"low_res must be ({B}, {cfg.low_res_channels}, h, w), got {tuple(low_res.shape)}")
            if low_res.shape[2:] != (H, W):
                low_res = upsample(low_res, (H, W))  # (B, c_lr, H, W)
            x = torch.cat([x, low_res.to(x.dtype)], dim=1)  # (B, C + c_lr, H, W)
            aug_level = torch.as_tensor(aug_level, device=x.device)
            if aug_level.ndim == 0:
                aug_level = aug_level.expand(B)  # (B,)
            if aug_level.shape != (B,):
                raise ValueError(f"aug_level must be a scalar or ({B},), got {tuple(aug_level.shape)}")
            emb = emb + self.aug_embed(timestep_embedding(aug_level, cfg.channels).to(x.dtype))  # (B, 4*ch)
        elif low_res is not None or aug_level is not None:
            raise ValueError("low_res/aug_level given but cfg.low_res_channels=0; set low_res_channels")

        # --- the U (H, W below are the image's sides divided by patch_size)
        if cfg.patch_size > 1:
            x = F.pixel_unshuffle(x, cfg.patch_size)  # (B, C * p^2, H / p, W / p): each p x p patch in channels
        h = self.conv_in(x.contiguous(memory_format=torch.channels_last))  # (B, ch, H, W), NHWC memory
        skips = [h]
        for level, blocks in enumerate(self.down_blocks):
            for block in blocks:
                h = block(h, emb, context, context_mask)  # (B, ch*mult, H/2^level, W/2^level)
                skips.append(h)
            if level < len(self.downsamplers):
                h = self.downsamplers[level](h)  # (B, ch*mult, H/2^(level+1), W/2^(level+1))
                skips.append(h)

        h = self.mid_res1(h, emb)
        h = self.mid_attn(h, context, context_mask)
        h = self.mid_res2(h, emb)  # (B, ch*mult[-1], H/2^(levels-1), W/2^(levels-1))

        for level, blocks in enumerate(self.up_blocks):
            for block in blocks:
                skip = skips.pop()
                if cfg.skip_scale != 1.0:
                    skip = skip * cfg.skip_scale  # Efficient U-Net (Imagen App. B.1): 1/sqrt(2)
                h = torch.cat([h, skip], dim=1)  # (B, width + skip width, h, w)
                h = block(h, emb, context, context_mask)  # (B, ch*mult, h, w)
            if level < len(self.upsamplers):
                h = self.upsamplers[level](h)  # (B, ch*mult, 2h, 2w)

        h = self.conv_out(F.silu(self.norm_out(h)))  # (B, out_channels * p^2, H, W)
        if cfg.patch_size > 1:
            h = F.pixel_shuffle(h, cfg.patch_size)  # (B, out_channels, H * p, W * p): back to pixels
        return h.contiguous()  # NCHW memory, like the input

    @contextmanager
    def attention_maps(self):
        """Record the cross-attention weights (text tokens -> pixels) of every SpatialTransformer, for pictures.

            with unet.attention_maps() as maps:
                unet(x, t, context)
            maps["down_blocks.1.0.attn.blocks.0.attn2"]  # (B, heads, H*W, L), rows sum to 1 over the L tokens

        Keys are the cross-attention modules' names; each forward pass overwrites the entries. Uses the explicit
        softmax path of Attention (store_weights), so it is slower; it is switched off again on exit.
        """
        maps = {}
        handles = []
        modules = [(name, m) for name, m in self.named_modules() if name.endswith(".attn2")]
        for name, module in modules:
            module.store_weights = True

            def hook(module, args, output, name=name):
                maps[name] = module.last_weights

            handles.append(module.register_forward_hook(hook))
        try:
            yield maps
        finally:
            for handle in handles:
                handle.remove()
            for name, module in modules:
                module.store_weights = False
                module.last_weights = None
