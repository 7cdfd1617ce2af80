"""The DALL-E family's pipeline: tokenizer -> transformer (image tokens) -> dVAE decoder, and CLIP re-ranking.

Paper: Ramesh et al. 2021, "Zero-Shot Text-to-Image Generation", arXiv 2102.12092, Sec. 2.3 (sample generation:
"we rerank the samples drawn from the transformer using a pretrained contrastive model", 512 -> the best 32) and
Fig. 9 (quality against the number of candidates). The contrastive model here is a CLIP trained by train/clip.py
that is NOT the judge of the metrics (configs/shapes/pipeline_dalle.yaml: runs/clip, clip.yaml; the judge is
runs/clip_demo), so re-ranking does not optimise the score it is judged by.

DallePipeline keeps the pipeline contract of models/pipeline.py (family, resolution, settings, presets,
check_prompts, settings_with, __call__). Each picture it returns is the best (highest CLIP cosine with its prompt)
of `candidates` draws; `rerank` keeps the best k of N for one prompt, as the paper's 512 -> 32.
"""
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from core.checkpoint import load_checkpoint, load_weights
from core.config import config_from_dict
from models.dalle import DalleConfig, DalleTransformer, check_sampling, sample_image_tokens
from models.dvae import load_dvae, token_fingerprint
from models.tokenizer import BPETokenizer


@dataclass
class DalleSampling:
    """How the transformer is sampled (the checkpoint's defaults; presets and flags change them)."""
    temperature: float = 1.0      # logits / temperature before the filters
    top_k: int = 0                # keep the k most probable image tokens (0 = off)
    top_p: float = 1.0            # nucleus: the smallest set with this much mass (1 = off)
    guidance_scale: float = 1.0   # classifier-free guidance on the logits (1 = conditional only)
    candidates: int = 1           # N: draws per picture, the best by CLIP kept (1 = no re-ranking)

    def check(self):
        check_sampling(self.temperature, self.top_k, self.top_p)
        if self.candidates < 1:
            raise ValueError(f"candidates must be at least 1, got {self.candidates}")


# Presets: quality re-ranks 16 candidates with guidance 3 and top-k; creative samples hotter with weak guidance
# (seed 004: "lower guidance, add temperature"). Flags given with a preset win.
PRESETS = {
    "fast": {"guidance_scale": 3.0, "top_k": 0, "top_p": 1.0, "temperature": 1.0, "candidates": 1},
    "quality": {"guidance_scale": 3.0, "top_k": 32, "top_p": 1.0, "temperature": 1.0, "candidates": 16},
    "creative": {"guidance_scale": 1.5, "top_k": 0, "top_p": 1.0, "temperature": 1.2, "candidates": 1},
}


def check_dvae_fits(dvae, model_cfg: DalleConfig, resolution, path):
    """A dVAE whose K or factor does not fit the transformer is refused with one line."""
    K, f = dvae.cfg.vocab_size, dvae.factor
    if K != model_cfg.image_vocab or resolution % f or resolution // f != model_cfg.image_size:
        raise ValueError(f"the dVAE {path} (K {K}, factor {f}: {resolution // f}x{resolution // f} tokens at "
                         f"{resolution} px) does not fit the transformer (image_vocab {model_cfg.image_vocab}, "
                         f"image_size {model_cfg.image_size}); set model.image_vocab={K} and "
                         f"model.image_size={resolution // f}, or give the dVAE it was made for")


@torch.no_grad()
def clip_scores(clip, clip_tokenizer, images, prompts):
    """Cosine of each picture (B, 3, H, W) in [-1, 1] with its prompt -> (B,)."""
    ids, mask = clip_tokenizer(list(prompts), max_length=clip.cfg.text.max_length, truncate=True)
    device = next(clip.parameters()).device
    image_e = F.normalize(clip.encode_image(images.to(device).float()), dim=-1)  # (B, E)
    text_e = F.normalize(clip.encode_text(ids.to(device), mask.to(device)), dim=-1)  # (B, E)
    return (image_e * text_e).sum(-1)


def rerank(scores, k):
    """scores (N,) of the N candidates of one prompt -> the indices of the best k, best first (Sec. 2.3)."""
    if k < 1 or len(scores) < k:
        raise ValueError(f"cannot keep the best {k} of {len(scores)} candidates; draw at least k candidates "
                         f"(N >= k >= 1)")
    return torch.topk(scores, k).indices


@dataclass
class DallePipeline:
    model: DalleTransformer
    tokenizer: BPETokenizer
    dvae: torch.nn.Module
    settings: DalleSampling
    data: dict
    clip: torch.nn.Module | None = None  # the re-ranking CLIP (None: candidates must be 1)
    clip_tokenizer: BPETokenizer | None = None
    family = "dalle"
    presets = PRESETS

    @property
    def resolution(self):
        return self.model.cfg.image_size * self.dvae.factor

    def check_prompts(self, prompts, truncate=False):
        self.tokenizer(list(prompts), max_length=self.model.cfg.text_length, truncate=truncate)

    def settings_with(self, preset=None, sampler=None, steps=None, eta=None, guidance=None, spacing=None,
                      dynamic_threshold=False, threshold_ratio=None, threshold_max=None, temperature=None,
                      top_k=None, top_p=None, candidates=None):
        """The checkpoint's settings, then the preset's, then the flags' (None = not given). The diffusion flags
        mean nothing here and are refused."""
        given = [name for name, v in (("--sampler", sampler), ("--steps", steps), ("--eta", eta),
                                      ("--spacing", spacing), ("--threshold-ratio", threshold_ratio),
                                      ("--threshold-max", threshold_max)) if v is not None]
        if dynamic_threshold:
            given.append("--dynamic-threshold")
        if given:
            raise ValueError(f"{', '.join(given)} belong to the diffusion samplers; the dalle pipeline takes "
                             f"--guidance, --temperature, --top-k, --top-p and --candidates")
        if top_k is not None and top_k < 1:
            raise ValueError(f"--top-k must be at least 1, got {top_k}; leave it out for no top-k filter")
        if preset is not None and preset not in PRESETS:
            raise ValueError(f"unknown preset '{preset}'; use one of {', '.join(sorted(PRESETS))}")
        cfg = replace(self.settings, **PRESETS[preset]) if preset else self.settings
        flags = {"guidance_scale": guidance, "temperature": temperature, "top_k": top_k, "top_p": top_p,
                 "candidates": candidates}
        cfg = replace(cfg, **{k: v for k, v in flags.items() if v is not None})
        cfg.check()
        if cfg.candidates > 1 and self.clip is None:
            raise ValueError("re-ranking needs a CLIP: set clip in the pipeline config (configs/shapes/"
                             "pipeline_dalle.yaml) or use --candidates 1")
        return cfg

    @torch.no_grad()
    def __call__(self, prompts, settings=None, generator=None, truncate=False, progress=True):
        """Prompts -> pictures (B, 3, H, W) in [-1, 1], each the best of settings.candidates draws by CLIP."""
        s = settings or self.settings
        s.check()
        device = next(self.model.parameters()).device
        prompts = list(prompts)
        ids, mask = self.tokenizer(prompts, max_length=self.model.cfg.text_length, truncate=truncate)  # (B, T)
        text = self.model.text_ids(ids.to(device), mask.to(device))
        N = s.candidates
        if N > 1 and self.clip is None:
            raise ValueError("re-ranking needs a CLIP; set clip in the pipeline config or use --candidates 1")
        text = text.repeat_interleave(N, dim=0)  # (B N, T): the N candidates of a prompt are neighbours
        tokens = sample_image_tokens(self.model, text, s.temperature, s.top_k, s.top_p, s.guidance_scale,
                                     generator=generator)  # (B N, h, w)
        images = self.dvae.decode(tokens)  # (B N, 3, H, W)
        self.intermediate = tokens  # what the transformer made: the image tokens (B, h, w), the kept candidates'
        if N == 1:
            return images
        scores = clip_scores(self.clip, self.clip_tokenizer, images, [p for p in prompts for _ in range(N)])
        best = torch.stack([rerank(row, 1)[0] for row in scores.view(len(prompts), N)])  # (B,)
        kept = torch.arange(len(prompts)) * N + best.cpu()  # (B,) rows of the kept candidates
        self.intermediate = tokens[kept.to(tokens.device)]
        return images.view(len(prompts), N, *images.shape[1:])[torch.arange(len(prompts)), best]

    def cast(self, dtype):
        self.model.to(dtype)
        return self


@dataclass
class DallePipelineConfig:
    """configs/shapes/pipeline_dalle.yaml: the checkpoints of the DALL-E family and how to sample them."""
    dalle: str = "runs/dalle/ckpt.pt"   # tokenizer + transformer (+ the dVAE's fingerprint)
    dvae: str = ""                      # the decoder; '' = the dVAE path stored in the transformer's checkpoint
    clip: str = "runs/clip/ckpt.pt"     # the re-ranking CLIP (not the judge, runs/clip_demo); '' = none
    preset: str = "fast"                # fast | quality | creative (PRESETS); '' = the checkpoint's settings
    device: str = "auto"


def load_dalle_pipeline(path, device="cpu", use_ema=True, dvae=None, clip=None):
    """A transformer checkpoint (kind "dalle") -> DallePipeline in eval mode, with its dVAE (checked against the
    fingerprint stored at training) and, when `clip` names one, the re-ranking CLIP."""
    ckpt = load_checkpoint(path, "dalle")
    cfg = ckpt["config"]
    model = DalleTransformer(config_from_dict(DalleConfig, cfg["model"]))
    load_weights(model, ckpt["ema"]["weights"] if use_ema and ckpt.get("ema") else ckpt["model"],
                 "DALL-E checkpoint weights")
    dvae_path = dvae or cfg["dvae"]
    dvae_model, _ = load_dvae(dvae_path, device)
    check_dvae_fits(dvae_model, model.cfg, cfg["data"]["resolution"], dvae_path)
    if token_fingerprint(dvae_model) != ckpt["dvae"]:
        raise ValueError(f"{dvae_path} is not the dVAE whose tokens this transformer was trained on (its config or "
                         f"encoder weights differ); pass the dVAE given at training, or one whose decoder alone was "
                         f"trained further, with --vae")
    clip_model = clip_tok = None
    if clip:
        from models.clip import load_clip
        clip_model, clip_tok, _ = load_clip(clip, device)
    return DallePipeline(model.to(device).eval(), BPETokenizer.from_state_dict(ckpt["tokenizer"]), dvae_model,
                         config_from_dict(DalleSampling, cfg["sampling"]), cfg["data"], clip_model, clip_tok)
