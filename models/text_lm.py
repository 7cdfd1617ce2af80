"""A text-only language model: a bidirectional transformer encoder trained by masked-token prediction on captions.

Papers: Devlin et al. 2018, "BERT: Pre-training of Deep Bidirectional Transformers for Language Understanding",
arXiv 1810.04805, Sec. 3.1 "Task #1: Masked LM" (15% of the tokens are chosen; a chosen token is replaced by
[MASK] 80% of the time, by a random token 10%, kept 10%; the loss is the cross-entropy of the original token at
the chosen positions only) and App. A.1; Saharia et al. 2022, "Imagen", arXiv 2205.11487, Sec. 2.1 and 4.4
(a frozen text-only language model, T5-XXL, as the text encoder; scaling it helps more than scaling the U-Net).
T5 (Raffel et al. 2019, arXiv 1910.10683) is an encoder-decoder trained on span corruption; this is the small
stand-in the roadmap asks for: the encoder of models/text_encoder.py with causal=False, trained on the captions
alone, and frozen afterwards (models/text2image.py, `text_encoder: lm:<ckpt>`).

The encoder is models/text_encoder.TextEncoder, unchanged, so its (tokens, pooled) output is the same contract
every text encoder here gives the U-Net. The head is BERT's (App. A, "transform" then decoder): Linear -> GELU ->
LayerNorm -> logits through the token embedding matrix transposed (weights tied, Press & Wolf 2017,
arXiv 1608.05859) plus a bias.

[MASK] is one extra embedding row, id = vocab_size - 1: the tokenizer has V tokens and the encoder V + 1
(text.vocab_size = tokenizer.vocab_size + 1); the tokenizer never emits it, so as a frozen encoder the model
sees ordinary prompts. B batch, L tokens, D width, V vocabulary (with [MASK]).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from core.checkpoint import load_checkpoint, load_weights
from core.config import config_from_dict
from models.text_encoder import TextEncoder, TextEncoderConfig
from models.tokenizer import BPETokenizer


class MaskedLanguageModel(nn.Module):
    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        if cfg.causal:
            raise ValueError("a masked language model reads both ways; set text.causal=false")
        self.cfg = cfg
        self.encoder = TextEncoder(cfg)
        self.transform = nn.Sequential(nn.Linear(cfg.width, cfg.width), nn.GELU(), nn.LayerNorm(cfg.width))
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))

    @property
    def mask_id(self):
        return self.cfg.vocab_size - 1

    def forward(self, ids, mask):
        """ids (B, L), mask (B, L) bool -> logits over the vocabulary (B, L, V)."""
        tokens, _ = self.encoder(ids, mask)  # (B, L, D)
        return self.transform(tokens) @ self.encoder.token_embedding.weight.t() + self.bias  # (B, L, V)


def mask_tokens(ids, mask, special_ids, mask_id, vocab_size, generator, mask_prob=0.15, random_prob=0.1,
                keep_prob=0.1):
    """BERT Sec. 3.1: choose each real, non-special token with probability mask_prob; replace a chosen one by
    [MASK] (1 - random_prob - keep_prob), by a random ordinary token (random_prob), or keep it (keep_prob).
    Returns (corrupted ids (B, L), chosen (B, L) bool). Random tokens are drawn among ids that are neither
    special nor [MASK]."""
    u = torch.rand(ids.shape, generator=generator)
    special = torch.isin(ids, torch.tensor(sorted(special_ids)))
    chosen = (u < mask_prob) & mask & ~special  # (B, L)
    how = torch.rand(ids.shape, generator=generator)  # which of the three replacements
    ordinary = torch.tensor([i for i in range(vocab_size) if i not in special_ids and i != mask_id])
    random_ids = ordinary[torch.randint(len(ordinary), ids.shape, generator=generator)]
    corrupted = ids.clone()
    to_mask = chosen & (how < 1 - random_prob - keep_prob)
    to_random = chosen & (how >= 1 - random_prob - keep_prob) & (how < 1 - keep_prob)
    corrupted[to_mask] = mask_id
    corrupted[to_random] = random_ids[to_random]
    return corrupted, chosen


def masked_lm_loss(logits, ids, chosen):
    """Cross-entropy of the original tokens at the chosen positions only (BERT Sec. 3.1)."""
    return F.cross_entropy(logits[chosen], ids[chosen])  # mean over the chosen tokens


def load_text_lm(path, device="cpu"):
    """A checkpoint of train/text_lm.py -> (MaskedLanguageModel in eval mode, its BPETokenizer, its config)."""

    ckpt = load_checkpoint(path, "text_lm")
    cfg = config_from_dict(TextEncoderConfig, ckpt["config"]["text"])
    model = MaskedLanguageModel(cfg)
    load_weights(model, ckpt["model"], f"text LM weights in {path}")
    return model.to(device).eval(), BPETokenizer.from_state_dict(ckpt["tokenizer"]), cfg
