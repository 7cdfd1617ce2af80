"""The sampling flags (models/pipeline.py) on a diffusion pipeline's settings: presets and flags over the checkpoint's
sampler, dynamic thresholding as Imagen defines it (not static clipping)."""
import math
from dataclasses import replace

import pytest
import torch

import sample.__main__ as sample_cli
from models.pipeline import settings_from_args
from models.samplers import SamplerConfig, clip_or_threshold_x0
from models.text2image import Text2Image


def settings(*flags, stored=SamplerConfig(clip_sample=True), preset=None, space="pixel"):
    """The settings `python -m sample` would use with these flags, for a pixel or latent diffusion pipeline."""
    args = sample_cli.build_parser().parse_args(["--ckpt", "x.pt", "--prompt", "a red circle", *flags])
    pipe = Text2Image(None, None, None, None, stored, {}, vae=None if space == "pixel" else torch.nn.Identity())
    return settings_from_args(pipe, args, preset)


def test_dynamic_threshold_flag_is_imagens_dynamic_thresholding():
    """x0_hat with |x0_hat| well above 1: the flag's default (p = 0.995, no cap) divides by the percentile s > 1,
    unlike static clipping, and equals diffusers' _threshold_sample with the same ratio and cap."""
    diffusers = pytest.importorskip("diffusers")
    x0 = 3 * torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    cfg = settings("--dynamic-threshold")
    assert cfg.thresholding and not cfg.clip_sample
    assert (cfg.dynamic_thresholding_ratio, cfg.sample_max_value) == (0.995, math.inf)
    ours = clip_or_threshold_x0(x0, cfg)
    static = x0.clamp(-1, 1)
    assert (ours - static).abs().max() > 0.1  # not static clipping
    s = torch.quantile(x0.flatten(1).abs(), 0.995, dim=1)  # (B,) both well above 1, nothing caps them
    assert (s > 2).all()
    torch.testing.assert_close(ours, x0.clamp(-s[:, None, None, None], s[:, None, None, None]) / s[:, None, None, None])
    for flags, ratio, cap in ((["--threshold-ratio", "0.9", "--threshold-max", "1.5"], 0.9, 1.5), ([], 0.995, math.inf)):
        cfg = settings("--dynamic-threshold", *flags)
        reference = diffusers.DDPMScheduler(thresholding=True, dynamic_thresholding_ratio=ratio, sample_max_value=cap)
        torch.testing.assert_close(clip_or_threshold_x0(x0, cfg), reference._threshold_sample(x0), rtol=1e-6, atol=1e-6)


def test_threshold_flags_need_the_switch_and_sensible_values():
    with pytest.raises(ValueError, match="add --dynamic-threshold"):
        settings("--threshold-max", "1.5")
    with pytest.raises(ValueError, match="--threshold-ratio must be in"):
        settings("--dynamic-threshold", "--threshold-ratio", "1.5")
    with pytest.raises(ValueError, match="at least 1"):
        settings("--dynamic-threshold", "--threshold-max", "0.5")
    with pytest.raises(ValueError, match="pixel space"):
        settings("--dynamic-threshold", space="latent")


def test_flags_override_the_preset_which_overrides_the_checkpoint():
    stored = SamplerConfig(sampler="ddpm", num_inference_steps=7, guidance_scale=2.0)
    assert settings(stored=stored) == stored
    cfg = settings(stored=stored, preset="quality")
    assert (cfg.sampler, cfg.num_inference_steps, cfg.guidance_scale) == ("ddim", 100, 5.0)
    cfg = settings("--steps", "12", "--eta", "0.5", stored=stored, preset="quality")
    assert cfg == replace(stored, sampler="ddim", num_inference_steps=12, guidance_scale=5.0, eta=0.5)
