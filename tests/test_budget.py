"""The matched training budget of the family comparison (sample/budget.py): the plan keeps the configs' proportions
and spends the budget, a budget too small for one step is refused naming the stage and the minimum, the timing runs
hand an earlier stage's checkpoint to a later one, and the demo trains each stage for the planned steps."""
import json
from pathlib import Path

import pytest

from core.checkpoint import load_checkpoint
from sample import budget, demo, demo_dalle, demo_imagen, demo_ldm
from tests.test_train_diffusion import cli_error


def test_the_plan_keeps_the_configs_proportions_and_spends_the_budget(tmp_path):
    stages = demo_ldm.stages(tmp_path, smoke=False)  # VAE 3000 steps, latent U-Net 1700 (configs/shapes/*.yaml)
    configured = {s.name: budget.configured_steps(s) for s in stages}
    rates = {"VAE": 0.05, "latent U-Net": 0.25}
    plan = budget.make_plan(stages, 5.0, rates)
    spent = sum(plan[name]["steps"] * rates[name] for name in rates)
    assert abs(spent - 300) < max(rates.values())  # 5 minutes, to within one step's rounding
    ratios = [plan[name]["steps"] / configured[name][0] for name in rates]
    assert abs(ratios[0] - ratios[1]) < 1 / min(c[0] for c in configured.values())  # one scale for every stage
    for name in rates:  # the warm-up shrinks with the run
        assert abs(plan[name]["warmup_steps"] - configured[name][1] * ratios[0]) <= 1
    # the smallest budget that gives every stage one step: the message names the stage that runs short first
    planned = sum(configured[n][0] * rates[n] for n in rates)
    smallest = max(planned / configured[n][0] / 60 for n in rates)
    with pytest.raises(ValueError, match=r"too small to train one step of the latent U-Net stage .* give at least "
                                         + f"{smallest:.2f} minutes"):
        budget.make_plan(stages, smallest * 0.9, rates)
    assert min(p["steps"] for p in budget.make_plan(stages, smallest * 1.01, rates).values()) >= 1
    with pytest.raises(ValueError, match="must be positive"):
        budget.make_plan(stages, 0, rates)


def test_timing_runs_hand_the_earlier_stages_checkpoint_on(tmp_path):
    vae, unet = demo_ldm.stages(tmp_path, smoke=True)
    rate, vae_ckpt = budget.seconds_per_step(vae, tmp_path / "timing", smoke=True)
    assert rate > 0 and load_checkpoint(vae_ckpt, "vae")["step"] == 2
    rate, unet_ckpt = budget.seconds_per_step(unet, tmp_path / "timing", smoke=True, earlier={str(vae.ckpt): vae_ckpt})
    ckpt = load_checkpoint(unet_ckpt, "diffusion")
    assert rate > 0 and ckpt["step"] == 2 and Path(ckpt["config"]["vae"]) == vae_ckpt
    assert not vae.ckpt.exists() and not unet.ckpt.exists()  # nothing of the demo's own folder was written
    # a frozen encoder named with its kind (text_encoder=lm:<path>, as the Imagen stages do) is handed on too
    lm, base = demo_imagen.stages(tmp_path, smoke=True)[:2]
    _, lm_ckpt = budget.seconds_per_step(lm, tmp_path / "timing", smoke=True)
    _, base_ckpt = budget.seconds_per_step(base, tmp_path / "timing", smoke=True, earlier={str(lm.ckpt): lm_ckpt})
    assert load_checkpoint(base_ckpt, "diffusion")["config"]["text_encoder"] == f"lm:{lm_ckpt}"
    assert not lm.ckpt.exists()


def test_the_demo_trains_each_stage_for_its_planned_steps(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(budget, "seconds_per_step", lambda stage, folder, smoke, earlier: (0.01, None))
    argv = ["--runs", str(tmp_path), "--smoke", "--fid-images", "24", "--n", "1", "--accuracy-n", "1", "--steps", "2",
            "--sequential"]
    # smoke stages are 3 steps each: 2 x 3 x 0.01 s planned; 0.002 minutes = 0.12 s = twice that
    demo.main(argv + ["--budget-minutes", "0.002"])
    report = json.loads((tmp_path / "demo" / "ldm" / "metrics.json").read_text())
    assert report["budget"]["minutes"] == 0.002
    assert report["parts_folder"] == str(tmp_path / "families" / "ldm")  # a budget's parts are the family's own
    for stage in demo_ldm.stages(tmp_path / "families" / "ldm", smoke=True):
        assert report["budget"]["stages"][stage.name]["steps"] == 6
        assert load_checkpoint(stage.ckpt, stage.kind)["step"] == 6
    plan = (tmp_path / "demo" / "ldm" / "budget.json").read_text()
    capsys.readouterr()
    # another budget in the same folder is refused, nothing overwritten
    err = cli_error(demo.main, argv + ["--budget-minutes", "0.004"], capsys)
    assert "holds the plan of a 0.002-minute budget; pass --runs <another folder>" in err
    assert (tmp_path / "demo" / "ldm" / "budget.json").read_text() == plan
    # a budget too small for one step is refused before anything trains
    err = cli_error(demo.main, ["--runs", str(tmp_path / "b"), "--smoke", "--budget-minutes", "0.0001"], capsys)
    assert "too small to train one step of the VAE stage" in err and not (tmp_path / "b" / "families").exists()
    # a folder trained without a budget is refused
    (tmp_path / "c" / "families" / "ldm" / "vae").mkdir(parents=True)
    (tmp_path / "c" / "families" / "ldm" / "vae" / "ckpt.pt").write_bytes(
        (tmp_path / "families" / "ldm" / "vae" / "ckpt.pt").read_bytes())
    err = cli_error(demo.main, ["--runs", str(tmp_path / "c"), "--smoke", "--budget-minutes", "0.002"], capsys)
    assert "trained without --budget-minutes" in err


def test_under_a_budget_every_family_trains_its_own_parts(tmp_path, capsys, monkeypatch):
    """--family all --budget-minutes: ldm and unclip both need a VAE; each trains its own within its minutes (one
    VAE at two step counts would be one checkpoint of two configs), and the comparison reads each family's parts."""
    monkeypatch.setattr(budget, "seconds_per_step", lambda stage, folder, smoke, earlier: (0.01, None))
    monkeypatch.setattr(demo, "FAMILIES", ("ldm", "dalle", "unclip"))
    demo.main(["--family", "all", "--runs", str(tmp_path), "--smoke", "--fid-images", "24", "--n", "1",
               "--accuracy-n", "1", "--steps", "2", "--sequential", "--budget-minutes", "0.004"])
    for family, stages in (("ldm", 2), ("dalle", 3), ("unclip", 4)):  # 0.004 min = 0.24 s at 0.01 s per step
        plan = json.loads((tmp_path / "demo" / family / "budget.json").read_text())["stages"]
        assert len(plan) == stages and {p["steps"] for p in plan.values()} == {round(3 * 24 / (3 * stages))}
        if family != "dalle":
            vae = load_checkpoint(tmp_path / "families" / family / "vae" / "ckpt.pt", "vae")
            assert vae["step"] == plan["VAE"]["steps"]
    assert not (tmp_path / "vae").exists()  # nothing shared between the families but the judges
    # the families' own figures that need a judge find it in the runs folder, not in the family's parts folder
    assert sorted(json.loads((tmp_path / "demo" / "dalle" / "metrics.json").read_text())["reranking"]) == ["1", "4"]
    table = (tmp_path / "demo" / "compare" / "comparison.md").read_text().splitlines()
    assert [row.split(" | ")[0] for row in table[2:]] == ["| ldm", "| dalle", "| unclip"]


def test_a_step_is_timed_against_the_noise_of_what_every_run_pays(tmp_path, monkeypatch):
    """A fake script: every run pays F seconds besides its steps (30 s, 35 s for the first run: the noise of
    rendering and encoding) and 0.1 s a step. The 1-step run's noise must be small against the timed difference:
    stopping at 10 s of difference would give 0.080 s per step (20% off); growing until the difference exceeds the
    1-step run's own time gives 0.095."""
    clock = [0.0]
    fixed = iter([35.0] + [30.0] * 20)

    class Script:
        @staticmethod
        def main(argv):
            steps = int(next(a for a in argv if a.startswith("train.steps=")).partition("=")[2])
            clock[0] += next(fixed) + 0.1 * steps

    monkeypatch.setattr(budget.time, "perf_counter", lambda: clock[0])
    (vae,) = [s for s in demo_ldm.stages(tmp_path, smoke=False) if s.name == "VAE"]
    vae.script = Script
    rate, _ = budget.seconds_per_step(vae, tmp_path / "timing")
    assert rate == pytest.approx(0.1, rel=0.06)


def test_a_later_phase_s_one_off_cost_is_not_taken_for_a_step(tmp_path, monkeypatch):
    """The dVAE's last half of steps trains the decoder on codes computed once when that phase starts (~25 s of
    encoding here). A fake script with that shape (30 s every run, 0.1 s a step, 25 s more when the run has a
    decoder step, round(0.5 * steps) >= 1): timed from 1 step, only the longer run paid the encoding, and the plan
    took 25 s for a step (7 of its 4000 steps in 3 minutes); timed from FIRST_TIMING_STEPS both runs pay it."""
    clock = [0.0]

    class Script:
        @staticmethod
        def main(argv):
            steps = int(next(a for a in argv if a.startswith("train.steps=")).partition("=")[2])
            clock[0] += 30.0 + 0.1 * steps + (25.0 if round(0.5 * steps) >= 1 else 0.0)

    monkeypatch.setattr(budget.time, "perf_counter", lambda: clock[0])
    (dvae,) = [s for s in demo_dalle.stages(tmp_path, smoke=False) if s.name == "dVAE"]
    dvae.script = Script
    rate, _ = budget.seconds_per_step(dvae, tmp_path / "timing")
    assert rate == pytest.approx(0.1, rel=1e-6)
