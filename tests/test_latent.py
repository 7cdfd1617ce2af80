"""Latent diffusion: the U-Net trained on a frozen VAE's latents, the checkpoint's memory of its VAE, exact
resumption, the ldm sampling pipeline and its presets, and the bad-input contract."""
import json
import os
import re

import pytest
import torch
from PIL import Image

import sample.__main__ as sample_cli
from core.checkpoint import load_checkpoint, save_checkpoint
from core.config import config_to_dict
from core.runtime import run_cli
from data.dataset import DataConfig, load_data
from models.text2image import load_text2image, vae_fingerprint
from models.vae import load_vae
from tests.test_train_diffusion import cli_error, losses
from train import diffusion
from train import vae as train_vae
from train.common import Ranks

VAE_TINY = ["data.num_images=32", "data.resolution=16", "vae.channels=8", "vae.channel_mult=[1, 2]",
            "vae.num_res_blocks=1", "vae.norm_groups=4", "train.steps=2", "train.batch_size=8",
            "train.eval_images=8", "train.scale_images=32", "train.device=cpu", "train.log_every=1"]
# 16x16 images -> 4x8x8 latents (factor 2)
LDM_TINY = ["data.num_images=48", "data.resolution=16", "space=latent", "unet.image_size=8", "unet.in_channels=4",
            "unet.out_channels=4", "unet.channels=16", "unet.channel_mult=[1, 2]", "unet.num_res_blocks=1",
            "unet.attention_resolutions=[4]", "unet.norm_groups=8", "unet.context_dim=32", "text.width=32",
            "text.layers=1", "text.max_length=16", "tokenizer.vocab_size=300", "sampler.clip_sample=false",
            "schedule.beta_schedule=scaled_linear", "train.batch_size=8", "train.log_every=1",
            "train.sample_every=0", "train.sample_steps=2", "train.device=cpu",
            "train.sample_prompts=[a red circle, a blue square]"]


@pytest.fixture(scope="module")
def vaes(tmp_path_factory):
    """Two tiny VAEs that differ only in their seed."""
    root = tmp_path_factory.mktemp("vaes")
    for seed in (0, 1):
        train_vae.main(VAE_TINY + [f"train.seed={seed}", f"train.out_dir={root / f'vae{seed}'}"])
    return root / "vae0" / "ckpt.pt", root / "vae1" / "ckpt.pt"


@pytest.fixture(scope="module")
def ldm(vaes, tmp_path_factory):
    out = tmp_path_factory.mktemp("ldm") / "run"
    diffusion.main(LDM_TINY + [f"vae={vaes[0]}", "train.steps=4", f"train.out_dir={out}"])
    return out / "ckpt.pt"


def test_checkpoint_remembers_its_vae(vaes, ldm):
    ckpt = load_checkpoint(ldm, "diffusion")
    vae, scale, _ = load_vae(vaes[0])
    assert ckpt["config"]["space"] == "latent" and ckpt["config"]["vae"] == str(vaes[0])
    assert ckpt["vae"] == vae_fingerprint(vae, scale)
    other, other_scale, _ = load_vae(vaes[1])
    assert vae_fingerprint(other, other_scale)["sha256"] != ckpt["vae"]["sha256"]


def test_latent_training_target_is_the_scaled_posterior_sample(vaes):
    """encode_latents gives the encoder's posterior mean and std for every image, in data order."""
    vae, _, _ = load_vae(vaes[0])
    data = load_data(DataConfig(resolution=16, num_images=20), progress=False)
    mean, std = diffusion.encode_latents(vae, data, "cpu", Ranks(1), batch_size=7, progress=False)
    posterior = vae.encode(data.batch(torch.arange(20))[0])
    torch.testing.assert_close(mean, posterior.mean, atol=1e-5, rtol=0)
    torch.testing.assert_close(std, posterior.std, atol=1e-6, rtol=1e-5)
    assert mean.shape == (20, 4, 8, 8)


def _encode_on_rank(rank, vae_path, store, out):
    run_cli(lambda: _encode(rank, vae_path, store, out))  # ends the process as torchrun's ranks end (os._exit)


def _encode(rank, vae_path, store, out):
    import torch.distributed as dist
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE="2")  # as torchrun sets them; Ranks joins the group below
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    vae, _, _ = load_vae(vae_path)
    data = load_data(DataConfig(resolution=16, num_images=20), progress=False)
    ranks = Ranks(14)
    assert (ranks.rank, ranks.world) == (rank, 2)
    mean, std = diffusion.encode_latents(vae, data, "cpu", ranks, batch_size=7, progress=False)
    torch.save({"mean": mean, "std": std}, f"{out}_{rank}.pt")
    dist.destroy_process_group()


def test_latents_encoded_by_two_ranks_are_every_image_s_on_both(vaes, tmp_path):
    """Under DDP each rank encodes every other batch (3 batches of 7: rank 0 two, rank 1 one) and the sum gives
    both ranks the whole set, equal to one process's encoding."""
    import torch.multiprocessing as mp
    mp.spawn(_encode_on_rank, args=(vaes[0], tmp_path / "store", tmp_path / "latents"), nprocs=2)
    vae, _, _ = load_vae(vaes[0])
    data = load_data(DataConfig(resolution=16, num_images=20), progress=False)
    mean, std = diffusion.encode_latents(vae, data, "cpu", Ranks(1), batch_size=7, progress=False)
    for rank in (0, 1):
        got = torch.load(tmp_path / f"latents_{rank}.pt", weights_only=True)
        torch.testing.assert_close(got["mean"], mean, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(got["std"], std, atol=1e-6, rtol=1e-6)


def test_latent_resume_is_exact(vaes, tmp_path, capsys):
    """The posterior noise is drawn from the step's generator: a resumed run has the same losses."""
    base = LDM_TINY + [f"vae={vaes[0]}", "train.steps=4"]
    diffusion.main(base + [f"train.out_dir={tmp_path / 'full'}"])
    full = losses(capsys.readouterr().out)
    diffusion.main(base + [f"train.out_dir={tmp_path / 'split'}", "train.stop_after=2"])
    diffusion.main(base + [f"train.out_dir={tmp_path / 'split'}", "train.resume=auto"])
    split = losses(capsys.readouterr().out)
    assert sorted(full) == sorted(split) == [1, 2, 3, 4]
    assert full == split
    err = cli_error(diffusion.main, base[:-1] + [f"vae={vaes[1]}", "train.steps=4",
                                                 f"train.out_dir={tmp_path / 'split'}", "train.resume=auto"], capsys)
    assert "another VAE" in err


def test_ldm_pipeline_samples_pixels(vaes, ldm, tmp_path, capsys):
    pipe = load_text2image(load_checkpoint(ldm, "diffusion"), "cpu")
    assert pipe.vae is not None and pipe.model.unet.cfg.in_channels == 4
    images = pipe(["a red circle"], generator=torch.Generator().manual_seed(0), progress=False)
    assert images.shape == (1, 3, 16, 16) and images.abs().max() <= 1
    # the intermediate product is the latent the VAE decodes into those pixels
    assert pipe.intermediate.shape == (1, 4, 8, 8)
    torch.testing.assert_close(pipe.vae.decode(pipe.intermediate / pipe.scale_factor).clamp(-1, 1), images)
    # the same seed gives the same pixels, through the command line and the pipeline config
    config = tmp_path / "pipe.yaml"
    config.write_text(f"diffusion: {ldm}\nvae: {vaes[0]}\npreset: quality\n")
    outs = []
    for name in ("a", "b"):
        sample_cli.main(["--pipeline", "ldm", "--config", str(config), "--prompt", "a red circle", "--n", "2",
                         "--steps", "3", "--out", str(tmp_path / f"{name}.png")])
        outs.append((tmp_path / f"{name}.png").read_bytes())
    assert outs[0] == outs[1]
    printed = capsys.readouterr().out
    assert "ddim, 3 steps, guidance 5.0" in printed  # the preset's guidance, the flag's steps
    sample_cli.main(["--pipeline", "ldm", "--config", str(config), "--preset", "creative", "--prompt", "a red circle",
                     "--n", "1", "--steps", "2", "--out", str(tmp_path / "c.png")])
    assert re.search(r"2 steps, guidance 1\.5", capsys.readouterr().out)


def test_ldm_bad_input(vaes, ldm, tmp_path, capsys):
    base = ["--prompt", "a red circle", "--n", "1", "--steps", "2"]
    err = cli_error(sample_cli.main, ["--pipeline", "ldm", "--ckpt", str(ldm), "--vae", str(vaes[1]), *base,
                                      "--out", str(tmp_path / "x.png")], capsys)
    assert "is not the VAE this latent U-Net was trained on" in err
    err = cli_error(sample_cli.main, ["--pipeline", "pixel", "--ckpt", str(ldm), *base,
                                      "--out", str(tmp_path / "x.png")], capsys)
    assert "needs a pixel-space diffusion checkpoint" in err
    err = cli_error(sample_cli.main, ["--ckpt", str(ldm), "--dynamic-threshold", *base,
                                      "--out", str(tmp_path / "x.png")], capsys)
    assert "--dynamic-threshold is for pixel space" in err
    err = cli_error(sample_cli.main, ["--ckpt", str(ldm), "--vae", str(tmp_path / "missing.pt"), *base,
                                      "--out", str(tmp_path / "x.png")], capsys)
    assert "not found" in err
    err = cli_error(sample_cli.main, ["--config", str(tmp_path / "p.yaml"), *base], capsys)
    assert "pass --pipeline NAME" in err
    (tmp_path / "p.yaml").write_text(f"diffusion: {ldm}\npreset: slow\n")
    err = cli_error(sample_cli.main, ["--pipeline", "ldm", "--config", str(tmp_path / "p.yaml"), *base], capsys)
    assert "unknown preset 'slow'" in err
    (tmp_path / "p.yaml").write_text(f"diffusion: {ldm}\nsteps: 3\n")
    err = cli_error(sample_cli.main, ["--pipeline", "ldm", "--config", str(tmp_path / "p.yaml"), *base], capsys)
    assert "steps" in err
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("extra, message", [
    (["vae="], "no VAE is given"),
    (["unet.image_size=16"], "unet.image_size=8"),
    (["unet.in_channels=3"], "latent_channels (4)"),
    (["sampler.clip_sample=true"], "sampler.clip_sample=false"),
    (["space=voxel"], "space must be pixel or latent"),
])
def test_latent_config_errors(vaes, tmp_path, capsys, extra, message):
    out = tmp_path / "run"
    err = cli_error(diffusion.main, LDM_TINY + [f"vae={vaes[0]}", "train.steps=2", f"train.out_dir={out}", *extra],
                    capsys)
    assert message in err
    assert not out.exists()


def test_pixel_config_refuses_a_vae(vaes, tmp_path, capsys):
    from tests.test_train_diffusion import TINY
    err = cli_error(diffusion.main, TINY + [f"vae={vaes[0]}", f"train.out_dir={tmp_path / 'run'}"], capsys)
    assert "space is pixel" in err


def test_overwrite_leaves_no_stale_images(ldm, tmp_path):
    """A second run with --overwrite and fewer images leaves exactly its own images beside metadata.jsonl."""
    base = ["--ckpt", str(ldm), "--prompt", "a red circle", "--steps", "2", "--out", str(tmp_path / "g.png")]
    sample_cli.main(base + ["--n", "3"])
    sample_cli.main(base + ["--n", "2", "--overwrite"])
    assert sorted(p.name for p in (tmp_path / "g").iterdir()) == ["0000.png", "0001.png", "metadata.jsonl"]
    assert len((tmp_path / "g" / "metadata.jsonl").read_text().splitlines()) == 2


def test_text_following_bad_input(ldm, tmp_path, capsys):
    import metrics.text_following as probe
    err = cli_error(probe.main, ["--ckpt", str(ldm), "--t", "5000"], capsys)
    assert "--t values must lie in 0..999" in err
    err = cli_error(probe.main, ["--ckpt", str(ldm), "--classifier", str(tmp_path / "none.pt")], capsys)
    assert "not found" in err
    err = cli_error(probe.main, ["--ckpt", str(ldm), "--n", "4", "--grid", str(tmp_path / "g.png"),
                                 "--grid-images", "5"], capsys)
    assert "--grid-images must lie in 1..--n (4), got 5" in err and not (tmp_path / "g.png").exists()


def test_text_following_grid_of_decoded_predictions(ldm, tmp_path, capsys):
    """The probe in latent space: x_t and x0_hat decoded by the VAE, one row per t under the renders, and the x0
    error of each t in the printout and the JSON (no do-nothing figure: x_t is a latent)."""
    import metrics.text_following as probe
    from models.classifier import ClassifierConfig, ShapesClassifier
    clf = tmp_path / "clf.pt"
    save_checkpoint(clf, {"kind": "shapes_classifier", "config": {"model": config_to_dict(ClassifierConfig())},
                          "model": ShapesClassifier(ClassifierConfig()).state_dict()})
    probe.main(["--ckpt", str(ldm), "--classifier", str(clf), "--n", "4", "--t", "10", "900", "--grid",
                str(tmp_path / "g.png"), "--grid-images", "3", "--out", str(tmp_path / "r.json")])
    out = capsys.readouterr().out
    rates = json.loads((tmp_path / "r.json").read_text())["rates"]
    assert set(rates) == {"10", "900"} and all(r["mse"] > 0 and "mse_input" not in r for r in rates.values())
    assert f"x0 MSE {rates['900']['mse']:.4f}" in out
    R = load_checkpoint(ldm, "diffusion")["config"]["data"]["resolution"]
    assert Image.open(tmp_path / "g.png").size == (4 * (3 * (R + 2) + 2), 4 * (5 * (R + 2) + 2))  # 1 + 2 x 2 rows
