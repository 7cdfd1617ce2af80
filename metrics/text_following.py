"""Does the denoiser follow the prompt's words? A probe of one attribute at chosen noise levels.

Prompt accuracy (metrics/prompt_accuracy.py) says how often a sample shows what the prompt asks; this probe
says where along the noise levels the text takes effect, one attribute at a time. For fresh single-object
renders x_0 ("a red circle"), a noise level t and every other value of the attribute ("square", "star", ...):
    x_t   = q(x_t | x_0) (in latent space: of the VAE's scaled posterior mean)
    x0_hat = the model's guided x_0 prediction at (x_t, t) for the prompt naming the other value
    decoded (latent space: by the VAE) and read by the shapes attribute classifier
and reports, over all (image, other value) pairs,
    follows   the classifier sees the prompt's value             (chance: 1 / number of values)
    keeps     the classifier sees the image's own value
At small t the picture decides (keeps -> 1); where x_t no longer shows the attribute a model that reads the
text follows it, one that does not stays at chance.

The same x_t under the render's own prompt say how well the model denoises at each level, text aside:
    mse       of x0_hat against x_0, in pixels (latent space: after decoding)
    mse_input of x_t / sqrt(abar_t) against x_0, the do-nothing estimate (pixel space only)
and `--grid FILE` saves the renders, then for each t a row of x_t and a row of x0_hat (latent space: decoded),
enlarged: where a model draws a blob for the square it is shown, it has not learned the shapes' edges.

    python -m metrics.text_following --ckpt runs/diffusion_latent/ckpt.pt --attribute shape --t 100 300 500 700 900
    #   t  100 | follows 0.557 | keeps 0.177 ... t  700 | follows 0.596 | keeps 0.083 ... t  900 | follows 0.359
    # (the demo's latent U-Net. The earlier preset, 64 channels after 800 steps of 32 images, kept what the picture
    # showed and ignored the shape word: t 100 follows 0.021, keeps 0.865; t 700 follows 0.172, keeps 0.180)
    python -m metrics.text_following --ckpt runs/imagen_base/ckpt.pt --grid base_denoising.png
"""
import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from core.images import image_grid
from core.runtime import run_cli
from data.shapes import COLOURS, SHAPES, article, render_dataset
from metrics.prompt_accuracy import check_trained_on_shapes
from models.classifier import load_classifier, predict_attributes
from models.conditioning import guided_prediction
from models.pipeline import add_pipeline_arguments, pipeline_from_args

VALUES = {"shape": list(SHAPES), "colour": list(COLOURS)}


def build_parser():
    p = argparse.ArgumentParser(description="Does the denoiser follow one attribute of the prompt, per noise level?")
    add_pipeline_arguments(p)
    p.add_argument("--classifier", default="runs/shapes_classifier/ckpt.pt", help="shapes classifier checkpoint")
    p.add_argument("--attribute", choices=sorted(VALUES), default="shape")
    p.add_argument("--t", type=int, nargs="+", default=[100, 300, 500, 700, 900], help="noise levels (0..T-1)")
    p.add_argument("--n", type=int, default=64, help="fresh renders per noise level")
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--seed", type=int, default=11, help="rendering and noise seed")
    p.add_argument("--out", help="also write the figures to this JSON file")
    p.add_argument("--grid", help="save renders, x_t and the x0 predictions under their own prompts (one row per t)")
    p.add_argument("--grid-images", type=int, default=8, help="renders in --grid")
    return p


def noised(pipe, x0, t_value, seed):
    """x_t = q(x_t | x_0) at t_value for every row of x0, noise seeded by (seed, t): the same x_t for every probe."""
    t = torch.full((len(x0),), t_value, device=x0.device, dtype=torch.long)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed * 1000 + t_value)).to(x0.device)
    return t, pipe.schedule.q_sample(x0, t, noise)


def prompt_of(obj):
    return f"{article(obj['colour'])} {obj['colour']} {obj['shape']}"


def to_pictures(pipe, x):
    """Samples of the model's space -> pictures in [-1, 1] (latent space: decoded by the VAE)."""
    return (x if pipe.vae is None else pipe.vae.decode(x / pipe.scale_factor)).clamp(-1, 1)


@torch.no_grad()
def denoising(pipe, images, attributes, timesteps, guidance_scale, seed):
    """x0 predictions under each render's own prompt -> ({t: {"mse", "mse_input"}}, {t: (x_t, x0_hat) pictures}).
    mse_input (pixel space): x_t / sqrt(abar_t), what the model would score by returning its input rescaled."""
    device = next(pipe.model.parameters()).device
    x = images.to(device)
    x0 = x if pipe.vae is None else pipe.vae.encode(x).mode() * pipe.scale_factor
    ids, mask = pipe.tokenizer([prompt_of(a["objects"][0]) for a in attributes],
                               max_length=pipe.model.text_encoder.cfg.max_length)
    cond = pipe.model.encode_text(ids.to(device), mask.to(device))
    figures, pictures = {}, {}
    for t_value in timesteps:
        t, x_t = noised(pipe, x0, t_value, seed)
        pred = guided_prediction(pipe.model.denoise, x_t, t, cond, guidance_scale)
        x0_hat = to_pictures(pipe, pipe.schedule.predict_x0_and_eps(pred, x_t, t)[0])
        figures[t_value] = {"mse": F.mse_loss(x0_hat, x).item()}
        if pipe.vae is None:
            figures[t_value]["mse_input"] = F.mse_loss(x_t / pipe.schedule.abar(t, x_t).sqrt(), x).item()
        pictures[t_value] = (to_pictures(pipe, x_t), x0_hat)
    return figures, pictures


def save_grid(path, images, pictures, scale=4):
    """Renders, then x_t and x0_hat for each t, one row each, enlarged `scale` times (nearest)."""
    rows = [images, *(p for pair in pictures.values() for p in pair)]
    grid = image_grid(torch.cat(rows).cpu(), nrow=len(images))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    grid.resize((grid.width * scale, grid.height * scale), resample=0).save(path)


@torch.no_grad()
def follow_rates(pipe, classifier, images, attributes, attribute, timesteps, guidance_scale, seed):
    """images (N, 3, H, W) in [-1, 1] with one object each -> {t: {"follows": f, "keeps": k, "pairs": n}}."""
    device = next(pipe.model.parameters()).device
    x = images.to(device)
    x0 = x if pipe.vae is None else pipe.vae.encode(x).mode() * pipe.scale_factor
    truth = [a["objects"][0] for a in attributes]
    out = {}
    for t_value in timesteps:
        t, x_t = noised(pipe, x0, t_value, seed)
        follows = keeps = pairs = 0
        for value in VALUES[attribute]:
            rows = [i for i, obj in enumerate(truth) if obj[attribute] != value]
            if not rows:
                continue
            objs = [dict(truth[i], **{attribute: value}) for i in rows]
            prompts = [prompt_of(o) for o in objs]
            ids, mask = pipe.tokenizer(prompts, max_length=pipe.model.text_encoder.cfg.max_length)
            cond = pipe.model.encode_text(ids.to(device), mask.to(device))
            pred = guided_prediction(pipe.model.denoise, x_t[rows], t[rows], cond, guidance_scale)
            x0_hat = pipe.schedule.predict_x0_and_eps(pred, x_t[rows], t[rows])[0]
            for i, seen in zip(rows, predict_attributes(classifier, to_pictures(pipe, x0_hat))):
                got = seen["objects"][0][attribute] if seen["objects"] else None
                follows += got == value
                keeps += got == truth[i][attribute]
                pairs += 1
        out[t_value] = {"follows": follows / pairs, "keeps": keeps / pairs, "pairs": pairs}
    return out


def main(argv=None):
    args = build_parser().parse_args(argv)

    pipe, _, device = pipeline_from_args(args)
    check_trained_on_shapes(pipe, "the probe")
    if pipe.family not in ("pixel", "ldm"):
        raise ValueError(f"the probe reads a diffusion model's x0 predictions; the {pipe.family} pipeline has none")
    T = pipe.schedule.num_train_timesteps
    if any(not 0 <= t < T for t in args.t):
        raise ValueError(f"--t values must lie in 0..{T - 1} (the checkpoint's num_train_timesteps is {T})")
    if args.grid and not 1 <= args.grid_images <= args.n:
        raise ValueError(f"--grid-images must lie in 1..--n ({args.n}), got {args.grid_images}")
    classifier, _ = load_classifier(args.classifier, device)
    resolution = pipe.data["resolution"]
    images, _, attributes = render_dataset(args.n, resolution, args.seed, "train", 1, progress=False)
    images = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1  # (N, 3, R, R)
    rates = follow_rates(pipe, classifier, images, attributes, args.attribute, args.t, args.guidance, args.seed)
    chance = 1 / len(VALUES[args.attribute])
    print(f"{args.attribute}: guided (scale {args.guidance}) x0 predictions for prompts naming another "
          f"{args.attribute} (chance {chance:.2f}), {args.n} renders")
    figures, pictures = denoising(pipe, images, attributes, args.t, args.guidance, args.seed)
    for t, r in rates.items():
        r.update(figures[t])
        mse_input = f" (x_t itself {r['mse_input']:.4f})" if "mse_input" in r else ""
        print(f"  t {t:4d} | follows {r['follows']:.3f} | keeps {r['keeps']:.3f} | {r['pairs']} pairs | own prompt: "
              f"x0 MSE {r['mse']:.4f}{mse_input}")
    if args.grid:
        save_grid(args.grid, images[:args.grid_images],
                  {t: tuple(p[:args.grid_images] for p in pair) for t, pair in pictures.items()})
        print(f"wrote {args.grid}: renders, then x_t and x0_hat under their own prompts for t = "
              f"{', '.join(map(str, args.t))}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"ckpt": args.ckpt, "attribute": args.attribute, "chance": chance,
                                              "guidance": args.guidance, "rates": rates}, indent=2) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    run_cli(main)
