"""The KL-regularised autoencoder of latent diffusion: images <-> latents f times smaller.

Papers:
  Rombach et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion Models", arXiv 2112.10752,
    Sec. 3.1 (perceptual compression: an encoder E, a decoder D, z = E(x) of size h x w x c with h = H/f;
    "KL-reg." = a slight KL penalty towards a standard normal, as in a VAE) and App. G (the loss below, the
    rescaling of z by 1 / std before diffusion);
  Kingma & Welling 2013, "Auto-Encoding Variational Bayes", arXiv 1312.6114 (the reparameterisation
    z = mu + sigma * eps, Sec. 2.4, and the Gaussian KL of App. B);
  Esser, Rombach, Ommer 2021, "Taming Transformers", arXiv 2012.09841, Eq. 7 (the adaptive GAN weight);
  Isola et al. 2017, "pix2pix", arXiv 1611.07004 (the PatchGAN discriminator);
  Lim & Ye 2017, arXiv 1705.02894 / Miyato et al. 2018 (the hinge loss of the discriminator).

Layout (channels=128, channel_mult=(1, 2, 4, 4), num_res_blocks=2: Stable Diffusion's VAE, f = 8):

    encoder  conv_in -> down_blocks[i]: num_res_blocks x Res, Downsample (not on the last level)
             -> mid_block: Res, single-head Attn, Res -> GroupNorm, SiLU, conv_out (2 * latent_channels)
    quant_conv (1x1) -> moments = [mean, logvar]  ->  z = mean + std * eps     (latent_channels x H/f x W/f)
    post_quant_conv (1x1) -> decoder  conv_in -> mid_block -> up_blocks[i]: (num_res_blocks + 1) x Res,
             Upsample (not on the last level) -> GroupNorm, SiLU, conv_out (3 channels)

There are no skip connections between encoder and decoder: all information passes through z.

Module and state_dict names are those of diffusers' AutoencoderKL (encoder.down_blocks.0.resnets.0.conv1,
encoder.mid_block.attentions.0.to_q, quant_conv, ...), so published Stable Diffusion VAE weights in diffusers
format load with load_state_dict(strict=True); tests/test_vae.py copies a random diffusers AutoencoderKL into
ours and compares the posterior and the decoded images. Of models/unet.py only Upsample is reused: its ResBlock
owns a time-embedding projection, calls its shortcut `skip` and uses GroupNorm eps 1e-5 (the VAE's is 1e-6),
its Downsample pads symmetrically, and models/attention.py's Attention names its output `to_out`, not
`to_out.0`, and has no group norm or residual. The pieces below are those same blocks, written for the VAE.

Notation (code <- paper):
    B batch, C channels, H, W image size, h, w latent size (H/f, W/f), f = factor = 2**(levels - 1)
    mean, logvar  mu and log sigma^2 of q(z | x) = N(mu, diag sigma^2) (Kingma & Welling App. B)
    scale_factor  LDM App. G / Sec. 4.3.2: z is multiplied by 1 / std(z) before diffusion (SD: 0.18215)

Not here: LPIPS. LDM's reconstruction loss adds the LPIPS perceptual distance (Zhang et al. 2018), which needs
a VGG-16 pretrained on ImageNet plus LPIPS's learned linear heads; we have no such weights and do not fake
them (an untrained VGG is not a perceptual metric), so train/vae.py trains with L1 or L2 pixel loss + KL
(+ the patch GAN). That is the autoencoder of LDM's ablations without the perceptual term, not SD's.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from core.checkpoint import load_checkpoint, load_weights
from core.config import config_from_dict
from models.attention import scaled_dot_product_attention
from models.unet import Upsample


@dataclass
class VAEConfig:
    in_channels: int = 3  # image channels in and out
    channels: int = 128  # base width; level i has channels * channel_mult[i] (LDM's ch, diffusers' block_out_channels[0])
    channel_mult: tuple = (1, 2, 4, 4)  # width multiplier per level; downsampling factor f = 2**(len - 1) (SD: 8)
    num_res_blocks: int = 2  # ResNet blocks per encoder level; the decoder has one more (diffusers' layers_per_block)
    latent_channels: int = 4  # channels of z (SD: 4)
    norm_groups: int = 32  # GroupNorm groups; every level width must be divisible by it
    mid_attention: bool = True  # single-head self-attention between the two middle ResNets (SD's VAE has it)
    quant_conv: bool = True  # 1x1 convs before the posterior and after sampling (SD 1/2 have them; SD3/Flux do not)

    @property
    def factor(self):
        """Downsampling factor f: the latent of an H x W image is (H/f, W/f)."""
        return 2 ** (len(self.channel_mult) - 1)


def validate_config(cfg: VAEConfig):
    """Raise a ValueError naming the problem and the fix; called by AutoencoderKL.__init__."""
    if len(cfg.channel_mult) < 1:
        raise ValueError("vae.channel_mult is empty; give one width multiplier per level, e.g. [1, 2, 2]")
    for mult in cfg.channel_mult:
        if (cfg.channels * mult) % cfg.norm_groups:
            raise ValueError(f"level width {cfg.channels * mult} (vae.channels={cfg.channels} x mult {mult}) is not "
                             f"divisible by vae.norm_groups={cfg.norm_groups}; change channels or norm_groups")
    if cfg.num_res_blocks < 1 or cfg.latent_channels < 1 or cfg.in_channels < 1:
        raise ValueError("vae.num_res_blocks, vae.latent_channels and vae.in_channels must be at least 1")


# ---------------------------------------------------------------- the posterior q(z | x)

class DiagonalGaussian:
    """q(z | x) = N(mean, diag exp(logvar)) from the encoder's moments (B, 2c, h, w) = [mean, logvar].

    logvar is clamped to [-30, 20] as in LDM and diffusers (std in [3e-7, 2e4]), computed in float32.
    """

    def __init__(self, parameters):
        self.mean, logvar = parameters.float().chunk(2, dim=1)  # 2 x (B, c, h, w)
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator=None):
        """Reparameterisation (Kingma & Welling Sec. 2.4): z = mean + std * eps, eps ~ N(0, I)."""
        eps = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * eps  # (B, c, h, w)

    def mode(self):
        return self.mean

    def kl(self):
        """KL(q || N(0, I)) per sample, summed over every non-batch dim (Kingma & Welling App. B):
        0.5 * sum(mean^2 + var - 1 - logvar)  -> (B,)"""
        return 0.5 * (self.mean.pow(2) + self.var - 1.0 - self.logvar).flatten(1).sum(1)

    def nll(self, x):
        """-log q(x) per sample, summed over every non-batch dim: 0.5 * sum(log 2 pi + logvar + (x - mean)^2 / var)."""
        return 0.5 * (math.log(2 * math.pi) + self.logvar + (x - self.mean).pow(2) / self.var).flatten(1).sum(1)


# ---------------------------------------------------------------- blocks (diffusers' names)

class ResnetBlock(nn.Module):
    """GroupNorm -> SiLU -> conv3x3 -> GroupNorm -> SiLU -> conv3x3, plus the shortcut (1x1 conv when the width
    changes); diffusers' ResnetBlock2D with temb_channels=None."""

    def __init__(self, in_ch, out_ch, groups):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_ch, eps=1e-6)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, out_ch, eps=1e-6)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))  # (B, out, H, W)
        h = self.conv2(F.silu(self.norm2(h)))  # (B, out, H, W)
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class Downsample(nn.Module):
    """Pad one zero row and column at the bottom and right, then a 3x3 stride-2 conv without padding:
    (B, C, H, W) -> (B, C, H/2, W/2). LDM's and diffusers' encoder (Downsample2D with padding=0)."""

    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # (B, C, H/2, W/2)


class AttentionBlock(nn.Module):
    """x + to_out(softmax(Q K^T / sqrt(C)) V) over the h*w positions, Q, K, V from GroupNorm(x): one head as
    wide as the block (LDM's AttnBlock; diffusers' Attention with group norm and residual_connection)."""

    def __init__(self, channels, groups):
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])  # diffusers: [Linear, Dropout]

    def forward(self, x):
        B, C, H, W = x.shape
        h = rearrange(self.group_norm(x), "b c h w -> b 1 (h w) c")  # (B, 1 head, H*W, C)
        h = scaled_dot_product_attention(self.to_q(h), self.to_k(h), self.to_v(h))  # (B, 1, H*W, C), Vaswani Eq. 1
        h = self.to_out[0](h)  # (B, 1, H*W, C)
        return x + rearrange(h, "b 1 (h w) c -> b c h w", h=H, w=W)  # (B, C, H, W)


class MidBlock(nn.Module):
    """Res, [Attn], Res at the lowest resolution (diffusers' UNetMidBlock2D without time embedding)."""

    def __init__(self, channels, groups, attention):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(channels, channels, groups), ResnetBlock(channels, channels, groups)])
        self.attentions = nn.ModuleList([AttentionBlock(channels, groups)] if attention else [])

    def forward(self, x):
        h = self.resnets[0](x)
        for attn in self.attentions:
            h = attn(h)
        return self.resnets[1](h)  # (B, C, h, w)


class DownEncoderBlock(nn.Module):
    def __init__(self, in_ch, out_ch, num_layers, groups, downsample):
        super().__init__()
        self.resnets = nn.ModuleList(ResnetBlock(in_ch if i == 0 else out_ch, out_ch, groups) for i in range(num_layers))
        self.downsamplers = nn.ModuleList([Downsample(out_ch)] if downsample else [])

    def forward(self, x):
        for resnet in self.resnets:
            x = resnet(x)
        for down in self.downsamplers:
            x = down(x)  # (B, out, H/2, W/2)
        return x


class UpDecoderBlock(nn.Module):
    def __init__(self, in_ch, out_ch, num_layers, groups, upsample):
        super().__init__()
        self.resnets = nn.ModuleList(ResnetBlock(in_ch if i == 0 else out_ch, out_ch, groups) for i in range(num_layers))
        self.upsamplers = nn.ModuleList([Upsample(out_ch)] if upsample else [])

    def forward(self, x):
        for resnet in self.resnets:
            x = resnet(x)
        for up in self.upsamplers:
            x = up(x)  # (B, out, 2H, 2W)
        return x


class Encoder(nn.Module):
    """x (B, in_channels, H, W) -> moments (B, 2 * latent_channels, H/f, W/f)."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        widths = [cfg.channels * m for m in cfg.channel_mult]
        levels = len(widths)
        self.conv_in = nn.Conv2d(cfg.in_channels, widths[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            DownEncoderBlock(widths[max(i - 1, 0)], widths[i], cfg.num_res_blocks, cfg.norm_groups, i < levels - 1)
            for i in range(levels))
        self.mid_block = MidBlock(widths[-1], cfg.norm_groups, cfg.mid_attention)
        self.conv_norm_out = nn.GroupNorm(cfg.norm_groups, widths[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(widths[-1], 2 * cfg.latent_channels, 3, padding=1)  # "double_z": mean and logvar

    def forward(self, x):
        h = self.conv_in(x)  # (B, ch, H, W)
        for block in self.down_blocks:
            h = block(h)  # (B, ch * mult[i], H / 2^(i+1), ...); the last level keeps its size
        h = self.mid_block(h)  # (B, ch * mult[-1], h, w)
        return self.conv_out(F.silu(self.conv_norm_out(h)))  # (B, 2c, h, w)


class Decoder(nn.Module):
    """z (B, latent_channels, h, w) -> x (B, in_channels, h*f, w*f)."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        widths = [cfg.channels * m for m in reversed(cfg.channel_mult)]  # deepest level first
        levels = len(widths)
        self.conv_in = nn.Conv2d(cfg.latent_channels, widths[0], 3, padding=1)
        self.mid_block = MidBlock(widths[0], cfg.norm_groups, cfg.mid_attention)
        self.up_blocks = nn.ModuleList(
            UpDecoderBlock(widths[max(i - 1, 0)], widths[i], cfg.num_res_blocks + 1, cfg.norm_groups, i < levels - 1)
            for i in range(levels))
        self.conv_norm_out = nn.GroupNorm(cfg.norm_groups, widths[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(widths[-1], cfg.in_channels, 3, padding=1)

    def forward(self, z):
        h = self.mid_block(self.conv_in(z))  # (B, ch * mult[-1], h, w)
        for block in self.up_blocks:
            h = block(h)  # (B, width, 2h, 2w); the last block keeps its size
        return self.conv_out(F.silu(self.conv_norm_out(h)))  # (B, in_channels, H, W)


class AutoencoderKL(nn.Module):
    """E and D of LDM Sec. 3.1 with a Gaussian posterior; images in [-1, 1], H and W divisible by `factor`."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        validate_config(cfg)
        self.cfg = cfg
        c = cfg.latent_channels
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = nn.Conv2d(2 * c, 2 * c, 1) if cfg.quant_conv else None
        self.post_quant_conv = nn.Conv2d(c, c, 1) if cfg.quant_conv else None

    @property
    def factor(self):
        """Downsampling factor f: the latent is (H/f, W/f)."""
        return self.cfg.factor

    @property
    def last_layer(self):
        """The decoder's last weight, where the adaptive GAN weight compares gradients (taming Eq. 7)."""
        return self.decoder.conv_out.weight

    def encode(self, x) -> DiagonalGaussian:
        B, C, H, W = x.shape
        if C != self.cfg.in_channels or H % self.factor or W % self.factor:
            raise ValueError(f"the VAE takes (B, {self.cfg.in_channels}, H, W) with H and W divisible by "
                             f"{self.factor}; got {tuple(x.shape)}")
        moments = self.encoder(x)  # (B, 2c, H/f, W/f)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        return DiagonalGaussian(moments)

    def decode(self, z):
        assert z.ndim == 4 and z.shape[1] == self.cfg.latent_channels, f"z must be (B, c, h, w), got {tuple(z.shape)}"
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)  # (B, in_channels, h*f, w*f)

    def forward(self, x, sample_posterior=True, generator=None):
        """-> (reconstruction (B, C, H, W), posterior); z is a sample of q(z | x), or its mean."""
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()  # (B, c, h, w)
        return self.decode(z.to(x.dtype)), posterior


def load_vae(path, device="cpu"):
    """A checkpoint of train/vae.py -> (model in eval mode on `device` with the EMA weights if it has them,
    scale_factor, its VAEConfig). The scale factor is stored when training ends."""

    ckpt = load_checkpoint(path, "vae")
    cfg = config_from_dict(VAEConfig, ckpt["config"]["vae"])
    model = AutoencoderKL(cfg)
    weights = ckpt["ema"]["weights"] if ckpt.get("ema") else ckpt["model"]
    load_weights(model, weights, "VAE weights")
    if ckpt.get("scale_factor") is None:
        raise ValueError(f"{path} was saved at step {ckpt['step']} of {ckpt['config']['train']['steps']}, before the "
                         f"latent scale factor was measured; finish training with train.resume=auto")
    return model.to(device).eval(), float(ckpt["scale_factor"]), cfg


# ---------------------------------------------------------------- the adversarial part (optional)

class NLayerDiscriminator(nn.Module):
    """PatchGAN (pix2pix; taming-transformers' NLayerDiscriminator, used by LDM): 4x4 convs, stride 2 for the
    first n_layers, then two stride-1 convs, LeakyReLU 0.2; one logit per overlapping patch.
    (B, C, H, W) -> (B, 1, H', W'); at 32 px with n_layers=3: 2x2 patches, each seeing 70x70 px in pix2pix terms.
    State_dict names (main.0.weight, ...) are taming's; norm "batch" as there, "group" as an option."""

    def __init__(self, in_channels=3, channels=64, n_layers=3, norm="batch"):
        super().__init__()
        if norm not in ("batch", "group"):
            raise ValueError(f"discriminator norm must be batch or group, got {norm!r}")

        def norm_layer(c):
            return nn.BatchNorm2d(c) if norm == "batch" else nn.GroupNorm(math.gcd(32, c), c)

        layers = [nn.Conv2d(in_channels, channels, 4, stride=2, padding=1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2 ** n, 8)
            stride = 2 if n < n_layers else 1
            layers += [nn.Conv2d(channels * prev, channels * mult, 4, stride=stride, padding=1, bias=False),
                       norm_layer(channels * mult), nn.LeakyReLU(0.2, True)]
        layers.append(nn.Conv2d(channels * mult, 1, 4, stride=1, padding=1))
        self.main = nn.Sequential(*layers)
        for m in self.modules():  # taming's weights_init
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        return self.main(x)  # (B, 1, H', W') logits


def hinge_d_loss(logits_real, logits_fake):
    """Discriminator hinge loss: 0.5 * (E[relu(1 - D(x))] + E[relu(1 + D(x_rec))])."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def adaptive_weight(rec_loss, g_loss, last_layer, disc_weight):
    """taming Eq. 7, as LDM uses it: lambda = ||grad_{G_L} L_rec|| / (||grad_{G_L} L_GAN|| + 1e-4), clamped to
    [0, 1e4] and detached, times disc_weight. G_L is the decoder's last layer; the GAN term then pulls on it
    about as hard as the reconstruction term does."""
    rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    weight = torch.linalg.vector_norm(rec_grad) / (torch.linalg.vector_norm(g_grad) + 1e-4)
    return weight.clamp(0.0, 1e4).detach() * disc_weight
