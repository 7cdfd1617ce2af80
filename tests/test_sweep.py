"""The ablation harness: a grid over training and sampling keys becomes run directories (one per distinct training
config, shared by its sampling points), a table, plots and tensorboard's hparams; a second call trains nothing it
has; bad input is one line before anything trains."""
import csv
import json
import sys

import pytest

from sample import sweep, sweep_report
from tests.test_train_diffusion import cli_error


def test_value_lists_split_outside_brackets_and_linked_keys_share_a_value():
    assert sweep.split_values("32,64", "k") == ["32", "64"]
    assert sweep.split_values("[1,2],[1, 2, 2]", "k") == ["[1,2]", "[1, 2, 2]"]
    assert sweep.split_values("clip:runs/clip/ckpt.pt", "k") == ["clip:runs/clip/ckpt.pt"]
    for bad in ("32,,64", "[1,2", "1]", ",", ""):
        with pytest.raises(ValueError, match="malformed value list"):
            sweep.split_values(bad, "k")
    points = sweep.parse_grid(["a+b=1,2", "c=x,y"])
    assert points == [[("a", "1"), ("b", "1"), ("c", "x")], [("a", "1"), ("b", "1"), ("c", "y")],
                      [("a", "2"), ("b", "2"), ("c", "x")], [("a", "2"), ("b", "2"), ("c", "y")]]


def test_a_pareto_curve_keeps_the_other_training_keys_at_their_base_values():
    base = {"unet": {"channels": 32}, "text": {"width": 64}, "text_encoder": "joint"}
    keys = ["text.width", "unet.channels", "text_encoder", "sampler.guidance_scale"]
    linked = {"text.width": ["text.width"], "unet.channels": ["unet.channels"], "text_encoder": ["text_encoder"]}
    rows = [{"text.width": w, "unet.channels": c, "text_encoder": e, "sampler.guidance_scale": g}
            for w, c, e in ((64, 32, "joint"), (32, 32, "joint"), (64, 48, "joint"), (64, 32, "lstm"))
            for g in ("1", "3")]
    per_encoder = sweep_report.pareto_rows(rows, ["text_encoder", "text.width"], keys, linked, base)
    assert {(r["text.width"], r["unet.channels"], r["text_encoder"]) for r in per_encoder} == {
        (64, 32, "joint"), (32, 32, "joint"), (64, 32, "lstm")} and len(per_encoder) == 6
    per_unet = sweep_report.pareto_rows(rows, ["unet.channels"], keys, linked, base)
    assert {(r["text.width"], r["unet.channels"], r["text_encoder"]) for r in per_unet} == {
        (64, 32, "joint"), (64, 48, "joint")}


def test_children_run_at_most_jobs_at_once_and_a_failure_is_one_line(tmp_path):
    logs = {n: tmp_path / f"{n}.log" for n in ("a", "b", "c")}
    ok = [sys.executable, "-c", "print('fine')"]
    sweep.run_children([("a", ok), ("b", ok)], 2, logs)
    assert logs["a"].read_text() == logs["b"].read_text() == "fine\n"
    with pytest.raises(ValueError, match=r"c failed \(exit code 3\): boom \(its output: .*c\.log\)"):
        sweep.run_children([("c", [sys.executable, "-c", "print('boom'); raise SystemExit(3)"])], 2, logs)


def test_a_tiny_sweep_end_to_end_and_again(tmp_path, capsys):
    out, runs = tmp_path / "sweep", tmp_path / "runs"
    common = ["--out", str(out), "--runs", str(runs), "--smoke", "--set", "train.steps=2", "train.sample_steps=1",
              "--fid-images", "16", "--accuracy-n", "1", "--steps", "2"]
    grid = ["--grid", "unet.channels=16", "sampler.guidance_scale=1,3", "--grid", "text_encoder=lstm"]
    plots = ["--plot", "fid:sampler.guidance_scale", "--pareto", "clip_score:fid:unet.channels"]
    # bad input: one line, and nothing trained or written
    for argv, message in ((grid[:1] + ["unet.chanels=16"], "did you mean 'unet.channels'"),
                          (grid[:1] + ["unet.channels=16,,32"], "malformed value list"),
                          (grid[:1] + ["unet.channels=sixteen"], "expects int"),
                          (grid[:1] + ["sampler.clip_sample=true"], "has no flag"),
                          (grid + ["--plot", "fid:unet.num_heads"], "no run has a key 'unet.num_heads'"),
                          (grid + ["--pareto", "fid:clip:unet.channels"], "no run has a metric 'clip'")):
        assert message in cli_error(sweep.main, common + argv, capsys)
    assert not out.exists() and not runs.exists()

    rows = sweep.main(common + grid + plots)
    names = {(r["run"], r["sample"]) for r in rows}
    assert names == {("unet.channels=16", "guidance_scale=1"), ("unet.channels=16", "guidance_scale=3"),
                     ("text_encoder=lstm", "base")}  # two training runs; the guidance points share one
    assert {r["text_encoder"] for r in rows} == {"joint", "lstm"}
    assert all(r["train_s"] > 0 and 0 <= r["r_precision"] <= 1 and r["fid"] >= 0 for r in rows)
    assert [r["sampler.guidance_scale"] for r in rows if r["run"] == "text_encoder=lstm"] == [3.0]  # --guidance
    with open(out / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 3 and {"fid", "kid", "clip_score", "r_precision", "shape", "train_s"} <= set(table[0])
    assert (out / "results.md").read_text().startswith("| unet.channels | sampler.guidance_scale | text_encoder |")
    assert (out / "plots" / "fid_against_sampler.guidance_scale.png").stat().st_size > 5000
    assert (out / "plots" / "fid_against_clip_score_per_unet.channels.png").stat().st_size > 5000
    events = list((out / "tensorboard").rglob("events.out.tfevents.*"))
    assert len(events) >= 3 and any(b"hparams" in e.read_bytes() for e in events)

    # again, with one more guidance scale: nothing is trained, only the new point is judged
    ckpt = out / "unet.channels=16" / "ckpt.pt"
    before = ckpt.stat().st_mtime_ns, (out / "unet.channels=16" / "guidance_scale=1" / "metrics.json").read_bytes()
    capsys.readouterr()
    rows = sweep.main(common + ["--grid", "unet.channels=16", "sampler.guidance_scale=1,3,5"])
    printed = capsys.readouterr().out
    assert len(rows) == 4 and "==== unet.channels=16 / guidance_scale=5" in printed
    assert "==== unet.channels=16 / guidance_scale=1" not in printed
    assert (ckpt.stat().st_mtime_ns, (out / "unet.channels=16" / "guidance_scale=1" / "metrics.json").read_bytes()) \
        == before
    # the same folder with another base config is refused; plots of what is there need no grid
    err = cli_error(sweep.main, [a if a != "train.steps=2" else "train.steps=3" for a in common] + grid, capsys)
    assert "holds a sweep made with another config (set: ['train.steps=2', 'train.sample_steps=1'] -> " in err
    assert "no run has a key 'text.width'" in cli_error(sweep.main, ["--out", str(out), "--plot", "fid:text.width"],
                                                        capsys)
    assert len(sweep.main(["--out", str(out), "--plot", "shape:unet.channels"])) == 4
    assert json.loads((out / "sweep.json").read_text())["keys"] == ["unet.channels", "sampler.guidance_scale",
                                                                    "text_encoder"]
