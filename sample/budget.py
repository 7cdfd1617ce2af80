"""A matched training budget: every family gets the same minutes of training, so a comparison compares designs,
not step counts (issue 23).

    python -m sample.demo --family all --budget-minutes 20 [--runs runs/budget_20min]

A family's config files state how many steps each of its stages trains (S_i). How long a step takes (r_i seconds)
is measured here, on this machine, by short runs of the stage's own training script into a temporary folder, of
k1 = 10 and k2 steps (k2 grown until the run takes 10 s, and the k1 run's time, longer), so that
r_i = (t2 - t1) / (k2 - k1): what both runs pay besides the steps (rendering the data, encoding latents, building the
model, the evaluation at the end) cancels, and its noise is small against the difference. k1 is 10, not 1, so that
both runs pay the one-off costs of a stage's later phase too: the dVAE's decoder phase (train.decoder_share 0.5)
starts by encoding the 20000 training images once (~25 s); with k1 = 1 only the k2 run had a decoder step, and that
encoding was taken for one step's time (25.5 s a step: 7 of the dVAE's 4000 steps in a 3-minute budget). Time on a
quiet machine: a second job on the two cores (oversubscribed threads) slows some runs several times and makes the plan wrong. A later stage's timing runs use an
earlier stage's timing checkpoint where its overrides name that stage's checkpoint (the latent U-Net's VAE, the
Imagen stages' text LM: `text_encoder=lm:<path>`). Then every stage is scaled by one
factor, so the budget is split across the stages in the proportions the configs state:

    scale = 60 * minutes / sum_i S_i r_i          steps_i = round(S_i * scale)     warmup_i = round(W_i * scale)

The plan is written to runs/demo/<family>/budget.json and reused by a second call with the same budget (a fresh
measurement would differ a little and make the finished checkpoints look like another config's). A budget too small
for one step of some stage is refused before anything trains, naming the stage and the smallest budget that works.
"""
import json
import tempfile
import time
from pathlib import Path

from core.config import load_config
from sample.stages import checkpoint_reference

MIN_DIFFERENCE = 10.0    # seconds the longer timing run must take beyond the first one (--smoke: not asked)
FIRST_TIMING_STEPS = 10  # the first timing run's steps: enough for every phase of a stage to start (--smoke: 1)
MAX_TIMING_STEPS = 2000  # the longest timing run


def configured_steps(stage):
    """(train.steps, train.warmup_steps) of a stage's config with its overrides."""
    tc = load_config(stage.config_cls, stage.config, stage.overrides).train
    return tc.steps, tc.warmup_steps


def seconds_per_step(stage, folder, smoke=False, earlier=None):
    """Wall seconds of one training step of `stage` here, from whole runs of its script into `folder`: k1 steps
    (FIRST_TIMING_STEPS, so that a later phase's one-off costs are in both runs; 1 with smoke), then k2 steps with
    k2 - k1 growing 4x until the k2 run takes max(MIN_DIFFERENCE, t1) seconds longer (so that the
    noise of what both runs pay besides the steps stays small against it); the difference of their times over the
    difference of their steps. earlier: {checkpoint path of an earlier stage: its timing checkpoint}, put in place of that path
    in the stage's overrides (the latent U-Net needs a VAE). Returns (seconds per step, the last run's checkpoint)."""
    overrides = []
    for item in stage.overrides:  # vae=<path>, clip=<path>, text_encoder=lm:<path> or clip:<path>
        key, _, value = item.partition("=")
        kind, path = checkpoint_reference(value)
        if path in (earlier or {}):
            value = f"{kind}:{earlier[path]}" if kind else str(earlier[path])
        overrides.append(f"{key}={value}")

    def run(k):
        out = Path(folder) / f"{stage.ckpt.parent.name}_{k}"
        argv = ["--config", str(stage.config), *overrides, f"train.out_dir={out}", "train.resume=never",
                f"train.steps={k}", "train.warmup_steps=0"]
        t0 = time.perf_counter()
        stage.script.main(argv)
        return time.perf_counter() - t0, out / stage.ckpt.name

    k1 = 1 if smoke else FIRST_TIMING_STEPS
    k2 = k1 + 1
    t1, _ = run(k1)
    t2, ckpt = run(k2)
    # the steps' share must outweigh the noise of what both runs pay besides them (rendering, encoding, evaluating:
    # t1, nearly all of it), so the k2 run must take MIN_DIFFERENCE seconds and t1 longer than the k1 run
    while not smoke and t2 - t1 < max(MIN_DIFFERENCE, t1) and k2 < MAX_TIMING_STEPS:
        k2 = k1 + 4 * (k2 - k1)
        t2, ckpt = run(k2)
    return max(t2 - t1, 1e-3) / (k2 - k1), ckpt


def make_plan(stages, minutes, rates):
    """The budget plan: {stage name: {configured_steps, seconds_per_step, steps, warmup_steps}}. rates: {name:
    seconds per step}. Raises the one-line error of a budget that cannot train one step of every stage."""
    if minutes <= 0:
        raise ValueError(f"--budget-minutes must be positive, got {minutes}")
    configured = {s.name: configured_steps(s) for s in stages}
    planned = sum(configured[s.name][0] * rates[s.name] for s in stages)  # seconds at the configs' steps
    scale = 60 * minutes / planned
    plan = {}
    for s in stages:
        steps, warmup = configured[s.name]
        if steps * scale < 1:
            smallest = planned / steps / 60  # the minutes at which this stage gets one step
            raise ValueError(f"--budget-minutes {minutes:g} is too small to train one step of the {s.name} stage "
                             f"({rates[s.name]:.3f} s per step here); give at least {smallest:.2f} minutes")
        plan[s.name] = {"configured_steps": steps, "seconds_per_step": round(rates[s.name], 5),
                        "steps": round(steps * scale), "warmup_steps": min(round(warmup * scale), round(steps * scale))}
    return plan


def apply_budget(stages, minutes, plan_path, smoke=False):
    """Measure (or reuse) the plan of `stages` for `minutes` and add its steps to each stage's overrides. Returns the
    plan. A plan file for another budget is refused: its checkpoints belong to that budget."""
    plan_path = Path(plan_path)
    if plan_path.exists():
        saved = json.loads(plan_path.read_text())
        if saved["budget_minutes"] != minutes:
            raise ValueError(f"{plan_path} holds the plan of a {saved['budget_minutes']:g}-minute budget; pass "
                             f"--runs <another folder> for {minutes:g} minutes (nothing was overwritten)")
        plan = saved["stages"]
    else:
        todo = [s for s in stages if not s.ckpt.exists()]
        if len(todo) < len(stages):
            done = ", ".join(str(s.ckpt) for s in stages if s.ckpt.exists())
            raise ValueError(f"{done} exist without a budget plan ({plan_path}): they were trained without "
                             f"--budget-minutes; pass --runs <another folder> (nothing was overwritten)")
        rates, earlier = {}, {}
        with tempfile.TemporaryDirectory(prefix="budget_") as tmp:  # the timing runs' checkpoints are thrown away
            for s in stages:
                print(f"==== budget: timing a step of the {s.name} stage", flush=True)
                rates[s.name], earlier[str(s.ckpt)] = seconds_per_step(s, tmp, smoke, earlier)
        plan = make_plan(stages, minutes, rates)
        plan_path.parent.mkdir(parents=True, exist_ok=True)
        plan_path.write_text(json.dumps({"budget_minutes": minutes, "stages": plan}, indent=2) + "\n")
    for s in stages:
        s.overrides = [*s.overrides, f"train.steps={plan[s.name]['steps']}",
                       f"train.warmup_steps={plan[s.name]['warmup_steps']}"]
        print(f"  budget {minutes:g} min: {s.name} {plan[s.name]['steps']} steps (config "
              f"{plan[s.name]['configured_steps']}, {plan[s.name]['seconds_per_step']:.3f} s per step here)")
    return plan
