"""unCLIP's diffusion prior: a CLIP text embedding z_t -> a CLIP image embedding z_i ("the bridge").

Paper: Ramesh, Dhariwal, Nichol, Chu, Chen 2022, "Hierarchical Text-Conditional Image Generation with CLIP
Latents" (unCLIP / DALL-E 2), arXiv 2204.06125, Sec. 2.2 (the diffusion prior) and Sec. 2.1 (guidance by dropping
the condition). The prior is "a decoder-only Transformer with a causal attention mask on a sequence consisting of,
in order: the encoded text, the CLIP text embedding, an embedding for the diffusion timestep, the noised CLIP image
embedding, and a final embedding whose output from the Transformer is used to predict the unnoised CLIP image
embedding". It predicts z_i itself, not the noise, trained with the mean-squared error (their Eq. in Sec. 2.2):

    L_prior = E_{t, z_i^(t)} || f_theta(z_i^(t), t, y) - z_i ||^2

At sampling it draws two candidates of z_i and keeps the one with the larger dot product with z_t (Sec. 2.2).

How z_i is scaled before noising, and why. CLIP compares embeddings by their cosine, so z_i is first divided by its
norm (the decoder, too, only ever sees unit z_i). A unit vector in E = 64 dimensions has a per-coordinate spread of
about 1 / sqrt(E) = 0.125, and on shapes the embeddings of the 63 (colour, shape) pairs sit in a narrow cone (their
mean is much larger than their spread), while the diffusion schedule adds noise of variance 1 per coordinate. So
each coordinate is standardised with the mean and standard deviation of the training set's unit z_i:

    x_0 = (z_i / |z_i| - clip_mean) / clip_std          (normalise; what is noised and predicted)
    z_i = x_0 * clip_std + clip_mean                    (denormalise; then divided by its norm again)

as the Karlo prior does (kakaobrain/karlo, diffusers' PriorTransformer.post_process_latents): the signal then has
unit variance per coordinate, as the schedule assumes, and the noise at a given t destroys every direction equally.

The module structure equals diffusers' PriorTransformer (num_embeddings = L, additional_embeddings = 4,
added_emb_type "prd", norm_in_type None, time_embed_dim = width); DIFFUSERS_NAMES maps its parameter names to ours
and tests/test_unclip.py loads one into the other and compares outputs. Its blocks are models/text_encoder.py's
pre-LN EncoderBlock (LayerNorm, attention with biases, LayerNorm, GELU MLP), with a causal mask.

Notation (paper -> code):
    y, z_t, z_i     caption, CLIP text embedding `cond.pooled` (B, E), CLIP image embedding (B, E)
    encoded text    CLIP's per-token outputs `cond.tokens` (B, L, W) with `cond.mask` (B, L)
    z_i^(t)         x_t (B, E), in the normalised space above
    B batch, L text tokens, W CLIP text width, E CLIP embed dim, D transformer width, S = L + 4 sequence length
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from core.checkpoint import load_checkpoint, load_weights
from core.config import config_from_dict
from models.conditioning import Conditioning, guided_prediction
from models.samplers import SamplerConfig, sample
from models.schedule import NoiseSchedule, ScheduleConfig
from models.text_encoder import EncoderBlock
from models.unet import timestep_embedding

EXTRA_TOKENS = 4  # z_t, the timestep, z_i^(t) and the final query: the tokens after the L text tokens


@dataclass
class PriorConfig:
    embed_dim: int = 64     # E: width of CLIP's shared space (z_t, z_i); the CLIP's embed_dim
    text_width: int = 64    # W: width of CLIP's per-token text outputs; the CLIP's text.width
    text_length: int = 16   # L: text tokens (the CLIP's text.max_length); the sequence is L + 4 long
    width: int = 128        # D: transformer width
    layers: int = 4         # transformer blocks
    heads: int = 4          # attention heads (width must divide by heads)
    dropout: float = 0.0    # dropout on attention weights and in the MLPs


class DiffusionPrior(nn.Module):
    """f_theta(z_i^(t), t, y) -> z_i (normalised space), a causal transformer over [text tokens, z_t, t, z_i^(t),
    query]; the query's output is the prediction."""

    def __init__(self, cfg: PriorConfig):
        super().__init__()
        if cfg.width % cfg.heads:
            raise ValueError(f"prior.width ({cfg.width}) must be divisible by prior.heads ({cfg.heads})")
        self.cfg = cfg
        E, W, D = cfg.embed_dim, cfg.text_width, cfg.width
        self.time_embed = nn.Sequential(nn.Linear(D, D), nn.SiLU(), nn.Linear(D, D))  # sinusoid(t) -> token
        self.tokens_in = nn.Linear(W, D)       # encoded text -> tokens
        self.text_embed_in = nn.Linear(E, D)   # z_t -> a token
        self.embed_in = nn.Linear(E, D)        # z_i^(t) -> a token
        self.query = nn.Parameter(torch.zeros(D))  # the final embedding whose output predicts z_i
        self.positional_embedding = nn.Parameter(torch.zeros(cfg.text_length + EXTRA_TOKENS, D))  # (S, D)
        self.blocks = nn.ModuleList(EncoderBlock(D, cfg.heads, cfg.dropout, causal=True) for _ in range(cfg.layers))
        self.final_norm = nn.LayerNorm(D)
        self.out = nn.Linear(D, E)
        nn.init.normal_(self.query, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        # classifier-free guidance (Sec. 2.2: "randomly dropping this text conditioning information 10% of the
        # time"): a dropped caption becomes a learned null token at every text position and a learned null z_t
        self.null_tokens = nn.Parameter(torch.randn(W) / W ** 0.5)
        self.null_text_embed = nn.Parameter(torch.randn(E) / E ** 0.5)
        # the statistics of the unit training z_i (set by train/prior.py before training; see the docstring)
        self.register_buffer("clip_mean", torch.zeros(E))
        self.register_buffer("clip_std", torch.ones(E))

    def normalise(self, z_i):
        """CLIP image embeddings (B, E), any norm -> x_0 (B, E): unit length, then standardised per coordinate."""
        return (F.normalize(z_i.float(), dim=-1) - self.clip_mean) / self.clip_std

    def denormalise(self, x0):
        """x_0 (B, E) -> unit CLIP image embeddings (B, E)."""
        return F.normalize(x0.float() * self.clip_std + self.clip_mean, dim=-1)

    def forward(self, x_t, t, cond: Conditioning):
        """x_t (B, E) noised normalised z_i; t (B,) or () timesteps; cond: tokens (B, L, W), mask (B, L) bool,
        pooled = z_t (B, E), drop (B,) bool or None. Returns the predicted x_0 (B, E)."""
        cfg = self.cfg
        B, E = x_t.shape
        tokens, mask, z_t = cond.tokens, cond.mask, cond.pooled
        if tokens is None or mask is None or z_t is None:
            raise ValueError("the prior reads the encoded text (tokens, mask) and z_t (pooled); pass all three")
        if cond.image_embed is not None or cond.low_res is not None or cond.aug_level is not None:
            raise ValueError("the prior is conditioned on text only (tokens, mask, pooled = z_t)")
        L = cfg.text_length
        if tokens.shape != (B, L, cfg.text_width) or mask.shape != (B, L) or z_t.shape != (B, cfg.embed_dim):
            raise ValueError(f"the prior needs tokens ({B}, {L}, {cfg.text_width}), mask ({B}, {L}) and z_t "
                             f"({B}, {cfg.embed_dim}), got {tuple(tokens.shape)}, {tuple(mask.shape)}, "
                             f"{tuple(z_t.shape)}; tokenize with max_length={L}")
        t = torch.as_tensor(t, device=x_t.device)
        t = t.expand(B) if t.ndim == 0 else t  # (B,)
        if cond.drop is not None:  # dropped captions: the null token at every position, all attended
            drop = cond.drop
            tokens = torch.where(drop[:, None, None], self.null_tokens.to(tokens.dtype), tokens)  # (B, L, W)
            mask = mask | drop[:, None]  # (B, L)
            z_t = torch.where(drop[:, None], self.null_text_embed.to(z_t.dtype), z_t)  # (B, E)
        time = self.time_embed(timestep_embedding(t, cfg.width).to(x_t.dtype))  # (B, D)
        h = torch.cat([self.tokens_in(tokens),                          # (B, L, D)  the encoded text
                       self.text_embed_in(z_t)[:, None],                # (B, 1, D)  z_t
                       time[:, None],                                   # (B, 1, D)  the timestep
                       self.embed_in(x_t)[:, None],                     # (B, 1, D)  z_i^(t)
                       self.query.to(x_t.dtype).expand(B, 1, -1)], 1)   # (B, 1, D)  the query -> (B, S, D)
        h = h + self.positional_embedding  # (B, S, D)
        key_mask = F.pad(mask, (0, EXTRA_TOKENS), value=True)  # (B, S): padding is never a key
        for block in self.blocks:
            h = block(h, key_mask)  # (B, S, D), causal: position s reads positions <= s
        return self.out(self.final_norm(h[:, -1]))  # (B, E): the query's output, Sec. 2.2's f_theta


@torch.no_grad()
def sample_image_embeddings(prior, schedule, cond: Conditioning, settings: SamplerConfig, candidates=2,
                            generator=None, progress=False):
    """Text conditions (tokens, mask, pooled = unit z_t, B rows) -> unit CLIP image embeddings (B, E).

    Sec. 2.2: draw `candidates` z_i per caption and keep the one with the largest dot product with z_t.
    Guidance (settings.guidance_scale, Ho & Salimans Eq. 6) contrasts the caption with the prior's null caption.
    Noise comes only from `generator`."""
    B, E = cond.pooled.shape
    if candidates < 1:
        raise ValueError(f"the prior's candidates must be at least 1, got {candidates}")
    weight = next(prior.parameters())
    rows = Conditioning(tokens=cond.tokens.repeat(candidates, 1, 1), mask=cond.mask.repeat(candidates, 1),
                        pooled=cond.pooled.repeat(candidates, 1))  # (K*B, ...): candidate k of row b at k*B + b
    x_T = torch.randn(candidates * B, E, generator=generator, device=weight.device)  # (K*B, E)
    denoise = lambda x_t, t: guided_prediction(prior, x_t.to(weight.dtype), t, rows, settings.guidance_scale).float()
    z_i = prior.denormalise(sample(denoise, x_T, schedule, settings, generator=generator, progress=progress))
    z_i = z_i.view(candidates, B, E)  # (K, B, E)
    score = (z_i * F.normalize(cond.pooled.float(), dim=-1)).sum(-1)  # (K, B): <z_i, z_t>
    return z_i[score.argmax(0), torch.arange(B, device=z_i.device)]  # (B, E)


def diffusers_names(layers):
    """{diffusers PriorTransformer parameter name: ours}, for loading its weights (tests/test_unclip.py)."""
    names = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "encoder_hidden_states_proj": "tokens_in", "embedding_proj": "text_embed_in", "proj_in": "embed_in",
             "norm_out": "final_norm", "proj_to_clip_embeddings": "out"}
    out = {f"{a}.{p}": f"{b}.{p}" for a, b in names.items() for p in ("weight", "bias")}
    for i in range(layers):
        block = {"norm1": "norm1", "attn1.to_q": "attn.to_q", "attn1.to_k": "attn.to_k", "attn1.to_v": "attn.to_v",
                 "attn1.to_out.0": "attn.to_out", "norm3": "norm2", "ff.net.0.proj": "mlp.net.0.0",
                 "ff.net.2": "mlp.net.2"}
        out.update({f"transformer_blocks.{i}.{a}.{p}": f"blocks.{i}.{b}.{p}" for a, b in block.items()
                    for p in ("weight", "bias")})
    return out


def load_diffusers_prior(prior, state_dict):
    """Copy a diffusers PriorTransformer state_dict (the configuration above) into `prior`."""
    ours = {b: state_dict[a] for a, b in diffusers_names(prior.cfg.layers).items()}
    ours["query"] = state_dict["prd_embedding"].reshape(-1)  # (1, 1, D) -> (D,)
    ours["positional_embedding"] = state_dict["positional_embedding"][0]  # (1, S, D) -> (S, D)
    ours["clip_mean"], ours["clip_std"] = state_dict["clip_mean"][0], state_dict["clip_std"][0]
    for name in ("null_tokens", "null_text_embed"):  # ours alone (diffusers uses the empty prompt's encoding)
        ours[name] = prior.state_dict()[name]
    prior.load_state_dict(ours)


def load_prior(path, device="cpu", use_ema=True):
    """A checkpoint of train/prior.py -> (DiffusionPrior in eval mode on `device`, its NoiseSchedule, the checkpoint,
    whose "config" is the run's whole config as a dict)."""
    ckpt = load_checkpoint(path, "prior")
    stored = ckpt["config"]
    prior = DiffusionPrior(config_from_dict(PriorConfig, stored["prior"], "prior."))
    load_weights(prior, ckpt["ema"]["weights"] if use_ema and ckpt.get("ema") else ckpt["model"],
                 f"prior weights in {path}")
    schedule = NoiseSchedule(config_from_dict(ScheduleConfig, stored["schedule"], "schedule."))
    return prior.to(device).eval(), schedule.to(device), ckpt
