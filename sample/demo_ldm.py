"""The latent-diffusion (Stable Diffusion) family in the demo: a VAE, then a text encoder and U-Net on its latents.

    python -m sample.demo --family ldm

Stages (each a training script of its own, in this order; sample/demo.py runs them, the judges and the metrics):
    VAE     python -m train.vae --config configs/shapes/vae.yaml                   the decoder (and encoder)
    U-Net   python -m train.diffusion --config configs/shapes/diffusion_latent.yaml  latent U-Net + its text encoder
The text encoder is the small transformer trained jointly with the U-Net (latent diffusion's own text-to-image
model, Rombach et al. 2022 Sec. 4.3.1); `text_encoder=clip:<ckpt>` in diffusion_latent.yaml swaps in a frozen CLIP
as in Stable Diffusion. Sampling: DDIM 50 steps, guidance 3 (--steps, --guidance).

A family module of the demo offers: stages(runs, smoke) -> [Stage], pipeline(runs) -> the flags that name its
pipeline to `python -m sample` and the metrics, sampling(args) -> its sampling flags, and report(runs, classifier)
-> what it adds to metrics.json.
"""
import torch

import train.diffusion
import train.vae
from core.checkpoint import load_checkpoint
from models.vae import load_vae
from sample.judging import reconstruction_accuracy
from sample.stages import CONFIGS, Stage

SMOKE = {
    "VAE": ["train.steps=3", "data.num_images=64", "train.batch_size=16", "train.eval_images=32",
            "train.scale_images=64"],
    "latent U-Net": ["train.steps=3", "data.num_images=64", "train.batch_size=16", "train.sample_every=0",
                     "train.sample_steps=2"],
}


def stages(runs, smoke):
    vae = runs / "vae" / "ckpt.pt"
    return [
        Stage("VAE", train.vae, CONFIGS / "vae.yaml", vae, "vae", train.vae.VAETrainConfig,
              SMOKE["VAE"] if smoke else []),
        Stage("latent U-Net", train.diffusion, CONFIGS / "diffusion_latent.yaml",
              runs / "diffusion_latent" / "ckpt.pt", "diffusion", train.diffusion.DiffusionConfig,
              [f"vae={vae}", *(SMOKE["latent U-Net"] if smoke else [])], ddp=True),
    ]


def pipeline(runs):
    return ["--pipeline", "ldm", "--config", str(CONFIGS / "pipeline_ldm.yaml"),
            "--ckpt", str(runs / "diffusion_latent" / "ckpt.pt"), "--vae", str(runs / "vae" / "ckpt.pt")]


def sampling(args):
    return ["--sampler", "ddim", "--steps", str(args.steps), "--guidance", str(args.guidance)]


def report(runs, classifier, num_images, model=None, demo=None, accuracy_n=4, judge_clip=None):
    """The VAE's held-out PSNR and scale factor, and what its reconstructions keep of the prompt's attributes.
    (model, demo, accuracy_n, judge_clip: the pipeline's flags, the demo folder, images per prompt and the judge
    CLIP's checkpoint, for families that judge more; unused here.)"""
    vae_path = runs / "vae" / "ckpt.pt"
    vae = load_checkpoint(vae_path, "vae")
    vae_model, _, _ = load_vae(vae_path)
    rec = reconstruction_accuracy(lambda x: vae_model.decode(vae_model.encode(x).mode()).clamp(-1, 1), classifier,
                                  num_images=num_images)
    print(f"  VAE PSNR {vae.get('psnr'):.2f} dB; the classifier on its reconstructions: colour {rec['colour']:.3f} | "
          f"shape {rec['shape']:.3f} (the ceiling of prompt accuracy in latent space)")
    return {"vae": {"psnr_db": vae.get("psnr"), "scale_factor": vae["scale_factor"],
                    "attribute_accuracy_of_reconstructions": rec}}
