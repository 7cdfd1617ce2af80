"""One contract for every text-to-image family, and the one place that builds a pipeline from what a user names.

Stable Diffusion, DALL-E, Imagen and unCLIP join separately trained parts (text encoder -> generation model ->
decoder) only at sampling time. Whatever the family, the joined object -- a pipeline -- offers:

    family          its name: "pixel" or "ldm" (models/text2image.py), "dalle" (models/dalle_pipeline.py),
                    "imagen" (models/imagen.py), "unclip" (models/unclip.py)
    resolution      the side of the square pictures it returns
    settings        its sampling settings, a dataclass holding the checkpoint's defaults (diffusion: SamplerConfig)
    data            the data config (a dict) its generation model was trained on: dataset, resolution, ...
    presets         {"fast": ..., "quality": ..., "creative": ...}: named changes to `settings`
    check_prompts(prompts, truncate=False)
                    raises the one-line error of the first bad prompt (empty, over the token limit) before any
                    compute
    settings_with(preset=None, **flags)
                    `settings` with a preset and command-line flags applied (None = flag not given); a flag that
                    means nothing to the family is a one-line error
    __call__(prompts, settings=None, generator=None, truncate=False, progress=True)
                    -> pictures (B, 3, H, W) in [-1, 1]; every random draw comes from `generator`, so a seed
                    gives the same pictures
    intermediate    after a call, what its generation model made before the decoder: latents (B, c, h, w) for
                    ldm (the picture itself for pixel), image tokens (B, h, w) for dalle, the base's small picture
                    (B, 3, r, r) for imagen, unit CLIP image embeddings (B, E) for unclip

`python -m sample`, the metrics that generate (prompt accuracy, the images for FID and CLIP score) and the demo
use nothing else. A pipeline is named on the command line in one of two ways (add_pipeline_arguments):
    --ckpt PATH                         one checkpoint; its `kind` decides the family (load_pipeline)
    --pipeline NAME --config FILE       a pipeline config (configs/shapes/pipeline_NAME.yaml) naming the
                                        checkpoints of a family that joins several
    --pipeline ldm --weights PATH       Stable Diffusion v1's published weights, a diffusers folder or a single
                                        CompVis .safetensors / .ckpt (models/stable_diffusion.py)
--dtype float16 | bfloat16 runs the networks in half precision (Text2Image.cast).
"""
from dataclasses import dataclass, replace

import torch

from core.checkpoint import load_checkpoint
from core.config import load_config
from core.runtime import get_device
from models.dalle_pipeline import DallePipelineConfig, load_dalle_pipeline
from models.imagen import ImagenPipelineConfig, load_imagen
from models.samplers import SAMPLERS
from models.stable_diffusion import load_stable_diffusion
from models.text2image import load_text2image
from models.unclip import UnCLIPPipelineConfig, load_unclip

FAMILIES = ("pixel", "ldm", "dalle", "imagen", "unclip")  # the names --pipeline accepts; every family adds its own
PRESET_NAMES = ("fast", "quality", "creative")  # every family defines these three (its `presets`)
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
SAMPLEABLE_KINDS = ("diffusion", "dalle")  # checkpoint kinds a pipeline can be built from alone


@dataclass
class DiffusionPipelineConfig:
    """configs/shapes/pipeline_ldm.yaml: the checkpoints of the diffusion family and how to sample them."""
    diffusion: str = "runs/diffusion_latent/ckpt.pt"  # tokenizer + text encoder + U-Net
    vae: str = ""              # the decoder (latent space); '' = the VAE path stored in the diffusion checkpoint
    preset: str = "fast"       # fast | quality | creative (models/text2image.py PRESETS); '' = the checkpoint's
    device: str = "auto"       # auto | cpu | cuda | cuda:N | mps


PIPELINE_CONFIGS = {"pixel": DiffusionPipelineConfig, "ldm": DiffusionPipelineConfig, "dalle": DallePipelineConfig,
                    "imagen": ImagenPipelineConfig, "unclip": UnCLIPPipelineConfig}
DEFAULT_CONFIGS = {"ldm": "configs/shapes/pipeline_ldm.yaml", "dalle": "configs/shapes/pipeline_dalle.yaml",
                   "imagen": "configs/shapes/pipeline_imagen.yaml", "unclip": "configs/shapes/pipeline_unclip.yaml"}


def load_pipeline(path, device="cpu", use_ema=True, vae=None):
    """One checkpoint -> the pipeline of its family, in eval mode on `device`. vae: a latent diffusion checkpoint's
    decoder (default: the one stored at training)."""
    ckpt = load_checkpoint(path, SAMPLEABLE_KINDS)
    if ckpt["kind"] == "diffusion" and ckpt["config"].get("image_embed_dim"):
        raise ValueError(f"{path} is unCLIP's decoder, which samples from CLIP image embeddings; use --pipeline unclip "
                         f"--config configs/shapes/pipeline_unclip.yaml")
    if ckpt["kind"] == "diffusion":
        if ckpt["config"].get("low_res"):
            raise ValueError(f"{path} is a super-resolution stage of a cascade (low_res {ckpt['config']['low_res']}); "
                             f"sample it with --pipeline imagen --config FILE naming it as sr1 or sr2")
        return load_text2image(ckpt, device, use_ema=use_ema, vae_path=vae)
    if ckpt["kind"] == "dalle":
        return load_dalle_pipeline(path, device, use_ema=use_ema, dvae=vae)
    raise AssertionError(f"no pipeline for checkpoint kind {ckpt['kind']!r}")  # load_checkpoint checked the kind


def pipeline_config(family, path):
    """A pipeline config file of `family` -> its dataclass (unknown keys are one-line errors)."""
    if family not in FAMILIES:
        raise ValueError(f"unknown pipeline '{family}'; use one of {', '.join(FAMILIES)}")
    return load_config(PIPELINE_CONFIGS[family], path)


def load_family_pipeline(family, cfg, device, use_ema=True):
    """A pipeline config of `family` -> (pipeline, its preset). A checkpoint of another family is refused."""
    if family in ("pixel", "ldm"):
        pipe = load_pipeline(cfg.diffusion, device, use_ema=use_ema, vae=cfg.vae or None)
        if pipe.family != family:
            raise ValueError(f"--pipeline {family} needs a {'latent' if family == 'ldm' else 'pixel'}-space diffusion "
                             f"checkpoint but {cfg.diffusion} is {'latent' if pipe.family == 'ldm' else 'pixel'}-space")
        return pipe, cfg.preset or None
    if family == "unclip":
        return load_unclip(cfg, device, use_ema=use_ema), cfg.preset or None
    if family == "dalle":
        return load_dalle_pipeline(cfg.dalle, device, use_ema=use_ema, dvae=cfg.dvae or None,
                                   clip=cfg.clip or None), cfg.preset or None
    if family == "imagen":
        return load_imagen(cfg, device, use_ema=use_ema), cfg.preset or None
    raise AssertionError(f"unhandled family {family!r}")  # pipeline_config checked the name


def add_pipeline_arguments(parser):
    """The flags that name a pipeline, the same for every command that samples."""
    parser.add_argument("--ckpt", help="a checkpoint to sample from (its kind decides the family); with --pipeline, "
                        "the diffusion checkpoint (unclip: the decoder) instead of the config's")
    parser.add_argument("--pipeline", choices=FAMILIES, help="a family whose parts a pipeline config names "
                        "(--config; default configs/shapes/pipeline_ldm.yaml for ldm)")
    parser.add_argument("--config", help="pipeline config (YAML) of --pipeline")
    parser.add_argument("--prior", help="unclip: the prior checkpoint instead of the config's")
    parser.add_argument("--vae", help="latent diffusion: the VAE checkpoint (default: the config's, else the one "
                        "stored at training)")
    parser.add_argument("--rerank-clip", help="dalle: the re-ranking CLIP checkpoint (default: the config's clip)")
    parser.add_argument("--weights", help="Stable Diffusion v1 weights (with --pipeline ldm): a diffusers folder or a "
                        "CompVis .safetensors / .ckpt file")
    parser.add_argument("--tokenizer", help="with --weights FILE: CLIP's vocabulary, a tokenizer/ folder (vocab.json, "
                        "merges.txt) or bpe_simple_vocab_16e6.txt.gz (default: the one inside an installed open_clip)")
    parser.add_argument("--dtype", choices=DTYPES, default="float32", help="the networks' precision: float16 or "
                        "bfloat16 halve the memory (GPU; on a CPU bfloat16)")
    parser.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA weights")
    parser.add_argument("--device", help="auto | cpu | cuda | cuda:N | mps (default: the config's, else auto)")


def pipeline_from_args(args):
    """The pipeline the flags of add_pipeline_arguments name -> (pipeline, preset or None, device)."""
    pipe, preset, device = named_pipeline(args)
    if args.weights is None and args.dtype != "float32":
        pipe.cast(DTYPES[args.dtype])
    return pipe, preset, device


def named_pipeline(args):
    if args.tokenizer and not args.weights:
        raise ValueError("--tokenizer is the vocabulary of a single-file --weights; pass --weights FILE with it")
    if args.weights:
        if args.pipeline != "ldm" or args.ckpt or args.config or args.vae:
            raise ValueError("--weights names a whole Stable Diffusion model: pass it with --pipeline ldm and without "
                             "--ckpt, --config or --vae")
        device = get_device(args.device or "auto")
        return load_stable_diffusion(args.weights, device, DTYPES[args.dtype], args.tokenizer,
                                     use_ema=not args.no_ema), None, device
    if getattr(args, "rerank_clip", None) and args.pipeline != "dalle":
        raise ValueError("--rerank-clip is the dalle pipeline's re-ranking CLIP; pass it with --pipeline dalle")
    if args.config and not args.pipeline:
        raise ValueError("--config is a pipeline config; pass --pipeline NAME with it")
    if not args.pipeline:
        if not args.ckpt:
            raise ValueError("no model given; pass --ckpt runs/<name>/ckpt.pt or --pipeline NAME --config FILE")
        device = get_device(args.device or "auto")
        return load_pipeline(args.ckpt, device, use_ema=not args.no_ema, vae=args.vae), None, device
    config = args.config or DEFAULT_CONFIGS.get(args.pipeline)
    if config is None and not args.ckpt:
        raise ValueError(f"--pipeline {args.pipeline} needs --config FILE (or --ckpt for a single checkpoint)")
    cfg = pipeline_config(args.pipeline, config)
    if args.pipeline == "imagen" and args.vae:
        raise ValueError("--vae is for latent diffusion; an Imagen cascade is in pixel space, drop it")
    main_ckpt = {"unclip": "decoder", "dalle": "dalle", "imagen": "base"}.get(args.pipeline, "diffusion")
    if args.prior and args.pipeline != "unclip":
        raise ValueError(f"--prior names unclip's prior; the {args.pipeline} pipeline has none")
    decoder = "dvae" if args.pipeline == "dalle" else "vae"
    cfg = replace(cfg, **{k: v for k, v in ((main_ckpt, args.ckpt), (decoder, args.vae), ("prior", args.prior),
                                            ("clip", args.rerank_clip)) if v})
    device = get_device(args.device or cfg.device)
    pipe, preset = load_family_pipeline(args.pipeline, cfg, device, use_ema=not args.no_ema)
    return pipe, preset, device


def add_sampling_flags(p):
    """The flags that change a pipeline's settings (pipe.settings_with); the same for every command that samples."""
    p.add_argument("--preset", choices=PRESET_NAMES, help="sampling preset of the pipeline; flags override it")
    p.add_argument("--sampler", choices=SAMPLERS, help="diffusion sampler (default: the checkpoint's)")
    p.add_argument("--steps", type=int, help="number of sampling steps")
    p.add_argument("--eta", type=float, help="DDIM eta (0 = deterministic)")
    p.add_argument("--guidance", type=float, help="classifier-free guidance scale (1 = conditional only)")
    p.add_argument("--spacing", choices=["leading", "trailing", "linspace"], help="timestep spacing")
    p.add_argument("--dynamic-threshold", action="store_true",
                   help="Imagen's dynamic thresholding of x0_hat (Sec. 2.3): s = the --threshold-ratio percentile of "
                        "|x0_hat|, at least 1 and at most --threshold-max; x0_hat <- clip(x0_hat, -s, s) / s")
    p.add_argument("--threshold-ratio", type=float, help="dynamic thresholding: the percentile p (default 0.995, "
                   "Imagen's 99.5%%)")
    p.add_argument("--threshold-max", type=float, help="dynamic thresholding: the cap on s (default: none, as in "
                   "Imagen; DeepFloyd IF uses 1.5; 1 would be static clipping)")
    p.add_argument("--prior-steps", type=int, help="unclip: the prior's sampling steps (the flags above are the "
                   "decoder's)")
    p.add_argument("--prior-guidance", type=float, help="unclip: the prior's classifier-free guidance scale")
    p.add_argument("--embedding", choices=["prior", "text", "true"], help="unclip: what the decoder reads: the "
                   "prior's z_i, z_t itself (no prior), or the z_i of a render that shows the prompt (upper bound)")
    p.add_argument("--temperature", type=float, help="dalle: divide the logits by this before the filters")
    p.add_argument("--top-k", type=int, help="dalle: keep the k most probable image tokens (0 = off)")
    p.add_argument("--top-p", type=float, help="dalle: nucleus sampling, keep the smallest set with this mass (1 = off)")
    p.add_argument("--candidates", type=int, help="dalle: draw N candidates per picture and keep the best by the "
                   "re-ranking CLIP (DALL-E Sec. 2.3)")


def settings_from_args(pipe, args, preset=None):
    """The pipeline's settings with --preset (else the config's preset) and the sampling flags applied."""
    unclip = {k: v for k, v in (("prior_steps", args.prior_steps), ("prior_guidance", args.prior_guidance),
                                ("embedding", args.embedding)) if v is not None}
    if unclip and pipe.family != "unclip":
        raise ValueError(f"--prior-steps, --prior-guidance and --embedding are unclip's; the {pipe.family} pipeline "
                         f"has no prior")
    dalle_flags = {"temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p,
                   "candidates": args.candidates}
    if pipe.family == "dalle":
        return pipe.settings_with(preset=args.preset or preset, sampler=args.sampler, steps=args.steps, eta=args.eta,
                                  guidance=args.guidance, spacing=args.spacing, dynamic_threshold=args.dynamic_threshold,
                                  threshold_ratio=args.threshold_ratio, threshold_max=args.threshold_max, **dalle_flags)
    given = [f"--{k.replace('_', '-')}" for k, v in dalle_flags.items() if v is not None]
    if given:
        raise ValueError(f"{', '.join(given)} belong to the dalle pipeline; drop them for {pipe.family}")
    return pipe.settings_with(preset=args.preset or preset, sampler=args.sampler, steps=args.steps, eta=args.eta,
                              guidance=args.guidance, spacing=args.spacing, dynamic_threshold=args.dynamic_threshold,
                              threshold_ratio=args.threshold_ratio, threshold_max=args.threshold_max, **unclip)
