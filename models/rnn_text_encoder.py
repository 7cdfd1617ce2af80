"""A recurrent text encoder: a bidirectional LSTM over the token embeddings, as AttnGAN's text encoder.

Papers: Xu et al. 2018, "AttnGAN: Fine-Grained Text to Image Generation with Attentional Generative Adversarial
Networks", arXiv 1711.10485, Sec. 2 ("the text encoder is a bi-directional Long Short-Term Memory (LSTM) that
extracts semantic vectors from the text description ... each word corresponds to two hidden states, one for each
direction ... we concatenate its two hidden states to represent the semantic meaning of a word ... the last hidden
states of the bi-directional LSTM are concatenated to be the global sentence vector"); Hochreiter & Schmidhuber
1997 (the LSTM); Schuster & Paliwal 1997 (bidirectional RNNs). Imagen (Saharia et al. 2022, arXiv 2205.11487,
Fig. 4a) compares text encoders of several sizes; this one is the recurrent member of that comparison here, trained
jointly with the U-Net like the transformer of models/text_encoder.py (`text_encoder=lstm`; AttnGAN pretrains its
encoder with the DAMSM loss and freezes it, which `clip:<ckpt>` is the transformer analogue of).

It keeps the output contract of every text encoder here (models/text_encoder.py):
    tokens  (B, L, width)  [h_fwd_j ; h_bwd_j] per token position j, AttnGAN's word features e; zeros at padding
    mask    (B, L) bool    True on <start> tokens <end>, a prefix of each row
    pooled  (B, width)     [h_fwd at <end> ; h_bwd at <start>]: the last hidden state of each direction, AttnGAN's
                           sentence vector e-bar (the padding is packed away, so neither direction reads it)

Notation (AttnGAN -> code): D = width (the paper's D = 256 is the concatenation of two hidden states of 128);
hidden size of each direction = width / 2; T (words) = L token positions; layers = stacked LSTMs.
"""
import torch
import torch.nn as nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from models.text_encoder import TextEncoderConfig


class LSTMTextEncoder(nn.Module):
    """Token embedding (width) -> `layers` bidirectional LSTM layers of width / 2 per direction. Reads of
    TextEncoderConfig: vocab_size, max_length, width (even), layers, dropout (between LSTM layers); heads and causal
    mean nothing to it."""

    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        if cfg.vocab_size <= 0:
            raise ValueError(f"TextEncoderConfig.vocab_size is {cfg.vocab_size}; set it from the tokenizer")
        if cfg.width % 2 or cfg.width < 2:
            raise ValueError(f"text.width={cfg.width}: a bi-LSTM's width is two hidden states of width / 2; "
                             f"give an even text.width")
        if cfg.layers < 1:
            raise ValueError(f"text.layers={cfg.layers}; a bi-LSTM needs at least one layer")
        self.cfg = cfg
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.lstm = nn.LSTM(cfg.width, cfg.width // 2, num_layers=cfg.layers, batch_first=True,
                            bidirectional=True, dropout=cfg.dropout if cfg.layers > 1 else 0.0)

    def forward(self, ids, mask):
        """ids (B, L) long, mask (B, L) bool True on real tokens (a prefix) -> (tokens (B, L, D), pooled (B, D))."""
        B, L = ids.shape
        if L > self.cfg.max_length:
            raise ValueError(f"token ids have length {L}, over TextEncoderConfig.max_length={self.cfg.max_length}")
        if mask.shape != (B, L) or mask.dtype != torch.bool:
            raise ValueError(f"mask must be a bool tensor of shape {(B, L)} like ids, got {mask.dtype} "
                             f"{tuple(mask.shape)}")
        if not mask[:, 0].all() or (mask[:, 1:] & ~mask[:, :-1]).any():
            raise ValueError("mask must be True on a prefix of each row (<start> tokens <end>, then padding)")
        lengths = mask.sum(dim=1)  # (B,) real tokens per row
        x = self.token_embedding(ids)  # (B, L, D)
        # the padding is packed away: the backward direction starts at each row's <end>, not at its last padding
        packed = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
        out, (h_n, _) = self.lstm(packed)  # h_n (layers * 2, B, D/2): the last state of each layer and direction
        tokens, _ = pad_packed_sequence(out, batch_first=True, total_length=L)  # (B, L, D), zeros at padding
        # AttnGAN: the last hidden states of the two directions (top layer), concatenated
        pooled = torch.cat([h_n[-2], h_n[-1]], dim=-1)  # (B, D): [fwd at <end>; bwd at <start>]
        return tokens, pooled
