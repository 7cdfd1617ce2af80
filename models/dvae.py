"""The discrete VAE of DALL-E: an image -> a grid of tokens from a codebook of K, and back.

Paper: Ramesh et al. 2021, "Zero-Shot Text-to-Image Generation", arXiv 2102.12092, Sec. 2.1 and App. A.
The encoder gives K logits per position of an (H/f) x (W/f) grid; training relaxes the categorical posterior
with the gumbel-softmax (Jang et al. 2016, arXiv 1611.01144; Maddison et al. 2016, arXiv 1611.00712) at a
temperature tau annealed from 1 to 1/16, and maximises the evidence lower bound (Eq. 1 of the paper)

    ELB = E_{q(z | x)} [ log p(x | z) ]  -  beta * KL( q(z | x) || p(z) ),    p(z) uniform over the K codes

with beta warmed up from 0 (App. A.2: to 6.6 over the first 5000 updates). p(x | z) is the logit-Laplace
distribution (App. A.3): each pixel, mapped into (eps, 1 - eps) by x -> (1 - 2 eps) x + eps, has density

    f(x | mu, b) = 1 / (2 b x (1 - x)) * exp(-|logit(x) - mu| / b)                    (App. A.3, Eq. 2)

i.e. a Laplace(mu, b) in logit space pushed through a sigmoid; the decoder outputs 2 x 3 channels, mu and
log b. The transformer's tokens are the argmax of the encoder's logits.

The modules and their state_dict keys are those of OpenAI's `dall_e` package (blocks.input, blocks.group_N
.block_M.{id_path,res_path.conv_K}.{w,b}, blocks.output.conv; residual blocks with a post-gain of 1 / L^2 for
L = group_count * n_blk_per_group blocks; max-pool down, nearest up), so its published weights load. With
group_count = 4, n_hid = 256, n_blk_per_group = 2, n_init = 128 and K = 8192 this is the published model
(f = 8: 256 px -> 32 x 32 tokens; tests/test_dvae.py proves the equality on random weights). To convert the
published pickles (https://cdn.openai.com/dall-e/encoder.pkl, decoder.pkl; pickled modules that need the
`dall_e` package and `torch.load(weights_only=False)`, so only for files you trust) into state_dict files that
load with weights_only=True:

    python -c "import torch, dall_e; torch.save(torch.load('encoder.pkl', weights_only=False).state_dict(), 'enc.pt')"
    python -c "import torch, dall_e; torch.save(torch.load('decoder.pkl', weights_only=False).state_dict(), 'dec.pt')"
    dvae = DiscreteVAE(DVAEConfig(vocab_size=8192, n_hid=256, n_init=128, group_count=4, n_blk_per_group=2))
    dvae.encoder.load_state_dict(torch.load('enc.pt', weights_only=True))
    dvae.decoder.load_state_dict(torch.load('dec.pt', weights_only=True))

Notation (code <- paper): vocab_size <- K, tau <- temperature, beta <- KL weight, logits (B, K, h, w) <- the
encoder's output, z (B, K, h, w) <- relaxed one-hot codes, f <- the downsampling factor 2^(group_count - 1).
"""
import math
from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

LOGIT_LAPLACE_EPS = 0.1  # App. A.3: pixels are mapped into (eps, 1 - eps)


@dataclass
class DVAEConfig:
    in_channels: int = 3        # image channels
    vocab_size: int = 512       # K: codebook size (paper: 8192)
    n_hid: int = 32             # width of the first group; group g is 2^(g-1) x wider (paper: 256)
    n_init: int = 32            # width of the decoder's first 1x1 conv, the codebook embedding (paper: 128)
    group_count: int = 3        # groups of residual blocks; f = 2^(group_count - 1) (paper: 4, f = 8)
    n_blk_per_group: int = 1    # residual blocks per group (paper: 2)

    @property
    def factor(self):
        return 2 ** (self.group_count - 1)


class Conv2d(nn.Module):
    """A 'same' convolution with parameters named w and b (dall_e's names), weights ~ N(0, 1 / fan_in)."""

    def __init__(self, n_in, n_out, kw):
        super().__init__()
        if kw % 2 != 1:
            raise ValueError(f"kernel width {kw} must be odd")
        self.w = nn.Parameter(torch.randn(n_out, n_in, kw, kw) / math.sqrt(n_in * kw ** 2))
        self.b = nn.Parameter(torch.zeros(n_out))

    def forward(self, x):
        return F.conv2d(x, self.w, self.b, padding=(self.w.shape[-1] - 1) // 2)


class ResBlock(nn.Module):
    """x -> id_path(x) + (1 / L^2) * res_path(x): four convs with ReLUs before each, n_out / 4 wide inside.
    Encoder blocks use kernels 3, 3, 3, 1; decoder blocks 1, 3, 3, 3 (dall_e's EncoderBlock / DecoderBlock)."""

    def __init__(self, n_in, n_out, n_layers, kernels):
        super().__init__()
        if n_out % 4:
            raise ValueError(f"block width {n_out} must be divisible by 4")
        n_hid = n_out // 4
        self.post_gain = 1 / n_layers ** 2
        self.id_path = Conv2d(n_in, n_out, 1) if n_in != n_out else nn.Identity()
        widths = [n_in, n_hid, n_hid, n_hid, n_out]
        layers = []
        for i, kw in enumerate(kernels):
            layers += [(f"relu_{i + 1}", nn.ReLU()), (f"conv_{i + 1}", Conv2d(widths[i], widths[i + 1], kw))]
        self.res_path = nn.Sequential(OrderedDict(layers))

    def forward(self, x):
        return self.id_path(x) + self.post_gain * self.res_path(x)


def _group(blocks, resample):
    return nn.Sequential(OrderedDict([*((f"block_{i + 1}", b) for i, b in enumerate(blocks)), *resample]))


class Encoder(nn.Module):
    """(B, 3, H, W) mapped pixels -> (B, K, H/f, W/f) logits."""

    def __init__(self, cfg: DVAEConfig):
        super().__init__()
        G, n, L = cfg.group_count, cfg.n_blk_per_group, cfg.group_count * cfg.n_blk_per_group
        widths = [cfg.n_hid * 2 ** g for g in range(G)]  # paper: 1, 2, 4, 8 x n_hid
        groups = [("input", Conv2d(cfg.in_channels, cfg.n_hid, 7))]
        w_in = cfg.n_hid
        for g in range(G):
            blocks = [ResBlock(w_in if i == 0 else widths[g], widths[g], L, (3, 3, 3, 1)) for i in range(n)]
            groups.append((f"group_{g + 1}", _group(blocks, [("pool", nn.MaxPool2d(2))] if g < G - 1 else [])))
            w_in = widths[g]
        groups.append(("output", nn.Sequential(OrderedDict([("relu", nn.ReLU()),
                                                             ("conv", Conv2d(w_in, cfg.vocab_size, 1))]))))
        self.blocks = nn.Sequential(OrderedDict(groups))

    def forward(self, x):
        return self.blocks(x)


class Decoder(nn.Module):
    """(B, K, h, w) one-hot or relaxed codes -> (B, 2 x 3, h f, w f): logit-Laplace mu and log b."""

    def __init__(self, cfg: DVAEConfig):
        super().__init__()
        G, n, L = cfg.group_count, cfg.n_blk_per_group, cfg.group_count * cfg.n_blk_per_group
        widths = [cfg.n_hid * 2 ** (G - 1 - g) for g in range(G)]  # paper: 8, 4, 2, 1 x n_hid
        groups = [("input", Conv2d(cfg.vocab_size, cfg.n_init, 1))]  # the codebook embedding
        w_in = cfg.n_init
        for g in range(G):
            blocks = [ResBlock(w_in if i == 0 else widths[g], widths[g], L, (1, 3, 3, 3)) for i in range(n)]
            up = [("upsample", nn.Upsample(scale_factor=2, mode="nearest"))] if g < G - 1 else []
            groups.append((f"group_{g + 1}", _group(blocks, up)))
            w_in = widths[g]
        groups.append(("output", nn.Sequential(OrderedDict([("relu", nn.ReLU()),
                                                             ("conv", Conv2d(w_in, 2 * cfg.in_channels, 1))]))))
        self.blocks = nn.Sequential(OrderedDict(groups))

    def forward(self, z):
        return self.blocks(z)


# ---------------------------------------------------------------- the paper's pieces, as free functions

def map_pixels(x01, eps=LOGIT_LAPLACE_EPS):
    """[0, 1] -> [eps, 1 - eps] (App. A.3), so that logit(x) stays finite."""
    return (1 - 2 * eps) * x01 + eps


def unmap_pixels(x, eps=LOGIT_LAPLACE_EPS):
    """The inverse of map_pixels, clamped to [0, 1]."""
    return ((x - eps) / (1 - 2 * eps)).clamp(0, 1)


def logit_laplace_log_prob(x, mu, log_b):
    """log f(x | mu, b) of App. A.3 for x in (0, 1): a Laplace(mu, b) in logit space through a sigmoid.
    log f = -log(2 b) - log x - log(1 - x) - |logit(x) - mu| / b"""
    return -math.log(2) - log_b - torch.log(x) - torch.log1p(-x) - (torch.logit(x) - mu).abs() * torch.exp(-log_b)


def kl_to_uniform(logits, dim=1):
    """KL(q || uniform over K) = sum_k q_k log(q_k K) per position, q = softmax(logits) along `dim`."""
    log_q = F.log_softmax(logits.float(), dim=dim)
    return (log_q.exp() * (log_q + math.log(logits.shape[dim]))).sum(dim)


def diversity_penalty(logits, dim=1):
    """KL(q_bar || uniform) = log K - H(q_bar) of the posterior averaged over a batch and its positions: 0 when the
    batch spreads over the whole codebook, log K when every position picks one code. Not in DALL-E: the diversity
    loss of wav2vec 2.0 (Baevski et al. 2020, arXiv 2006.11477, Eq. 4), a remedy for a collapsed codebook."""
    q_bar = F.softmax(logits.float(), dim=dim).movedim(dim, -1).flatten(0, -2).mean(0)  # (K,)
    return (q_bar * (q_bar.clamp_min(1e-12).log() + math.log(q_bar.numel()))).sum()


def gumbel_noise(like, generator=None):
    """Standard Gumbel noise g = -log(-log U), U ~ Uniform(0, 1), of like's shape, dtype and device, drawn in
    logical (B, K, h, w) order whatever like's memory order (train.channels_last). Through U rather than
    F.gumbel_softmax's -log(Exp(1)): the same distribution, but the CPU draws uniforms ~7x faster than exponentials
    (3 against 21 ms for a batch of 32 x 512 x 8 x 8 on two threads; 8% of a dVAE step at the tiny preset)."""
    u = torch.rand(like.shape, generator=generator, dtype=like.dtype, device=like.device)
    return -(-u.clamp_min(torch.finfo(like.dtype).tiny).log()).log()  # (like's shape); U = 0 clamped: finite


def gumbel_softmax(logits, tau, hard=False, dim=1, generator=None):
    """A sample of the gumbel-softmax relaxation (Jang et al. 2016, Eq. 1): softmax((logits + g) / tau) with
    g ~ Gumbel(0, 1) (gumbel_noise). hard: the one-hot of its argmax forward, the soft gradient backward
    (straight-through)."""
    gumbels = gumbel_noise(logits, generator)
    y = ((logits + gumbels) / tau).softmax(dim)
    if not hard:
        return y
    one_hot = torch.zeros_like(y).scatter_(dim, y.argmax(dim, keepdim=True), 1.0)
    return one_hot - y.detach() + y


def cosine_schedule(step, total, start, end):
    """start at step 0 -> end at step `total` and after, along half a cosine (App. A.2 anneals the temperature
    and the KL weight this way)."""
    progress = min(1.0, step / max(1, total))
    return end + (start - end) * 0.5 * (1 + math.cos(math.pi * progress))


class DiscreteVAE(nn.Module):
    """Encoder + decoder; images in [-1, 1] at the interface, mapped pixels inside."""

    def __init__(self, cfg: DVAEConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)

    @property
    def factor(self):
        return self.cfg.factor

    def check_images(self, x):
        B, C, H, W = x.shape
        if H % self.factor or W % self.factor:
            raise ValueError(f"images of {H}x{W} are not divisible by the dVAE's factor {self.factor}; resize them to "
                             f"a multiple of {self.factor}")
        return B, C, H, W

    def logits(self, x):
        """(B, 3, H, W) in [-1, 1] -> (B, K, H/f, W/f) encoder logits."""
        self.check_images(x)
        return self.encoder(map_pixels((x + 1) / 2))

    def encode(self, x):
        """(B, 3, H, W) in [-1, 1] -> (B, H/f, W/f) token ids: the argmax of the logits (Sec. 2.1)."""
        return self.logits(x).argmax(1)

    def decode_codes(self, z):
        """(B, K, h, w) codes -> (B, 3, h f, w f) mu and log b of the logit-Laplace."""
        stats = self.decoder(z)  # (B, 6, H, W)
        return stats.chunk(2, dim=1)

    def decode(self, tokens):
        """(B, h, w) token ids -> (B, 3, h f, w f) pictures in [-1, 1]: sigmoid(mu) unmapped (the mode in
        logit space, as dall_e's usage example)."""
        z = F.one_hot(tokens, self.cfg.vocab_size).permute(0, 3, 1, 2).float()  # (B, K, h, w)
        mu, _ = self.decode_codes(z.to(next(self.parameters()).dtype))
        return unmap_pixels(torch.sigmoid(mu.float())) * 2 - 1

    def forward(self, x, tau, beta, hard=False, generator=None, diversity=0.0):
        """One training evaluation: -ELB per element, and its parts. x (B, 3, H, W) in [-1, 1].
        diversity: weight of diversity_penalty added to the loss (0 = the paper's loss).
        Returns (loss, dict(nll: per pixel, kl: per position, diversity, logits, rec in [-1, 1]))."""
        B, C, H, W = self.check_images(x)
        x_mapped = map_pixels((x + 1) / 2)  # (B, 3, H, W) in [eps, 1 - eps]
        logits = self.encoder(x_mapped)  # (B, K, h, w)
        z = gumbel_softmax(logits.float(), tau, hard=hard, dim=1, generator=generator)  # (B, K, h, w)
        mu, log_b = self.decode_codes(z.to(logits.dtype))  # (B, 3, H, W) each
        nll = -logit_laplace_log_prob(x_mapped, mu.float(), log_b.float())  # (B, 3, H, W)
        kl = kl_to_uniform(logits)  # (B, h, w)
        # Eq. 1 per element: (sum of nll + beta * sum of KL) / number of pixels, so beta keeps the paper's meaning
        # relative to the pixel sum
        loss = (nll.sum() + beta * kl.sum()) / nll.numel()
        spread = diversity_penalty(logits)  # 0 when the batch uses the whole codebook evenly
        if diversity:
            loss = loss + diversity * spread
        rec = unmap_pixels(torch.sigmoid(mu.float())) * 2 - 1
        return loss, {"nll": nll.mean(), "kl": kl.mean(), "diversity": spread, "logits": logits, "rec": rec}

    def decoder_loss(self, x, tokens=None):
        """The decoder alone on the codes it is given at sampling time: -log p(x | D(one_hot(argmax logits))) per
        pixel, the encoder held fixed (no gradient reaches it). x (B, 3, H, W) in [-1, 1]; tokens (B, h, w): x's
        argmax codes when already known (train/dvae.py encodes the training images once for the whole phase, the
        encoder being frozen), else the encoder's here.
        Not in the paper, whose decoder only ever sees relaxed codes (tau -> 1/16); a short phase of this after
        the joint training closes the gap between the relaxed and the hard codes (configs/shapes/dvae.yaml).
        Returns (loss, dict(nll, tokens, rec in [-1, 1]))."""
        self.check_images(x)
        x_mapped = map_pixels((x + 1) / 2)
        if tokens is None:
            with torch.no_grad():
                tokens = self.encoder(x_mapped).argmax(1)  # (B, h, w)
        z = F.one_hot(tokens, self.cfg.vocab_size).permute(0, 3, 1, 2).float()  # (B, K, h, w)
        mu, log_b = self.decode_codes(z)
        nll = -logit_laplace_log_prob(x_mapped, mu.float(), log_b.float()).mean()
        rec = unmap_pixels(torch.sigmoid(mu.float())) * 2 - 1
        return nll, {"nll": nll, "tokens": tokens, "rec": rec}


def codebook_usage(tokens, vocab_size):
    """(perplexity exp(H) of the token histogram, number of codes used) over any tensor of token ids."""
    counts = torch.bincount(tokens.flatten(), minlength=vocab_size).double()
    p = counts / counts.sum()
    entropy = -(p[p > 0] * p[p > 0].log()).sum()
    return entropy.exp().item(), int((counts > 0).sum())


def token_fingerprint(dvae):
    """What a transformer remembers of the dVAE whose tokens it was trained on: the dVAE's config and a SHA-256 of
    its encoder's weights. The decoder is left out: one trained further on the same tokens (train.decoder_share, or
    a user's own) still decodes what the transformer draws, as Stable Diffusion's fine-tuned VAE decoders do."""
    from core.checkpoint import weights_sha256
    from core.config import config_to_dict
    return {"config": config_to_dict(dvae.cfg), "encoder_sha256": weights_sha256(dvae.encoder)}


def load_dvae(path, device="cpu"):
    """A dVAE checkpoint (train/dvae.py, kind "dvae") -> (DiscreteVAE in eval mode, its checkpoint dict)."""
    from core.checkpoint import load_checkpoint, load_weights
    from core.config import config_from_dict
    ckpt = load_checkpoint(path, "dvae")
    model = DiscreteVAE(config_from_dict(DVAEConfig, ckpt["config"]["dvae"]))
    load_weights(model, ckpt["ema"]["weights"] if ckpt.get("ema") else ckpt["model"], "dVAE checkpoint weights")
    return model.to(device).eval(), ckpt
