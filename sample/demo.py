"""The README's main job: train one family's tiny models on the built-in shapes, sample from them and judge them.

    python -m sample.demo [--family ldm] [--runs runs] [--fid-images 500]      # `make demo`
    python -m sample.demo --family all        # every family in turn, then runs/demo/compare/comparison.{md,png}

Every family goes through the same steps and writes the same figures, so the families can be compared:
    judges      the shapes attribute classifier (prompt accuracy, FID features) and a judge CLIP trained apart from
                every generator (CLIP score), trained once per runs folder and shared by the families
    stages      the family's own training scripts, in order (sample/demo_<family>.py); each is
                `python -m train.<script> --config FILE train.out_dir=... train.resume=auto`: a finished stage is
                skipped, a stopped one continues, one of another config is refused (sample/stages.py)
    samples     python -m sample <the family's pipeline> --prompts-file configs/shapes/demo_prompts.txt
                                                                                -> runs/demo/<family>/samples.png
    metrics     sample/judging.py: prompt accuracy (metrics.prompt_accuracy) on held-in and held-out prompts; FID
                and KID on the classifier's features, the CLIP score and R-precision with the judge CLIP
                (metrics.fid, metrics.clip_score, metrics.r_precision) of images generated for the captions of
                fresh renders, against those renders                             -> runs/demo/<family>/metrics.json
metrics.json has the same keys for every family: prompt_accuracy.{heldin,heldout}.{colour,shape,...}, fid,
clip_score, r_precision (and r_precision_real, of the renders), stage_seconds (wall), stage_cpu_seconds (CPU time of
the stage's process: the cost that does not depend on what else the machine ran), total_seconds, seconds_per_image
(and what the family adds: the ldm family's VAE). sample/compare.py puts the families' figures side by side.
`--smoke` shrinks every stage to a few steps: a check that the whole chain runs (tests/test_demo.py), not a result.
The notebooks get the same trained parts from `trained_parts` (the demo's runs/, or trained by the same stages).

On a machine with two or more cores the two judges train one after the other in child processes on one thread each
(their output in runs/demo/<family>/logs/<judge>.log) beside the family's first stage, which needs nothing from them:
the small models of the tiny presets use a second thread poorly (the VAE, batch 8: 168 s on one thread, 142 s on two),
so the judges leave the critical path. The family's later stages wait for them and take every core: a stage whose
script trains under torchrun (the latent U-Net) as one process per core (DDP over gloo, sample/stages.train_ddp: its
steps 1.13x faster than one process on two threads, whose second thread adds only 1.15-1.2x), the others here on
every thread. `--sequential` runs every stage here, in turn, in this process.
"""
import argparse
import json
import os
import time
from pathlib import Path

import torch

import sample.__main__ as sample_cli
from core.runtime import run_cli
from sample import demo_dalle, demo_imagen, demo_ldm, demo_unclip
from sample.budget import apply_budget
from sample.compare import compare
from sample.judging import judge, summary_lines
from sample.stages import CONFIGS, Lane, Timer, judges, keep_stage_seconds, train_ddp

FAMILIES = ("ldm", "dalle", "imagen", "unclip")  # python -m sample.demo --family NAME; each: sample/demo_<family>.py


def family_module(name):
    if name == "ldm":
        return demo_ldm
    if name == "dalle":
        return demo_dalle
    if name == "imagen":
        return demo_imagen
    if name == "unclip":
        return demo_unclip
    raise ValueError(f"unknown family '{name}'; use one of {', '.join(FAMILIES)}")


def build_parser():
    p = argparse.ArgumentParser(description="Train one family's tiny models on shapes, sample and judge them.")
    p.add_argument("--family", default="ldm",
                   help=f"which family: {', '.join(FAMILIES)}, or all (each in turn, then a comparison table and "
                        f"picture in <runs>/demo/compare, sample/compare.py)")
    p.add_argument("--runs", default="runs", help="folder of every stage's output (runs/<stage>, runs/demo/<family>)")
    p.add_argument("--fid-images", type=int, default=500, help="generated and real images for FID and CLIP score")
    p.add_argument("--n", type=int, default=8, help="images per prompt in the samples grid")
    p.add_argument("--accuracy-n", type=int, default=4, help="images per prompt for prompt accuracy")
    p.add_argument("--steps", type=int, default=50, help="sampling steps (diffusion families)")
    p.add_argument("--guidance", type=float, default=3.0, help="classifier-free guidance scale")
    p.add_argument("--sequential", action="store_true",
                   help="train the judges here, before the family's stages, instead of beside them")
    p.add_argument("--budget-minutes", type=float, default=None,
                   help="train every stage of the family for this many minutes in all, split as its configs' steps "
                        "are (sample/budget.py); default runs folder runs/budget_<M>min")
    p.add_argument("--seed", type=int, default=None,
                   help="train.seed of every stage of the family (init, data order, noise); the judges and the "
                        "sampling seeds stay fixed, so two seeds measure the spread of training alone. A runs folder "
                        "trained with another seed is refused: give each seed its own --runs")
    p.add_argument("--smoke", action="store_true", help="a few steps per stage: checks the chain, gives no result")
    return p


def train_stages(family_stages, judge_stages, log_dir, timer, sequential):
    """The judges and the family's stages. With two cores or more and both still to train, the judges that are not
    done train in a lane of their own (child processes on one thread each, one after the other: sample/stages.Lane)
    beside the family's first stage, which runs on the other threads; the family's later stages wait for the lane and
    take every core. A first stage that trains as one process per core (Stage.ddp) takes every core itself: the
    judges train before it, here. Else everything here, in turn."""
    for stage in judge_stages:
        if stage.done():
            timer.skipped(stage.name)
    pending = [stage for stage in judge_stages if stage.name not in timer.seconds]
    first, rest = family_stages[0], family_stages[1:]
    processes = ddp_processes(sequential)

    def train(stage):
        if stage.ddp and processes > 1:
            timer.run(stage.name, lambda: train_ddp(stage, processes), skip=stage.done(), children=True)
        else:
            timer.run(stage.name, lambda: stage.script.main(stage.argv), skip=stage.done())

    beside = (pending and not first.done() and not sequential and (os.cpu_count() or 1) >= 2
              and not (first.ddp and processes > 1))
    if beside:
        lane = Lane(pending, log_dir, timer)
        lane.start()
        threads = torch.get_num_threads()
        torch.set_num_threads(max(1, threads - 1))
        try:
            timer.run(first.name, lambda: first.script.main(first.argv))
        except BaseException:  # an error or Ctrl-C here: the lane stops too
            lane.stop()
            raise
        finally:
            torch.set_num_threads(threads)
        if not lane.done():
            print(f"\n==== waiting for the judges' lane (log {log_dir})", flush=True)
        lane.wait()
    else:
        for stage in pending:
            timer.run(stage.name, lambda: stage.script.main(stage.argv))
        train(first)
    for stage in rest:
        train(stage)
    keep_stage_seconds((*judge_stages, *family_stages), timer)


def ddp_processes(sequential):
    """How many processes a stage that supports torchrun trains as: one per core (at most 2: measured there) on a CPU
    machine of two cores or more, unless --sequential; else 1 (this process, on every thread; a GPU trains alone)."""
    if sequential or torch.cuda.is_available() or os.environ.get("RANK") is not None:
        return 1
    return min(2, os.cpu_count() or 1)


def trained_parts(family="ldm", quick=False, runs="runs"):
    """The notebooks' way to the trained models (notebooks/*.ipynb): {stage name: checkpoint path} of the judges and
    of `family`'s stages. The demo's `runs` when it has trained them all; else trained by the demo's own stages:
    with quick (NOTEBOOKS_QUICK=1, as CI runs them) at the --smoke size, in seconds, into $NOTEBOOKS_RUNS (default
    runs/notebooks_quick), without it at the demo's size into `runs` (minutes; finished stages are skipped)."""
    module = family_module(family)
    full = [*judges(Path(runs), False), *module.stages(Path(runs), False)]
    if not quick or all(stage.done() for stage in full):
        folder, smoke = Path(runs), False
    else:
        folder, smoke = Path(os.environ.get("NOTEBOOKS_RUNS", Path(runs) / "notebooks_quick")), True
    judge_stages, family_stages = judges(folder, smoke), module.stages(folder, smoke)
    train_stages(family_stages, judge_stages, folder / "demo" / family / "logs", Timer(), sequential=True)
    return {stage.name: stage.ckpt for stage in (*judge_stages, *family_stages)}


def run_family(args, name):
    """One family's demo: its stages (and the judges), samples, metrics -> runs/demo/<name>/."""
    family = family_module(name)
    runs = Path(args.runs)
    demo = runs / "demo" / name
    # under a budget every family trains all of its parts in its own minutes: the parts families share otherwise
    # (the VAE of ldm and unclip, the CLIP of dalle and unclip) are trained per family, in runs/families/<name>/
    parts = runs / "families" / name if args.budget_minutes is not None else runs
    judge_stages = judges(runs, args.smoke)
    family_stages = family.stages(parts, args.smoke)
    if args.seed is not None:  # after the config's own overrides: the seed is the one thing that differs
        for stage in family_stages:
            stage.overrides = [*stage.overrides, f"train.seed={args.seed}"]
    timer = Timer()
    t_start = time.time()
    budget = None
    if args.budget_minutes is not None:  # every stage's steps scaled so that the family trains this many minutes
        budget = timer.run("budget plan", lambda: apply_budget(family_stages, args.budget_minutes,
                                                               demo / "budget.json", args.smoke))
    for stage in (*judge_stages, *family_stages):
        stage.done()  # a checkpoint of another config is refused here, before anything trains
    classifier, judge_clip = (stage.ckpt for stage in judge_stages)

    # ---- the trained parts
    train_stages(family_stages, judge_stages, demo / "logs", timer, args.sequential)
    model = family.pipeline(parts) + family.sampling(args)  # the flags that name the pipeline and how it samples
    sampled = model + ["--seed", "0", "--overwrite"]

    # ---- samples for people to look at
    timer.run("samples", lambda: sample_cli.main(
        sampled + ["--prompts-file", str(CONFIGS / "demo_prompts.txt"), "--n", str(args.n),
                   "--out", str(demo / "samples.png")]))

    # ---- metrics (sample/judging.py: the same figures for every family and every sweep point)
    report = {"family": name, "parts_folder": str(parts), "train_seed": 0 if args.seed is None else args.seed}
    report.update(judge(model, demo, classifier, judge_clip, args.fid_images, args.accuracy_n, timer))
    report["stage_seconds"] = timer.seconds
    report["stage_cpu_seconds"] = timer.cpu_seconds
    report["stages_beside"] = sorted(timer.beside)
    report["stages_trained_before"] = timer.trained_before  # skipped here: the seconds of the run that trained them
    if budget is not None:
        report["budget"] = {"minutes": args.budget_minutes, "stages": budget}
    report["total_seconds"] = round(time.time() - t_start, 1)
    report["smoke"] = args.smoke

    # ---- the summary
    print(f"\n==== {name} demo summary" + ("  (--smoke: a few steps per stage; the figures mean nothing)"
                                                  if args.smoke else ""))
    for stage, seconds in timer.seconds.items():
        print(f"  {stage:32s} {seconds:6.0f} s" + ("  (beside the family's first stage, one thread)" if stage in timer.beside
                                                  else ""))
    print(f"  {'total':32s} {report['total_seconds']:6.0f} s; {report['seconds_per_image']:.3f} s per image sampled")
    for line in summary_lines(report):
        print("  " + line)
    report.update(family.report(parts, classifier, min(1000, args.fid_images), model=model, demo=demo,
                                accuracy_n=args.accuracy_n, judge_clip=judge_clip))
    (demo / "metrics.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"  pictures: {demo / 'samples.png'} (one row per prompt), "
          f"{demo / 'prompt_accuracy_heldin.png'}, {demo / 'prompt_accuracy_heldout.png'}, {demo / 'generated'}/")
    print(f"  figures:  {demo / 'metrics.json'}")


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.budget_minutes is not None and args.runs == "runs":  # the default folder holds the configs' own steps
        args.runs = f"runs/budget_{args.budget_minutes:g}min"
    if args.fid_images < 2 or args.n < 1 or args.accuracy_n < 1:
        raise ValueError("--fid-images must be at least 2, --n and --accuracy-n at least 1")
    names = FAMILIES if args.family == "all" else (args.family,)
    for name in names:
        family_module(name)  # an unknown family is refused before anything trains
    for name in names:
        run_family(args, name)
    if args.family == "all":
        compare(names, args.runs, Path(args.runs) / "demo" / "compare", family_module)


if __name__ == "__main__":
    run_cli(main)
