"""Train the shapes attribute classifier (models/classifier.py) used to score prompt accuracy.

    python -m train.classifier --config configs/shapes/classifier.yaml                       # 32 px, 1 object
    python -m train.classifier --config configs/shapes/classifier.yaml model.resolution=64 model.max_objects=3 \
        train.steps=2000 data.num_images=30000 train.out_dir=runs/shapes_classifier_64

Trains on images rendered once into memory (split "all": the held-out (colour, shape) pairs too, since the
classifier must recognise them in generated images) and ends by scoring 2000 fresh renders of another seed.
It ends with the accuracy per attribute, every one >= 0.99 at 32 px (figures: docs/results.md). Writes
train.out_dir/ckpt.pt (atomic; kind "shapes_classifier": config, weights, optimizer, step; train.resume=auto
continues it exactly) and config.yaml.

Accuracy per attribute: count and background per image; colour, shape, size and position per true object,
after pairing true and predicted objects by nearest centres (an object left unpaired counts as wrong);
position is right when both coordinates are within POSITION_TOLERANCE of the truth.
"""
import itertools
import time
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from core.checkpoint import save_checkpoint
from core.config import format_config, parse_config
from core.runtime import autocast, get_device, run_cli, seed_everything
from data.shapes import render_dataset
from models.classifier import (ClassifierConfig, ShapesClassifier, attributes_to_targets, detection_loss,
                               load_classifier, predict_attributes)
from train.common import (TrainConfig, batch_indices, end_step, memory_format, open_run, resume_state,
                          set_learning_rate, step_generator, training_state)

POSITION_TOLERANCE = 0.05   # of the image side: 1.6 px at 32 px


@dataclass
class ClassifierData:
    num_images: int = 20000       # training renders, made once into memory from every (colour, shape) pair
    seed: int = 0                 # rendering seed of the training images


@dataclass
class ClassifierTrain(TrainConfig):
    out_dir: str = "runs/shapes_classifier"  # ckpt.pt and config.yaml go here (the metrics' default classifier)
    steps: int = 1000             # optimizer steps
    batch_size: int = 128         # images per step
    lr: float = 3e-3              # peak AdamW learning rate
    weight_decay: float = 1e-4    # AdamW decoupled weight decay
    warmup_steps: int = 50        # linear warm-up, then cosine decay
    min_lr_ratio: float = 0.01    # final learning rate as a fraction of lr
    noise_std: float = 0.03       # Gaussian noise added to training images (robustness to generated ones)
    eval_images: int = 2000       # fresh renders scored at the end (0 = skip)
    eval_seed: int = 1            # rendering seed of the fresh evaluation images (must differ from data.seed)


@dataclass
class ClassifierTrainConfig:
    model: ClassifierConfig = field(default_factory=ClassifierConfig)
    data: ClassifierData = field(default_factory=ClassifierData)
    train: ClassifierTrain = field(default_factory=ClassifierTrain)


def render_tensors(num_images, cfg: ClassifierConfig, seed, progress=True):
    """Rendered images (N, 3, R, R) uint8 and their attributes, from every (colour, shape) pair."""
    images, _, attributes = render_dataset(num_images, cfg.resolution, seed, "all", cfg.max_objects, progress)
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), attributes  # (N, 3, R, R)


def _match(true_objects, predicted):
    """Pairs (true, predicted or None) minimising the total centre distance over all one-to-one pairings."""
    k = min(len(true_objects), len(predicted))
    best, best_cost = [], float("inf")
    for chosen_true in itertools.combinations(range(len(true_objects)), k):
        for chosen_pred in itertools.permutations(range(len(predicted)), k):
            pairs = [(true_objects[i], predicted[j]) for i, j in zip(chosen_true, chosen_pred)]
            cost = sum(abs(t["x"] - p["x"]) + abs(t["y"] - p["y"]) for t, p in pairs)
            if cost < best_cost:
                best, best_cost = pairs, cost
    paired = {id(t) for t, _ in best}
    return best + [(t, None) for t in true_objects if id(t) not in paired]


def score(predictions, attributes):
    """Per-attribute accuracy of predicted against true attribute dicts, plus exact-match rate per image."""
    hits = {k: 0 for k in ("count", "background", "colour", "shape", "size", "position", "image")}
    num_objects = 0
    for pred, true in zip(predictions, attributes):
        hits["count"] += pred["count"] == true["count"]
        hits["background"] += pred["background"] == true["background"]
        all_right = pred["count"] == true["count"] and pred["background"] == true["background"]
        for t, p in _match(true["objects"], pred["objects"]):
            num_objects += 1
            right = {k: p is not None and p[k] == t[k] for k in ("colour", "shape", "size")}
            right["position"] = (p is not None and abs(p["x"] - t["x"]) < POSITION_TOLERANCE
                                 and abs(p["y"] - t["y"]) < POSITION_TOLERANCE)
            for k, ok in right.items():
                hits[k] += ok
            all_right = all_right and all(right.values())
        hits["image"] += all_right
    per_image = {"count", "background", "image"}
    return {k: v / (len(attributes) if k in per_image else num_objects) for k, v in hits.items()}


def evaluate(model, cfg: ClassifierConfig, num_images, seed, batch_size=500, progress=True, transform=None):
    """Accuracy on `num_images` fresh renders of `seed`; with `transform` ((b, 3, R, R) images in [-1, 1] -> the
    same, e.g. a VAE's encode and decode), on what it makes of them."""
    images, attributes = render_tensors(num_images, cfg, seed, progress)
    device = next(model.parameters()).device
    predictions = []
    for i in range(0, num_images, batch_size):
        x = images[i: i + batch_size].to(device).float() / 127.5 - 1  # (b, 3, R, R) in [-1, 1]
        predictions += predict_attributes(model, transform(x) if transform is not None else x)
    return score(predictions, attributes)


def main(argv=None):
    cfg, config_path = parse_config(ClassifierTrainConfig, argv, description=__doc__.split("\n")[0])
    tc = cfg.train
    if tc.eval_seed == cfg.data.seed:
        raise ValueError("train.eval_seed must differ from data.seed so that the evaluation images are unseen")
    if cfg.data.num_images < tc.batch_size:
        raise ValueError("data.num_images must be at least train.batch_size")
    out_dir, resumed = open_run(cfg, config_path, "shapes_classifier", ("model", "data"), "shapes_classifier")
    ckpt_path = out_dir / "ckpt.pt"
    device = get_device(tc.device)
    seed_everything(tc.seed)

    # ---- data: rendered once, targets encoded once
    images, attributes = render_tensors(cfg.data.num_images, cfg.model, cfg.data.seed)  # (N, 3, R, R) uint8
    targets = attributes_to_targets(attributes)
    N = len(attributes)

    # ---- model, optimizer
    model = ShapesClassifier(cfg.model).to(device)
    layout = memory_format(tc, model)  # train.channels_last
    optimizer = torch.optim.AdamW(model.parameters(), lr=tc.lr, betas=tc.betas, weight_decay=tc.weight_decay)
    start_step = resume_state(resumed, model, optimizer, what="shapes classifier weights")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.yaml").write_text(format_config(cfg) + "\n")
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{N} training images, {n_params / 1e6:.2f}M parameters, device {device}, writing to {out_dir}", flush=True)

    # ---- the loop
    model.train()
    end = end_step(tc, start_step)
    t0 = time.time()
    bar = tqdm(range(start_step, end), initial=start_step, total=tc.steps, desc="classifier", dynamic_ncols=True)
    for step in bar:
        idx = batch_indices(step, tc.batch_size, N, tc.seed)  # (B,)
        g = step_generator(tc.seed, step)
        x = images[idx].to(device).float() / 127.5 - 1  # (B, 3, R, R)
        x = x + tc.noise_std * torch.randn(x.shape, generator=g).to(device)
        batch_targets = {k: v[idx].to(device) for k, v in targets.items()}
        lr = set_learning_rate(optimizer, tc, step)
        with autocast(device, tc.bf16):
            loss = detection_loss(model(layout(x)), batch_targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if tc.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        optimizer.step()
        done = step + 1
        if done % tc.log_every == 0 or done == tc.steps:
            bar.set_postfix(loss=f"{loss.item():.4f}")
            tqdm.write(f"step {done} | loss {loss.item():.4f} | lr {lr:.2e} | {time.time() - t0:.0f}s")
        if done % tc.ckpt_every == 0 or done == end:
            save_checkpoint(ckpt_path, training_state("shapes_classifier", cfg, done, model, optimizer))
    print(f"saved {ckpt_path} at step {end} of {tc.steps} ({time.time() - t0:.0f}s this run)", flush=True)
    if end < tc.steps or not tc.eval_images:
        return

    # ---- accuracy on fresh renders, through the checkpoint as users will load it
    model, _ = load_classifier(ckpt_path, device)
    acc = evaluate(model, cfg.model, tc.eval_images, tc.eval_seed)
    print(f"accuracy on {tc.eval_images} fresh renders (seed {tc.eval_seed}, {cfg.model.resolution}px, "
          f"up to {cfg.model.max_objects} objects):", flush=True)
    print(" | ".join(f"{k} {v:.4f}" for k, v in acc.items()), flush=True)


if __name__ == "__main__":
    run_cli(main)
