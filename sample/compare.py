"""The families side by side: one table and one picture from the demos' folders (issue 23).

    python -m sample.demo --family all [--runs runs]     # every family's demo, then this -> runs/demo/compare/

Reads what `python -m sample.demo --family NAME` left in runs/demo/NAME/ (metrics.json) and the checkpoints of the
family's stages, and writes to runs/demo/compare/:
    comparison.md    one row per family: the weights of each trained part, the training seconds of each part (wall
                     and CPU; of the demo run that trained it, '-' for a part trained outside the demo), seconds per image at sampling, prompt accuracy held-in / held-out, FID, CLIP score,
                     R-precision; the judges (classifier, judge CLIP) are shared by every family and left out
    comparison.png   the same prompts through every family, one row each, at a common display size
A family whose demo has not run is an error naming the command that makes it.
"""
import argparse
import json
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure  # not pyplot: drawing here must not change a notebook's backend

import sample.__main__ as sample_cli
from core.checkpoint import load_checkpoint
from core.images import to_uint8
from sample.stages import CONFIGS

PICTURE_PROMPTS = 8  # the first prompts of configs/shapes/demo_prompts.txt, one column each


def weights_count(ckpt_path, kind):
    """Elements of every floating-point tensor a stage's checkpoint stores as its model (parameters and float
    buffers; a frozen encoder stored with it is counted too)."""
    state = load_checkpoint(ckpt_path, kind)["model"]
    return sum(t.numel() for t in state.values() if torch.is_tensor(t) and t.is_floating_point())


def family_row(family, module, runs):
    """{column: value} of one family, from runs/demo/<family>/metrics.json and its stages' checkpoints."""
    path = Path(runs) / "demo" / family / "metrics.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; run `python -m sample.demo --family {family} --runs {runs}` first")
    metrics = json.loads(path.read_text())
    if metrics.get("smoke"):
        print(f"  note: {path} comes from a --smoke run; its figures mean nothing")
    stages = module.stages(Path(metrics.get("parts_folder", runs)), bool(metrics.get("smoke")))
    cpu, before = metrics.get("stage_cpu_seconds", {}), metrics.get("stages_trained_before", {})
    parts = []
    for s in stages:  # a stage skipped as done (0 s) costs what the run that trained it recorded, if a demo did
        wall, cpu_s = metrics["stage_seconds"].get(s.name), cpu.get(s.name)
        if not wall:
            wall, cpu_s = before.get(s.name, {}).get("seconds"), before.get(s.name, {}).get("cpu_seconds")
        parts.append((s.name, weights_count(s.ckpt, s.kind), wall, cpu_s))
    acc = metrics["prompt_accuracy"]
    return {"family": family, "parts": parts, "seconds_per_image": metrics["seconds_per_image"],
            "heldin": (acc["heldin"]["colour"], acc["heldin"]["shape"]),
            "heldout": (acc["heldout"]["colour"], acc["heldout"]["shape"]),
            "fid": metrics["fid"]["fid"], "clip_score": metrics["clip_score"]["generated"]["torchmetrics_clip_score"], "r_precision": metrics["r_precision"],
            "total_seconds": metrics["total_seconds"], "parts_folder": metrics.get("parts_folder", str(runs))}


def _seconds(wall, cpu):
    wall_text = "-" if wall is None else f"{wall:.0f}"
    return wall_text if cpu is None else f"{wall_text} ({cpu:.0f})"


def table(rows):
    """The markdown comparison table of family rows (family_row)."""
    lines = ["| family | trained parts: weights | training s per part: wall (CPU) | s per image | held-in colour / "
             "shape | held-out colour / shape | FID | CLIP score | R-precision | demo s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        weights = ", ".join(f"{name} {n / 1e6:.2f}M" for name, n, _, _ in r["parts"])
        seconds = ", ".join(f"{name} {_seconds(wall, cpu)}" for name, _, wall, cpu in r["parts"])
        lines.append(f"| {r['family']} | {weights} | {seconds} | {r['seconds_per_image']:.3f} | "
                     f"{r['heldin'][0]:.3f} / {r['heldin'][1]:.3f} | {r['heldout'][0]:.3f} / {r['heldout'][1]:.3f} | "
                     f"{r['fid']:.3f} | {r['clip_score']:.2f} | {r['r_precision']:.3f} | {r['total_seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def family_pictures(module, runs, prompts, seed=0, steps=50, guidance=3.0, smoke=False):
    """(len(prompts), H, W, 3) uint8: one picture per prompt from the family's demo pipeline, seed `seed`."""
    from models.pipeline import pipeline_from_args, settings_from_args
    args = sample_cli.build_parser().parse_args(
        module.pipeline(Path(runs)) + module.sampling(argparse.Namespace(steps=steps, guidance=guidance, smoke=smoke)))
    pipe, preset, device = pipeline_from_args(args)
    settings = settings_from_args(pipe, args, preset)
    pipe.check_prompts(prompts)
    images = pipe(prompts, settings, generator=torch.Generator(device).manual_seed(seed), progress=False)
    return to_uint8(images.cpu())


def picture(names, pictures, prompts, out, size=64):
    """One row per family, one column per prompt; every picture shown at size x size (nearest neighbour, so a
    family's own resolution stays visible as its pixel size)."""
    fig = Figure(figsize=(1.3 * len(prompts), 1.45 * len(names) + 0.3))
    axes = fig.subplots(len(names), len(prompts), squeeze=False)
    for i, (name, row) in enumerate(zip(names, pictures)):
        for j, arr in enumerate(row):
            reps = max(1, size // arr.shape[0])
            axes[i, j].imshow(np.kron(arr, np.ones((reps, reps, 1), dtype=np.uint8)), interpolation="nearest")
            axes[i, j].set_xticks([])
            axes[i, j].set_yticks([])
            if j == 0:
                axes[i, j].set_ylabel(f"{name}\n{arr.shape[0]} px", fontsize=8)
            if i == 0:
                axes[i, j].set_title(prompts[j], fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def compare(families, runs, out, family_module):
    """The table and the picture of `families` (each with a finished demo in `runs`) into the folder `out`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    modules = {f: family_module(f) for f in families}  # an unknown family fails here, before any work
    rows = [family_row(f, modules[f], runs) for f in families]
    lines = (CONFIGS / "demo_prompts.txt").read_text().splitlines()
    prompts = [line.strip() for line in lines if line.strip()][:PICTURE_PROMPTS]
    smoke = [bool(json.loads((Path(runs) / "demo" / f / "metrics.json").read_text()).get("smoke")) for f in families]
    pictures = [family_pictures(modules[f], row["parts_folder"], prompts, steps=2 if s else 50, smoke=s)
                for f, row, s in zip(families, rows, smoke)]
    text = table(rows)
    (out / "comparison.md").write_text(text)
    picture(families, pictures, prompts, out / "comparison.png")
    print(text)
    print(f"wrote {out / 'comparison.md'} and {out / 'comparison.png'}")
    return rows
