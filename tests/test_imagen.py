"""Tests for the Imagen cascade (models/imagen.py, data/crops.py, the super-resolution stages of train/diffusion.py):
reference equality with diffusers on random weights (noise augmentation = DDPMScheduler.add_noise, dynamic
thresholding = DDPMScheduler._threshold_sample, the 6-channel U-Net with a level embedding = UNet2DConditionModel with
class_embed_type="timestep"), the crops, a tiny cascade trained for a few steps and sampled through `python -m
sample --pipeline imagen`, and the bad-input contract."""
import math
import re
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import sample.__main__ as sample_cli
from core.checkpoint import load_checkpoint
from core.runtime import run_cli
from data import shapes
from data.crops import CropSource
from data.dataset import DataConfig
from models.conditioning import Conditioning
from models.imagen import (ImagenPipeline, ImagenPipelineConfig, aug_timestep, downsample, load_imagen, load_stage,
                           noise_augment, super_resolve)
from models.samplers import SamplerConfig, clip_or_threshold_x0
from models.schedule import NoiseSchedule, ScheduleConfig
from models.unet import UNet
from tests.test_unet import diffusers_name, diffusers_twin, inputs, randomize, tiny
from train import diffusion


# ---------------------------------------------------------------- reference equality with diffusers

@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_noise_augmentation_equals_diffusers_add_noise(schedule):
    """DeepFloyd IF's super-resolution pipeline noises its low-res input with image_noising_scheduler.add_noise."""
    from diffusers import DDPMScheduler

    ref = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2" if schedule == "cosine"
                        else "linear")
    ours = NoiseSchedule(ScheduleConfig(beta_schedule=schedule))
    g = torch.Generator().manual_seed(0)
    z, eps = torch.randn(4, 3, 8, 8, generator=g), torch.randn(4, 3, 8, 8, generator=g)
    s = torch.tensor([0, 250, 600, 999])
    out = noise_augment(ours, z, s, eps)
    torch.testing.assert_close(out, ref.add_noise(z, eps, s), rtol=1e-6, atol=1e-6)
    assert not torch.allclose(out[1], z[1], atol=0.1)  # level 250 does noise the input
    assert aug_timestep(0.25, 1000) == 250 and aug_timestep(0.0, 1000) == 0 and aug_timestep(1.0, 1000) == 999


def test_cascade_thresholding_equals_diffusers_threshold_sample():
    """Every stage samples with Imagen's dynamic thresholding (p = 99.5%, no cap) = diffusers' _threshold_sample."""
    from diffusers import DDPMScheduler

    cfg = SamplerConfig(thresholding=True, dynamic_thresholding_ratio=0.995, sample_max_value=math.inf)
    ref = DDPMScheduler(thresholding=True, dynamic_thresholding_ratio=0.995, sample_max_value=1e30)
    x0 = 3 * torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(clip_or_threshold_x0(x0, cfg), ref._threshold_sample(x0), rtol=1e-6, atol=1e-6)


def test_super_resolution_unet_equals_diffusers_with_six_channels_and_a_level_embedding():
    """Our U-Net with low_res_channels=3 = UNet2DConditionModel(in_channels=6, class_embed_type="timestep") fed
    [x_t, bilinear-upsampled low-res] as 6 channels and the augmentation level as class_labels."""
    cfg = tiny(low_res_channels=3, attention_resolutions=(8,))
    ours = randomize(UNet(cfg)).eval()
    theirs = diffusers_twin(cfg)
    from diffusers import UNet2DConditionModel

    kwargs = {k: v for k, v in theirs.config.items() if not k.startswith("_")}
    theirs = UNet2DConditionModel(**{**kwargs, "in_channels": 6, "class_embed_type": "timestep"}).eval()
    state = {diffusers_name(k).replace("aug_embed.0.", "class_embedding.linear_1.")
             .replace("aug_embed.2.", "class_embedding.linear_2."): v
             for k, v in ours.state_dict().items() if k != "null_context"}
    assert set(state) == set(theirs.state_dict()), "parameter sets differ"
    theirs.load_state_dict(state)
    x, t, context = inputs(cfg)
    low = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    s = torch.tensor([0, 300, 900])
    with torch.no_grad():
        ours_out = ours(x, t, Conditioning(tokens=context, low_res=low, aug_level=s))
        up = F.interpolate(low, size=x.shape[-2:], mode="bilinear", align_corners=False)
        theirs_out = theirs(torch.cat([x, up], 1), t, context, class_labels=s).sample
    assert ours_out.abs().max() > 0.1
    torch.testing.assert_close(ours_out, theirs_out, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- crops and downsampling

def test_crops_are_windows_of_the_whole_render():
    source = CropSource(DataConfig(resolution=32, num_images=6), crop=16)
    whole = source.whole(range(6))  # (6, 3, 32, 32)
    g = torch.Generator().manual_seed(3)
    crops, captions = source.batch([0, 5, 2], g)
    offsets = torch.randint(0, 17, (3, 2), generator=torch.Generator().manual_seed(3))
    for crop, i, (top, left) in zip(crops, [0, 5, 2], offsets.tolist()):
        torch.testing.assert_close(crop, whole[i, :, top: top + 16, left: left + 16])
    assert captions == [shapes.sample_scene(0, i)[0] for i in (0, 5, 2)]
    # the renders are the dataset's: item i at 32 px, as data/shapes.py makes it
    torch.testing.assert_close(whole[2], torch.from_numpy(shapes.make_item(0, 2, 32)[0]).permute(2, 0, 1) / 127.5 - 1)


def test_downsample_is_the_mean_of_each_block():
    x = torch.randn(2, 3, 16, 16)
    low = downsample(x, 4)  # (2, 3, 4, 4)
    torch.testing.assert_close(low, x.view(2, 3, 4, 4, 4, 4).mean((3, 5)))


# ---------------------------------------------------------------- a tiny cascade, trained for a few steps

TINY = ["data.num_images=32", "unet.channels=16", "unet.channel_mult=[1, 2]", "unet.num_res_blocks=1",
        "unet.attention_resolutions=[8]", "unet.norm_groups=8", "unet.context_dim=32", "unet.pooled_dim=32",
        "text_encoder=joint", "text.width=32", "text.layers=1", "text.max_length=16", "tokenizer.vocab_size=300",
        "train.batch_size=4", "train.log_every=1", "train.sample_every=0", "train.sample_steps=2", "train.device=cpu",
        "train.steps=2", "train.sample_prompts=[a red circle]"]


def stage(tmp, name, config, *extra):
    out = tmp / name
    diffusion.main(["--config", f"configs/shapes/{config}.yaml", *TINY, f"train.out_dir={out}", *extra])
    return out / "ckpt.pt"


@pytest.fixture(scope="module")
def cascade(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cascade")
    base = stage(tmp, "base", "imagen_base", "unet.attention_resolutions=[8]")
    sr1 = stage(tmp, "sr1", "imagen_sr1", "unet.attention_resolutions=[16]")
    sr2 = stage(tmp, "sr2", "imagen_sr2", "unet.attention_resolutions=[32]")
    return tmp, base, sr1, sr2


def test_stages_store_their_input_size_and_sample_through_python_m_sample(cascade, capsys):
    tmp, base, sr1, sr2 = cascade
    ckpt = load_checkpoint(sr2, "diffusion")
    assert ckpt["config"]["low_res"] == 32 and ckpt["config"]["train"]["crop"] == 32
    assert (sr2.parent / "samples" / "step_0000002.png").is_file()  # rows: input, output, truth
    config = tmp / "pipeline.yaml"
    config.write_text(f"base: {base}\nsr1: {sr1}\nsr2: {sr2}\npreset: ''\nsteps: [2, 2, 2]\n")
    out = tmp / "grid.png"
    sample_cli.main(["--pipeline", "imagen", "--config", str(config), "--prompt", "a red circle", "--n", "2",
                     "--out", str(out), "--device", "cpu"])
    assert Image.open(out).size[0] > 2 * 64
    assert Image.open(tmp / "grid_stages.png").size[0] > 3 * 64  # base, sr1, sr2 side by side
    assert len(list((tmp / "grid").glob("*.png"))) == 2 and Image.open(tmp / "grid" / "0000.png").size == (64, 64)


@pytest.mark.parametrize("config, extra", [("imagen_sr1", "unet.attention_resolutions=[16]"),
                                           ("imagen_base", "unet.attention_resolutions=[4]")])
def test_channels_last_trains_the_same_stage_to_float_rounding(tmp_path, config, extra):
    # train.channels_last (x_t and the noised low-res input in NHWC order, the U-Net's weights too): the same
    # weights to float rounding after two steps, the super-resolution stage and the patched base alike
    a = stage(tmp_path, "a", config, extra, "text_encoder=joint")
    b = stage(tmp_path, "b", config, extra, "text_encoder=joint", "train.channels_last=true")
    wa, wb = (load_checkpoint(p, "diffusion")["model"] for p in (a, b))
    assert any(not v.is_contiguous() for v in wb.values())
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-3, atol=1e-5, msg=k)


def test_a_residual_stage_adds_the_upsampled_input_to_the_residual_it_samples(tmp_path):
    """SRDiff's parametrization: the stage trains on x0 - upsample(downsample(x0)) and returns upsample(input) + what
    it samples; with the U-Net's output zeroed (x-prediction: x0_hat = 0) the sampled residual is exactly 0."""
    ckpt = stage(tmp_path, "sr", "imagen_sr1", "unet.attention_resolutions=[16]", "low_res_residual=true",
                 "sampler.thresholding=false", "schedule.prediction_type=sample", "train.snr_gamma=0")
    assert load_checkpoint(ckpt, "diffusion")["config"]["low_res_residual"] is True
    sr = load_stage(ckpt)
    assert sr.residual and not load_stage(stage(tmp_path, "plain", "imagen_sr1", "unet.attention_resolutions=[16]",
                                                  "low_res_residual=false")).residual
    with torch.no_grad():
        sr.pipe.model.unet.conv_out.weight.zero_()
        sr.pipe.model.unet.conv_out.bias.zero_()
    low = torch.rand(2, 3, 16, 16) * 2 - 1
    settings = replace(sr.pipe.settings, num_inference_steps=3)
    out = super_resolve(sr, ["a red circle"] * 2, low, settings, generator=torch.Generator().manual_seed(0),
                        progress=False)
    torch.testing.assert_close(out, F.interpolate(low, size=(32, 32), mode="bilinear", align_corners=False))
    # the same stage read as a plain one samples the zero image
    plain = replace(sr, residual=False)
    assert super_resolve(plain, ["a red circle"] * 2, low, settings, progress=False).abs().max() < 1e-5
    # the cascade never thresholds a residual stage's samples (they are not images in [-1, 1])
    base = load_stage(stage(tmp_path, "base", "imagen_base", "unet.attention_resolutions=[8]"))
    settings = ImagenPipeline([base, sr], ImagenPipelineConfig(preset="", steps=(2, 2), guidance=(3, 3))).settings
    assert settings.stages[0].thresholding and not settings.stages[1].thresholding
    # dynamic_threshold: false (configs/shapes/pipeline_imagen.yaml) leaves each stage its own sampler: the shipped
    # base clips x0 statically (dynamic thresholding greys its flat colours at guidance 2, docs/results.md)
    own = ImagenPipeline([base, sr], ImagenPipelineConfig(preset="", steps=(2, 2), guidance=(3, 3),
                                                          dynamic_threshold=False)).settings
    assert own.stages[0].clip_sample and not own.stages[0].thresholding and not own.stages[1].thresholding
    # spacing per stage: '' keeps the stage's own (leading here), a name replaces it; the --spacing flag sets every stage
    assert [s.timestep_spacing for s in settings.stages] == ["leading", "leading"]
    mixed = ImagenPipeline([base, sr], ImagenPipelineConfig(preset="", steps=(2, 2), guidance=(3, 3),
                                                            spacing=("linspace", ""))).settings
    assert [s.timestep_spacing for s in mixed.stages] == ["linspace", "leading"]
    pipe = ImagenPipeline([base, sr], ImagenPipelineConfig(preset="", steps=(2, 2), guidance=(3, 3),
                                                           spacing=("linspace", "")))
    assert [s.timestep_spacing for s in pipe.settings_with(spacing="trailing").stages] == ["trailing"] * 2
    with pytest.raises(ValueError, match="spacing needs one value per stage"):
        ImagenPipeline([base, sr], ImagenPipelineConfig(preset="", steps=(2, 2), guidance=(3, 3), spacing=("",)))
    with pytest.raises(ValueError, match="unknown spacing 'lineal'; valid values: leading, trailing, linspace"):
        ImagenPipeline([base, sr], ImagenPipelineConfig(preset="", steps=(2, 2), guidance=(3, 3),
                                                        spacing=("lineal", "")))


def test_presets_choose_stages_and_the_same_seed_gives_the_same_pixels(cascade):
    _, base, sr1, sr2 = cascade
    pipe = load_imagen(ImagenPipelineConfig(base=str(base), sr1=str(sr1), sr2=str(sr2), steps=(2, 2, 2)))
    fast = pipe.settings_with("fast")
    assert fast.num_stages == 2 and pipe.settings_with("quality").num_stages == 3
    assert fast.stages[0].thresholding and fast.stages[0].dynamic_thresholding_ratio == 0.995
    assert not any(s.thresholding or s.clip_sample for s in fast.stages[1:])  # the shipped SR stages are residual
    s = pipe.settings_with(None, steps=2, guidance=2.0)
    a = pipe(["a red circle", "a blue square"], s, torch.Generator().manual_seed(0), progress=False)
    assert a.shape == (2, 3, 64, 64) and [x.shape[-1] for x in pipe.stage_images] == [16, 32, 64]
    assert pipe.intermediate is pipe.stage_images[0]  # the base's picture, which the SR stages enlarge
    b = pipe(["a red circle", "a blue square"], s, torch.Generator().manual_seed(0), progress=False)
    assert torch.equal(a, b)
    lo = pipe(["a red circle"], replace_aug(s, 0.0), torch.Generator().manual_seed(0), progress=False)
    hi = pipe(["a red circle"], replace_aug(s, 0.9), torch.Generator().manual_seed(0), progress=False)
    assert not torch.allclose(lo, hi)  # the level reaches the SR stages


def replace_aug(settings, level):
    from dataclasses import replace
    return replace(settings, aug_levels=(level, level))


# ---------------------------------------------------------------- bad input: one line, nothing overwritten

def cli_error(main, argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: main(argv))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ")
    return err


def test_bad_cascades_are_one_line_errors(cascade, capsys):
    tmp, base, sr1, sr2 = cascade
    out = tmp / "bad.png"

    def run(config_text, *extra):
        config = tmp / "bad.yaml"
        config.write_text(config_text)
        return cli_error(sample_cli.main, ["--pipeline", "imagen", "--config", str(config), "--prompt", "a red circle",
                                           "--out", str(out), "--device", "cpu", *extra], capsys)

    assert "takes 32 px inputs but the stage before it gives 16 px" in run(f"base: {base}\nsr1: {sr2}\nsr2: ''\n")
    assert "is a base model" in run(f"base: {base}\nsr1: {base}\nsr2: ''\n")
    assert "augmentation level must be in [0, 1]" in run(f"base: {base}\nsr1: {sr1}\nsr2: {sr2}\naug_levels: [1.5, 0]\n")
    assert "unknown spacing 'lineal'" in run(f"base: {base}\nsr1: {sr1}\nsr2: {sr2}\nspacing: [lineal, '', '']\n")
    assert "spacing needs one value per stage" in run(f"base: {base}\nsr1: {sr1}\nsr2: {sr2}\nspacing: [linspace]\n")
    long_prompt = " ".join(["red circle"] * 40)
    assert "token" in run(f"base: {base}\nsr1: {sr1}\nsr2: {sr2}\n", "--prompt", long_prompt)
    assert "super-resolution stage of a cascade" in cli_error(
        sample_cli.main, ["--ckpt", str(sr1), "--prompt", "a red circle", "--out", str(out)], capsys)
    assert not out.exists()


def test_bad_training_inputs_are_one_line_errors(tmp_path, capsys):
    argv = ["--config", "configs/shapes/imagen_sr2.yaml", *TINY, f"train.out_dir={tmp_path / 'run'}"]
    assert "train.crop=128 is larger than the images" in cli_error(diffusion.main, argv + ["train.crop=128"], capsys)
    assert "train.aug_max must be in [0, 1]" in cli_error(diffusion.main, argv + ["train.aug_max=2"], capsys)
    err = cli_error(diffusion.main, argv + ["sampler.thresholding=true"], capsys)  # imagen_sr2.yaml: a residual stage
    assert "set sampler.clip_sample=false and sampler.thresholding=false" in err
    err = cli_error(diffusion.main, ["--config", "configs/shapes/imagen_base.yaml", *TINY, "low_res_residual=true",
                                     f"train.out_dir={tmp_path / 'run'}"], capsys)
    assert "low_res_residual are for super-resolution stages" in err
    folder = tmp_path / "small"
    folder.mkdir()
    Image.fromarray(np.zeros((40, 48, 3), np.uint8)).save(folder / "a.png")
    (folder / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "a red circle"}\n')
    err = cli_error(diffusion.main, argv + [f"data.dataset=folder:{folder}"], capsys)
    assert "smaller than this stage's resolution 64" in err
    assert not (tmp_path / "run").exists()


def test_folder_crops_read_on_the_fly(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    lines = []
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (80, 96, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        lines.append(f'{{"file_name": "{i}.png", "text": "picture {i}"}}')
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    source = CropSource(DataConfig(dataset=f"folder:{folder}", resolution=64, num_images=0), crop=32)
    crops, captions = source.batch([2, 0], torch.Generator().manual_seed(0))
    assert crops.shape == (2, 3, 32, 32) and captions == ["picture 2", "picture 0"]
    assert re.fullmatch(r"picture \d", source.captions[1])


# ---------------------------------------------------------------- Efficient U-Net options and the shifted schedule

def test_skip_scale_scales_exactly_the_skip_half_of_each_up_block_input():
    cfg = tiny(attention_resolutions=(8,))
    plain, scaled = randomize(UNet(cfg)), UNet(tiny(attention_resolutions=(8,), skip_scale=0.5 ** 0.5))
    scaled.load_state_dict(plain.state_dict())
    seen = {}
    for name, model in (("plain", plain), ("scaled", scaled)):
        model.up_blocks[0][0].res.register_forward_pre_hook(lambda m, args, name=name: seen.__setitem__(name, args[0]))
    x, t, context = inputs(cfg)
    with torch.no_grad():
        a, b = plain(x, t, Conditioning(tokens=context)), scaled(x, t, Conditioning(tokens=context))
    width = cfg.channels * cfg.channel_mult[-1]  # the first part of the concatenation is the path from below
    torch.testing.assert_close(seen["scaled"][:, :width], seen["plain"][:, :width])
    torch.testing.assert_close(seen["scaled"][:, width:], seen["plain"][:, width:] * 0.5 ** 0.5)
    assert not torch.allclose(a, b, atol=1e-4)


def test_level_blocks_put_more_blocks_at_low_resolution():
    model = UNet(tiny(level_blocks=(1, 2, 3)))
    assert [len(b) for b in model.down_blocks] == [1, 2, 3] and [len(b) for b in model.up_blocks] == [4, 3, 2]
    x, t, context = inputs(model.cfg)
    assert model(x, t, Conditioning(tokens=context)).shape == x.shape
    with pytest.raises(ValueError, match="level_blocks"):
        UNet(tiny(level_blocks=(1, 2)))


def test_resolution_shift_adds_to_log_snr_at_every_step():
    from models.schedule import resolution_shift

    shift = resolution_shift(256)  # a 64 px schedule used at 256 px: 2 log(1/4), more noise
    plain = NoiseSchedule(ScheduleConfig(beta_schedule="cosine"))
    shifted = NoiseSchedule(ScheduleConfig(beta_schedule="cosine", log_snr_shift=shift))
    t = torch.arange(0, 1000, 37)
    ratio = shifted.snr(t).double() / plain.snr(t).double()
    torch.testing.assert_close(ratio, torch.full_like(ratio, 1 / 16), rtol=2e-3, atol=0)


# ---------------------------------------------------------------- the super-resolution figures

def test_ssim_identities():
    from metrics.super_resolution import psnr, ssim

    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(ssim(x, x), torch.ones(2))
    # two flat images m and m + c: no variance, so SSIM is the luminance term (2 m (m + c) + C1) / (m^2 + (m + c)^2 + C1)
    m, c, c1 = 0.3, 0.2, 0.01**2
    a, b = torch.full((1, 3, 16, 16), m), torch.full((1, 3, 16, 16), m + c)
    torch.testing.assert_close(ssim(a, b), torch.tensor([(2 * m * (m + c) + c1) / (m**2 + (m + c) ** 2 + c1)]))
    torch.testing.assert_close(psnr(a, b), torch.tensor([-10 * math.log10(c**2)]))
    assert ssim(x, 1 - x).mean() < 0
