"""Ablations as grids: train every point of a grid over config keys, judge it, and gather a table and plots.

    python -m sample.sweep --out runs/sweeps/guidance --set train.steps=1000 \
        --grid unet.channels=32,64 sampler.guidance_scale=1,2,3,5,8 --plot fid:sampler.guidance_scale
    python -m sample.sweep --out runs/sweeps/guidance --pareto clip_score:fid:unet.channels   # plots only

The grid (`--grid KEY=V1,V2 ...`: the product of its keys; `--grid` again adds another product, so a sweep is a
union of grids) is over the config keys of the family's generation stage (sample/demo_<family>.py's last stage,
or --stage NAME), with the same `key=value` syntax every training script reads (train/common.py), plus the
sampling keys `sampler.*` (SAMPLING_FLAGS), which need no training: the points that differ only in them share one
trained model. Keys joined by `+` take the same value (`text.width+unet.context_dim=32,64`); a value list is split at
the commas outside brackets (`unet.channel_mult=[1,2],[1,2,2]`). `--set KEY=VALUE` applies to every point.

Every distinct training config is one run directory, named by how it differs from the base config (the stage's
config file with --set; `base` when it does not), holding the checkpoint; every sampling point a folder inside it
with its metrics.json (sample/judging.py: the demo's figures). The family's other stages and the judges (the shapes
classifier, the judge CLIP) are trained once in --runs and shared, as the demo does. A second call skips the finished
points (Stage.done(): a finished checkpoint of the same config) and continues a stopped one. Results:
    <out>/results.csv, results.md     one row per point: its keys, FID, KID, CLIP score (torchmetrics, CLIP-S),
                                       R-precision, prompt accuracy (colour, shape; held in and held out), wall time
    <out>/plots/*.png                  --plot METRIC:KEY         METRIC against KEY, a line per other setting
                                       --pareto MX:MY:KEY[,KEY]   MY against MX, one curve per value of KEY, its
                                                                  points the sampling settings, the other training
                                                                  keys at their base values (Imagen Fig. 4)
    <out>/tensorboard/                 the same table in tensorboard's HPARAMS view
Bad input -- a key no config has, a malformed value list, an --out made with another base config, a plot key or
metric no run has -- is one line `error: ...` before anything trains.

--jobs N runs N training runs at once, each in a child process (`python -m sample.sweep --out DIR --run NAME`, its
output in <run>/sweep.log) prefixed by --launcher (e.g. /work/bin/onecore: one run per free core); the shared stages
are trained first the same way.
"""
import argparse
import dataclasses
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from core.config import config_changes, config_to_dict, load_config, stored_config_changes
from core.runtime import run_cli
from sample.demo import FAMILIES, family_module
from sample.judging import judge, summary_lines
from sample.stages import Timer, judges
from sample.sweep_report import METRICS, is_sampling, leaf, report, safe_name

# The sampling keys a grid can vary and the flag of `python -m sample` (models/pipeline.py add_sampling_flags) that
# sets each; a family whose pipeline reads other settings adds its flags here.
SAMPLING_FLAGS = {"sampler.guidance_scale": "--guidance", "sampler.num_inference_steps": "--steps",
                  "sampler.sampler": "--sampler", "sampler.eta": "--eta", "sampler.timestep_spacing": "--spacing"}
# ---------------------------------------------------------------- the grid

def split_values(text, key):
    """'32,64' -> ['32', '64']; commas inside brackets stay ('[1,2],[1,2,2]' -> two lists)."""
    values, depth, start = [], 0, 0
    for i, ch in enumerate(text + ","):
        depth += {"[": 1, "{": 1, "]": -1, "}": -1}.get(ch, 0)
        if depth < 0:
            break
        if ch == "," and depth == 0:
            values.append(text[start:i].strip())
            start = i + 1
    if depth != 0 or not values or any(v == "" for v in values):
        raise ValueError(f"--grid {key}={text}: malformed value list; give values separated by commas, lists in "
                         f"brackets (e.g. {key}=32,64 or unet.channel_mult=[1,2],[1,2,2])")
    return values


def parse_grid(items):
    """One --grid: ['a+b=1,2', 'c=x,y'] -> list of points, each a list of (key, value text) in the order given."""
    points = [[]]
    for item in items:
        keys, eq, values = item.partition("=")
        if not eq or not keys.strip():
            raise ValueError(f"--grid item '{item}' is not KEY=V1,V2,... (e.g. sampler.guidance_scale=1,3,5)")
        keys = [k.strip() for k in keys.split("+")]
        if any(not k for k in keys):
            raise ValueError(f"--grid item '{item}': an empty key between '+'")
        points = [p + [(k, v) for k in keys] for p in points for v in split_values(values, item.split("=")[0])]
    return points


# ---------------------------------------------------------------- the sweep's plan

def build_parser():
    p = argparse.ArgumentParser(description="Train and judge every point of a grid; gather a table and plots.")
    p.add_argument("--out", required=True, help="the sweep's folder (one run directory per training config)")
    p.add_argument("--grid", nargs="+", action="append", default=[], metavar="KEY=V1,V2",
                   help="a product of keys and value lists; repeat --grid for a union of products")
    p.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", help="overrides of every point")
    p.add_argument("--family", default="ldm", help=f"whose stages: {', '.join(FAMILIES)}")
    p.add_argument("--stage", help="the family's stage the grid changes (default: its last, the generation model)")
    p.add_argument("--runs", default="runs", help="where the shared stages and the judges are (as the demo's)")
    p.add_argument("--fid-images", type=int, default=500, help="generated and real images for FID, CLIP score, R-prec.")
    p.add_argument("--accuracy-n", type=int, default=2, help="images per prompt for prompt accuracy")
    p.add_argument("--steps", type=int, default=20, help="sampling steps unless the grid sets them")
    p.add_argument("--guidance", type=float, default=3.0, help="guidance scale unless the grid sets it")
    p.add_argument("--plot", action="append", default=[], metavar="METRIC:KEY", help="METRIC against KEY")
    p.add_argument("--pareto", action="append", default=[], metavar="MX:MY:KEY[,KEY]",
                   help="MY against MX, one curve per value of KEY (the other training keys at their base values)")
    p.add_argument("--jobs", type=int, default=1, help="training runs at once, each in a child process")
    p.add_argument("--launcher", default="", help="command put before each child, e.g. /work/bin/onecore")
    p.add_argument("--smoke", action="store_true", help="the shared stages at a few steps (tests)")
    p.add_argument("--run", help=argparse.SUPPRESS)  # a child: train and judge this run of <out>/sweep.json
    return p


def swept_stage(family, args):
    stages = family.stages(Path(args.runs), args.smoke)
    if args.stage is None:
        return stages[-1], stages[:-1]
    for i, stage in enumerate(stages):
        if stage.name == args.stage:
            return stage, stages[:i] + stages[i + 1:]
    raise ValueError(f"--stage {args.stage!r} is not a stage of the {args.family} family; use one of "
                     f"{', '.join(repr(s.name) for s in stages)}")


def resolved(stage, overrides):
    """The config dict of `stage` with `overrides` after its own: unknown keys and bad values raise here."""
    cfg = load_config(stage.config_cls, stage.config, [*stage.overrides, *overrides])
    check = getattr(stage.script, "check_config", None)  # the script's own checks before it loads any data
    if check is not None:
        check(cfg)
    return config_to_dict(cfg)


def plan(args, stage):
    """The sweep's identity and its runs: {name: {overrides, values, samples: {name: {flags, values}}}}."""
    base = resolved(stage, args.set)
    identity = {"family": args.family, "stage": stage.name, "config": str(stage.config), "set": args.set,
                "runs": args.runs, "fid_images": args.fid_images, "accuracy_n": args.accuracy_n,
                "steps": args.steps, "guidance": args.guidance, "smoke": args.smoke}
    runs, keys, linked = {}, [], {}
    for group in args.grid:
        for point in parse_grid(group):
            train = [f"{k}={v}" for k, v in point if not is_sampling(k)]
            sampling = [(k, v) for k, v in point if is_sampling(k)]
            for k, _ in point:
                keys += [k] * (k not in keys)
            config = resolved(stage, [*args.set, *train])
            changed = sorted(c.split(":")[0] for c in config_changes(base, config))
            name = safe_name([f"{k}={leaf(config, k)}" for k in changed])
            run = runs.setdefault(name, {"overrides": [*args.set, *train], "samples": {}, "config": config})
            flags, values = [], {}
            for k, v in sampling:
                if k not in SAMPLING_FLAGS:
                    raise ValueError(f"--grid {k}: the sweep can vary the sampling keys {', '.join(SAMPLING_FLAGS)}; "
                                     f"{k} has no flag of `python -m sample`")
                load_config(stage.config_cls, None, [f"{k}={v}"])  # its type (a float for guidance, ...)
                flags += [SAMPLING_FLAGS[k], v]
                values[k] = v
            run["samples"][safe_name([f"{k.split('.', 1)[1]}={v}" for k, v in sampling])] = {"flags": flags,
                                                                                            "values": values}
        for item in group:
            members = [k.strip() for k in item.partition("=")[0].split("+")]
            for k in members:
                linked[k] = members
    return identity, runs, keys, linked, base


def check_plots(args, keys):
    """Every plot names known metrics and grid keys: a one-line error before anything trains."""
    def check_metric(m, spec):
        if m not in METRICS:
            raise ValueError(f"{spec}: no run has a metric '{m}'; use one of {', '.join(METRICS)}")

    def check_key(k, spec):
        if k not in keys:
            raise ValueError(f"{spec}: no run has a key '{k}'; the sweep's keys are {', '.join(keys) or 'none'}")

    for spec in args.plot:
        parts = spec.split(":")
        if len(parts) != 2:
            raise ValueError(f"--plot {spec}: give METRIC:KEY, e.g. fid:sampler.guidance_scale")
        check_metric(parts[0], f"--plot {spec}")
        check_key(parts[1], f"--plot {spec}")
    for spec in args.pareto:
        parts = spec.split(":", 2)
        if len(parts) != 3:
            raise ValueError(f"--pareto {spec}: give MX:MY:KEY[,KEY], e.g. clip_score:fid:unet.channels")
        for m in parts[:2]:
            check_metric(m, f"--pareto {spec}")
        for k in parts[2].split(","):
            check_key(k, f"--pareto {spec}")


# ---------------------------------------------------------------- running the points

def run_point(args, family, stage, name, run, out):
    """Train the run (skipped when done) and judge each of its sampling points not judged yet."""
    folder = out / name
    point = dataclasses.replace(stage, ckpt=folder / "ckpt.pt", overrides=[*stage.overrides, *run["overrides"]])
    seconds_file = folder / "train_seconds.json"
    if not point.done():
        t0 = time.time()
        point.script.main(point.argv)
        before = json.loads(seconds_file.read_text())["seconds"] if seconds_file.exists() else 0.0
        seconds_file.write_text(json.dumps({"seconds": round(before + time.time() - t0, 1)}) + "\n")
    runs = Path(args.runs)
    classifier, judge_clip = (s.ckpt for s in judges(runs, args.smoke))
    model = [str(point.ckpt) if flag == str(stage.ckpt) else flag for flag in family.pipeline(runs)]
    if str(point.ckpt) not in model:
        raise AssertionError(f"the {args.family} pipeline flags do not name {stage.ckpt}")
    model += family.sampling(args)
    for sample_name, sampling in run["samples"].items():
        target = folder / sample_name
        if (target / "metrics.json").exists():
            continue
        target.mkdir(parents=True, exist_ok=True)
        timer = Timer()
        report = judge(model + sampling["flags"], target, classifier, judge_clip, args.fid_images, args.accuracy_n,
                       timer)
        report["judge_seconds"] = round(sum(timer.seconds.values()), 1)
        report["train_seconds"] = json.loads(seconds_file.read_text())["seconds"] if seconds_file.exists() else None
        (target / "metrics.json").write_text(json.dumps(report, indent=2) + "\n")
        print(f"==== {name} / {sample_name}\n  " + "\n  ".join(summary_lines(report)), flush=True)


def child_command(args, name):
    return [*shlex.split(args.launcher), sys.executable, "-m", "sample.sweep", "--out", args.out, "--run", name]


def run_children(commands, jobs, logs):
    """Run the commands, at most `jobs` at a time, each with its output in its log; a failure is one line."""
    pending, running = list(commands), []
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
        [str(Path(__file__).resolve().parents[1]), *filter(None, [os.environ.get("PYTHONPATH")])]))
    try:
        while pending or running:
            while pending and len(running) < jobs:
                name, command = pending.pop(0)
                logs[name].parent.mkdir(parents=True, exist_ok=True)
                with open(logs[name], "w") as log:
                    running.append((name, subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)))
                print(f"==== {name}: started, log {logs[name]}", flush=True)
            for name, process in list(running):
                if process.poll() is not None:
                    running.remove((name, process))
                    if process.returncode != 0:
                        last = (logs[name].read_text().strip().splitlines() or [""])[-1]
                        raise ValueError(f"{name} failed (exit code {process.returncode}): {last} (its output: "
                                         f"{logs[name]})")
                    print(f"==== {name}: done", flush=True)
            time.sleep(1)
    finally:
        for _, process in running:
            process.terminate()


# ---------------------------------------------------------------- main

def main(argv=None):
    args = build_parser().parse_args(argv)
    out = Path(args.out)
    saved = out / "sweep.json"
    if args.run:  # a child of --jobs: everything comes from sweep.json
        state = json.loads(saved.read_text())
        for k, v in state["args"].items():
            setattr(args, k, v)
    family = family_module(args.family)
    if args.fid_images < 2 or args.accuracy_n < 1 or args.jobs < 1:
        raise ValueError("--fid-images must be at least 2, --accuracy-n and --jobs at least 1")
    stage, shared = swept_stage(family, args)
    if args.run:
        state = json.loads(saved.read_text())
        return run_point(args, family, stage, args.run, state["plan"][args.run], out)

    if not args.grid:  # plots and table of an existing sweep
        if not saved.exists():
            raise ValueError(f"{saved} not found: give --grid KEY=V1,V2 to start a sweep in {out}")
        state = json.loads(saved.read_text())
        keys, linked, runs = state["keys"], state["linked"], state["plan"]
        check_plots(args, keys)
        return report(args, out, runs, keys, linked, state["base"])

    identity, runs, keys, linked, base = plan(args, stage)
    check_plots(args, keys)
    if saved.exists():
        state = json.loads(saved.read_text())
        # the base config is read through its dataclass, so a key added to the code since is its default, not a change
        changes = config_changes(state["identity"], identity)
        base_changes = stored_config_changes(stage.config_cls, state["base"], base)
        if changes or base_changes:
            changes = changes + [base_changes] * bool(base_changes)
            raise ValueError(f"{out} holds a sweep made with another config ({'; '.join(changes[:3])}); give another "
                             f"--out or the same base config and settings")
        for name, run in state["plan"].items():  # the points of earlier calls stay in the table
            merged = runs.setdefault(name, run)
            merged["samples"] = {**run["samples"], **merged["samples"]}
        keys = list(dict.fromkeys(state["keys"] + keys))
        linked = {**state["linked"], **linked}
    for s in (*judges(Path(args.runs), args.smoke), *shared, stage):
        if s is not stage:
            s.done()  # a shared checkpoint of another config is refused here, before anything trains
    out.mkdir(parents=True, exist_ok=True)
    saved.write_text(json.dumps({"identity": identity, "args": {k: v for k, v in vars(args).items() if k != "run"},
                                 "keys": keys, "linked": linked, "base": base, "plan": runs}, indent=1) + "\n")

    # ---- the shared stages (the judges, the family's other stages), then every run
    t0 = time.time()
    todo = [s for s in (*judges(Path(args.runs), args.smoke), *shared) if not s.done()]
    if args.jobs > 1 or args.launcher:
        logs = {s.name: out / "logs" / (s.name.replace(" ", "_") + ".log") for s in todo}
        for s in todo:  # one after the other: the runs need all of them
            run_children([(s.name, [*shlex.split(args.launcher), sys.executable, "-m", s.module, *s.argv])], 1, logs)
        logs = {name: out / name / "sweep.log" for name in runs}
        run_children([(name, child_command(args, name)) for name in runs], args.jobs, logs)
    else:
        for s in todo:
            s.script.main(s.argv)
        for name, run in runs.items():
            run_point(args, family, stage, name, run, out)
    print(f"==== sweep: {len(runs)} training runs, {sum(len(r['samples']) for r in runs.values())} points, "
          f"{time.time() - t0:.0f} s wall", flush=True)
    return report(args, out, runs, keys, linked, base)


if __name__ == "__main__":
    run_cli(main)
