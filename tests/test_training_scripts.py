"""One convention for every training script (train/common.py): nested sections, train.out_dir, train.resume with exact
resumption, a configurable final learning rate; and every script learns: its loss falls on a handful of examples.

The diffusion and VAE scripts have their own resume tests (test_train_diffusion.py, test_vae.py); here the same
property is asserted for CLIP, the attribute classifier and the masked LM, which resume the same way."""
import re

import pytest
import torch

from core.checkpoint import load_checkpoint
from tests.test_train_diffusion import TINY as DIFFUSION_TINY
from tests.test_train_diffusion import cli_error
from train import classifier, clip, diffusion, text_lm, vae

SCRIPTS = {  # a tiny model and tiny data per script; train.* below is added by the tests
    "clip": (clip, "clip", ["model.embed_dim=16", "model.text.width=32", "model.text.layers=1",
                            "model.text.max_length=16", "model.vision.kind=conv", "model.vision.image_size=16",
                            "model.vision.width=8", "model.vision.layers=2", "tokenizer.vocab_size=300",
                            "data.resolution=16", "train.eval_images=0", "train.warmup_steps=5"]),
    "classifier": (classifier, "shapes_classifier", ["model.channels=16", "train.eval_images=0",
                                                      "train.warmup_steps=5", "train.noise_std=0"]),
    "text_lm": (text_lm, "text_lm", ["text.width=32", "text.layers=1", "text.max_length=16",
                                     "tokenizer.vocab_size=300", "train.eval_captions=0", "train.warmup_steps=5"]),
    "vae": (vae, "vae", ["data.resolution=16", "vae.channels=8", "vae.channel_mult=[1, 2]", "vae.num_res_blocks=1",
                         "vae.norm_groups=4", "train.eval_images=8", "train.scale_images=8", "train.warmup_steps=5",
                         "train.image_every=0"]),
    "diffusion": (diffusion, "diffusion", [a for a in DIFFUSION_TINY if not a.startswith(("data.num_images",
                                                                                          "train.batch_size"))]
                  + ["train.warmup_steps=5", "train.sample_every=0"]),
}


def losses(text, script):
    """{step: loss} from a script's log lines ('step N | loss X', the VAE's 'step N | rec X')."""
    key = "rec" if script == "vae" else "loss"
    return {int(m[1]): float(m[2]) for m in re.finditer(rf"step (\d+) \| {key} ([0-9.e-]+)", text)}


def run(script, tmp_path, name, *extra):
    module, _, tiny = SCRIPTS[script]
    module.main(tiny + [f"train.out_dir={tmp_path / name}", "train.device=cpu", "train.log_every=1", *extra])
    return tmp_path / name / "ckpt.pt"


@pytest.mark.parametrize("script", ["clip", "classifier"])
def test_channels_last_trains_the_same_model_to_float_rounding(script, tmp_path):
    """train.channels_last (the conv nets' weights and image batches in NHWC order; the VAE, dVAE and U-Net scripts
    have their own tests): four steps give the same function to float rounding. Compared on outputs, not weights: a
    conv bias that a GroupNorm of one channel per group removes has a zero gradient in exact arithmetic, so AdamW
    moves it along rounding noise in either memory order without changing what the model computes."""
    from models.classifier import load_classifier
    from models.clip import load_clip

    data = ["data.num_images=64", "train.batch_size=16", "train.steps=4"]
    paths = run(script, tmp_path, "a", *data), run(script, tmp_path, "b", *data, "train.channels_last=true")
    assert any(not v.is_contiguous() for v in load_checkpoint(paths[1], SCRIPTS[script][1])["model"].values())
    images = torch.rand(4, 3, 16 if script == "clip" else 32, 16 if script == "clip" else 32) * 2 - 1
    with torch.no_grad():
        if script == "clip":
            a, b = (load_clip(p)[0].encode_image(images) for p in paths)
        else:
            a, b = (torch.cat([v.flatten(1) for v in load_classifier(p)[0](images).values()], 1) for p in paths)
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("script", ["clip", "classifier", "text_lm"])
def test_resume_continues_exactly(script, tmp_path, capsys):
    """Three steps, stop, three more: the same losses and weights as six steps in one go (the data order and every
    random draw are functions of (seed, step); the checkpoint holds the optimizer and the RNG states)."""
    data = ["data.num_images=64", "train.batch_size=16", "train.steps=6"]
    whole = run(script, tmp_path, "whole", *data)
    whole_log = losses(capsys.readouterr().out, script)
    part = run(script, tmp_path, "part", *data, "train.stop_after=3")
    first_log = losses(capsys.readouterr().out, script)
    assert load_checkpoint(part, SCRIPTS[script][1])["step"] == 3
    run(script, tmp_path, "part", *data, "train.resume=auto")
    resumed_log = losses(capsys.readouterr().out, script)
    assert sorted(first_log) == [1, 2, 3] and sorted(resumed_log) == [4, 5, 6]
    assert {**first_log, **resumed_log} == whole_log
    a, b = (load_checkpoint(p, SCRIPTS[script][1])["model"] for p in (whole, part))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("script", ["clip", "classifier", "text_lm"])
def test_resume_refuses_another_model_config_and_an_existing_run(script, tmp_path, capsys):
    data = ["data.num_images=32", "train.batch_size=16", "train.steps=2"]
    ckpt = run(script, tmp_path, "run", *data, "train.stop_after=1")
    before = ckpt.read_bytes()
    capsys.readouterr()
    module, _, tiny = SCRIPTS[script]
    argv = tiny + [f"train.out_dir={ckpt.parent}", "train.device=cpu", *data]
    assert "exists; pass train.resume=auto" in cli_error(module.main, argv, capsys)
    other = {"clip": "model.embed_dim=24", "classifier": "model.channels=24", "text_lm": "text.width=48"}[script]
    err = cli_error(module.main, argv + ["train.resume=auto", other], capsys)
    assert "cannot resume" in err and "was made with another config" in err
    assert ckpt.read_bytes() == before
    assert "train.min_lr_ratio" in cli_error(module.main, argv + ["train.min_lr_ratio=2"], capsys)


@pytest.mark.parametrize("script, steps, extra", [
    ("clip", 40, []), ("classifier", 40, []), ("vae", 40, []), ("diffusion", 80, []),
    ("text_lm", 100, ["train.lr=1e-2", "masking.mask_prob=0.3"]),  # few masked tokens a step: more of them
])
def test_loss_falls_on_a_handful_of_examples(script, steps, extra, tmp_path, capsys):
    """Eight examples, one batch: the mean loss of the last five steps is well below that of the first five."""
    run(script, tmp_path, "overfit", "data.num_images=8", "train.batch_size=8", f"train.steps={steps}",
        "train.lr=3e-3", "train.min_lr_ratio=1", *extra)
    log = losses(capsys.readouterr().out, script)
    first = sum(log[s] for s in range(1, 6)) / 5
    last = sum(log[s] for s in range(steps - 4, steps + 1)) / 5
    assert last < 0.5 * first, (first, last)
