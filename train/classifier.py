"""Train the shapes attribute classifier (models/classifier.py) used to score prompt accuracy.

    python -m train.classifier --config configs/shapes/classifier.yaml                       # 32 px, 1 object
    python -m train.classifier --config configs/shapes/classifier.yaml model.resolution=64 model.max_objects=3 \
        steps=2000 num_train_images=30000 out_dir=runs/shapes_classifier_64

Trains on images rendered once into memory (split "all": the held-out (colour, shape) pairs too, since the
classifier must recognise them in generated images) and ends by scoring 2000 fresh renders of another seed.
Measured on a shared 2-core CPU with OMP_NUM_THREADS=1 (0.14M parameters):
    32 px, 1 object, 1000 steps, 134 s in all:
    count 1.0000 | background 1.0000 | colour 1.0000 | shape 0.9975 | size 1.0000 | position 1.0000 | image 0.9975
    64 px, 1-3 objects, 2000 steps, about 6 minutes:
    count 1.0000 | background 1.0000 | colour 1.0000 | shape 1.0000 | size 1.0000 | position 1.0000 | image 1.0000
Writes out_dir/ckpt.pt (atomic; kind "shapes_classifier", config and weights) and out_dir/config.yaml.

Accuracy per attribute: count and background per image; colour, shape, size and position per true object,
after pairing true and predicted objects by nearest centres (an object left unpaired counts as wrong);
position is right when both coordinates are within POSITION_TOLERANCE of the truth.
"""
import itertools
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from core.checkpoint import save_checkpoint
from core.config import config_to_dict, format_config, parse_config
from core.runtime import autocast, get_device, run_cli, seed_everything
from data.shapes import render_dataset
from models.classifier import (ClassifierConfig, ShapesClassifier, attributes_to_targets, detection_loss,
                               load_classifier, predict_attributes)
from train.common import shuffled_batches, warmup_cosine

POSITION_TOLERANCE = 0.05   # of the image side: 1.6 px at 32 px


@dataclass
class ClassifierTrainConfig:
    model: ClassifierConfig = field(default_factory=ClassifierConfig)
    out_dir: str = "runs/shapes_classifier"  # ckpt.pt and config.yaml go here
    steps: int = 1000                 # optimizer steps
    batch_size: int = 128             # images per step
    lr: float = 3e-3                  # peak AdamW learning rate
    weight_decay: float = 1e-4        # AdamW decoupled weight decay
    warmup_steps: int = 50            # linear warm-up, then cosine decay to 1% of lr
    num_train_images: int = 20000     # rendered once into memory (split "all", seed data_seed)
    data_seed: int = 0                # rendering seed of the training images
    eval_seed: int = 1                # rendering seed of the fresh evaluation images (must differ)
    num_eval_images: int = 2000       # fresh renders scored at the end
    noise_std: float = 0.03           # Gaussian noise added to training images (robustness to generated ones)
    seed: int = 0                     # model init and batch order
    device: str = "auto"              # auto | cpu | cuda | cuda:N | mps
    bf16: bool = False                # bf16 autocast for forward and loss
    log_every: int = 100              # steps between log lines
    overwrite: bool = False           # replace an existing out_dir/ckpt.pt (otherwise that is an error)


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


def evaluate(model, cfg: ClassifierConfig, num_images, seed, batch_size=500, progress=True):
    """Accuracy on `num_images` fresh renders of `seed`."""
    images, attributes = render_tensors(num_images, cfg, seed, progress)
    device = next(model.parameters()).device
    predictions = []
    for i in range(0, num_images, batch_size):
        x = images[i: i + batch_size].to(device).float() / 127.5 - 1  # (b, 3, R, R) in [-1, 1]
        predictions += predict_attributes(model, x)
    return score(predictions, attributes)


def main(argv=None):
    cfg, _ = parse_config(ClassifierTrainConfig, argv, description=__doc__.split("\n")[0])
    if cfg.eval_seed == cfg.data_seed:
        raise ValueError("eval_seed must differ from data_seed so that the evaluation images are unseen")
    if cfg.steps < 1 or cfg.batch_size < 1 or cfg.num_train_images < cfg.batch_size:
        raise ValueError("steps and batch_size must be at least 1 and num_train_images at least batch_size")
    device = get_device(cfg.device)
    seed_everything(cfg.seed)
    out_dir = Path(cfg.out_dir)
    if (out_dir / "ckpt.pt").exists() and not cfg.overwrite:
        raise ValueError(f"{out_dir / 'ckpt.pt'} exists; pass overwrite=true to replace it or choose another "
                         f"out_dir (nothing was overwritten)")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.yaml").write_text(format_config(cfg) + "\n")

    # ---- data: rendered once, targets encoded once
    images, attributes = render_tensors(cfg.num_train_images, cfg.model, cfg.data_seed)  # (N, 3, R, R) uint8
    targets = attributes_to_targets(attributes)
    N = len(attributes)

    # ---- model, optimizer
    model = ShapesClassifier(cfg.model).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{N} training images, {n_params / 1e6:.2f}M parameters, device {device}", flush=True)

    # ---- the loop
    g = torch.Generator().manual_seed(cfg.seed)
    batches = shuffled_batches(N, cfg.batch_size, g)
    model.train()
    t0 = time.time()
    bar = tqdm(range(cfg.steps), desc="classifier", dynamic_ncols=True)
    for step in bar:
        idx = next(batches)
        x = images[idx].to(device).float() / 127.5 - 1                                  # (B, 3, R, R)
        x = x + cfg.noise_std * torch.randn(x.shape, generator=g).to(device)
        batch_targets = {k: v[idx].to(device) for k, v in targets.items()}
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr * warmup_cosine(step, cfg.warmup_steps, cfg.steps, min_ratio=0.01)
        with autocast(device, cfg.bf16):
            loss = detection_loss(model(x), batch_targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            bar.set_postfix(loss=f"{loss.item():.4f}")
            tqdm.write(f"step {step + 1} | loss {loss.item():.4f} | lr {optimizer.param_groups[0]['lr']:.2e} | "
                       f"{time.time() - t0:.0f}s")

    ckpt_path = out_dir / "ckpt.pt"
    save_checkpoint(ckpt_path, {"kind": "shapes_classifier", "config": config_to_dict(cfg), "step": cfg.steps,
                                "model": model.state_dict()})
    print(f"saved {ckpt_path} after {cfg.steps} steps ({time.time() - t0:.0f}s)", flush=True)

    # ---- accuracy on fresh renders, through the checkpoint as users will load it
    model, _ = load_classifier(ckpt_path, device)
    acc = evaluate(model, cfg.model, cfg.num_eval_images, cfg.eval_seed)
    print(f"accuracy on {cfg.num_eval_images} fresh renders (seed {cfg.eval_seed}, {cfg.model.resolution}px, "
          f"up to {cfg.model.max_objects} objects):", flush=True)
    print(" | ".join(f"{k} {v:.4f}" for k, v in acc.items()), flush=True)


if __name__ == "__main__":
    run_cli(main)
