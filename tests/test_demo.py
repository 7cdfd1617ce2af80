"""The README's main job, end to end at a few steps per stage: every stage runs, hands its checkpoint to the next,
and the demo writes its pictures and figures; a second run skips the finished stages."""
import json
import os
import time

import pytest
import torch

from core.checkpoint import load_checkpoint
from data.claims import eval_prompts
from sample import demo
from train.diffusion import DiffusionConfig


def test_demo_smoke_runs_every_stage_and_skips_finished_ones(tmp_path, capsys):
    argv = ["--runs", str(tmp_path), "--smoke", "--fid-images", "24", "--n", "1", "--accuracy-n", "1",
            "--steps", "2"]
    demo.main(argv)
    out = capsys.readouterr().out
    report = json.loads((tmp_path / "demo" / "metrics.json").read_text())
    stages = ["classifier", "VAE", "judge CLIP", "latent U-Net", "samples", "prompt accuracy",
              "images for FID and CLIP score", "FID, KID and CLIP score"]
    assert list(report["stage_seconds"]) == stages and all(s > 0 for s in report["stage_seconds"].values())
    if os.cpu_count() >= 2:  # the classifier trained in a child process beside the VAE, its output in logs/
        assert report["stages_beside_the_vae"] == ["classifier"]
        assert "accuracy on 2000 fresh renders" not in out
        assert "accuracy on" in (tmp_path / "demo" / "logs" / "classifier.log").read_text()
    # every prompt was judged (one image each: --accuracy-n 1), and every image counted by FID and CLIP score
    assert report["prompt_accuracy"]["heldin"]["images"] == len(eval_prompts("train"))
    assert report["prompt_accuracy"]["heldout"]["images"] == len(eval_prompts("heldout"))
    assert report["fid"]["n_a"] == report["fid"]["n_b"] == 24
    assert "NOT comparable with published FIDs" in report["fid"]["features"]
    assert report["clip_score"]["generated"]["images"] == report["clip_score"]["real"]["images"] == 24
    vae_ckpt = load_checkpoint(tmp_path / "vae" / "ckpt.pt", "vae")
    assert report["vae"]["scale_factor"] == vae_ckpt["scale_factor"] and report["vae"]["psnr_db"] == vae_ckpt["psnr"]
    assert (tmp_path / "demo" / "samples.png").exists() and "demo summary" in out
    demo.main(argv)  # the trained stages are done: skipped, the sampling and metrics run again
    out = capsys.readouterr().out
    for stage in ("classifier", "judge CLIP", "VAE", "latent U-Net"):
        assert f"==== {stage}: done before, skipped" in out
    report = json.loads((tmp_path / "demo" / "metrics.json").read_text())
    assert report["stage_seconds"]["latent U-Net"] == 0.0 and report["stage_seconds"]["samples"] > 0
    # a checkpoint of another config (an older preset) is neither used nor trained over
    ckpt = tmp_path / "diffusion_latent" / "ckpt.pt"
    before = ckpt.read_bytes()
    wanted = ["--config", "configs/shapes/diffusion_latent.yaml", f"vae={tmp_path / 'vae' / 'ckpt.pt'}",
              f"train.out_dir={ckpt.parent}", "train.resume=auto", *demo.SMOKE["diffusion"]]
    assert demo.stage_done(ckpt, "diffusion", DiffusionConfig, wanted)
    with pytest.raises(ValueError, match=r"trained with another config than the demo's configs/shapes/"
                                         r"diffusion_latent.yaml \(unet.channels: 32 -> 48\); move its folder away"):
        demo.stage_done(ckpt, "diffusion", DiffusionConfig, wanted + ["unet.channels=48"])
    assert ckpt.read_bytes() == before
    # a checkpoint made before a config key existed (unet.patch_size) matches that key's default, not a change
    old = torch.load(ckpt, weights_only=True)
    del old["config"]["unet"]["patch_size"]
    torch.save(old, tmp_path / "old.pt")
    assert demo.stage_done(tmp_path / "old.pt", "diffusion", DiffusionConfig, wanted)
    with pytest.raises(ValueError, match=r"unet.patch_size: 1 -> 2"):
        demo.stage_done(tmp_path / "old.pt", "diffusion", DiffusionConfig, wanted + ["unet.patch_size=2"])


def test_a_failing_stage_beside_the_vae_is_an_error_naming_its_log(tmp_path):
    timer = demo.Timer()
    beside = demo.Background("classifier", "train.classifier", ["train.num_steps=3"], tmp_path / "logs", timer)
    beside.start()
    with pytest.raises(ValueError, match=r"classifier stage failed \(exit code 2\): error: unknown config key "
                                         r"'train.num_steps'.*classifier\.log"):
        beside.wait()
    log = (tmp_path / "logs" / "classifier.log").read_text()
    assert "unknown config key 'train.num_steps'" in log  # the child's own one-line error is kept for the user
    assert timer.seconds["classifier"] > 0


def test_stop_ends_the_child_beside_the_vae(tmp_path):
    """When the demo's own stage fails, the classifier's child process is ended, not left training."""
    timer = demo.Timer()
    beside = demo.Background("classifier", "train.classifier",
                             ["train.steps=100000", f"train.out_dir={tmp_path / 'c'}"],
                             tmp_path / "logs", timer)
    beside.start()
    time.sleep(2)
    t0 = time.time()
    beside.stop()
    assert time.time() - t0 < 30 and beside.process.returncode not in (None, 0)  # terminated, not run to the end
    assert not (tmp_path / "c" / "ckpt.pt").exists()
