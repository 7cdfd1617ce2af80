"""What a denoiser sees besides x_t and t, carried in one object, and classifier-free guidance over it.

Every family in this codebase conditions a denoiser on something: Stable Diffusion on per-token text vectors
(cross-attention, Rombach et al. 2022, arXiv 2112.10752, Sec. 3.3), Imagen also on a pooled text vector and, in its
super-resolution stages, on a low-resolution image and the level of the noise that augmented it (Saharia et al.
2022, arXiv 2205.11487, Sec. 2.4-2.5), unCLIP's decoder on a CLIP image embedding (Ramesh et al. 2022, arXiv
2204.06125, Sec. 2.1), its prior on text embeddings. A denoiser takes (x_t, t, cond) with `cond` a Conditioning;
a field a model does not use stays None, and a model refuses a field it cannot read (an unused conditioning is a
bug, not a no-op). So a new kind of conditioning is a new field here, not a new argument threaded through the
U-Net, the training scripts and the samplers.

    field        shape          meaning
    tokens       (B, L, D)      per-token text vectors, read by cross-attention
    mask         (B, L) bool    True on real tokens (<start> ... <end>), False on padding
    pooled       (B, P)         one vector per prompt, added to the time embedding (Imagen Sec. 2.5)
    low_res      (B, C, h, w)   the lower-resolution image a super-resolution model refines (Imagen Sec. 2.4)
    aug_level    (B,) long      the timestep at which low_res was noised (noise-conditioning augmentation)
    image_embed  (B, E)         a CLIP image embedding (unCLIP's decoder)
    drop         (B,) bool      True: that sample is unconditional; its text (tokens, pooled) and image embedding
                                are replaced by learned null values (Ho & Salimans 2022, arXiv 2207.12598).
                                low_res and aug_level are never dropped: they are the input of a super-resolution
                                step, not a condition to guide towards.

Classifier-free guidance (Ho & Salimans Eq. 6 with w = s - 1) runs the conditional and the unconditional
prediction as one batch of 2B: the first B rows conditional, the last B unconditional (guided_prediction).
"""
from dataclasses import dataclass, fields, replace

import torch

from models.samplers import guidance


@dataclass
class Conditioning:
    tokens: torch.Tensor | None = None       # (B, L, D) per-token text vectors
    mask: torch.Tensor | None = None         # (B, L) bool, True = real token
    pooled: torch.Tensor | None = None       # (B, P) pooled text vector
    low_res: torch.Tensor | None = None      # (B, C, h, w) super-resolution input
    aug_level: torch.Tensor | None = None    # (B,) noise-augmentation timestep of low_res
    image_embed: torch.Tensor | None = None  # (B, E) CLIP image embedding
    drop: torch.Tensor | None = None         # (B,) bool, True = unconditional sample

    def batch_size(self):
        """B, from the first field that is set (None when none is)."""
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None:
                return value.shape[0]
        return None

    def cat(self, other):
        """Rows of self followed by rows of other, field by field; a field must be set in both or in neither
        (drop = None counts as no sample dropped)."""
        out = {}
        for f in fields(self):
            a, b = getattr(self, f.name), getattr(other, f.name)
            if f.name == "drop" and (a is None) != (b is None):
                a, b = (a if a is not None else self.no_drop(b.device), b if b is not None else other.no_drop(a.device))
            if (a is None) != (b is None):
                raise ValueError(f"cannot join conditionings: '{f.name}' is set in one and not in the other")
            out[f.name] = None if a is None else torch.cat([a, b])
        return Conditioning(**out)

    def no_drop(self, device):
        return torch.zeros(self.batch_size(), dtype=torch.bool, device=device)

    def unconditional(self):
        """The same rows with every sample dropped (drop = True): what guidance contrasts the prompt with."""
        B = self.batch_size()
        if B is None:
            raise ValueError("an empty conditioning has no unconditional counterpart; there is nothing to guide by")
        device = next(getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None).device
        return replace(self, drop=torch.ones(B, dtype=torch.bool, device=device))


def guided_prediction(denoise, x_t, t, cond: Conditioning, scale):
    """The output of denoise(x_t, t, cond) under classifier-free guidance with scale s (Ho & Salimans Eq. 6):
        uncond + s (cond - uncond)
    s = 1 is the conditional model alone (one pass). Otherwise the conditional rows (first B) and the unconditional
    rows (last B, cond.unconditional()) run as one batch of 2B. x_t may have any shape (B, ...)."""
    if scale == 1.0:
        return denoise(x_t, t, cond)
    both = cond.cat(cond.unconditional())  # rows: B conditional, then B unconditional
    out = denoise(torch.cat([x_t, x_t]), torch.cat([t, t]), both)  # (2B, ...)
    conditional, unconditional = out.chunk(2)
    return guidance(conditional, unconditional, scale)
