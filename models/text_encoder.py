"""A small transformer text encoder, trained jointly with the diffusion model.

Papers: Vaswani et al. 2017, "Attention Is All You Need", arXiv 1706.03762 (the transformer; here its encoder
with the LayerNorm moved in front of each sub-block, "pre-LN"); Rombach et al. 2022, "High-Resolution Image
Synthesis with Latent Diffusion Models", arXiv 2112.10752, Sec. 3.3 and App. (the text-to-image LDM conditions on
a transformer tau_theta trained jointly with the U-Net: tokens -> embeddings + positions -> N blocks -> the
context that cross-attention reads); Radford et al. 2021, "Learning Transferable Visual Models From Natural
Language Supervision" (CLIP), arXiv 2103.00020, Sec. 2.4 (causal text tower, sentence vector taken at the
[EOS] token).

Output contract shared by every text encoder in this codebase (this one, CLIP's, the masked LM), the only
thing the U-Net sees:
    tokens  (B, L, width)  one vector per token position; read by cross-attention together with `mask`
    mask    (B, L) bool    True on real tokens (<start> ... <end>), False on padding; passed through unchanged
    pooled  (B, width)     one vector per prompt: the output at the <end> token. With causal=True it is the
                           only position that has seen the whole prompt (CLIP's convention); with causal=False
                           every position has, and we keep the same rule for one convention across encoders.
The <end> position is found from the mask, as the last True position of each row (the tokenizer writes
<start> tokens <end> then padding, so the mask is a prefix of Trues); CLIP finds it as ids.argmax(-1), which
works only because its <|endoftext|> has the largest id.

Notation (LDM / Vaswani -> code): tau_theta = TextEncoder; y (prompt) -> ids; d_model = width; N = layers;
h = heads; positional encoding = learned `position_embedding` (as CLIP and LDM's BERT-like tau_theta, not the
sinusoids of Vaswani Sec. 3.5). B batch, L token length (<= max_length), D = width.
"""
from dataclasses import dataclass

import torch
import torch.nn as nn

from models.attention import Attention, FeedForward


@dataclass
class TextEncoderConfig:
    vocab_size: int = 0  # set from the tokenizer at build time (tokenizer.vocab_size); 0 = not set -> error
    max_length: int = 32  # token limit including <start> and <end>; = the tokenizer's max_length
    width: int = 128  # token vector size D; = the U-Net's context_dim
    layers: int = 4  # number of transformer blocks N
    heads: int = 4  # attention heads h; width must be divisible by heads
    dropout: float = 0.0  # dropout on attention weights and inside the MLP
    causal: bool = False  # True: causal mask (CLIP-style text tower); False: bidirectional (BERT-style)


class EncoderBlock(nn.Module):
    """Pre-LN transformer encoder block: x + SelfAttn(LN(x)); x + MLP(LN(x)), MLP = Linear-GELU-Linear (4x)."""

    def __init__(self, width, heads, dropout, causal):
        super().__init__()
        self.causal = causal
        self.norm1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads, qkv_bias=True, dropout=dropout)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = FeedForward(width, mult=4, dropout=dropout, glu=False)

    def forward(self, x, mask):
        x = x + self.attn(self.norm1(x), key_mask=mask, causal=self.causal)  # (B, L, D)
        return x + self.mlp(self.norm2(x))  # (B, L, D)


class TextEncoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        if cfg.vocab_size <= 0:
            raise ValueError(f"TextEncoderConfig.vocab_size is {cfg.vocab_size}; set it from the tokenizer: "
                             f"TextEncoderConfig(vocab_size=tokenizer.vocab_size, ...)")
        self.cfg = cfg
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.position_embedding = nn.Parameter(torch.empty(cfg.max_length, cfg.width))
        self.blocks = nn.ModuleList(
            [EncoderBlock(cfg.width, cfg.heads, cfg.dropout, cfg.causal) for _ in range(cfg.layers)])
        self.final_norm = nn.LayerNorm(cfg.width)
        # CLIP's initialisation of the embeddings (std 0.02 tokens, 0.01 positions); Linear/LayerNorm keep
        # PyTorch's defaults.
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.position_embedding, std=0.01)

    def forward(self, ids, mask):
        """ids (B, L) long, mask (B, L) bool True on real tokens -> (tokens (B, L, D), pooled (B, D))."""
        B, L = ids.shape
        if L > self.cfg.max_length:
            raise ValueError(f"token ids have length {L}, over TextEncoderConfig.max_length={self.cfg.max_length}; "
                             f"tokenize with max_length={self.cfg.max_length} or raise the config's max_length")
        if mask.shape != (B, L) or mask.dtype != torch.bool:
            raise ValueError(f"mask must be a bool tensor of shape {(B, L)} like ids, got {mask.dtype} "
                             f"{tuple(mask.shape)}; use the mask the tokenizer returns")
        if not mask[:, 0].all() or (mask[:, 1:] & ~mask[:, :-1]).any():
            raise ValueError("mask must be True on a prefix of each row (<start> tokens <end>, then padding) with "
                             "at least one True; got a row that is empty or padded on the left")
        x = self.token_embedding(ids) + self.position_embedding[:L]  # (B, L, D)
        for block in self.blocks:
            x = block(x, mask)  # (B, L, D)
        tokens = self.final_norm(x)  # (B, L, D)
        end = mask.sum(dim=1) - 1  # (B,) position of <end>: the last real token
        pooled = tokens[torch.arange(B, device=ids.device), end]  # (B, D)
        return tokens, pooled
