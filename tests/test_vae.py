"""Tests for models/vae.py and train/vae.py: the Gaussian posterior against torch.distributions, shapes for f = 4
and 8, equality with diffusers' AutoencoderKL on copied random weights, the adaptive GAN weight and the hinge loss
by hand, a training smoke run, exact resumption, and the bad-input contract (one line, exit code 2)."""
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from core.checkpoint import load_checkpoint
from models.vae import (AutoencoderKL, DiagonalGaussian, NLayerDiscriminator, VAEConfig, adaptive_weight, hinge_d_loss,
                        load_vae)
from tests.test_train_diffusion import cli_error as main_cli_error
from train import vae as train_vae

ROOT = Path(__file__).resolve().parents[1]


def tiny(**overrides):
    return VAEConfig(**{**dict(channels=8, channel_mult=(1, 2), num_res_blocks=1, norm_groups=4), **overrides})


def randomize(model, std=0.05, seed=1):
    """Perturb every parameter (GroupNorm scales and biases included) so that no path is a silent default."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(std * torch.randn(p.shape, generator=g))
    return model


# ---------------------------------------------------------------- the posterior

def test_kl_and_nll_equal_torch_distributions():
    g = torch.Generator().manual_seed(0)
    moments = torch.randn(3, 8, 4, 5, generator=g) * 2  # (B, 2c, h, w): mean and logvar
    posterior = DiagonalGaussian(moments)
    mean, logvar = moments.chunk(2, dim=1)
    q = Normal(mean, torch.exp(0.5 * logvar))
    expected_kl = kl_divergence(q, Normal(torch.zeros_like(mean), torch.ones_like(mean))).flatten(1).sum(1)
    torch.testing.assert_close(posterior.kl(), expected_kl)
    assert posterior.kl().shape == (3,)
    x = torch.randn(mean.shape, generator=g)
    torch.testing.assert_close(posterior.nll(x), -q.log_prob(x).flatten(1).sum(1))
    assert torch.equal(posterior.mode(), mean)


def test_logvar_is_clamped_and_sample_is_reparameterised():
    moments = torch.cat([torch.zeros(2, 4, 3, 3), torch.full((2, 2, 3, 3), -100.0), torch.full((2, 2, 3, 3), 100.0)], 1)
    posterior = DiagonalGaussian(moments)
    assert posterior.logvar[:, :2].eq(-30).all() and posterior.logvar[:, 2:].eq(20).all()
    moments = torch.randn(2, 8, 3, 3)
    posterior = DiagonalGaussian(moments)
    z = posterior.sample(torch.Generator().manual_seed(5))
    eps = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(z, posterior.mean + torch.exp(0.5 * posterior.logvar) * eps)


# ---------------------------------------------------------------- shapes

@pytest.mark.parametrize("channel_mult, factor", [((1, 2, 2), 4), ((1, 2, 2, 2), 8)])
@pytest.mark.parametrize("latent_channels", [4, 3])
def test_encode_decode_shapes(channel_mult, factor, latent_channels):
    model = AutoencoderKL(tiny(channel_mult=channel_mult, latent_channels=latent_channels))
    assert model.factor == factor
    x = torch.randn(2, 3, 32, 24)
    posterior = model.encode(x)
    assert posterior.mean.shape == posterior.logvar.shape == (2, latent_channels, 32 // factor, 24 // factor)
    rec, post = model(x)
    assert rec.shape == x.shape and post.mean.shape == posterior.mean.shape
    assert model.decode(posterior.mode()).shape == x.shape
    with pytest.raises(ValueError, match="divisible"):
        model.encode(torch.randn(1, 3, 32 + factor // 2, 32))


# ---------------------------------------------------------------- reference equality with diffusers

@pytest.mark.parametrize("mid_attention, channel_mult", [(True, (1, 2)), (False, (1, 2)), (True, (1, 1, 2))])
def test_equals_diffusers_autoencoderkl(mid_attention, channel_mult):
    from diffusers import AutoencoderKL as DiffusersAutoencoderKL

    torch.manual_seed(0)
    theirs = DiffusersAutoencoderKL(
        block_out_channels=tuple(32 * m for m in channel_mult), layers_per_block=1, norm_num_groups=8,
        latent_channels=4, down_block_types=("DownEncoderBlock2D",) * len(channel_mult),
        up_block_types=("UpDecoderBlock2D",) * len(channel_mult), mid_block_add_attention=mid_attention)
    randomize(theirs).eval()
    ours = AutoencoderKL(VAEConfig(channels=32, channel_mult=channel_mult, num_res_blocks=1, norm_groups=8,
                                   latent_channels=4, mid_attention=mid_attention)).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)  # every name and shape must match
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    z = torch.randn(2, 4, 32 // ours.factor // 2, 32 // ours.factor // 2, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours_post, their_post = ours.encode(x), theirs.encode(x).latent_dist
        ours_dec, their_dec = ours.decode(z), theirs.decode(z).sample
        ours_rec, _ = ours(x, sample_posterior=False)
        their_rec = theirs(x, sample_posterior=False).sample
    assert ours_post.mean.abs().max() > 0.1 and ours_dec.abs().max() > 0.1  # the network is not silent
    torch.testing.assert_close(ours_post.mean, their_post.mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours_post.logvar, their_post.logvar, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours_dec, their_dec, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours_rec, their_rec, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- the adversarial part

def test_adaptive_weight_by_hand():
    # L_rec = a . w and L_G = b . w have gradients a and b: lambda = 0.5 * |a| / (|b| + 1e-4)
    w = torch.randn(6, requires_grad=True)
    a, b = torch.randn(6), torch.randn(6)
    weight = adaptive_weight((a * w).sum(), (b * w).sum(), w, disc_weight=0.5)
    torch.testing.assert_close(weight, 0.5 * a.norm() / (b.norm() + 1e-4))
    assert not weight.requires_grad
    # a vanishing GAN gradient: |a| / 1e-4 clamped to 1e4
    big = adaptive_weight((10 * a * w).sum(), (0 * w).sum(), w, disc_weight=1.0)
    assert big.item() == 1e4
    # on the real networks, against gradients from .backward() on each loss separately
    model, disc = randomize(AutoencoderKL(tiny())), NLayerDiscriminator(3, 8, n_layers=2)
    x = torch.randn(4, 3, 16, 16)
    rec, _ = model(x, generator=torch.Generator().manual_seed(0))
    rec_loss = (rec - x).abs().flatten(1).sum(1).mean()
    g_loss = -disc(rec).mean()
    weight = adaptive_weight(rec_loss, g_loss, model.last_layer, disc_weight=0.5)
    grads = []
    for loss in (rec_loss, g_loss):
        model.zero_grad()
        loss.backward(retain_graph=True)
        grads.append(model.decoder.conv_out.weight.grad.clone())
    torch.testing.assert_close(weight, 0.5 * grads[0].norm() / (grads[1].norm() + 1e-4))


def test_hinge_loss_and_discriminator_shape():
    loss = hinge_d_loss(torch.tensor([2.0, 0.5]), torch.tensor([-2.0, 0.0]))
    assert loss.item() == pytest.approx(0.5 * ((0 + 0.5) / 2 + (0 + 1) / 2))
    for norm in ("batch", "group"):
        disc = NLayerDiscriminator(3, 16, n_layers=3, norm=norm)
        assert disc(torch.randn(2, 3, 32, 32)).shape == (2, 1, 2, 2)  # 32 -> 16 -> 8 -> 4 -> 3 -> 2
    assert "main.0.weight" in disc.state_dict()  # taming-transformers' names


# ---------------------------------------------------------------- the training script

TINY = ["data.num_images=48", "data.resolution=16", "vae.channels=8", "vae.channel_mult=[1, 2]",
        "vae.num_res_blocks=1", "vae.norm_groups=4", "loss.disc_weight=0.5", "loss.disc_start=2",
        "loss.disc_channels=8", "loss.disc_layers=2", "train.batch_size=8", "train.log_every=1",
        "train.image_every=0", "train.eval_images=8", "train.scale_images=16", "train.device=cpu",
        "train.ema_decay=0.9"]


def train(tmp_path, *extra, name="run"):
    out = tmp_path / name
    train_vae.main(TINY + [f"train.out_dir={out}", *extra])
    return out


def log_lines(text):
    return {int(m[1]): m[2] for m in re.finditer(r"step (\d+) \| (rec .*?) \| lr", text)}


def cli_error(argv, capsys):
    return main_cli_error(train_vae.main, argv, capsys)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return train(tmp_path_factory.mktemp("vae"), "train.steps=3")


def test_training_writes_a_vae_checkpoint(trained, capsys):
    ckpt = load_checkpoint(trained / "ckpt.pt", "vae")
    assert ckpt["kind"] == "vae" and ckpt["step"] == 3 and ckpt["scale_factor"] > 0 and ckpt["psnr"] > 0
    assert set(ckpt) >= {"config", "model", "ema", "optimizer", "disc", "disc_optimizer", "rng", "scale_factor"}
    model, scale_factor, cfg = load_vae(trained / "ckpt.pt")
    assert scale_factor == ckpt["scale_factor"] and cfg.channels == 8 and not model.training
    for k, v in model.state_dict().items():  # load_vae serves the EMA weights
        assert torch.equal(v, ckpt["ema"]["weights"][k]), k
    assert (trained / "reconstructions" / "step_0000003.png").is_file()
    assert list((trained / "tensorboard").iterdir())


def test_channels_last_trains_the_same_vae_to_float_rounding(tmp_path, capsys):
    # train.channels_last: the autoencoder and the discriminator (on from step 2) in NHWC order give the same
    # weights to float rounding, and the same scale factor. Except the attention's key biases: their gradient is 0
    # in exact arithmetic (a softmax does not see a shift shared by every key), so AdamW steps them by lr along
    # rounding noise, whatever the memory order, and they say nothing about it
    a = train(tmp_path, "train.steps=3", name="a")
    b = train(tmp_path, "train.steps=3", "train.channels_last=true", name="b")
    ca, cb = (load_checkpoint(d / "ckpt.pt", "vae") for d in (a, b))
    assert any(not v.is_contiguous() for v in cb["model"].values())
    for key in ("model", "disc"):
        for k in ca[key]:
            if not k.endswith("to_k.bias"):
                torch.testing.assert_close(cb[key][k], ca[key][k], rtol=1e-3, atol=1e-5, msg=k)
    assert cb["scale_factor"] == pytest.approx(ca["scale_factor"], rel=1e-4)


def test_resume_continues_exactly(tmp_path, capsys):
    whole = train(tmp_path, "train.steps=5", name="whole")
    out = capsys.readouterr().out
    whole_log = log_lines(out)
    ckpt = load_checkpoint(whole / "ckpt.pt", "vae")
    assert f"PSNR {ckpt['psnr']:.2f} dB" in out and f"scale_factor {ckpt['scale_factor']:.4f}" in out
    part = train(tmp_path, "train.steps=5", "train.stop_after=3", name="part")
    first_log = log_lines(capsys.readouterr().out)
    with pytest.raises(ValueError, match="before the latent scale factor"):
        load_vae(part / "ckpt.pt")
    train(tmp_path, "train.steps=5", "train.resume=auto", name="part")
    resumed_log = log_lines(capsys.readouterr().out)
    assert sorted(first_log) == [1, 2, 3] and sorted(resumed_log) == [4, 5]
    assert "d_weight" in whole_log[5]  # the GAN part ran, and resumed
    assert {**first_log, **resumed_log} == whole_log
    a, b = (load_checkpoint(d / "ckpt.pt", "vae") for d in (whole, part))
    for key in ("model", "disc"):
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), (key, name)
    for name in a["ema"]["weights"]:
        assert torch.equal(a["ema"]["weights"][name], b["ema"]["weights"][name]), name
    assert a["scale_factor"] == b["scale_factor"]


def test_bf16_autocast_trains(tmp_path):
    out = train(tmp_path, "train.steps=2", "loss.disc_start=1", "train.bf16=true")
    assert load_checkpoint(out / "ckpt.pt", "vae")["scale_factor"] > 0


def test_bad_input(tmp_path, capsys, trained):
    err = cli_error(TINY + ["vae.chanels=8"], capsys)
    assert "unknown config key 'vae.chanels'; did you mean 'vae.channels'?" in err
    err = cli_error(TINY + ["data.resolution=17"], capsys)
    assert "must be divisible by the VAE's factor 2" in err
    err = cli_error(TINY + [f"train.out_dir={tmp_path / 'x'}", f"train.resume={tmp_path / 'missing.pt'}"], capsys)
    assert "checkpoint not found" in err
    torch.save({"kind": "shapes_classifier"}, tmp_path / "clf.pt")
    err = cli_error(TINY + [f"train.out_dir={tmp_path / 'y'}", f"train.resume={tmp_path / 'clf.pt'}"], capsys)
    assert "'shapes_classifier' checkpoint but a 'vae' checkpoint" in err
    with pytest.raises(ValueError, match="'shapes_classifier' checkpoint but a 'vae'"):
        load_vae(tmp_path / "clf.pt")
    before = (trained / "ckpt.pt").read_bytes()
    err = cli_error(TINY + [f"train.out_dir={trained}", "train.steps=3"], capsys)
    assert "exists; pass train.resume=auto" in err
    err = cli_error(TINY + [f"train.out_dir={trained}", "train.resume=auto", "vae.channels=16"], capsys)
    assert "was made with another config (vae.channels: 8 -> 16)" in err
    assert (trained / "ckpt.pt").read_bytes() == before


def test_command_line_error_is_one_line_and_exit_code_2():
    result = subprocess.run([sys.executable, "-m", "train.vae", "--config", "configs/shapes/vae.yaml", "vae.chanels=8"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip() == "error: unknown config key 'vae.chanels'; did you mean 'vae.channels'?"
