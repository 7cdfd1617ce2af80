"""unCLIP's decoder: the text-conditional U-Net, also conditioned on a CLIP image embedding z_i.

Paper: Ramesh et al. 2022, "Hierarchical Text-Conditional Image Generation with CLIP Latents", arXiv 2204.06125,
Sec. 2.1: "we modify the architecture described in Nichol et al. (2021) [GLIDE] by projecting and adding CLIP
embeddings to the existing timestep embedding, and by projecting CLIP embeddings into four extra tokens of context
that are concatenated to the sequence of outputs from the GLIDE text encoder. [...] we enable classifier-free
guidance by randomly setting the CLIP embeddings to zero (or a learned embedding) 10% of the time, and randomly
dropping the text caption 50% of the time during training."

Here, as in Karlo (kakaobrain/karlo; diffusers' UnCLIPTextProjModel), the caption is read through CLIP itself: the
frozen CLIP text tower's per-token outputs, projected and layer-normalised, are the text tokens, and its pooled
vector (z_t before CLIP's text_projection, a linear map of it) is projected into the timestep embedding next to
z_i. Everything reaches the U-Net through its existing inputs (models/unet.py):
    pooled  = [z_i, pooled text]  (B, E + W): the U-Net's pooled_proj is one Linear, so pooled_proj(pooled) is the
              sum of Karlo's two projections W_i z_i + W_t z_t (+ their biases), added to the timestep embedding
    tokens  = [4 tokens from z_i, projected text tokens]  (B, 4 + L, C), read by cross-attention
The learned null values of guidance are the U-Net's own: null_pooled = [null z_i (Karlo's
learned_classifier_free_guidance_embeddings), null pooled text] and null_context (one token, at every text position).
A dropped z_i is replaced before its two projections, as in Karlo, so its four tokens are those of the null z_i.

Training drops z_i and the caption independently (drop_image, drop_text); sampling contrasts the full condition
with both dropped (cond.drop, what models.conditioning.guided_prediction sets for the unconditional rows).
tests/test_unclip.py checks the projection against diffusers' UnCLIPTextProjModel with its weights copied in.

Notation: B batch, E CLIP embed dim (z_i), W CLIP text width, L text tokens, C the U-Net's context_dim, K = 4 extra
tokens.
"""
import torch
import torch.nn as nn
from einops import rearrange

from models.conditioning import Conditioning
from models.unet import UNet, UNetConfig

EXTRA_TOKENS = 4  # Sec. 2.1: "four extra tokens of context"


class UnCLIPDecoder(nn.Module):
    """Frozen CLIP text tower + the z_i projections + the U-Net, as one module; the interface of
    models.text2image.TextConditionedUNet (encode_text, denoise, forward), so the diffusion family's training loop
    and sampler drive it unchanged."""

    def __init__(self, text_encoder, unet_cfg: UNetConfig, embed_dim):
        super().__init__()
        W, C, E = text_encoder.cfg.width, unet_cfg.context_dim, embed_dim
        if unet_cfg.pooled_dim != E + W:
            raise ValueError(f"unCLIP's decoder adds [z_i, pooled text] to the timestep embedding: set "
                             f"unet.pooled_dim={E + W} (the CLIP's embed_dim {E} + text width {W})")
        self.embed_dim = E
        self.text_encoder = text_encoder  # models.text2image.FrozenTextEncoder of kind "clip"
        self.text_proj = nn.Linear(W, C)  # Karlo's encoder_hidden_states_proj
        self.text_norm = nn.LayerNorm(C)  # Karlo's text_encoder_hidden_states_norm
        self.image_tokens = nn.Linear(E, EXTRA_TOKENS * C)  # Karlo's clip_extra_context_tokens_proj
        self.unet = UNet(unet_cfg)

    def encode_text(self, ids, mask, cond=None):
        """(B, L) ids and mask -> Conditioning with the CLIP tokens (B, L, W), mask, pooled (B, W); the other fields
        of `cond` (image_embed, drop) kept."""
        tokens, pooled = self.text_encoder(ids, mask)
        cond = cond or Conditioning()
        return Conditioning(tokens=tokens, mask=mask, pooled=pooled, image_embed=cond.image_embed, drop=cond.drop)

    def unet_condition(self, cond, drop_text=None, drop_image=None):
        """The decoder's condition -> the U-Net's (tokens (B, K + L, C), mask, pooled (B, E + W)), with the learned
        nulls in the dropped rows. drop_text / drop_image (B,) bool drop one part; cond.drop drops both."""
        z_i, tokens, mask, pooled = cond.image_embed, cond.tokens, cond.mask, cond.pooled
        if z_i is None or tokens is None or pooled is None:
            raise ValueError("unCLIP's decoder reads a CLIP image embedding (image_embed) and the caption's CLIP "
                             "tokens and pooled vector; pass all three")
        B = z_i.shape[0]
        if z_i.shape != (B, self.embed_dim):
            raise ValueError(f"image_embed must be (B, {self.embed_dim}), the CLIP's embed_dim; got {tuple(z_i.shape)}")
        no = torch.zeros(B, dtype=torch.bool, device=z_i.device)
        drop = cond.drop if cond.drop is not None else no
        drop_text = drop | (drop_text if drop_text is not None else no)  # (B,)
        drop_image = drop | (drop_image if drop_image is not None else no)  # (B,)
        null_image, null_text = self.unet.null_pooled.split([self.embed_dim, pooled.shape[1]])
        z_i = torch.where(drop_image[:, None], null_image.to(z_i.dtype), z_i)  # (B, E)
        pooled = torch.where(drop_text[:, None], null_text.to(pooled.dtype), pooled)  # (B, W)
        text = self.text_norm(self.text_proj(tokens))  # (B, L, C)
        text = torch.where(drop_text[:, None, None], self.unet.null_context.to(text.dtype), text)  # (B, L, C)
        if mask is not None:
            mask = torch.cat([torch.ones(B, EXTRA_TOKENS, dtype=torch.bool, device=mask.device),
                              mask | drop_text[:, None]], dim=1)  # (B, K + L): the null token at every position
        extra = rearrange(self.image_tokens(z_i), "b (c k) -> b k c", k=EXTRA_TOKENS)  # (B, K, C), Karlo's layout
        return Conditioning(tokens=torch.cat([extra, text], dim=1), mask=mask,
                            pooled=torch.cat([z_i, pooled], dim=1))  # (B, K + L, C), (B, K + L), (B, E + W)

    def denoise(self, x_t, t, cond, drop_text=None, drop_image=None):
        return self.unet(x_t, t, self.unet_condition(cond, drop_text, drop_image))

    def forward(self, x_t, t, ids, mask, cond, drop_text=None, drop_image=None):
        """Training: the frozen text tower, the projections and the U-Net in one call (DDP sees one module)."""
        return self.denoise(x_t, t, self.encode_text(ids, mask, cond), drop_text, drop_image)


def diffusers_text_proj_weights(decoder):
    """Our parameters in diffusers' UnCLIPTextProjModel names (clip_embeddings_dim = E = W), for the equality test:
    Karlo's two time projections are the two column blocks of our pooled_proj, their biases summed into its one."""
    E = decoder.embed_dim
    weight, bias = decoder.unet.pooled_proj.weight, decoder.unet.pooled_proj.bias  # (4ch, E + W), (4ch,)
    return {"learned_classifier_free_guidance_embeddings": decoder.unet.null_pooled[:E],
            "clip_image_embeddings_project_to_time_embeddings.weight": weight[:, :E],
            "clip_image_embeddings_project_to_time_embeddings.bias": bias,
            "embedding_proj.weight": weight[:, E:], "embedding_proj.bias": torch.zeros_like(bias),
            "clip_extra_context_tokens_proj.weight": decoder.image_tokens.weight,
            "clip_extra_context_tokens_proj.bias": decoder.image_tokens.bias,
            "encoder_hidden_states_proj.weight": decoder.text_proj.weight,
            "encoder_hidden_states_proj.bias": decoder.text_proj.bias,
            "text_encoder_hidden_states_norm.weight": decoder.text_norm.weight,
            "text_encoder_hidden_states_norm.bias": decoder.text_norm.bias}
