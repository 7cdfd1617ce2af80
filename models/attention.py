"""Multi-head attention and the transformer block used by the U-Net and the text encoders.

Papers: Vaswani et al. 2017, "Attention Is All You Need", arXiv 1706.03762 (scaled dot-product attention,
Eq. 1: Attention(Q, K, V) = softmax(Q K^T / sqrt(d)) V); Shazeer 2020, "GLU Variants Improve Transformer",
arXiv 2002.05202 (GEGLU); Rombach et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion Models",
arXiv 2112.10752, Sec. 3.3 (cross-attention: Q from the image features, K and V from the text tokens).

Attention goes through F.scaled_dot_product_attention, which picks a fused kernel (flash / memory-efficient on
a GPU). Setting `store_weights = True` on an Attention module switches it to the explicit softmax so that the
weights can be kept for pictures (the per-token cross-attention maps); tests check the two paths agree.

Notation:
    B batch, N query length (pixels H*W or text tokens), M key length (text tokens for cross-attention),
    h heads, d head dim, D model width.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from torch.nn.attention import SDPBackend, sdpa_kernel

# torch 2.13's fused CPU attention in bf16 packs its operands with AVX-512 VNNI instructions whenever the processor
# has them, then refuses ("pack_vnni2 is only supported when avx512 is supported") when ATen's dispatch was lowered
# below AVX-512 (ATEN_CPU_CAPABILITY=avx2 or default), for sequences of about 64 tokens and more. There the
# reference (math) kernel computes the same Eq. 1.
_CPU_HALF_NEEDS_MATH = torch.backends.cpu.get_cpu_capability() != "AVX512"


def scaled_dot_product_attention(q, k, v, attn_mask=None, dropout_p=0.0):
    """F.scaled_dot_product_attention (Vaswani Eq. 1) on (B, h, N, d) queries and (B, h, M, d) keys and values,
    with the math kernel where torch's fused CPU kernel fails (bf16 / fp16 below AVX-512 dispatch, see above)."""
    if _CPU_HALF_NEEDS_MATH and q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16):
        with sdpa_kernel(SDPBackend.MATH):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p)


class Attention(nn.Module):
    """Multi-head attention; self-attention when `context` is None, cross-attention otherwise."""

    def __init__(self, dim, heads, context_dim=None, head_dim=None, qkv_bias=False, dropout=0.0):
        super().__init__()
        if head_dim is None:
            if dim % heads != 0:
                raise ValueError(f"attention width {dim} is not divisible by {heads} heads; change heads or width")
            head_dim = dim // heads
        context_dim = context_dim or dim
        inner = heads * head_dim
        self.heads = heads
        self.dropout = dropout
        self.to_q = nn.Linear(dim, inner, bias=qkv_bias)
        self.to_k = nn.Linear(context_dim, inner, bias=qkv_bias)
        self.to_v = nn.Linear(context_dim, inner, bias=qkv_bias)
        self.to_out = nn.Linear(inner, dim)
        self.store_weights = False  # True: explicit softmax, weights kept in .last_weights (B, h, N, M)
        self.last_weights = None

    def forward(self, x, context=None, key_mask=None, causal=False):
        B, N, _ = x.shape
        context = x if context is None else context
        M = context.shape[1]
        q = rearrange(self.to_q(x), "b n (h d) -> b h n d", h=self.heads)  # (B, h, N, d)
        k = rearrange(self.to_k(context), "b m (h d) -> b h m d", h=self.heads)  # (B, h, M, d)
        v = rearrange(self.to_v(context), "b m (h d) -> b h m d", h=self.heads)  # (B, h, M, d)
        mask = None
        if key_mask is not None:
            assert key_mask.shape == (B, M), f"key_mask must be (B, M) = {(B, M)}, got {tuple(key_mask.shape)}"
            mask = key_mask[:, None, None, :]  # (B, 1, 1, M), True = attend
        if causal:
            assert N == M, "a causal mask needs self-attention"
            causal_mask = torch.ones(N, M, dtype=torch.bool, device=x.device).tril()  # (N, M)
            mask = causal_mask if mask is None else mask & causal_mask
        if self.store_weights:
            # Eq. 1 written out: softmax(Q K^T / sqrt(d)) V
            scores = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5  # (B, h, N, M)
            if mask is not None:
                scores = scores.masked_fill(~mask, float("-inf"))
            weights = scores.softmax(dim=-1)  # (B, h, N, M)
            self.last_weights = weights.detach()
            out = F.dropout(weights, self.dropout, self.training) @ v  # (B, h, N, d)
        else:
            out = scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0
            )  # (B, h, N, d)
        out = rearrange(out, "b h n d -> b n (h d)")  # (B, N, h*d)
        return self.to_out(out)  # (B, N, D)


class GEGLU(nn.Module):
    """GEGLU(x) = (x W + b) * GELU(x V + c) (Shazeer 2020, Eq. 5); one Linear makes both halves."""

    def __init__(self, dim_in, dim_out):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x):
        a, gate = self.proj(x).chunk(2, dim=-1)  # 2 x (..., dim_out)
        return a * F.gelu(gate)


class FeedForward(nn.Module):
    """Position-wise MLP: GEGLU (latent diffusion, Imagen) or a plain GELU MLP (CLIP, BERT) -> Linear."""

    def __init__(self, dim, mult=4, dropout=0.0, glu=True):
        super().__init__()
        hidden = dim * mult
        first = GEGLU(dim, hidden) if glu else nn.Sequential(nn.Linear(dim, hidden), nn.GELU())
        self.net = nn.Sequential(first, nn.Dropout(dropout), nn.Linear(hidden, dim))

    def forward(self, x):
        return self.net(x)


class TransformerBlock(nn.Module):
    """Pre-LayerNorm block of latent diffusion's SpatialTransformer (LDM Sec. 3.3):
    x + SelfAttn(LN(x)); x + CrossAttn(LN(x), text); x + FF(LN(x)).

    With `self_attention=False` the first sub-block is dropped (Imagen's super-resolution U-Nets keep
    cross-attention only at high resolution, where self-attention over H*W pixels would be too costly).
    """

    def __init__(self, dim, heads, context_dim, dropout=0.0, self_attention=True):
        super().__init__()
        self.self_attention = self_attention
        if self_attention:
            self.norm1 = nn.LayerNorm(dim)
            self.attn1 = Attention(dim, heads, dropout=dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, heads, context_dim=context_dim, dropout=dropout)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim, dropout=dropout, glu=True)

    def forward(self, x, context, key_mask=None):
        if self.self_attention:
            x = x + self.attn1(self.norm1(x))  # (B, N, D)
        x = x + self.attn2(self.norm2(x), context=context, key_mask=key_mask)  # (B, N, D)
        return x + self.ff(self.norm3(x))  # (B, N, D)
