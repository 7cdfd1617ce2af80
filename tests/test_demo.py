"""The README's main job, end to end at a few steps per stage: every stage runs, hands its checkpoint to the next,
and the demo writes its pictures and figures; a second run skips the finished stages."""
import dataclasses
import json
import os
import time

import pytest
import torch

from core.checkpoint import load_checkpoint
from data.claims import eval_prompts
from sample import demo, demo_ldm
from sample.stages import Background, Lane, Timer, judges, train_ddp
from tests.test_train_diffusion import cli_error


def test_demo_smoke_runs_every_stage_and_skips_finished_ones(tmp_path, capsys, monkeypatch):
    argv = ["--runs", str(tmp_path), "--smoke", "--fid-images", "24", "--n", "1", "--accuracy-n", "1",
            "--steps", "2"]
    demo.main(argv)
    out = capsys.readouterr().out
    folder = tmp_path / "demo" / "ldm"
    report = json.loads((folder / "metrics.json").read_text())
    stages = ["classifier", "judge CLIP", "VAE", "latent U-Net", "samples", "prompt accuracy",
              "images for FID and CLIP score", "FID, KID and CLIP score"]
    assert list(report["stage_seconds"]) == stages and all(s > 0 for s in report["stage_seconds"].values())
    # CPU seconds of every stage, the judges' from their child processes (they trained beside the family's first stage)
    assert list(report["stage_cpu_seconds"]) == stages
    assert report["stage_cpu_seconds"]["classifier"] > 0 and report["stage_cpu_seconds"]["judge CLIP"] > 0
    if os.cpu_count() >= 2:  # the judges trained in child processes, one after the other, their output in logs/
        assert report["stages_beside"] == ["classifier", "judge CLIP"]
        assert "accuracy on 32 fresh renders" not in out
        assert "accuracy on 32 fresh renders" in (folder / "logs" / "classifier.log").read_text()
        assert (folder / "logs" / "judge_CLIP.log").read_text().strip()
        # the latent U-Net trained as two processes of one thread (torchrun), its CPU time theirs
        assert "2 processes of one thread (torchrun, gloo)" in out
        assert report["stage_cpu_seconds"]["latent U-Net"] > 0
        assert load_checkpoint(tmp_path / "diffusion_latent" / "ckpt.pt", "diffusion")["step"] == 3
    # every prompt was judged (one image each: --accuracy-n 1), and every image counted by FID and CLIP score
    assert report["prompt_accuracy"]["heldin"]["images"] == len(eval_prompts("train"))
    assert report["prompt_accuracy"]["heldout"]["images"] == len(eval_prompts("heldout"))
    assert report["fid"]["n_a"] == report["fid"]["n_b"] == 24
    assert "NOT comparable with published FIDs" in report["fid"]["features"]
    assert report["clip_score"]["generated"]["images"] == report["clip_score"]["real"]["images"] == 24
    # R-precision by the judge CLIP, among as many captions as 24 renders allow (fewer than 100)
    assert 2 <= report["r_precision_candidates"] < 24 and 0 <= report["r_precision"] <= 1
    assert 0 <= report["r_precision_real"] <= 1 and "R-precision (judge CLIP, top-1 of" in out
    vae_ckpt = load_checkpoint(tmp_path / "vae" / "ckpt.pt", "vae")
    assert report["vae"]["scale_factor"] == vae_ckpt["scale_factor"] and report["vae"]["psnr_db"] == vae_ckpt["psnr"]
    assert report["family"] == "ldm" and report["seconds_per_image"] > 0
    assert (folder / "samples.png").exists() and "ldm demo summary" in out
    # --family all (here over the one family): the trained stages are done, skipped; sampling and metrics run
    # again; then the comparison table and picture (sample/compare.py)
    first = report
    monkeypatch.setattr(demo, "FAMILIES", ("ldm",))
    demo.main(argv + ["--family", "all"])
    out = capsys.readouterr().out
    for stage in ("classifier", "judge CLIP", "VAE", "latent U-Net"):
        assert f"==== {stage}: done before, skipped" in out
    report = json.loads((folder / "metrics.json").read_text())
    assert report["stage_seconds"]["latent U-Net"] == 0.0 and report["stage_seconds"]["samples"] > 0
    # a skipped stage keeps the seconds of the run that trained it (beside its checkpoint), for the comparison
    before = report["stages_trained_before"]
    assert before["latent U-Net"]["seconds"] == first["stage_seconds"]["latent U-Net"]
    assert before["VAE"]["cpu_seconds"] == first["stage_cpu_seconds"]["VAE"]
    table = (tmp_path / "demo" / "compare" / "comparison.md").read_text().splitlines()
    assert len(table) == 3 and table[2].startswith("| ldm | VAE ")
    acc = report["prompt_accuracy"]
    assert f"| {acc['heldin']['colour']:.3f} / {acc['heldin']['shape']:.3f} |" in table[2]
    assert f"| {report['r_precision']:.3f} |" in table[2]
    vae_weights = sum(t.numel() for t in vae_ckpt["model"].values() if t.is_floating_point())
    assert f"VAE {vae_weights / 1e6:.2f}M" in table[2]
    unet_s = first["stage_seconds"]["latent U-Net"], first["stage_cpu_seconds"]["latent U-Net"]
    assert f"latent U-Net {unet_s[0]:.0f} ({unet_s[1]:.0f})" in table[2]
    assert (tmp_path / "demo" / "compare" / "comparison.png").stat().st_size > 0
    assert "unknown family 'dall-e'" in cli_error(demo.main, argv + ["--family", "dall-e"], capsys)
    # a checkpoint of another config (an older preset) is neither used nor trained over
    (unet,) = [stage for stage in demo_ldm.stages(tmp_path, smoke=True) if stage.name == "latent U-Net"]
    assert unet.done()
    unet.overrides.append("unet.channels=48")
    with pytest.raises(ValueError, match=r"trained with another config than the demo's configs/shapes/"
                                         r"diffusion_latent.yaml \(unet.channels: 32 -> 48\); move its folder away"):
        unet.done()
    unet.overrides.pop()
    ckpt = torch.load(unet.ckpt, weights_only=True)
    ckpt["config"]["unet"]["channels"] = 48  # as if trained with an older preset
    torch.save(ckpt, unet.ckpt)
    before = unet.ckpt.read_bytes()
    err = cli_error(demo.main, argv, capsys)  # refused before anything trains or samples
    assert "unet.channels: 48 -> 32" in err and unet.ckpt.read_bytes() == before
    # a checkpoint made before a config key existed (unet.patch_size) matches that key's default, not a change
    ckpt["config"]["unet"]["channels"] = 32
    ckpt["config"]["train"].update(out_dir="/elsewhere/runs/diffusion_latent", resume="never",  # a moved runs folder
                                   ckpt_every=7)  # checkpointed more often: the same training
    ckpt["config"]["vae"] = "/elsewhere/runs/vae/ckpt.pt"  # its VAE named where the folder was
    del ckpt["config"]["unet"]["patch_size"]
    torch.save(ckpt, unet.ckpt)
    assert unet.done()
    ckpt["config"]["vae"] = "/elsewhere/runs/vae_x/ckpt.pt"  # another stage's VAE is another config
    torch.save(ckpt, unet.ckpt)
    with pytest.raises(ValueError, match=r"vae: '/elsewhere/runs/vae_x/ckpt.pt' -> "):
        unet.done()
    ckpt["config"]["vae"] = str(tmp_path / "vae" / "ckpt.pt")
    torch.save(ckpt, unet.ckpt)
    unet.overrides.append("unet.patch_size=2")
    with pytest.raises(ValueError, match=r"unet.patch_size: 1 -> 2"):
        unet.done()
    unet.overrides.pop()
    # --seed: every stage of the family trains with that train.seed; a folder trained with another seed is refused
    # before anything trains (the judges keep theirs: only the family's training varies between seeds)
    assert first["train_seed"] == 0 and load_checkpoint(unet.ckpt, "diffusion")["config"]["train"]["seed"] == 0
    before = unet.ckpt.read_bytes()
    err = cli_error(demo.main, argv + ["--seed", "1"], capsys)
    assert "train.seed: 0 -> 1" in err and "--runs <another folder>" in err and unet.ckpt.read_bytes() == before
    assert not any("train.seed" in o for stage in demo_ldm.stages(tmp_path, smoke=True) for o in stage.overrides)


def test_a_failing_stage_beside_the_vae_is_an_error_naming_its_log(tmp_path):
    timer = Timer()
    beside = Background("classifier", "train.classifier", ["train.num_steps=3"], tmp_path / "logs", timer)
    beside.start()
    with pytest.raises(ValueError, match=r"classifier stage failed \(exit code 2\): error: unknown config key "
                                         r"'train.num_steps'.*classifier\.log"):
        beside.wait()
    log = (tmp_path / "logs" / "classifier.log").read_text()
    assert "unknown config key 'train.num_steps'" in log  # the child's own one-line error is kept for the user
    assert timer.seconds["classifier"] > 0


def test_a_stage_failing_under_torchrun_is_one_line_naming_the_way_out(tmp_path):
    (unet,) = [stage for stage in demo_ldm.stages(tmp_path, smoke=True) if stage.name == "latent U-Net"]
    assert unet.ddp
    unet.overrides.append("unet.chanels=8")  # a bad key: refused here, before any process starts
    with pytest.raises(ValueError, match="unet.chanels"):
        train_ddp(unet, 2)
    unet.overrides[-1] = f"vae={tmp_path / 'missing' / 'ckpt.pt'}"  # fails in the processes
    with pytest.raises(ValueError, match=r"the latent U-Net stage failed under torchrun \(exit code 1; its output is "
                                         r"above\); run the demo with --sequential"):
        train_ddp(unet, 2)
    assert not unet.ckpt.exists()


def test_stop_ends_the_child_beside_the_vae(tmp_path):
    """When the demo's own stage fails, the classifier's child process is ended, not left training."""
    timer = Timer()
    beside = Background("classifier", "train.classifier",
                             ["train.steps=100000", f"train.out_dir={tmp_path / 'c'}"],
                             tmp_path / "logs", timer)
    beside.start()
    time.sleep(2)
    t0 = time.time()
    beside.stop()
    assert time.time() - t0 < 30 and beside.process.returncode not in (None, 0)  # terminated, not run to the end
    assert not (tmp_path / "c" / "ckpt.pt").exists()


def test_a_lane_stops_at_its_first_failing_stage_and_with_the_demo(tmp_path):
    """The judges' lane: a failing stage is the demo's error (one line naming its log) and the stages after it never
    start; stop() (the family's stage failed) ends the running child and starts no other."""
    classifier, judge_clip = judges(tmp_path / "runs", smoke=True)
    timer = Timer()
    bad = dataclasses.replace(classifier, overrides=[*classifier.overrides, "train.num_steps=3"])
    lane = Lane([bad, judge_clip], tmp_path / "logs", timer)
    lane.start()
    with pytest.raises(ValueError, match=r"classifier stage failed \(exit code 2\).*classifier\.log"):
        lane.wait()
    assert lane.done() and timer.seconds["judge CLIP"] is None and not (tmp_path / "logs" / "judge_CLIP.log").exists()

    long = dataclasses.replace(classifier, overrides=["train.steps=100000"])
    lane = Lane([long, judge_clip], tmp_path / "logs2", timer)
    lane.start()
    time.sleep(2)
    assert not lane.done()
    t0 = time.time()
    lane.stop()
    assert time.time() - t0 < 30 and lane.done() and lane.current.process.returncode not in (None, 0)
    assert not (tmp_path / "logs2" / "judge_CLIP.log").exists() and not classifier.ckpt.exists()


def test_reconstruction_accuracy_judges_each_render_once_through_the_reconstruction(tmp_path):
    """The families' ceiling figure (sample/judging.reconstruction_accuracy): every fresh render goes through
    `reconstruct` once, in [-1, 1] at the classifier's resolution, and the classifier judges what comes back."""
    import train.classifier
    from models.classifier import load_classifier
    from sample.judging import reconstruction_accuracy
    classifier = judges(tmp_path, smoke=True)[0]
    train.classifier.main(classifier.argv)
    model, cfg = load_classifier(classifier.ckpt)
    seen = []

    def identity(x):
        assert x.shape[1:] == (3, cfg.resolution, cfg.resolution) and x.min() >= -1 and x.max() <= 1
        seen.append(len(x))
        return x

    acc = reconstruction_accuracy(identity, classifier.ckpt, num_images=20, seed=5, batch_size=7)
    assert seen == [7, 7, 6]
    assert acc == train.classifier.evaluate(model, cfg, 20, 5, progress=False)  # the classifier on the renders
    blank = reconstruction_accuracy(lambda x: torch.full_like(x, -1.0), classifier.ckpt, num_images=20)
    assert blank["background"] < 1 and blank != acc  # black pictures: what came back is judged, not the renders


def test_every_family_keeps_the_demo_contract_and_all_compares_them(tmp_path, capsys):
    """--family all at a few steps per stage: each family trains its stages, samples and writes metrics.json with the
    same keys as the latent demo, plus its own figures; then one comparison row per family."""
    demo.main(["--family", "all", "--runs", str(tmp_path), "--smoke", "--fid-images", "24", "--n", "1",
               "--accuracy-n", "1", "--steps", "2"])
    out = capsys.readouterr().out
    shared = {"family", "prompt_accuracy", "fid", "clip_score", "r_precision", "r_precision_real", "stage_seconds",
              "stage_cpu_seconds", "total_seconds", "seconds_per_image"}
    first = {"ldm": ["classifier", "judge CLIP", "VAE", "latent U-Net"],
             "dalle": ["classifier", "judge CLIP", "re-ranking CLIP", "dVAE", "transformer"],
             "imagen": ["classifier", "judge CLIP", "text LM"],
             "unclip": ["classifier", "judge CLIP", "CLIP", "VAE", "prior", "decoder"]}
    reports = {}
    for family in demo.FAMILIES:
        folder = tmp_path / "demo" / family
        report = reports[family] = json.loads((folder / "metrics.json").read_text())
        assert report["family"] == family and shared <= set(report), (family, shared - set(report))
        for split in ("heldin", "heldout"):
            assert {"colour", "shape", "count"} <= set(report["prompt_accuracy"][split])
            assert report["prompt_accuracy"][split]["images"] == len(eval_prompts(
                "train" if split == "heldin" else "heldout"))
        assert report["fid"]["n_a"] == report["fid"]["n_b"] == 24 and report["seconds_per_image"] > 0
        assert list(report["stage_seconds"])[:len(first[family])] == first[family], report["stage_seconds"]
        assert (folder / "samples.png").is_file() and f"{family} demo summary" in out
    # what each family adds
    assert sorted(reports["dalle"]["reranking"], key=int) == ["1", "4"]
    assert (tmp_path / "demo" / "dalle" / "reranking.png").is_file()
    dvae = load_checkpoint(tmp_path / "dvae" / "ckpt.pt", "dvae")
    assert reports["dalle"]["dvae"]["codes_used"] == dvae["codes_used"]
    rec = reports["dalle"]["dvae"]["attribute_accuracy_of_reconstructions"]  # the token space's ceiling
    assert 0 <= rec["colour"] <= 1 and 0 <= rec["shape"] <= 1 and "classifier on the dVAE's reconstructions" in out
    assert set(reports["imagen"]["super_resolution"]) == {"sr1", "sr2"}
    assert (tmp_path / "demo" / "imagen" / "samples_stages.png").is_file()  # every stage side by side
    assert {"heldin", "heldout"} <= set(reports["unclip"]["prior"])
    assert "prompt_accuracy_true_embedding" in reports["unclip"]
    # the judges and the VAE / CLIP the families share trained once
    assert out.count("==== classifier: done before, skipped") == 3  # trained by ldm, skipped by the other three
    assert out.count("==== VAE: done before, skipped") == 1  # ldm's, skipped by unclip
    assert out.count("==== CLIP: done before, skipped") == 1  # dalle's re-ranking CLIP (clip.yaml), skipped by unclip
    table = (tmp_path / "demo" / "compare" / "comparison.md").read_text().splitlines()
    assert [row.split(" | ")[0] for row in table[2:]] == [f"| {f}" for f in demo.FAMILIES]
    assert (tmp_path / "demo" / "compare" / "comparison.png").stat().st_size > 0