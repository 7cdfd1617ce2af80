"""Tests for models/dvae.py and train/dvae.py (DALL-E's discrete VAE, Ramesh et al. 2021, arXiv 2102.12092):
equality with OpenAI's `dall_e` Encoder and Decoder on random weights (same state_dict keys), the logit-Laplace
density against torch.distributions, the KL to the uniform prior against kl_divergence of categoricals, the
gumbel-softmax identities, the schedules' end points, a training smoke run and the bad-input contract."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Categorical, Laplace, TransformedDistribution, kl_divergence
from torch.distributions.transforms import SigmoidTransform

from core.checkpoint import load_checkpoint
from models.dvae import (DiscreteVAE, DVAEConfig, codebook_usage, cosine_schedule, gumbel_noise, gumbel_softmax,
                         kl_to_uniform, load_dvae, logit_laplace_log_prob, map_pixels, unmap_pixels)
from tests.test_train_diffusion import cli_error
from train import dvae as train_dvae
from train.common import warmup_cosine


# ---------------------------------------------------------------- reference equality

@pytest.mark.parametrize("n_blk", [1, 2])
def test_equals_dall_e_encoder_and_decoder(n_blk):
    dall_e = pytest.importorskip("dall_e")
    torch.manual_seed(0)
    ref_enc = dall_e.Encoder(n_hid=64, n_blk_per_group=n_blk, vocab_size=512)
    ref_dec = dall_e.Decoder(n_init=16, n_hid=64, n_blk_per_group=n_blk, vocab_size=512)
    with torch.no_grad():  # dall_e's biases start at 0: perturb them so that they are compared too
        for p in [*ref_enc.parameters(), *ref_dec.parameters()]:
            p.add_(0.05 * torch.randn(p.shape))
    ours = DiscreteVAE(DVAEConfig(vocab_size=512, n_hid=64, n_init=16, group_count=4, n_blk_per_group=n_blk))
    assert set(ours.encoder.state_dict()) == set(ref_enc.state_dict())
    assert set(ours.decoder.state_dict()) == set(ref_dec.state_dict())
    ours.encoder.load_state_dict(ref_enc.state_dict())  # strict: the published keys load as they are
    ours.decoder.load_state_dict(ref_dec.state_dict())
    x = torch.rand(2, 3, 16, 16)  # [0, 1]
    mapped = dall_e.map_pixels(x)
    torch.testing.assert_close(map_pixels(x), mapped)
    logits = ours.logits(x * 2 - 1)  # our interface takes [-1, 1] and maps inside
    torch.testing.assert_close(logits, ref_enc(mapped), rtol=1e-5, atol=1e-5)
    z = F.one_hot(logits.argmax(1), 512).permute(0, 3, 1, 2).float()  # (B, K, 2, 2)
    stats = ref_dec(z)  # (B, 6, 16, 16)
    torch.testing.assert_close(torch.cat(ours.decode_codes(z), 1), stats, rtol=1e-5, atol=1e-5)
    # decode = dall_e's usage example: unmap_pixels(sigmoid(x_stats[:, :3])), here in [-1, 1]
    expected = dall_e.unmap_pixels(torch.sigmoid(stats[:, :3])) * 2 - 1
    torch.testing.assert_close(ours.decode(logits.argmax(1)), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(unmap_pixels(mapped), x)


def test_factor_and_shapes():
    model = DiscreteVAE(DVAEConfig(vocab_size=16, n_hid=8, n_init=8, group_count=3))
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    assert model.factor == 4 and model.logits(x).shape == (2, 16, 4, 4)
    tokens = model.encode(x)
    assert tokens.shape == (2, 4, 4) and tokens.dtype == torch.long
    out = model.decode(tokens)
    assert out.shape == (2, 3, 16, 16) and out.min() >= -1 and out.max() <= 1
    with pytest.raises(ValueError, match="not divisible by the dVAE's factor 4"):
        model.encode(torch.zeros(1, 3, 18, 18))


# ---------------------------------------------------------------- the paper's pieces

def test_logit_laplace_equals_laplace_through_a_sigmoid():
    g = torch.Generator().manual_seed(0)
    x = map_pixels(torch.rand(4, 3, 5, 5, generator=g))
    mu, log_b = torch.randn(2, 4, 3, 5, 5, generator=g)
    ref = TransformedDistribution(Laplace(mu, log_b.exp()), [SigmoidTransform()]).log_prob(x)
    torch.testing.assert_close(logit_laplace_log_prob(x, mu, log_b), ref, rtol=1e-5, atol=1e-5)
    # a density on (0, 1): it integrates to 1 (midpoint rule on a fine grid)
    grid = (torch.arange(200000, dtype=torch.float64) + 0.5) / 200000
    mass = logit_laplace_log_prob(grid, torch.tensor(0.3, dtype=torch.float64),
                                  torch.tensor(-1.0, dtype=torch.float64)).exp().mean()
    assert abs(mass.item() - 1) < 1e-4


def test_kl_to_uniform_equals_kl_divergence_of_categoricals():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 7, 4, 5, generator=g) * 3  # (B, K, h, w)
    ref = kl_divergence(Categorical(logits=logits.movedim(1, -1)), Categorical(probs=torch.full((7,), 1 / 7)))
    torch.testing.assert_close(kl_to_uniform(logits), ref, rtol=1e-5, atol=1e-6)
    assert kl_to_uniform(torch.zeros(1, 7, 1, 1)).abs().max() < 1e-6  # uniform q: KL 0
    peaked = torch.full((1, 7, 1, 1), -1e4)
    peaked[:, 2] = 0
    assert abs(kl_to_uniform(peaked).item() - math.log(7)) < 1e-5  # one-hot q: KL log K


def test_gumbel_softmax_identities():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(6, 10, 3, 3, generator=g, requires_grad=True)
    y = gumbel_softmax(logits, tau=0.7, generator=g)
    torch.testing.assert_close(y.sum(1), torch.ones(6, 3, 3))
    # the Gumbel-max trick: the argmax of logits + g is a draw from softmax(logits), as F.gumbel_softmax's
    n = 200_000
    row = torch.tensor([1.5, 0.0, -1.0, 0.7, -3.0])
    probs = row.softmax(0)
    for draw in (lambda x: gumbel_softmax(x, 1.0, hard=True, generator=torch.Generator().manual_seed(5)),
                 lambda x: F.gumbel_softmax(x, tau=1.0, hard=True)):
        freq = draw(row.expand(n, 5).clone()).argmax(1).bincount(minlength=5) / n
        assert ((freq - probs).abs() < 5 * (probs * (1 - probs) / n).sqrt()).all(), (freq, probs)
    # Gumbel(0, 1) moments: mean the Euler-Mascheroni constant, variance pi^2 / 6; finite at every draw
    noise = gumbel_noise(torch.empty(n, 4), torch.Generator().manual_seed(6))
    assert torch.isfinite(noise).all()
    assert abs(noise.mean().item() - 0.5772157) < 5 * math.sqrt(math.pi ** 2 / 6 / noise.numel())
    assert abs(noise.var().item() - math.pi ** 2 / 6) < 0.02
    # drawn in logical order: a channels_last tensor gets the same noise at the same (b, k, i, j)
    nhwc = torch.empty(2, 6, 3, 3).to(memory_format=torch.channels_last)
    torch.testing.assert_close(gumbel_noise(nhwc, torch.Generator().manual_seed(7)),
                               gumbel_noise(torch.empty(2, 6, 3, 3), torch.Generator().manual_seed(7)))
    # hard: one-hot forward, the soft sample's gradient backward
    w = torch.randn(6, 10, 3, 3, generator=g)
    hard = gumbel_softmax(logits, 0.5, hard=True, generator=torch.Generator().manual_seed(4))
    soft = gumbel_softmax(logits, 0.5, generator=torch.Generator().manual_seed(4))
    assert set(hard.unique().tolist()) == {0.0, 1.0} and (hard.sum(1) == 1).all()
    assert torch.equal(hard.argmax(1), soft.argmax(1))
    grad_hard, = torch.autograd.grad((hard * w).sum(), logits)
    grad_soft, = torch.autograd.grad((soft * w).sum(), logits)
    torch.testing.assert_close(grad_hard, grad_soft)
    # a low temperature approaches the argmax of logits + gumbel noise; with no noise, the argmax of the logits
    cold = gumbel_softmax(logits.detach() * 1e4, 1 / 16, generator=g)
    torch.testing.assert_close(cold, F.one_hot(logits.argmax(1), 10).permute(0, 3, 1, 2).float(), atol=1e-4, rtol=0)


def test_schedules_hit_their_end_points():
    assert cosine_schedule(0, 1000, 1.0, 1 / 16) == 1.0
    assert cosine_schedule(1000, 1000, 1.0, 1 / 16) == pytest.approx(1 / 16)
    assert cosine_schedule(5000, 1000, 1.0, 1 / 16) == pytest.approx(1 / 16)  # stays at the end
    assert cosine_schedule(500, 1000, 1.0, 0.0) == pytest.approx(0.5)  # half-way on the cosine
    assert cosine_schedule(0, 5000, 0.0, 6.6) == 0.0 and cosine_schedule(5000, 5000, 0.0, 6.6) == pytest.approx(6.6)
    values = [cosine_schedule(s, 100, 0.0, 6.6) for s in range(101)]
    assert all(a <= b for a, b in zip(values, values[1:]))  # monotone warm-up


def test_codebook_usage():
    assert codebook_usage(torch.tensor([3, 3, 3]), 8) == (pytest.approx(1.0), 1)
    perplexity, used = codebook_usage(torch.arange(8).repeat(5), 8)
    assert perplexity == pytest.approx(8.0) and used == 8


# ---------------------------------------------------------------- training

TINY = ["dvae.vocab_size=32", "dvae.n_hid=8", "dvae.n_init=8", "dvae.group_count=2", "data.resolution=16",
        "data.num_images=64", "train.batch_size=8", "train.eval_images=16", "train.log_every=2",
        "loss.tau_steps=4", "loss.kl_warmup_steps=2"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("dvae")
    train_dvae.main(["--config", "configs/shapes/dvae.yaml", f"train.out_dir={out}", "train.steps=4", *TINY])
    return out


def test_training_writes_a_dvae_checkpoint(trained):
    ckpt = load_checkpoint(trained / "ckpt.pt", "dvae")
    assert ckpt["step"] == 4 and 1 <= ckpt["codes_used"] <= 32 and ckpt["psnr"] > 0
    assert (trained / "reconstructions" / "step_0000004.png").is_file() and list((trained / "tensorboard").iterdir())
    model, _ = load_dvae(trained / "ckpt.pt")
    assert model.encode(torch.zeros(1, 3, 16, 16)).shape == (1, 8, 8)


def test_resume_continues_exactly(tmp_path):
    base = ["--config", "configs/shapes/dvae.yaml", "train.steps=4", *TINY]
    train_dvae.main(base + [f"train.out_dir={tmp_path / 'a'}"])
    train_dvae.main(base + [f"train.out_dir={tmp_path / 'b'}", "train.stop_after=2"])
    train_dvae.main(base + [f"train.out_dir={tmp_path / 'b'}", "train.resume=auto"])
    a, b = (load_checkpoint(tmp_path / n / "ckpt.pt", "dvae")["model"] for n in "ab")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_channels_last_trains_the_same_dvae_to_float_rounding(tmp_path):
    # train.channels_last changes where values sit in memory and which convolution kernels run, not the function:
    # 4 steps (joint and decoder phases) land on the same weights to float rounding, and the same fingerprint
    base = ["--config", "configs/shapes/dvae.yaml", "train.steps=4", "train.decoder_share=0.5", *TINY]
    train_dvae.main(base + [f"train.out_dir={tmp_path / 'a'}"])
    train_dvae.main(base + [f"train.out_dir={tmp_path / 'b'}", "train.channels_last=true"])
    a, b = (load_checkpoint(tmp_path / n / "ckpt.pt", "dvae") for n in "ab")
    assert any(not v.is_contiguous() for v in b["model"].values())  # it did train in NHWC order
    for k in a["model"]:
        torch.testing.assert_close(b["model"][k], a["model"][k], rtol=1e-3, atol=1e-5, msg=k)
    assert a["psnr"] == pytest.approx(b["psnr"], abs=1e-3)
    assert load_dvae(tmp_path / "b" / "ckpt.pt")[0].encode(torch.zeros(1, 3, 16, 16)).shape == (1, 8, 8)


def test_decoder_loss_is_the_nll_of_the_argmax_codes_and_leaves_the_encoder_alone():
    torch.manual_seed(0)
    model = DiscreteVAE(DVAEConfig(vocab_size=16, n_hid=8, n_init=8, group_count=2))
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    loss, parts = model.decoder_loss(x)
    tokens = model.encode(x)
    mu, log_b = model.decode_codes(F.one_hot(tokens, 16).permute(0, 3, 1, 2).float())
    expected = -logit_laplace_log_prob(map_pixels((x + 1) / 2), mu, log_b).mean()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(parts["rec"], model.decode(tokens))
    torch.testing.assert_close(model.decoder_loss(x, tokens)[0], loss)  # the codes given: the same loss
    assert not torch.equal(model.decoder_loss(x, tokens.flip(0))[0], loss)  # ... and they are what it decodes
    loss.backward()
    assert all(p.grad is None for p in model.encoder.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.decoder.parameters())


def test_learning_rate_of_the_two_phases():
    tc = train_dvae.DVAETrain(steps=100, warmup_steps=10, lr=2e-3, min_lr_ratio=0.1)
    assert [train_dvae.learning_rate(tc, s) for s in range(100)] == [tc.lr * warmup_cosine(s, 10, 100, 0.1)
                                                                     for s in range(100)]
    tc = train_dvae.DVAETrain(steps=100, decoder_share=0.4, warmup_steps=10, lr=2e-3, decoder_lr=1e-3,
                              min_lr_ratio=0.1)
    assert train_dvae.learning_rate(tc, 59) == pytest.approx(2e-4, rel=0.02)  # joint phase: cosine to 0.1 lr
    assert train_dvae.learning_rate(tc, 60) == train_dvae.learning_rate(tc, 99) == 1e-3  # then decoder_lr


def test_decoder_phase_freezes_the_encoder_and_resumes_exactly(tmp_path, capsys):
    base = ["--config", "configs/shapes/dvae.yaml", "train.steps=6", "train.decoder_share=0.5", "train.ckpt_every=1",
            *TINY]
    train_dvae.main(base + [f"train.out_dir={tmp_path / 'a'}", "train.stop_after=3"])  # the joint phase only
    joint = load_checkpoint(tmp_path / "a" / "ckpt.pt", "dvae")["model"]
    train_dvae.main(base + [f"train.out_dir={tmp_path / 'a'}", "train.resume=auto"])
    train_dvae.main(base + [f"train.out_dir={tmp_path / 'b'}", "train.stop_after=4"])  # stopped inside the phase
    train_dvae.main(base + [f"train.out_dir={tmp_path / 'b'}", "train.resume=auto"])
    a, b = (load_checkpoint(tmp_path / n / "ckpt.pt", "dvae")["model"] for n in "ab")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert all(torch.equal(a[k], joint[k]) for k in a if k.startswith("encoder."))
    before = (tmp_path / "b" / "ckpt.pt").read_bytes()  # a step of the decoder phase, resumed as a joint one
    capsys.readouterr()
    err = cli_error(train_dvae.main, base + [f"train.out_dir={tmp_path / 'b'}", "train.resume=auto", "train.steps=9",
                                             "train.decoder_share=0"], capsys)
    assert "saved in the other phase" in err and (tmp_path / "b" / "ckpt.pt").read_bytes() == before
    assert any(not torch.equal(a[k], joint[k]) for k in a if k.startswith("decoder."))


def test_bad_input(tmp_path, capsys, trained):
    before = (trained / "ckpt.pt").read_bytes()
    err = cli_error(train_dvae.main, ["--config", "configs/shapes/dvae.yaml", "data.resolution=30",
                                      f"train.out_dir={tmp_path}"], capsys)
    assert "divisible by the dVAE's factor 4" in err
    err = cli_error(train_dvae.main, ["--config", "configs/shapes/dvae.yaml", f"train.out_dir={trained}", *TINY], capsys)
    assert "exists; pass train.resume=auto" in err
    err = cli_error(train_dvae.main, ["--config", "configs/shapes/dvae.yaml", "loss.tau_end=0",
                                      f"train.out_dir={tmp_path}"], capsys)
    assert "loss.tau_start and loss.tau_end must be > 0" in err
    err = cli_error(train_dvae.main, ["--config", "configs/shapes/dvae.yaml", "train.steps=10",
                                      "train.decoder_share=1", f"train.out_dir={tmp_path}"], capsys)
    assert "train.decoder_share (1.0) must be in [0, 1)" in err
    assert (trained / "ckpt.pt").read_bytes() == before
