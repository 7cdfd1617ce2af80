"""The creative preset's prompt model: a small causal language model over captions that extends a prompt by
sampling at a temperature.

Papers: Radford et al. 2019, "Language Models are Unsupervised Multitask Learners" (GPT-2), Sec. 2 (a
left-to-right LM, p(x) = prod_i p(s_i | s_1 .. s_{i-1}), Eq. 1; byte-level BPE, Sec. 2.2; pre-LayerNorm blocks
and a final LayerNorm, Sec. 2.3); the transformer blocks are DALL-E's (Ramesh et al. 2021, arXiv 2102.12092,
models/dalle.py Block / CausalSelfAttention, with its KV cache), here over text alone. Temperature, top-k and
top-p are models/dalle.py's filter_logits (Holtzman et al. 2019, arXiv 1904.09751, for top-p).

A caption is tokenized by our BPE tokenizer (models/tokenizer.py) as <start> tokens <end> <pad> ..; the model
reads positions 0 .. L - 2 and predicts positions 1 .. L - 1 (GPT-2 Eq. 1). The cross-entropy counts only the
targets that are real tokens (the caption's tokens and its <end>), never padding. Attention is causal, so a real
position never sees the padding after it and no key-padding mask is needed. Learned positions (GPT-2), the output
matrix tied to the token embedding (Press & Wolf 2017, arXiv 1608.05859, as GPT-2).

rewrite(): the user's prompt is kept as a prefix and the model samples a continuation, token by token, until it
draws <end> (or max_new_tokens, or its context is full). Why a continuation and not a new caption conditioned
on the prompt: the prompt is what the user asked for; a continuation keeps every word of it (so "a red circle"
still gets a red circle) and adds what the captions it was trained on tend to say next ("on a navy background",
", a small blue square and ..."); a freshly sampled caption could drop the user's words at any temperature.
The temperature sets how far the additions stray: near 0 the most probable continuation (greedy), 1 the model's
own distribution, above 1 rarer words. <start> and <pad> are never drawn (their logits are set to -inf).

Notation: B batch, L = max_length positions, D width, V vocab (the tokenizer's).
"""
import math
from collections import Counter
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from core.checkpoint import load_checkpoint, load_weights
from core.config import config_from_dict
from models.dalle import Block, check_sampling, filter_logits
from models.tokenizer import BPETokenizer


@dataclass
class PromptLMConfig:
    max_length: int = 32          # L: positions with <start> and <end> (the longest caption it reads or writes)
    vocab_size: int = 0           # V: the BPE vocab; 0 = the tokenizer's (train/prompt_lm.py fills it in)
    width: int = 64               # D (GPT-2 small: 768)
    layers: int = 2               # (GPT-2 small: 12)
    heads: int = 4                # (GPT-2 small: 12)
    dropout: float = 0.0          # residual and attention dropout


def check_config(cfg: PromptLMConfig):
    if cfg.width % cfg.heads:
        raise ValueError(f"model.width ({cfg.width}) must be divisible by model.heads ({cfg.heads})")
    if cfg.max_length < 3 or cfg.layers < 1:
        raise ValueError("model.max_length must be at least 3 and model.layers at least 1")
    if not 0 <= cfg.dropout < 1:
        raise ValueError(f"model.dropout must be in [0, 1), got {cfg.dropout}")


class PromptLM(nn.Module):
    """GPT-2 in small: token + position embeddings, DALL-E's pre-LN blocks under a causal mask, LN, tied head."""

    def __init__(self, cfg: PromptLMConfig):
        super().__init__()
        check_config(cfg)
        if cfg.vocab_size < 1:
            raise ValueError("model.vocab_size must be set (train/prompt_lm.py takes it from the tokenizer)")
        self.cfg = cfg
        self.token_emb = nn.Embedding(cfg.vocab_size, cfg.width)
        self.pos = nn.Parameter(torch.zeros(cfg.max_length, cfg.width))  # learned positions
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))  # models/dalle.py's blocks
        self.ln_f = nn.LayerNorm(cfg.width)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
        nn.init.normal_(self.pos, std=0.02)
        L = cfg.max_length
        self.register_buffer("mask", torch.ones(L, L, dtype=torch.bool).tril(), persistent=False)  # (L, L) causal

    def forward(self, ids, caches=None, start=0):
        """ids (B, n) at positions start .. start + n - 1 -> logits (B, n, V) of the next token at each.
        caches: one dict per block (KV cache; models/dalle.py CausalSelfAttention), holding positions < start."""
        B, n = ids.shape
        end = start + n
        assert end <= self.cfg.max_length, f"positions up to {end} but the model has {self.cfg.max_length}"
        x = self.token_emb(ids) + self.pos[start:end]  # (B, n, D)
        for i, block in enumerate(self.blocks):
            x = block(x, self.mask[start:end, :end], caches[i] if caches is not None else None)  # (B, n, D)
        return self.ln_f(x) @ self.token_emb.weight.t()  # (B, n, V), tied output matrix

    def loss(self, ids, mask):
        """GPT-2 Eq. 1 as a cross-entropy: ids, mask (B, L) from the tokenizer -> mean -log p(s_i | s_<i) over the
        real targets (mask[:, 1:]); padding targets are ignored."""
        logits = self(ids[:, :-1])  # (B, L - 1, V)
        targets = ids[:, 1:].masked_fill(~mask[:, 1:], -100)  # (B, L - 1), -100 = ignored
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100)


@torch.no_grad()
def perplexity(model, tokenizer, captions, batch_size=512):
    """exp(mean negative log-likelihood per real target token) of `captions` (GPT-2 Sec. 3's per-token figure)."""
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    for i in range(0, len(captions), batch_size):
        ids, mask = tokenizer(captions[i: i + batch_size], max_length=model.cfg.max_length, truncate=True)
        n = int(mask[:, 1:].sum())
        nll += model.loss(ids.to(device), mask.to(device)).item() * n
        count += n
    return float(torch.tensor(nll / max(count, 1)).exp())


def perplexity_floor(captions, tokenizer):
    """The perplexity per token no model can beat on captions drawn like `captions`: exp(H / E[n]), with H the
    plug-in entropy of the caption distribution (nats per caption, from the counts of the draws) and E[n] the
    mean number of targets per caption (its tokens and <end>). A model's cross-entropy per caption is at least H
    (Gibbs' inequality), and perplexity() divides it by the same E[n]. The plug-in estimate is low by about
    (distinct captions - 1) / (2 draws) nats (Miller 1955), so give many more draws than distinct captions."""
    counts = Counter(captions)
    n = len(captions)
    H = -sum(c / n * math.log(c / n) for c in counts.values())  # nats per caption
    targets = sum(c / n * (len(tokenizer.encode(t)) + 1) for t, c in counts.items())
    return math.exp(H / targets)


@torch.no_grad()
def continue_tokens(model, prefix, end_id, banned, temperature=1.0, top_k=0, top_p=1.0, generator=None,
                    max_new_tokens=16):
    """prefix: a list of token ids starting with <start> -> the sampled continuation (a list, without <end>).
    The prefix is read once; then one token at a time with the KV cache. Every draw comes from `generator`."""
    check_sampling(temperature, top_k, top_p)
    device = next(model.parameters()).device
    room = min(max_new_tokens, model.cfg.max_length - len(prefix))  # positions left for new tokens
    caches = [dict() for _ in model.blocks]
    logits = model(torch.tensor([prefix], device=device), caches, 0)[:, -1]  # (1, V)
    new = []
    for _ in range(max(room, 0)):
        logits = logits.float()
        logits[:, banned] = float("-inf")  # never <start> or <pad>
        probs = filter_logits(logits, temperature, top_k, top_p).softmax(-1)  # (1, V)
        token = int(torch.multinomial(probs, 1, generator=generator))
        if token == end_id:
            break
        new.append(token)
        if len(prefix) + len(new) >= model.cfg.max_length:
            break
        logits = model(torch.tensor([[token]], device=device), caches, len(prefix) + len(new) - 1)[:, -1]  # (1, V)
    return new


def rewrite(model, tokenizer, prompts, temperature=1.0, top_k=0, top_p=1.0, generator=None, max_new_tokens=16,
            fits=None):
    """Each prompt kept as a prefix, extended by a sampled continuation -> the new prompts (strings).
    The prompts are rewritten one after the other from `generator`, so a seed gives the same prompts.
    fits: optional test of a whole prompt (e.g. the pipeline's token limit); the continuation is cut token by token
    from its end until the result passes (the prompt alone must pass). A prompt that leaves no room in the
    model's context comes back unchanged."""
    check_sampling(temperature, top_k, top_p)
    banned = [tokenizer.start_id, tokenizer.pad_id]
    out = []
    for prompt in prompts:
        prefix = [tokenizer.start_id] + tokenizer.encode(prompt)
        new = continue_tokens(model, prefix, tokenizer.end_id, banned, temperature, top_k, top_p, generator,
                              max_new_tokens) if len(prefix) < model.cfg.max_length else []
        text = prompt + tokenizer.decode(new)
        while new and fits is not None and not fits(text):
            new = new[:-1]
            text = prompt + tokenizer.decode(new)
        out.append(text)
    return out


def load_prompt_lm(path, device="cpu"):
    """A checkpoint of train/prompt_lm.py -> (PromptLM in eval mode, its BPETokenizer)."""
    ckpt = load_checkpoint(path, "prompt_lm")
    cfg = config_from_dict(PromptLMConfig, ckpt["config"]["model"])
    model = PromptLM(cfg)
    load_weights(model, ckpt["model"], f"prompt LM weights in {path}")
    return model.to(device).eval(), BPETokenizer.from_state_dict(ckpt["tokenizer"])


# ---------------------------------------------------------------- python -m sample: --prompt-lm

def add_prompt_lm_flags(parser):
    parser.add_argument("--prompt-lm", help="with --preset creative: a prompt LM checkpoint (train/prompt_lm.py) "
                        "that extends every prompt by sampling before the pictures are drawn; the prompts used are "
                        "printed and written to metadata.jsonl. Only with the creative preset: fast and quality "
                        "draw the prompt as written, and a metric run must never judge prompts it did not give")
    parser.add_argument("--prompt-temperature", type=float, help="the prompt LM's sampling temperature (default 1; "
                        "near 0: its most probable continuation; above 1: rarer words); needs --prompt-lm")


def check_prompt_lm_flags(args):
    """The one-line errors of the flags alone, before anything loads."""
    if args.prompt_temperature is not None and not args.prompt_lm:
        raise ValueError("--prompt-temperature is the prompt LM's; pass --prompt-lm runs/prompt_lm/ckpt.pt with it")
    if args.prompt_temperature is not None and args.prompt_temperature <= 0:
        raise ValueError(f"--prompt-temperature must be > 0, got {args.prompt_temperature}; use 1 for the LM's own "
                         f"distribution, small values for its most probable continuation")
    if args.prompt_lm and (args.variations or args.interpolate):
        raise ValueError("--prompt-lm rewrites --prompt / --prompts-file prompts; drop it with --variations or "
                         "--interpolate")


def pipeline_fits(pipe):
    """text -> whether the pipeline takes it within its token limit (a prompt already over it, which --truncate
    lets through, gets no continuation)."""
    def fits(text):
        try:
            pipe.check_prompts([text])
            return True
        except ValueError:
            return False
    return fits


def rewrite_for_pipeline(lm, pipe, preset, prompts, args):
    """--prompt-lm: every prompt through the LM (on the CPU: it is small; seeded by --seed, apart from the
    pictures' generator), each continuation cut to the pipeline's token limit; prints what is used.
    lm: load_prompt_lm's (model, tokenizer). -> the prompts to draw."""
    if preset != "creative":
        raise ValueError(f"--prompt-lm routes prompts through the creative preset; add --preset creative (the preset "
                         f"is {preset or 'the checkpoint settings'})")
    model, tokenizer = lm
    temperature = 1.0 if args.prompt_temperature is None else args.prompt_temperature
    used = rewrite(model, tokenizer, prompts, temperature, generator=torch.Generator().manual_seed(args.seed),
                   fits=pipeline_fits(pipe))
    for given, new in zip(prompts, used):
        print(f"prompt {given!r} -> used {new!r} (prompt LM, temperature {temperature:g})", flush=True)
    return used
