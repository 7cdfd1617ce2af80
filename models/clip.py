"""CLIP: a text transformer and an image encoder trained so that matching (image, caption) pairs point the same
way in a shared space.

Paper: Radford et al. 2021, "Learning Transferable Visual Models From Natural Language Supervision",
arXiv 2103.00020. Sec. 2.3 (the contrastive objective, Fig. 3's pseudo-code), Sec. 2.4 (the encoders: a ViT with
an extra LayerNorm before the transformer; a 12-layer causal text transformer whose [EOS] output is the sentence
vector, layer-normalised then linearly projected), Sec. 2.5 (the temperature is a learned scalar, initialised
to 0.07 and clipped so the logits are never scaled by more than 100), Sec. 3.1.4 (prompt ensembling).
Dosovitskiy et al. 2020, "An Image is Worth 16x16 Words", arXiv 2010.11929, Eq. 1-4 (the ViT).

The module structure and the state_dict names are OpenAI's (clip/model.py, also open_clip's `ViT-B-32-quickgelu`):
token_embedding, positional_embedding, transformer.resblocks.N.{ln_1, attn.in_proj_weight, attn.out_proj, ln_2,
mlp.c_fc, mlp.c_proj}, ln_final, text_projection, visual.{conv1, class_embedding, positional_embedding, ln_pre,
transformer, ln_post, proj}, logit_scale. So published weights load with load_state_dict and
tests/test_clip.py proves the features equal open_clip's. That is also why the blocks here are not
models/attention.py's: OpenAI fuses q, k and v into one `in_proj_weight` (nn.MultiheadAttention's layout) and
names its MLP c_fc / c_proj; the math is the same (checked against open_clip, which uses nn.MultiheadAttention).
Every activation is QuickGELU, x * sigmoid(1.702 x), as in all of OpenAI's published CLIPs.

Two image encoders (`vision.kind`):
    vit   OpenAI's VisionTransformer: patches -> [class token; patch tokens] + positions -> ln_pre -> blocks ->
          ln_post of the class token -> proj
    conv  a small convolutional net for tiny images (32 px): stride-2 conv stages, then the final feature map
          flattened (so positions survive, which "left of" needs), ln_post -> proj. Not OpenAI's ModifiedResNet.

Text side (the contract of models/text_encoder.py): text_features(ids, mask) -> tokens (B, L, W) after ln_final
and pooled (B, W) at the <end> token (the last True of the mask; OpenAI takes ids.argmax(-1), which finds the
same position because its <|endoftext|> has the largest id). encode_text = pooled @ text_projection.
A diffusion model conditions on (tokens, mask, pooled), so a text-only CLIP (`text_only=True`: no image encoder,
no projections) is what models/text2image.py stores inside a diffusion checkpoint.

Notation (paper Fig. 3 -> code):
    I_f, T_f          visual(images), text pooled vector (B, W_i), (B, W)
    W_i, W_t          visual.proj (W_i, E), text_projection (W, E)
    I_e, T_e          l2-normalised image_embeds, text_embeds (B, E)
    t                 logit_scale (a log: logits = exp(logit_scale) * I_e @ T_e^T)
    B batch, L tokens, W text width, E embed_dim, P patch size, N = (image_size / P)^2 patches
"""
import math
from collections import OrderedDict
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from core.checkpoint import load_checkpoint, load_weights, weights_sha256
from core.config import config_from_dict, config_to_dict
from models.attention import scaled_dot_product_attention
from models.text_encoder import TextEncoderConfig
from models.tokenizer import BPETokenizer


@dataclass
class VisionConfig:
    kind: str = "vit"  # vit: OpenAI's ViT | conv: small conv net for tiny images
    image_size: int = 32  # input side in pixels (images are square)
    patch_size: int = 4  # vit: side of a patch (N = (image_size / patch_size)^2 tokens)
    width: int = 128  # vit: token width; conv: channels of every stage
    layers: int = 4  # vit: transformer blocks; conv: stride-2 stages (image_size must divide by 2^layers)
    heads: int = 4  # vit: attention heads (width must divide by heads)


@dataclass
class CLIPConfig:
    embed_dim: int = 128  # E: width of the shared image-text space
    # the text tower: vocab_size is set from the tokenizer; max_length = OpenAI's context_length; causal as in CLIP
    text: TextEncoderConfig = field(default_factory=lambda: TextEncoderConfig(max_length=32, width=128, layers=4,
                                                                              heads=4, causal=True))
    vision: VisionConfig = field(default_factory=VisionConfig)
    init_temperature: float = 0.07  # Sec. 2.5: logit_scale starts at log(1 / 0.07)
    max_logit_scale: float = 100.0  # Sec. 2.5: exp(logit_scale) is clipped to at most this (clamp_logit_scale)


class QuickGELU(nn.Module):
    """OpenAI's GELU approximation x * sigmoid(1.702 x) (Hendrycks & Gimpel 2016, arXiv 1606.08415, Sec. 2)."""

    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class MultiheadSelfAttention(nn.Module):
    """softmax(Q K^T / sqrt(d)) V (Vaswani Eq. 1) with nn.MultiheadAttention's parameter names: one in_proj
    for q, k, v stacked (3D, D), and out_proj."""

    def __init__(self, width, heads):
        super().__init__()
        if width % heads:
            raise ValueError(f"CLIP width {width} is not divisible by {heads} heads; change heads or width")
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)

    def forward(self, x, mask=None):
        """x (B, N, D); mask None or bool (B or 1, 1, N, N), True = may attend."""
        q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)  # 3 x (B, N, D)
        q, k, v = (rearrange(t, "b n (h d) -> b h n d", h=self.heads) for t in (q, k, v))  # (B, h, N, d)
        out = scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, h, N, d)
        return self.out_proj(rearrange(out, "b h n d -> b n (h d)"))  # (B, N, D)


class ResidualAttentionBlock(nn.Module):
    """Pre-LN block: x + attn(ln_1(x)); x + mlp(ln_2(x)), mlp = c_fc -> QuickGELU -> c_proj (4x wide)."""

    def __init__(self, width, heads):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = MultiheadSelfAttention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict(
            c_fc=nn.Linear(width, 4 * width), gelu=QuickGELU(), c_proj=nn.Linear(4 * width, width)))

    def forward(self, x, mask=None):
        x = x + self.attn(self.ln_1(x), mask)  # (B, N, D)
        return x + self.mlp(self.ln_2(x))  # (B, N, D)


class Transformer(nn.Module):
    def __init__(self, width, layers, heads):
        super().__init__()
        self.resblocks = nn.ModuleList([ResidualAttentionBlock(width, heads) for _ in range(layers)])
        # OpenAI's initialisation (clip/model.py initialize_parameters), residual outputs scaled by depth
        proj_std = width ** -0.5 * (2 * layers) ** -0.5
        for block in self.resblocks:
            nn.init.normal_(block.attn.in_proj_weight, std=width ** -0.5)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.normal_(block.mlp.c_fc.weight, std=(2 * width) ** -0.5)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)

    def forward(self, x, mask=None):
        for block in self.resblocks:
            x = block(x, mask)  # (B, N, D)
        return x


class VisionTransformer(nn.Module):
    """ViT (Dosovitskiy Eq. 1-4) with CLIP's ln_pre; the class token's output is the image vector."""

    def __init__(self, cfg: VisionConfig, embed_dim):
        super().__init__()
        if cfg.image_size % cfg.patch_size:
            raise ValueError(f"vision.image_size ({cfg.image_size}) must be divisible by vision.patch_size "
                             f"({cfg.patch_size})")
        W, n = cfg.width, (cfg.image_size // cfg.patch_size) ** 2
        scale = W ** -0.5
        self.conv1 = nn.Conv2d(3, W, kernel_size=cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.class_embedding = nn.Parameter(scale * torch.randn(W))
        self.positional_embedding = nn.Parameter(scale * torch.randn(n + 1, W))
        self.ln_pre = nn.LayerNorm(W)
        self.transformer = Transformer(W, cfg.layers, cfg.heads)
        self.ln_post = nn.LayerNorm(W)
        self.proj = nn.Parameter(scale * torch.randn(W, embed_dim))

    def forward(self, images):
        B = images.shape[0]
        x = rearrange(self.conv1(images), "b w gh gw -> b (gh gw) w")  # (B, N, W): Eq. 1, x_p E
        cls = self.class_embedding.to(x.dtype).expand(B, 1, -1)  # (B, 1, W): x_class
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)  # (B, N+1, W): Eq. 1, + E_pos
        x = self.transformer(self.ln_pre(x))  # (B, N+1, W): Eq. 2-3
        return self.ln_post(x[:, 0]) @ self.proj  # (B, E): Eq. 4, y = LN(z_L^0), then W_i


class ConvImageEncoder(nn.Module):
    """Tiny-image option: `layers` stages of [3x3 conv stride 2, GroupNorm, QuickGELU, 3x3 conv, GroupNorm,
    QuickGELU], then the (width, S, S) map flattened, LayerNorm, projection to the shared space."""

    def __init__(self, cfg: VisionConfig, embed_dim):
        super().__init__()
        side = cfg.image_size // 2 ** cfg.layers
        if side < 1 or cfg.image_size % 2 ** cfg.layers:
            raise ValueError(f"vision.image_size ({cfg.image_size}) must be divisible by 2^vision.layers "
                             f"({2 ** cfg.layers}) for the conv encoder")
        W = cfg.width
        groups = math.gcd(W, 8)
        stages = []
        for i in range(cfg.layers):
            stages.append(nn.Sequential(
                nn.Conv2d(3 if i == 0 else W, W, 3, stride=2, padding=1), nn.GroupNorm(groups, W), QuickGELU(),
                nn.Conv2d(W, W, 3, padding=1), nn.GroupNorm(groups, W), QuickGELU()))
        self.stages = nn.Sequential(*stages)
        self.ln_post = nn.LayerNorm(W * side * side)
        self.proj = nn.Parameter((W * side * side) ** -0.5 * torch.randn(W * side * side, embed_dim))

    def forward(self, images):
        x = self.stages(images).flatten(1)  # (B, W * S * S)
        return self.ln_post(x) @ self.proj  # (B, E)


class CLIP(nn.Module):
    def __init__(self, cfg: CLIPConfig, text_only=False):
        super().__init__()
        t = cfg.text
        if t.vocab_size <= 0:
            raise ValueError("CLIPConfig.text.vocab_size is not set; set it from the tokenizer "
                             "(text.vocab_size = tokenizer.vocab_size)")
        if t.dropout:
            raise ValueError(f"CLIP has no dropout (text.dropout={t.dropout}); set text.dropout=0")
        if not t.causal:  # a YAML section `text:` starts from TextEncoderConfig's defaults, where causal is false
            raise ValueError("CLIP's text transformer is causal (Sec. 2.4); set text.causal=true in the CLIP config")
        self.cfg = cfg
        self.token_embedding = nn.Embedding(t.vocab_size, t.width)
        self.positional_embedding = nn.Parameter(torch.empty(t.max_length, t.width))
        self.transformer = Transformer(t.width, t.layers, t.heads)
        self.ln_final = nn.LayerNorm(t.width)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        if text_only:  # the text tower alone: what a text-to-image model conditions on
            return
        self.text_projection = nn.Parameter(t.width ** -0.5 * torch.randn(t.width, cfg.embed_dim))
        if cfg.vision.kind == "vit":
            self.visual = VisionTransformer(cfg.vision, cfg.embed_dim)
        elif cfg.vision.kind == "conv":
            self.visual = ConvImageEncoder(cfg.vision, cfg.embed_dim)
        else:
            raise ValueError(f"unknown vision.kind {cfg.vision.kind!r}; use vit or conv")
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / cfg.init_temperature)))  # Sec. 2.5

    def text_features(self, ids, mask):
        """ids (B, L) long, mask (B, L) bool (True on <start> ... <end>) -> tokens (B, L, W), pooled (B, W)."""
        B, L = ids.shape
        if L > self.cfg.text.max_length:
            raise ValueError(f"token ids have length {L}, over CLIP's context length {self.cfg.text.max_length}; "
                             f"tokenize with max_length={self.cfg.text.max_length}")
        assert mask.shape == (B, L) and mask.dtype == torch.bool, "mask must be bool (B, L) like ids"
        x = self.token_embedding(ids) + self.positional_embedding[:L]  # (B, L, W)
        causal = torch.ones(L, L, dtype=torch.bool, device=ids.device).tril()  # (L, L): key j <= query i
        attend = mask[:, None, None, :] & causal  # (B, 1, L, L): and padding is never a key
        tokens = self.ln_final(self.transformer(x, attend))  # (B, L, W)
        end = mask.sum(dim=1) - 1  # (B,) position of <end>
        return tokens, tokens[torch.arange(B, device=ids.device), end]  # (B, L, W), (B, W)

    def forward(self, ids, mask):
        """The text-encoder contract of models/text_encoder.py: (tokens (B, L, W), pooled (B, W))."""
        return self.text_features(ids, mask)

    def encode_text(self, ids, mask):
        return self.text_features(ids, mask)[1] @ self.text_projection  # (B, E): T_f W_t

    def encode_image(self, images):
        """images (B, 3, H, W) in [-1, 1] (or normalised however the weights were trained) -> (B, E): I_f W_i."""
        return self.visual(images)

    def clamp_logit_scale(self):
        """Sec. 2.5: 'clipped to prevent scaling the logits by more than 100'; call after every optimizer step."""
        with torch.no_grad():
            self.logit_scale.clamp_(0, math.log(self.cfg.max_logit_scale))


def contrastive_loss(image_embeds, text_embeds, logit_scale):
    """Fig. 3: symmetric cross-entropy over the B x B cosine similarities, the diagonal being the true pairs.
    image_embeds, text_embeds (B, E), not yet normalised; logit_scale a scalar (log of the inverse temperature).
    Returns (loss, logits (B, B))."""
    B = image_embeds.shape[0]
    I_e = F.normalize(image_embeds, dim=-1)  # (B, E)
    T_e = F.normalize(text_embeds, dim=-1)  # (B, E)
    logits = I_e @ T_e.t() * logit_scale.exp()  # (B, B): logits[i, j] = <I_i, T_j> / temperature
    labels = torch.arange(B, device=logits.device)
    loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2  # (loss_i + loss_t) / 2
    return loss, logits


@torch.no_grad()
def embed_texts(model, tokenizer, texts, batch_size=512):
    """Captions -> l2-normalised text embeddings (N, E); over-long captions are cut (truncate=True)."""
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(texts), batch_size):
        ids, mask = tokenizer(texts[i: i + batch_size], max_length=model.cfg.text.max_length, truncate=True)
        out.append(torch.nn.functional.normalize(model.encode_text(ids.to(device), mask.to(device)), dim=-1))
    return torch.cat(out)


@torch.no_grad()
def embed_images(model, images, batch_size=512):
    """uint8 (N, 3, H, W) -> l2-normalised image embeddings (N, E)."""
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(images), batch_size):
        x = images[i: i + batch_size].to(device).float() / 127.5 - 1  # (b, 3, H, W) in [-1, 1]
        out.append(torch.nn.functional.normalize(model.encode_image(x), dim=-1))
    return torch.cat(out)


def load_clip(path, device="cpu", text_only=False):
    """A checkpoint of train/clip.py -> (CLIP in eval mode on `device`, its BPETokenizer, its CLIPConfig).
    text_only=True builds and loads the text tower alone (the image tower's weights are skipped)."""

    ckpt = load_checkpoint(path, "clip")
    cfg = config_from_dict(CLIPConfig, ckpt["config"]["model"])
    model = CLIP(cfg, text_only=text_only)
    weights = {k: v for k, v in ckpt["model"].items() if k in model.state_dict()} if text_only else ckpt["model"]
    load_weights(model, weights, f"CLIP weights in {path}")
    return model.to(device).eval(), BPETokenizer.from_state_dict(ckpt["tokenizer"]), cfg


def clip_fingerprint(model):
    """What a model conditioned on CLIP embeddings remembers of its CLIP (unCLIP's prior and decoder): a SHA-256 of
    the config and weights, so that joining parts trained on different CLIPs (whose spaces differ) is refused."""
    return weights_sha256(model, repr(sorted(config_to_dict(model.cfg).items())).encode())


@torch.no_grad()
def text_conditions(model, tokenizer, texts, truncate=False, batch_size=512):
    """Captions -> (tokens (N, L, W) after ln_final, mask (N, L), unit z_t (N, E)), padded to the full context
    length L = text.max_length: what unCLIP's prior reads of a caption. Over-long captions are an error unless
    truncate."""
    device = next(model.parameters()).device
    L = model.cfg.text.max_length
    tokens, masks, z_t = [], [], []
    for i in range(0, len(texts), batch_size):
        ids, mask = tokenizer(texts[i: i + batch_size], max_length=L, truncate=truncate)  # (b, L) each
        t, pooled = model.text_features(ids.to(device), mask.to(device))  # (b, L, W), (b, W)
        tokens.append(t)
        masks.append(mask.to(device))
        z_t.append(torch.nn.functional.normalize(pooled @ model.text_projection, dim=-1))  # (b, E)
    return torch.cat(tokens), torch.cat(masks), torch.cat(z_t)
