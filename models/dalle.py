"""DALL-E's transformer: one decoder-only transformer over [text tokens; image tokens], with a KV cache and the
sampling filters.

Paper: Ramesh et al. 2021, "Zero-Shot Text-to-Image Generation", arXiv 2102.12092, Sec. 2.2 and App. B.
The dVAE (models/dvae.py) turns an image into h x w tokens of a codebook of K; the transformer models the
stream of T text tokens followed by the h*w image tokens autoregressively (Eq. 1's p_psi(y, z)):

    input    [t_0 .. t_{T-1}, z_0 .. z_{N-2}]           (T + N - 1 positions; z in raster order, N = h w)
    targets  [t_1 .. t_{T-1}, z_0 .. z_{N-1}]           (each position predicts the next token)
    loss     text_loss_weight * CE(text) + (1 - text_loss_weight) * CE(image)     (Sec. 2.2: 1/8 and 7/8)

Text positions that hold padding get a pad token of their own per position (Sec. 2.2: "we use a special padding
token for each of the 256 text positions"): id text_vocab + t at position t. Text positions have learned
embeddings; image positions a row plus a column embedding (App. B.1). A caption dropped to the null caption
(every position its pad token) trains the unconditional model of classifier-free guidance (Ho & Salimans 2022,
arXiv 2207.12598), which DALL-E itself did not use.

Attention masks (App. B.1, Fig. 11), chosen per layer by cfg.attention (cycled over the layers):
    text -> text     causal, in every layer
    image -> text    every text position, in every layer
    image -> image   full:    every earlier image token (and itself)
                     row:     the earlier tokens of its own row (Fig. 11 a)
                     column:  the earlier tokens of its own column (Fig. 11 b; the paper's c is the same mask
                              in a transposed layout, an implementation detail of its kernels)
                     conv:    the earlier tokens of the conv_kernel x conv_kernel window centred on it
                              (Fig. 11 d; the paper: 11 x 11, in the last layer)
The paper's 64 layers cycle row, column, row, row and end with conv.

Sampling (sample_image_tokens): the text is processed once, then one image token at a time with the keys and
values of earlier positions kept (a KV cache); the logits of each step go through, in order, classifier-free
guidance on the logits  l = l_uncond + s (l_cond - l_uncond)  (s = 1: conditional only; s - 1 is the weight of
"super-conditioning", l_cond + (s - 1)(l_cond - l_uncond)), temperature, top-k and top-p (nucleus; Holtzman et
al. 2019, arXiv 1904.09751), then one draw from `generator`.

Notation: B batch, T text length, N = h w image tokens, L = T + N - 1 positions, D width, H heads, d head dim,
K codebook size (image_vocab), V text vocab (without the T pad tokens).
"""
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from models.attention import FeedForward, scaled_dot_product_attention

ATTENTION_KINDS = ("full", "row", "column", "conv")


@dataclass
class DalleConfig:
    text_length: int = 16         # T: text tokens with <start> and <end> (paper: 256)
    text_vocab: int = 0           # V: the BPE vocab; 0 = the tokenizer's (train/dalle.py fills it in)
    image_size: int = 8           # h = w: the dVAE's token grid side (paper: 32)
    image_vocab: int = 512        # K: the dVAE's codebook size (paper: 8192)
    width: int = 128              # D (paper: 3968)
    layers: int = 4               # (paper: 64)
    heads: int = 4                # (paper: 62)
    attention: list[str] = field(default_factory=lambda: ["full"])  # masks cycled over the layers; see above
    conv_kernel: int = 3          # side of the conv mask's window (paper: 11)
    dropout: float = 0.0          # residual and attention dropout
    text_loss_weight: float = 0.125  # weight of the text cross-entropy; the image gets 1 minus it (paper: 1/8)

    @property
    def image_tokens(self):
        return self.image_size ** 2

    @property
    def length(self):
        return self.text_length + self.image_tokens - 1  # L: input positions


def check_config(cfg: DalleConfig):
    bad = [a for a in cfg.attention if a not in ATTENTION_KINDS]
    if bad or not cfg.attention:
        raise ValueError(f"model.attention must list masks among {', '.join(ATTENTION_KINDS)}, got {cfg.attention}")
    if cfg.width % cfg.heads:
        raise ValueError(f"model.width ({cfg.width}) must be divisible by model.heads ({cfg.heads})")
    if cfg.conv_kernel < 1 or cfg.conv_kernel % 2 == 0:
        raise ValueError(f"model.conv_kernel must be odd and at least 1, got {cfg.conv_kernel}")
    if not 0 <= cfg.text_loss_weight <= 1:
        raise ValueError(f"model.text_loss_weight must be in [0, 1], got {cfg.text_loss_weight}")
    if cfg.text_length < 3 or cfg.image_size < 1:
        raise ValueError("model.text_length must be at least 3 and model.image_size at least 1")


def attention_mask(kind, text_length, image_size, conv_kernel=3):
    """(L, L) bool, True = query i may attend to key j, over the input positions [text; image[:-1]] of App. B.1.
    The last image token is never an input, so the mask covers T + N - 1 positions."""
    T, h = text_length, image_size
    L = T + h * h - 1
    i = torch.arange(L)[:, None]  # (L, 1) query positions
    j = torch.arange(L)[None, :]  # (1, L) key positions
    causal = j <= i  # (L, L)
    if kind == "full":
        return causal
    # image coordinates of positions >= T (row r, column c of the image token held there)
    qi, kj = (i - T).clamp(min=0), (j - T).clamp(min=0)
    qr, qc, kr, kc = qi // h, qi % h, kj // h, kj % h
    if kind == "row":
        image_pair = qr == kr
    elif kind == "column":
        image_pair = qc == kc
    elif kind == "conv":
        half = conv_kernel // 2
        image_pair = ((qr - kr).abs() <= half) & ((qc - kc).abs() <= half)
    else:
        raise ValueError(f"unknown attention mask {kind!r}; use one of {', '.join(ATTENTION_KINDS)}")
    text_key = j < T  # every query sees the text (causally, for text queries)
    image_query = i >= T
    return causal & (text_key | (image_query & image_pair))


class CausalSelfAttention(nn.Module):
    """Masked multi-head self-attention (Vaswani et al. 2017, Eq. 1) that can keep its keys and values."""

    def __init__(self, cfg: DalleConfig):
        super().__init__()
        self.heads, self.dropout = cfg.heads, cfg.dropout
        self.qkv = nn.Linear(cfg.width, 3 * cfg.width)
        self.proj = nn.Linear(cfg.width, cfg.width)

    def forward(self, x, mask, cache=None):
        """x (B, n, D) at positions p0 .. p0 + n - 1; mask (n, p0 + n) rows of the (L, L) mask; cache: None, or a
        dict holding the keys and values of positions 0 .. p0 - 1 ((B, H, p0, d) each), extended here."""
        B, n, D = x.shape
        q, k, v = rearrange(self.qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.heads)  # (B, H, n, d)
        if cache is not None:
            if "k" in cache:
                k = torch.cat([cache["k"], k], dim=2)  # (B, H, p0 + n, d)
                v = torch.cat([cache["v"], v], dim=2)
            cache["k"], cache["v"] = k, v
        assert mask.shape == (n, k.shape[2]), f"mask {tuple(mask.shape)} does not fit {n} queries, {k.shape[2]} keys"
        out = scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0)
        return self.proj(rearrange(out, "b h n d -> b n (h d)"))  # (B, n, D)


class Block(nn.Module):
    """Pre-LayerNorm residual block (GPT-2): x + Attn(LN(x)); x + MLP(LN(x)). cfg: any config with width, heads
    and dropout (models/prompt_lm.py builds its caption LM from these blocks too)."""

    def __init__(self, cfg: DalleConfig):
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(cfg.width), nn.LayerNorm(cfg.width)
        self.attn = CausalSelfAttention(cfg)
        self.mlp = FeedForward(cfg.width, mult=4, dropout=cfg.dropout, glu=False)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, mask, cache=None):
        x = x + self.drop(self.attn(self.ln_1(x), mask, cache))  # (B, n, D)
        return x + self.drop(self.mlp(self.ln_2(x)))  # (B, n, D)


class DalleTransformer(nn.Module):
    def __init__(self, cfg: DalleConfig):
        super().__init__()
        check_config(cfg)
        if cfg.text_vocab < 1:
            raise ValueError("model.text_vocab must be set (train/dalle.py takes it from the tokenizer)")
        self.cfg = cfg
        T, h, D = cfg.text_length, cfg.image_size, cfg.width
        self.text_emb = nn.Embedding(cfg.text_vocab + T, D)  # V BPE tokens + one pad token per position
        self.image_emb = nn.Embedding(cfg.image_vocab, D)
        self.text_pos = nn.Parameter(torch.zeros(T, D))  # learned text positions
        self.row_pos = nn.Parameter(torch.zeros(h, D))  # image positions: row + column
        self.col_pos = nn.Parameter(torch.zeros(h, D))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.ln_f = nn.LayerNorm(D)
        self.text_head = nn.Linear(D, cfg.text_vocab + T, bias=False)
        self.image_head = nn.Linear(D, cfg.image_vocab, bias=False)
        self.apply(self._init)
        for p in (self.text_pos, self.row_pos, self.col_pos):
            nn.init.normal_(p, std=0.02)
        masks = torch.stack([attention_mask(cfg.attention[i % len(cfg.attention)], T, h, cfg.conv_kernel)
                             for i in range(cfg.layers)])  # (layers, L, L)
        self.register_buffer("masks", masks, persistent=False)

    @staticmethod
    def _init(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)

    def text_ids(self, ids, mask):
        """Tokenizer output (B, T) ids and mask -> ids with each padded position t given its own pad token V + t."""
        B, T = ids.shape
        assert T == self.cfg.text_length, f"text of {T} tokens, the model takes {self.cfg.text_length}"
        pad = self.cfg.text_vocab + torch.arange(T, device=ids.device).expand(B, T)  # (B, T)
        return torch.where(mask, ids, pad)

    def null_text(self, B, device):
        """The null caption of classifier-free guidance: every position its pad token. (B, T)"""
        T = self.cfg.text_length
        return self.cfg.text_vocab + torch.arange(T, device=device).expand(B, T)

    def embed(self, text, image, start):
        """Embeddings of the positions start .. start + n - 1 of the stream [text; image]: text (B, t) ids for
        positions start .. T - 1 (t may be 0) and image (B, m) tokens for the image positions after them."""
        T, h = self.cfg.text_length, self.cfg.image_size
        parts = []
        if text is not None and text.shape[1]:
            parts.append(self.text_emb(text) + self.text_pos[start: start + text.shape[1]])  # (B, t, D)
        if image is not None and image.shape[1]:
            first = max(start, T) - T  # raster index of the first image token given
            idx = torch.arange(first, first + image.shape[1], device=image.device)
            parts.append(self.image_emb(image) + self.row_pos[idx // h] + self.col_pos[idx % h])  # (B, m, D)
        return torch.cat(parts, dim=1)  # (B, n, D)

    def forward(self, text, image, caches=None, start=0):
        """Hidden states -> (text logits (B, t, V + T), image logits (B, m', K)) of positions start .. start + n - 1,
        where the text logits are those of the text positions but the last (they predict text) and the image
        logits those of the positions from T - 1 on (they predict image tokens). Training: text (B, T), image
        (B, N - 1) or (B, N) (the last token is dropped), start 0. caches: one dict per layer (KV cache)."""
        T, N = self.cfg.text_length, self.cfg.image_tokens
        if image is not None and start + (text.shape[1] if text is not None else 0) + image.shape[1] > T + N - 1:
            image = image[:, :T + N - 1 - start - (text.shape[1] if text is not None else 0)]
        x = self.embed(text, image, start)  # (B, n, D)
        n = x.shape[1]
        end = start + n
        for i, block in enumerate(self.blocks):
            x = block(x, self.masks[i, start:end, :end], caches[i] if caches is not None else None)
        x = self.ln_f(x)  # (B, n, D)
        text_part = x[:, : max(0, min(end, T - 1) - start)]  # positions < T - 1 predict text
        image_part = x[:, max(0, T - 1 - start):]  # positions >= T - 1 predict image tokens
        return self.text_head(text_part), self.image_head(image_part)

    def loss(self, text, image):
        """Sec. 2.2: text (B, T) ids (pads already per position), image (B, N) tokens -> (loss, text CE, image CE)."""
        text_logits, image_logits = self(text, image)  # (B, T - 1, V + T), (B, N, K)
        text_ce = F.cross_entropy(text_logits.flatten(0, 1).float(), text[:, 1:].flatten())
        image_ce = F.cross_entropy(image_logits.flatten(0, 1).float(), image.flatten())
        w = self.cfg.text_loss_weight
        return w * text_ce + (1 - w) * image_ce, text_ce, image_ce


# ---------------------------------------------------------------- sampling filters (each a free function)

def check_sampling(temperature, top_k, top_p):
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}; use 1 for the model's own distribution")
    if top_k < 0:
        raise ValueError(f"top_k must be at least 1 (0 = off), got {top_k}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1] (1 = off), got {top_p}")


def top_k_filter(logits, k):
    """Keep the k largest logits of each row, -inf elsewhere (ties with the k-th kept, as transformers'
    TopKLogitsWarper)."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]  # (..., 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits, p):
    """Nucleus (Holtzman et al. 2019, Sec. 3.1): keep the smallest set of largest-probability tokens whose mass
    reaches p; the others get -inf (at least one token is kept; as transformers' TopPLogitsWarper)."""
    if p >= 1:
        return logits
    sorted_logits, order = torch.sort(logits, descending=False, dim=-1)
    cumulative = sorted_logits.softmax(-1).cumsum(-1)  # ascending: the mass of the tail up to each token
    remove_sorted = cumulative <= 1 - p
    remove_sorted[..., -1] = False  # the most probable token always stays
    remove = remove_sorted.scatter(-1, order, remove_sorted)
    return logits.masked_fill(remove, float("-inf"))


def filter_logits(logits, temperature=1.0, top_k=0, top_p=1.0):
    """Temperature, then top-k, then top-p, in that order (transformers' order of the warpers)."""
    return top_p_filter(top_k_filter(logits / temperature, top_k), top_p)


def guided_logits(cond, uncond, scale):
    """Classifier-free guidance on the logits: uncond + s (cond - uncond); s = 1 is the conditional model."""
    return cond if scale == 1 else uncond + scale * (cond - uncond)


@torch.no_grad()
def sample_image_tokens(model, text, temperature=1.0, top_k=0, top_p=1.0, guidance=1.0, generator=None,
                        use_cache=True, progress=None):
    """text (B, T) ids with per-position pads (model.text_ids) -> (B, h, w) image tokens, drawn from `generator`.
    use_cache=False recomputes the whole prefix at every step (the reference the KV cache is tested against)."""
    check_sampling(temperature, top_k, top_p)
    cfg = model.cfg
    B, T = text.shape
    N = cfg.image_tokens
    guided = guidance != 1
    if guided:
        text = torch.cat([text, model.null_text(B, text.device)])  # (2B, T): conditional rows, then null
    image = torch.zeros(text.shape[0], 0, dtype=torch.long, device=text.device)  # (B', 0)
    caches = [dict() for _ in model.blocks] if use_cache else None
    for n in range(N):
        if use_cache:
            # step 0 reads the whole text; step n > 0 reads only the token drawn at step n - 1
            logits = model(text, None, caches, 0)[1] if n == 0 else model(None, image[:, -1:], caches, T + n - 1)[1]
        else:
            logits = model(text, image)[1]  # (B', n + 1, K)
        logits = logits[:, -1].float()  # (B', K): the next image token
        if guided:
            logits = guided_logits(logits[:B], logits[B:], guidance)  # (B, K)
        probs = filter_logits(logits, temperature, top_k, top_p).softmax(-1)  # (B, K)
        token = torch.multinomial(probs, 1, generator=generator)  # (B, 1)
        image = torch.cat([image, token.repeat(2, 1) if guided else token], dim=1)  # (B', n + 1)
        if progress is not None:
            progress.update(1)
    return image[:B].view(B, cfg.image_size, cfg.image_size)
