"""The Imagen family in the demo: a frozen text encoder, a pixel-space base model and two super-resolution stages.

    python -m sample.demo --family imagen [--runs DIR]

Saharia et al. 2022, arXiv 2205.11487: frozen T5 -> 64 px base -> 64->256 -> 256->1024. The tiny preset here is the
same cascade at 1/4 and 1/16 of the sides: 16 px base -> 16->32 -> 32->64, the last stage trained on random 32 px
crops (16 -> 32) of 64 px renders and run on the whole 64 px image. The paper-shaped configs are *_gpu.yaml.
Stages (each a training script of its own, in this order; sample/demo.py runs them, the judges and the metrics):
    text LM   python -m train.text_lm --config configs/shapes/text_lm.yaml           the frozen text encoder (T5's role)
    base      python -m train.diffusion --config configs/shapes/imagen_base.yaml     16 px, text-conditional
    SR 16-32  python -m train.diffusion --config configs/shapes/imagen_sr1.yaml      noise-conditioning augmentation
    SR 32-64  python -m train.diffusion --config configs/shapes/imagen_sr2.yaml      crops, no self-attention
The three U-Nets train as one process per core on a CPU machine (Stage.ddp, as the latent U-Net; --sequential: one).
Sampling: the cascade of configs/shapes/pipeline_imagen.yaml (its per-stage steps, guidance and augmentation
levels; the demo's --steps and --guidance are not passed, they would set every stage alike; --smoke passes --steps),
with the checkpoints of this runs folder (written to runs/demo/imagen/pipeline_imagen.yaml). Prompt accuracy is
judged on the 64 px output (the classifier resizes it to its 32 px). report() adds each SR stage's PSNR / SSIM against bicubic
(metrics/super_resolution.py), the base's own prompt accuracy and the parameter counts.
"""
import json
from dataclasses import fields

import train.diffusion
import train.text_lm
from core.checkpoint import load_checkpoint
from core.config import load_config
from models.imagen import ImagenPipelineConfig
from models.text_encoder import TextEncoderConfig
from models.tokenizer import TokenizerConfig
from sample.stages import CONFIGS, Stage

SMOKE = ["train.steps=3", "data.num_images=64", "train.batch_size=8", "train.sample_every=0", "train.sample_steps=2"]
# the frozen encoder's sizes, which train/diffusion.py copies into text.* and tokenizer.* before storing the config
FILLED_IN = (*(f"text.{f.name}" for f in fields(TextEncoderConfig)), *(f"tokenizer.{f.name}" for f in fields(TokenizerConfig)))
NAMES = {"base": "imagen_base", "sr1": "imagen_sr1", "sr2": "imagen_sr2"}


def stages(runs, smoke):
    lm = runs / "text_lm" / "ckpt.pt"
    smoke_lm = ["train.steps=3", "data.num_images=64", "train.batch_size=16", "train.eval_captions=32"]
    out = [Stage("text LM", train.text_lm, CONFIGS / "text_lm.yaml", lm, "text_lm", train.text_lm.TextLMTrainConfig,
                 smoke_lm if smoke else [], train.text_lm.FILLED_IN)]
    for title, key in (("base 16px", "base"), ("SR 16->32", "sr1"), ("SR 32->64", "sr2")):
        out.append(Stage(title, train.diffusion, CONFIGS / f"{NAMES[key]}.yaml", runs / NAMES[key] / "ckpt.pt",
                         "diffusion", train.diffusion.DiffusionConfig,
                         [f"text_encoder=lm:{lm}", *(SMOKE if smoke else [])], FILLED_IN, ddp=True))
    return out


def pipeline_config(runs):
    """The shipped pipeline config with this runs folder's checkpoints, written beside the demo's figures."""
    text = (CONFIGS / "pipeline_imagen.yaml").read_text()
    for key, name in NAMES.items():
        text = text.replace(f"{key}: runs/{name}/ckpt.pt", f"{key}: {runs / name / 'ckpt.pt'}")
    path = runs / "demo" / "imagen" / "pipeline_imagen.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def pipeline(runs):
    return ["--pipeline", "imagen", "--config", str(pipeline_config(runs))]


def sampling(args):
    """The pipeline config's per-stage steps, guidance and augmentation levels; with --smoke the demo's --steps in
    every stage (a check that the chain runs, in seconds)."""
    return ["--steps", str(args.steps)] if args.smoke else []


def parameter_counts(runs):
    counts = {}
    for key, name in NAMES.items():
        ckpt = load_checkpoint(runs / name / "ckpt.pt", "diffusion")
        counts[key] = sum(v.numel() for k, v in ckpt["model"].items() if k.startswith("unet."))
    return counts


def report(runs, classifier, num_images, model=None, demo=None, accuracy_n=4, judge_clip=None):
    """Each SR stage on ground-truth low-resolution input (PSNR / SSIM against bicubic, consistency, colour error),
    sampled with pipeline_imagen.yaml's steps, guidance and augmentation level for that stage, and
    the U-Nets' parameter counts. (model, demo, accuracy_n, judge_clip: the contract's other arguments, unused here.)"""
    from metrics.super_resolution import evaluate, report_lines

    n = max(2, min(100, num_images))
    cascade = load_config(ImagenPipelineConfig, str(CONFIGS / "pipeline_imagen.yaml"))  # each stage as it samples
    out = {"unet_parameters": parameter_counts(runs), "super_resolution": {}}
    for i, key in enumerate(("sr1", "sr2"), start=1):
        figures = evaluate(runs / NAMES[key] / "ckpt.pt", n=n, steps=int(cascade.steps[i]),
                           guidance=float(cascade.guidance[i]), aug_level=float(cascade.aug_levels[i - 1]),
                           progress=False)
        out["super_resolution"][key] = figures
        for line in report_lines(figures):
            print("  " + line)
    print(f"  U-Net parameters: {json.dumps(out['unet_parameters'])}")
    return out
