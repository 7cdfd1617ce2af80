"""The unCLIP (DALL-E 2) family in the demo: a CLIP, a VAE, the diffusion prior and the decoder.

    python -m sample.demo --family unclip

Stages (each a training script of its own, in this order; sample/demo.py runs them, the judges and the metrics):
    CLIP     python -m train.clip --config configs/shapes/clip.yaml               text and image towers, frozen after
    VAE      python -m train.vae --config configs/shapes/vae.yaml                 the decoder's latent space
    prior    python -m train.prior --config configs/shapes/prior.yaml             z_t -> z_i (Ramesh et al. Sec. 2.2)
    decoder  python -m train.diffusion --config configs/shapes/decoder_unclip.yaml  z_i (+ caption) -> latents
The CLIP and the VAE are the same checkpoints as the other families' (runs/clip, runs/vae): trained once per runs
folder. Sampling: the prior DDPM 25 steps, guidance 2, best of 2; the decoder DDIM 50 steps, guidance 3
(--steps, --guidance).

report() adds the prior's figures to metrics.json (train/prior.py evaluate(): cosine of the prior's z_i to the true
z_i against z_t and the training mean, retrieval) and the decoder's prompt accuracy given the true z_i of a render
of the prompt (the upper bound) and given z_t in place of z_i (no prior); `prompt_accuracy` is the full pipeline's.
"""
import json

import torch

import metrics.prompt_accuracy
import train.clip
import train.diffusion
import train.prior
import train.vae
from sample.stages import CONFIGS, Stage

SMOKE = {
    "CLIP": ["train.steps=3", "data.num_images=64", "train.batch_size=16", "train.eval_images=32"],
    "VAE": ["train.steps=3", "data.num_images=64", "train.batch_size=16", "train.eval_images=32",
            "train.scale_images=64"],
    "prior": ["train.steps=3", "data.num_images=64", "train.batch_size=16", "train.eval_images=16"],
    "decoder": ["train.steps=3", "data.num_images=64", "train.batch_size=16", "train.sample_every=0",
                "train.sample_steps=2"],
}


def stages(runs, smoke):
    clip, vae = runs / "clip" / "ckpt.pt", runs / "vae" / "ckpt.pt"
    return [
        Stage("CLIP", train.clip, CONFIGS / "clip.yaml", clip, "clip", train.clip.ClipTrainConfig,
              SMOKE["CLIP"] if smoke else [], train.clip.FILLED_IN),
        Stage("VAE", train.vae, CONFIGS / "vae.yaml", vae, "vae", train.vae.VAETrainConfig,
              SMOKE["VAE"] if smoke else []),
        Stage("prior", train.prior, CONFIGS / "prior.yaml", runs / "prior" / "ckpt.pt", "prior",
              train.prior.PriorTrainConfig, [f"clip={clip}", *(SMOKE["prior"] if smoke else [])],
              train.prior.FILLED_IN),
        Stage("decoder", train.diffusion, CONFIGS / "decoder_unclip.yaml", runs / "decoder_unclip" / "ckpt.pt",
              "diffusion", train.diffusion.DiffusionConfig,
              [f"text_encoder=clip:{clip}", f"vae={vae}", *(SMOKE["decoder"] if smoke else [])],
              ("text.vocab_size", "tokenizer.vocab_size")),
    ]


def pipeline(runs):
    return ["--pipeline", "unclip", "--config", str(CONFIGS / "pipeline_unclip.yaml"),
            "--ckpt", str(runs / "decoder_unclip" / "ckpt.pt"), "--prior", str(runs / "prior" / "ckpt.pt")]


def sampling(args):
    return ["--sampler", "ddim", "--steps", str(args.steps), "--guidance", str(args.guidance)]


def report(runs, classifier, num_images, model=None, demo=None, accuracy_n=4, judge_clip=None):
    """The prior's figures, and the decoder's prompt accuracy with the true z_i and with z_t (no prior)."""
    from models.clip import load_clip
    prior_path = runs / "prior" / "ckpt.pt"
    prior, schedule, cfg, ckpt = train.prior.load_prior(prior_path)
    clip, tokenizer, _ = load_clip(ckpt["clip"]["path"])
    g = torch.Generator().manual_seed(0)
    n = min(num_images, 500)
    figures = {name: train.prior.evaluate(prior, schedule, cfg.sampler, cfg.candidates, clip, tokenizer, n,
                                          cfg.train.eval_seed, split, g)
               for split, name in (("train", "heldin"), ("heldout", "heldout"))}
    train.prior.print_evaluation(figures, n, cfg.train.eval_seed)
    out = {"prior": figures}
    if model is not None:  # the decoder given other embeddings than the prior's
        for embedding in ("true", "text"):
            path = demo / f"prompt_accuracy_{embedding}_embedding.json"
            metrics.prompt_accuracy.main(model + ["--embedding", embedding, "--classifier", str(classifier),
                                                  "--n", str(accuracy_n), "--seed", "0", "--out", str(path)])
            accuracy = json.loads(path.read_text())
            out[f"prompt_accuracy_{embedding}_embedding"] = {k: accuracy[k] for k in ("heldin", "heldout")}
    return out
