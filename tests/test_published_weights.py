"""Published Stable Diffusion v1 weights (models/stable_diffusion.py, models/weight_names.py), without the weights:
diffusers' UNet2DConditionModel and AutoencoderKL and transformers' CLIPTextModel with SD v1's block structure at
small widths and random weights, saved as a diffusers folder and as a CompVis single file, loaded with ours:
the same numbers as theirs, module by module and through the whole pipeline (diffusers' StableDiffusionPipeline
with DDIM: same noise in, same picture out). The CompVis names are checked against diffusers' own converter; on
the meta device the full-size SD v1 configs map every key with the right shape. Export: ours -> diffusers folder
-> diffusers' modules give our outputs. Bad input: one line, exit 2."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import sample.__main__ as sample_cli
from core.checkpoint import load_checkpoint
from models.conditioning import Conditioning
from models.schedule import NoiseSchedule
from models.diffusers_export import export_diffusers
from models.stable_diffusion import (COMPVIS_DERIVED, COMPVIS_PREFIXES, CLIP_HEAD_WIDTH, bundled_clip_vocab,
                                     load_stable_diffusion, read_published, read_tokenizer, schedule_config,
                                     text_config, unet_config, vae_config)
from models.tokenizer import BPETokenizer
from models.weight_names import clip_text_names, unet_names, vae_names
from tests.test_train_diffusion import cli_error

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["a photo of an astronaut riding a horse", "a red circle"]

# SD v1's block structure at small widths: CrossAttn x3 + plain, 8 heads, 32 groups, CLIP's 64-wide heads
TINY_UNET = dict(sample_size=16, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 32, 64, 64),
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=128,
                 attention_head_dim=8, norm_num_groups=32)
TINY_VAE = dict(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=32, latent_channels=4,
                down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, sample_size=32)
TINY_TEXT = dict(vocab_size=49408, hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=2,
                 max_position_embeddings=77, hidden_act="quick_gelu")
# the published SD v1 configs (unet/, vae/, text_encoder/ config.json of stable-diffusion-v1-5)
SD_V1_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                  block_out_channels=(320, 640, 1280, 1280),
                  down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                  up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=768,
                  attention_head_dim=8, norm_num_groups=32)
SD_V1_VAE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32, latent_channels=4,
                 down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, sample_size=512)
SD_V1_TEXT = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                  num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu")
PUBLISHED_COMPVIS_KEYS = [f"model.diffusion_model.{k}" for k in (
    "input_blocks.0.0.weight", "input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight", "input_blocks.3.0.op.weight",
    "input_blocks.11.0.emb_layers.1.weight", "middle_block.1.proj_in.weight", "output_blocks.2.1.conv.weight",
    "output_blocks.5.2.conv.weight", "output_blocks.8.2.conv.weight", "output_blocks.11.0.skip_connection.weight",
    "output_blocks.11.1.transformer_blocks.0.ff.net.0.proj.weight", "out.2.weight", "time_embed.2.weight")] + \
    [f"first_stage_model.{k}" for k in (
        "encoder.down.0.downsample.conv.weight", "encoder.down.1.block.0.nin_shortcut.weight",
        "encoder.mid.attn_1.proj_out.weight", "decoder.up.3.upsample.conv.weight", "decoder.up.0.block.2.conv1.weight",
        "decoder.norm_out.weight", "post_quant_conv.weight")]
SCHEDULER = dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                 steps_offset=1, set_alpha_to_one=False, clip_sample=False)


def randomize(module, seed):
    """Every parameter drawn anew (zero-inits included), so that no branch of the network is silent."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return module.eval()


def reference_modules():
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    return (randomize(UNet2DConditionModel(**TINY_UNET), 1), randomize(AutoencoderKL(**TINY_VAE), 2),
            randomize(CLIPTextModel(CLIPTextConfig(**TINY_TEXT)), 3))


def write_clip_tokenizer(folder):
    """SD v1's tokenizer/ as published: CLIP's vocab.json and merges.txt (made from OpenAI's merge list in the
    open_clip wheel), padding with <|endoftext|>, 77 tokens."""
    openai = BPETokenizer.from_clip_vocab(bundled_clip_vocab())
    folder.mkdir(parents=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(openai.vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in openai.merges))
    (folder / "special_tokens_map.json").write_text(json.dumps({"pad_token": "<|endoftext|>"}))
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 77, "do_lower_case": True}))


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    """A Stable Diffusion v1 diffusers folder with tiny random modules, and the modules themselves."""
    from diffusers import DDIMScheduler

    folder = tmp_path_factory.mktemp("sd") / "tiny-sd-v1"
    unet, vae, text = reference_modules()
    unet.save_pretrained(folder / "unet")
    vae.save_pretrained(folder / "vae")
    text.save_pretrained(folder / "text_encoder")
    DDIMScheduler(**SCHEDULER).save_pretrained(folder / "scheduler")
    write_clip_tokenizer(folder / "tokenizer")
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    return folder, unet, vae, text


def compvis_state(unet, vae, text):
    """The CompVis single-file state dict of the reference modules, named through our maps (each our name joins
    its diffusers and its CompVis name), with CompVis' conv-shaped VAE attention and the schedule's buffers."""
    ucfg, vcfg = unet_config(dict(unet.config), 77), vae_config(dict(vae.config))[0]
    theirs, compvis = unet.state_dict(), unet_names(ucfg, "compvis")
    state = {COMPVIS_PREFIXES["unet"] + compvis[k][0]: theirs[d[0]] for k, d in unet_names(ucfg, "diffusers").items()}
    theirs = vae.state_dict()
    for k, (c,) in vae_names(vcfg, "compvis").items():
        t = theirs[k]
        state["first_stage_model." + c] = t[:, :, None, None] if ".attn_1." in c and t.ndim == 2 else t
    for k, v in text.state_dict().items():
        state[COMPVIS_PREFIXES["text"] + k] = v
    state[COMPVIS_PREFIXES["text"] + "embeddings.position_ids"] = torch.arange(77)[None]
    schedule = NoiseSchedule(schedule_config(SCHEDULER)[0])
    state["betas"] = schedule.betas
    state["alphas_cumprod"] = schedule.alphas_cumprod
    for name in COMPVIS_DERIVED[1:]:
        state[name] = torch.zeros(1)
    return {k: v.contiguous() for k, v in state.items()}


@pytest.fixture(scope="module")
def sd_file(sd_folder, tmp_path_factory):
    folder, unet, vae, text = sd_folder
    path = tmp_path_factory.mktemp("compvis") / "tiny-sd-v1.safetensors"
    save_file(compvis_state(unet, vae, text), str(path))
    return path


def inputs(B=2, L=77, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, 4, 16, 16, generator=g), torch.tensor([10, 700]), torch.randn(B, L, 128, generator=g)


def assert_modules_equal(pipe, unet, vae, text):
    """Our U-Net, VAE decoder and text encoder inside `pipe` compute what diffusers' and transformers' do."""
    x, t, context = inputs()
    z = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(5))
    ids, _ = pipe.tokenizer(PROMPTS, max_length=77)
    with torch.no_grad():
        ours = pipe.model.unet(x, t, Conditioning(tokens=context))
        torch.testing.assert_close(ours, unet(x, t, context).sample, rtol=1e-4, atol=1e-5)
        assert ours.abs().max() > 0.1
        torch.testing.assert_close(pipe.vae.decode(z), vae.decode(z).sample, rtol=1e-4, atol=1e-5)
        tokens = pipe.model.encode_text(ids, torch.ones_like(ids, dtype=torch.bool)).tokens
        torch.testing.assert_close(tokens, text(ids).last_hidden_state, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- loading: diffusers folder and CompVis file

def test_folder_loads_equal_to_diffusers_modules(sd_folder):
    folder, unet, vae, text = sd_folder
    pipe = load_stable_diffusion(folder)
    assert (pipe.family, pipe.resolution, pipe.scale_factor) == ("ldm", 32, 0.18215)
    assert_modules_equal(pipe, unet, vae, text)


def test_tokenizer_folder_equals_clip_tokenizer(sd_folder, tmp_path):
    """vocab.json + merges.txt, and transformers' own tokenizer.json, give CLIPTokenizer's ids, padded with
    <|endoftext|> to 77 as Stable Diffusion pads."""
    from transformers import CLIPTokenizer

    folder = sd_folder[0] / "tokenizer"
    theirs = CLIPTokenizer.from_pretrained(folder)
    prompts = [*PROMPTS, "Hello,   World! it's 3 cats' toys"]
    expected = theirs(prompts, padding="max_length", max_length=77, return_tensors="pt").input_ids
    theirs.save_pretrained(tmp_path / "saved")  # transformers 5 writes tokenizer.json
    for path in (folder, tmp_path / "saved"):
        ids, mask = read_tokenizer(path)(prompts, max_length=77)
        assert torch.equal(ids, expected), path
        assert ids[0, -1] == 49407 and mask[0, :10].all() and not mask[0, 10:].any()


def test_whole_pipeline_equals_diffusers_stable_diffusion_pipeline(sd_folder):
    """The same seed through ours and diffusers' StableDiffusionPipeline (DDIM, guidance 7.5, the empty prompt as
    the unconditional one): the same latents, hence the same picture."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTokenizer

    folder, unet, vae, text = sd_folder
    theirs = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=CLIPTokenizer.from_pretrained(
        folder / "tokenizer"), unet=unet, scheduler=DDIMScheduler.from_pretrained(folder / "scheduler"),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    theirs.set_progress_bar_config(disable=True)
    ours = load_stable_diffusion(folder)
    settings = ours.settings_with(steps=4)
    assert (settings.guidance_scale, settings.steps_offset, settings.set_alpha_to_one) == (7.5, 1, False)
    image = ours(PROMPTS, settings, generator=torch.Generator().manual_seed(0), progress=False)
    expected = theirs(PROMPTS, num_inference_steps=4, guidance_scale=7.5, output_type="pt",
                      generator=torch.Generator().manual_seed(0)).images
    assert image.shape == expected.shape == (2, 3, 32, 32)
    assert image.std() > 0.05
    torch.testing.assert_close((image / 2 + 0.5).clamp(0, 1), expected, rtol=1e-4, atol=2e-4)


def test_null_condition_is_clips_empty_prompt(sd_folder):
    folder, _, _, text = sd_folder
    pipe = load_stable_diffusion(folder)
    ids = torch.tensor([[49406, 49407] + [49407] * 75])
    with torch.no_grad():
        torch.testing.assert_close(pipe.model.unet.null_context, text(ids).last_hidden_state[0])
    assert pipe.model.unet.null_context.shape == (77, 128)


def test_compvis_names_are_diffusers_converters(sd_folder):
    """Our CompVis map, read back by diffusers' own single-file converter (convert_ldm_*_checkpoint), gives
    diffusers' state dicts exactly: the map is the inverse of the reference conversion."""
    from diffusers.loaders.single_file_utils import (convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint,
                                                      convert_ldm_vae_checkpoint)

    _, unet, vae, text = sd_folder
    state = compvis_state(unet, vae, text)
    for converted, module in [(convert_ldm_unet_checkpoint(state, dict(unet.config)), unet),
                              (convert_ldm_vae_checkpoint(state, dict(vae.config)), vae),
                              (convert_ldm_clip_checkpoint(state), text)]:
        expected = module.state_dict()
        converted = {k.removeprefix("text_model."): v for k, v in converted.items() if not k.endswith("position_ids")}
        assert set(converted) == set(expected)
        for k, v in expected.items():
            assert torch.equal(converted[k], v), k


def test_single_file_loads_equal_to_diffusers_modules(sd_folder, sd_file, tmp_path):
    _, unet, vae, text = sd_folder
    tokenizer = sd_folder[0] / "tokenizer"
    pipe = load_stable_diffusion(sd_file, tokenizer=tokenizer)
    assert_modules_equal(pipe, unet, vae, text)
    assert pipe.model_cfg.unet.num_heads == 8 and pipe.settings.steps_offset == 1
    # the same as a .ckpt (torch.save of {"state_dict": ...}), read with torch.load(weights_only=True)
    ckpt = tmp_path / "tiny.ckpt"
    torch.save({"state_dict": load_file(sd_file), "global_step": 0}, ckpt)
    assert_modules_equal(load_stable_diffusion(ckpt, tokenizer=tokenizer), unet, vae, text)


def test_single_file_ema_weights_are_used_unless_no_ema(sd_folder, sd_file, tmp_path):
    """LDM keeps an EMA copy of the U-Net as model_ema.<name without dots>: it is the one loaded by default."""
    _, unet, vae, text = sd_folder
    state = load_file(sd_file)
    ema = {"model_ema." + k[len("model."):].replace(".", ""): v + 0.01 for k, v in state.items()
           if k.startswith(COMPVIS_PREFIXES["unet"])}
    path = tmp_path / "with_ema.safetensors"
    save_file({**state, **ema, "model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(7)},
              str(path))
    tokenizer = sd_folder[0] / "tokenizer"
    raw = load_stable_diffusion(path, tokenizer=tokenizer, use_ema=False)
    assert_modules_equal(raw, unet, vae, text)
    with_ema = load_stable_diffusion(path, tokenizer=tokenizer)
    torch.testing.assert_close(with_ema.model.unet.conv_in.weight, raw.model.unet.conv_in.weight + 0.01)


# ---------------------------------------------------------------- full size, on the meta device

def test_full_size_sd_v1_maps_every_key_with_its_shape():
    """UNet2DConditionModel, AutoencoderKL and CLIPTextModel with SD v1's published configs, built on the meta
    device (no memory): our maps name every one of their keys once, with the shape of our parameter (a 1x1 conv
    for a Linear where SD v1 has one); the CompVis names, run through diffusers' converter, give diffusers' keys
    and shapes."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModel

    from models.stable_diffusion import shapes
    from models.weight_names import gather

    with torch.device("meta"):
        unet, vae = UNet2DConditionModel(**SD_V1_UNET), AutoencoderKL(**SD_V1_VAE)
        text = CLIPTextModel(CLIPTextConfig(**SD_V1_TEXT))
    ucfg, tcfg = unet_config(dict(unet.config), 77), text_config(text.config.to_dict())
    vcfg = vae_config(dict(vae.config))[0]
    assert (ucfg.channels, ucfg.channel_mult, ucfg.attention_resolutions, ucfg.num_heads) == (320, (1, 2, 4, 4),
                                                                                                (64, 32, 16), 8)
    coverage = {}
    for what, theirs, names, ours in [("unet", unet, unet_names(ucfg, "diffusers"), shapes("unet", ucfg)),
                                      ("vae", vae, vae_names(vcfg, "diffusers"), shapes("vae", vcfg)),
                                      ("text", text, clip_text_names(tcfg), shapes("text", tcfg))]:
        state = theirs.state_dict()
        mapped, used = gather(state.__getitem__, names, ours, what)  # raises on a missing key or a wrong shape
        assert used == set(state), f"{what}: not mapped {sorted(set(state) - used)[:3]}"
        assert set(mapped) == set(ours) - {"null_context"}
        coverage[what] = (len(state), len(mapped))
    assert coverage == {"unet": (686, 686), "vae": (248, 248), "text": (196, 148)}  # text: q, k, v -> in_proj
    assert sum(s.numel() for s in shapes("unet", ucfg).values()) - 77 * 768 == 859_520_964  # SD v1's U-Net

    # CompVis: our names, filled with diffusers' shapes (VAE attention as 1x1 convs), back through diffusers
    theirs, names = unet.state_dict(), unet_names(ucfg, "compvis")
    compvis = {"model.diffusion_model." + names[k][0]: theirs[d[0]] for k, d in unet_names(ucfg, "diffusers").items()}
    theirs = vae.state_dict()
    compvis.update({"first_stage_model." + c: theirs[k] for k, (c,) in vae_names(vcfg, "compvis").items()})
    for converted, module in [(convert_ldm_unet_checkpoint(compvis, dict(unet.config)), unet),
                              (convert_ldm_vae_checkpoint(compvis, dict(vae.config)), vae)]:
        assert {k: v.shape for k, v in converted.items()} == {k: v.shape for k, v in module.state_dict().items()}
    # names of the published v1-5-pruned-emaonly file that diffusers' converter accepts either way (it looks for an
    # Upsample at .1.conv and at .2.conv) or uses to tell SD versions apart
    assert set(PUBLISHED_COMPVIS_KEYS) <= set(compvis)


def test_compvis_configs_are_read_from_the_shapes(sd_file):
    from models.stable_diffusion import TensorFile, compvis_configs

    text_cfg, unet_cfg, vae_cfg = compvis_configs(TensorFile(sd_file))
    assert (text_cfg.width, text_cfg.layers, text_cfg.heads, text_cfg.max_length) == (128, 2, 128 // CLIP_HEAD_WIDTH, 77)
    assert (unet_cfg.channels, unet_cfg.channel_mult, unet_cfg.num_res_blocks) == (32, (1, 1, 2, 2), 2)
    assert unet_cfg.attention_resolutions == (64, 32, 16) and not unet_cfg.use_scale_shift_norm
    assert (vae_cfg.channels, vae_cfg.channel_mult, vae_cfg.num_res_blocks, vae_cfg.mid_attention) == (32, (1, 2), 1,
                                                                                                        True)


# ---------------------------------------------------------------- the commands: sample and convert

def test_sample_with_weights_equals_the_converted_checkpoint(sd_folder, tmp_path, capsys):
    """python -m sample --pipeline ldm --weights FOLDER, and the same after python -m models.convert --to ours
    (our diffusion.pt + vae.pt, through --ckpt): the same pictures. --dtype bfloat16 stays close to float32."""
    import models.convert as convert_cli

    folder = sd_folder[0]
    flags = ["--prompt", PROMPTS[1], "--n", "1", "--steps", "3", "--seed", "4"]
    sample_cli.main(["--pipeline", "ldm", "--weights", str(folder), *flags, "--out", str(tmp_path / "a.png")])
    convert_cli.main(["--pipeline", "ldm", "--weights", str(folder), "--to", "ours", "--out", str(tmp_path / "sd")])
    assert load_checkpoint(tmp_path / "sd" / "diffusion.pt", "diffusion")["config"]["padding"] == "attended"
    sample_cli.main(["--ckpt", str(tmp_path / "sd" / "diffusion.pt"), *flags, "--out", str(tmp_path / "b.png")])
    a, b = (torch.tensor(list(__import__("PIL.Image").Image.open(tmp_path / f"{n}.png").getdata())) for n in "ab")
    assert torch.equal(a, b) and a.float().std() > 5
    # float16 files: half the size, the same pictures after rounding
    convert_cli.main(["--pipeline", "ldm", "--weights", str(folder), "--to", "ours", "--dtype", "float16",
                      "--out", str(tmp_path / "sd16")])
    assert (tmp_path / "sd16" / "diffusion.pt").stat().st_size < 0.6 * (tmp_path / "sd" / "diffusion.pt").stat().st_size
    capsys.readouterr()


def test_bfloat16_is_close_to_float32(sd_folder):
    folder = sd_folder[0]
    full = load_stable_diffusion(folder)
    half = load_stable_diffusion(folder, dtype=torch.bfloat16)
    assert next(half.model.parameters()).dtype == torch.bfloat16
    settings = full.settings_with(steps=3)
    a = full(PROMPTS[:1], settings, generator=torch.Generator().manual_seed(0), progress=False)
    b = half(PROMPTS[:1], settings, generator=torch.Generator().manual_seed(0), progress=False)
    assert b.dtype == torch.float32
    assert 0 < (a - b).norm() / a.norm() < 0.1


def test_export_round_trip_sd_folder(sd_folder, tmp_path):
    """SD folder -> ours -> diffusers folder (python -m models.convert --to diffusers): every tensor back under its
    name (1x1-conv projections as the Linear of use_linear_projection=True), and diffusers loads every part."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    folder, unet, vae, text = sd_folder
    notes = export_diffusers(load_stable_diffusion(folder), tmp_path / "out")
    assert notes == []
    for part, module in [("unet", unet), ("vae", vae)]:
        written = load_file(tmp_path / "out" / part / "diffusion_pytorch_model.safetensors")
        expected = module.state_dict()
        assert set(written) == set(expected)
        for k, v in expected.items():
            assert torch.equal(written[k], v.reshape(written[k].shape)), k
    written = load_file(tmp_path / "out" / "text_encoder" / "model.safetensors")
    assert {k.removeprefix("text_model."): v.shape for k, v in written.items()} == \
        {k: v.shape for k, v in text.state_dict().items()}
    UNet2DConditionModel.from_pretrained(tmp_path / "out" / "unet")
    AutoencoderKL.from_pretrained(tmp_path / "out" / "vae")
    DDIMScheduler.from_pretrained(tmp_path / "out" / "scheduler")
    assert_modules_equal(load_stable_diffusion(tmp_path / "out"), unet, vae,
                         CLIPTextModel.from_pretrained(tmp_path / "out" / "text_encoder").eval())
    ids = CLIPTokenizer.from_pretrained(tmp_path / "out" / "tokenizer")(PROMPTS, padding="max_length",
                                                                       max_length=77, return_tensors="pt").input_ids
    assert torch.equal(ids, load_stable_diffusion(folder).tokenizer(PROMPTS, max_length=77)[0])


def tiny_trained_pipeline(text_encoder):
    """A Text2Image the way train/diffusion.py builds one (our own tokenizer, a masked-padding U-Net with a learned
    null token, scale-shift norm, a linear schedule), randomised: what a student exports."""
    from models.samplers import SamplerConfig
    from models.schedule import ScheduleConfig
    from models.text2image import ModelConfig, Text2Image, build_model
    from models.text_encoder import TextEncoderConfig
    from models.unet import UNetConfig
    from models.vae import AutoencoderKL, VAEConfig

    tokenizer = BPETokenizer.train(["a red circle", "a blue square left of a green triangle"] * 20, 300, progress=False)
    text = TextEncoderConfig(vocab_size=tokenizer.vocab_size, max_length=12, width=32, layers=2, heads=2, causal=True)
    unet = UNetConfig(image_size=8, in_channels=4, out_channels=4, channels=16, channel_mult=(1, 2),
                      attention_resolutions=(4,), num_heads=2, context_dim=32, norm_groups=8)
    cfg = ModelConfig(text=text, unet=unet, schedule=ScheduleConfig(beta_schedule="cosine"))
    model = build_model(cfg, tokenizer.vocab_size)
    if text_encoder == "clip":
        from models.text2image import TextConditionedUNet
        model = TextConditionedUNet(text, unet, "clip:x")
        cfg.text_encoder = "clip:x"
    torch.manual_seed(0)
    vae = AutoencoderKL(VAEConfig(channels=16, channel_mult=(1, 2), num_res_blocks=1, norm_groups=8))
    for module in (model, vae):
        randomize(module, 4).requires_grad_(False)
    return Text2Image(model, tokenizer, NoiseSchedule(cfg.schedule), cfg, SamplerConfig(num_inference_steps=4), {},
                      vae, 0.7)


@pytest.mark.parametrize("text_encoder", ["joint", "clip"])
def test_export_of_a_model_trained_here_gives_diffusers_our_outputs(text_encoder, tmp_path):
    """ours -> diffusers folder -> UNet2DConditionModel (with the padding mask as encoder_attention_mask, and the
    exported null condition as the unconditional tokens), AutoencoderKL, CLIPTextModel (a causal joint encoder as
    hidden_act=gelu, a CLIP tower as quick_gelu) and DDIMScheduler give our outputs."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

    pipe = tiny_trained_pipeline(text_encoder)
    notes = export_diffusers(pipe, tmp_path)
    assert any("tokenizer" in n for n in notes) and any("encoder_attention_mask" in n for n in notes)
    unet = UNet2DConditionModel.from_pretrained(tmp_path / "unet").eval()
    vae = AutoencoderKL.from_pretrained(tmp_path / "vae").eval()
    text = CLIPTextModel.from_pretrained(tmp_path / "text_encoder").eval()
    null = load_file(tmp_path / "null_context.safetensors")["null_context"]
    ids, mask = pipe.tokenizer(["a red circle", "a blue square left of a green triangle"], max_length=12)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([3, 900])
    with torch.no_grad():
        cond = pipe.model.encode_text(ids, mask)
        real = cond.tokens[mask]  # padding outputs differ by design (ours never attends to padding keys)
        torch.testing.assert_close(real, text(ids, attention_mask=mask.long()).last_hidden_state[mask],
                                   rtol=1e-4, atol=1e-5)
        ours = pipe.model.unet(x, t, cond)
        torch.testing.assert_close(ours, unet(x, t, cond.tokens, encoder_attention_mask=mask).sample,
                                   rtol=1e-4, atol=1e-5)
        dropped = pipe.model.unet(x, t, Conditioning(tokens=cond.tokens, drop=torch.ones(2, dtype=torch.bool)))
        torch.testing.assert_close(dropped, unet(x, t, null.expand(2, 12, 32)).sample, rtol=1e-4, atol=1e-5)
        z = torch.randn(2, 4, 4, 4)
        torch.testing.assert_close(pipe.vae.decode(z), vae.decode(z).sample, rtol=1e-4, atol=1e-5)
    scheduler = DDIMScheduler.from_pretrained(tmp_path / "scheduler")
    torch.testing.assert_close(scheduler.alphas_cumprod, pipe.schedule.alphas_cumprod)


def test_exported_scheduler_keeps_a_shifted_schedule_and_refuses_edm(tmp_path):
    """simple diffusion's log-SNR shift (the Imagen base's) goes to diffusers as its betas; an EDM-preconditioned
    model has no diffusers prediction_type and is refused before anything is written."""
    from dataclasses import replace

    from diffusers import DDIMScheduler
    from models.diffusers_export import diffusers_scheduler_config
    from models.samplers import SamplerConfig
    from models.schedule import ScheduleConfig

    shifted = ScheduleConfig(beta_schedule="cosine", prediction_type="sample", log_snr_shift=-1.386)
    config = diffusers_scheduler_config(shifted, SamplerConfig())
    (tmp_path / "scheduler_config.json").write_text(json.dumps(config))
    scheduler = DDIMScheduler.from_pretrained(tmp_path)
    torch.testing.assert_close(scheduler.alphas_cumprod, NoiseSchedule(shifted).alphas_cumprod, rtol=1e-5, atol=1e-7)
    pipe = tiny_trained_pipeline("joint")
    pipe.model_cfg.schedule = replace(pipe.model_cfg.schedule, prediction_type="edm")
    with pytest.raises(ValueError, match="prediction_type edm has no diffusers scheduler"):
        export_diffusers(pipe, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- bad input: one line, exit 2

def sample_error(argv, capsys):
    return cli_error(sample_cli.main, ["--prompt", "a cat", *argv], capsys)


def test_folder_missing_a_component(sd_folder, tmp_path, capsys):
    import shutil
    shutil.copytree(sd_folder[0], tmp_path / "sd", ignore=shutil.ignore_patterns("scheduler"))
    err = sample_error(["--pipeline", "ldm", "--weights", str(tmp_path / "sd")], capsys)
    assert "missing scheduler/" in err


def test_sd2_and_sdxl_folders_are_refused_naming_what_was_found(sd_folder, tmp_path, capsys):
    import shutil
    v2 = tmp_path / "sd2"
    shutil.copytree(sd_folder[0], v2)
    config = json.loads((v2 / "text_encoder/config.json").read_text())
    (v2 / "text_encoder/config.json").write_text(json.dumps({**config, "hidden_act": "gelu", "hidden_size": 1024}))
    config = json.loads((v2 / "unet/config.json").read_text())
    (v2 / "unet/config.json").write_text(json.dumps({**config, "attention_head_dim": [5, 10, 20, 20],
                                                     "cross_attention_dim": 1024}))
    err = sample_error(["--pipeline", "ldm", "--weights", str(v2)], capsys)
    assert "Stable Diffusion 2.x" in err and "hidden_act='gelu'" in err and "only Stable Diffusion v1" in err
    xl = tmp_path / "sdxl"
    xl.mkdir()
    (xl / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline",
                                                     "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"]}))
    err = sample_error(["--pipeline", "ldm", "--weights", str(xl)], capsys)
    assert "Stable Diffusion XL" in err and "StableDiffusionXLPipeline" in err


@pytest.mark.parametrize("keys, message", [
    ({"conditioner.embedders.1.model.positional_embedding": (77, 1280)}, "Stable Diffusion XL"),
    ({"cond_stage_model.model.token_embedding.weight": (49408, 1024),
      "model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3)}, "Stable Diffusion 2.x"),
    ({"encoder.layers.0.weight": (2, 2), "decoder.bias": (2,)}, "match no known layout.*encoder.layers.0.weight"),
])
def test_other_single_files_are_refused(keys, message, tmp_path, capsys):
    path = tmp_path / "other.safetensors"
    save_file({k: torch.zeros(s) for k, s in keys.items()}, str(path))
    with pytest.raises(ValueError, match=message):
        read_published(path)


def test_truncated_and_pickled_files_are_one_line_errors(sd_file, tmp_path, capsys):
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(sd_file.read_bytes()[:100_000])
    err = sample_error(["--pipeline", "ldm", "--weights", str(truncated)], capsys)
    assert "truncated or damaged" in err
    pickled = tmp_path / "lightning.ckpt"
    torch.save({"state_dict": {"betas": torch.zeros(3)}, "callbacks": __import__("argparse").Namespace(a=1)}, pickled)
    err = sample_error(["--pipeline", "ldm", "--weights", str(pickled)], capsys)
    assert "pickle code execution" in err and "argparse.Namespace" in err and "save_file" in err


def test_unused_and_missing_keys_are_listed(sd_file, tmp_path):
    state = load_file(sd_file)
    extra = tmp_path / "extra.safetensors"
    save_file({**state, "model.diffusion_model.lora_up.weight": torch.zeros(2)}, str(extra))
    with pytest.raises(ValueError, match="1 key.* not use: model.diffusion_model.lora_up.weight"):
        read_published(extra, tokenizer=ROOT / "missing-is-fine-here")
    missing = tmp_path / "missing.safetensors"
    name = "first_stage_model.decoder.conv_out.bias"
    save_file({k: v for k, v in state.items() if k != name}, str(missing))
    with pytest.raises(ValueError, match=f"1 missing \\({name}\\)"):
        read_published(missing)


def test_flags_that_do_not_go_with_weights(sd_folder, capsys):
    assert "without --ckpt" in sample_error(["--pipeline", "ldm", "--weights", "x", "--ckpt", "y"], capsys)
    assert "--tokenizer is the vocabulary" in sample_error(["--ckpt", "y", "--tokenizer", "v"], capsys)
    err = sample_error(["--pipeline", "ldm", "--weights", str(sd_folder[0] / "nothing.safetensors")], capsys)
    assert "no Stable Diffusion weights" in err


def test_convert_refusals(sd_folder, tmp_path, capsys):
    import models.convert as convert_cli

    err = cli_error(convert_cli.main, ["--ckpt", "x.pt", "--to", "ours", "--out", str(tmp_path / "o")], capsys)
    assert "--to ours converts published weights" in err
    err = cli_error(convert_cli.main, ["--pipeline", "ldm", "--weights", str(sd_folder[0]), "--to", "ours", "--out",
                                       str(tmp_path)], capsys)
    assert "already exists" in err


def test_vae_saved_before_diffusers_0_14_loads(sd_folder, tmp_path):
    """Older SD v1 folders name the VAE's attention query / key / value / proj_attn (diffusers < 0.14)."""
    import shutil

    folder, unet, vae, text = sd_folder
    shutil.copytree(folder, tmp_path / "sd")
    path = tmp_path / "sd" / "vae" / "diffusion_pytorch_model.safetensors"
    legacy = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    state = {}
    for k, v in load_file(path).items():
        for new, old in legacy.items():
            k = k.replace(f".attentions.0.{new}.", f".attentions.0.{old}.")
        state[k] = v
    assert "decoder.mid_block.attentions.0.proj_attn.weight" in state
    save_file(state, str(path))
    assert_modules_equal(load_stable_diffusion(tmp_path / "sd"), unet, vae, text)
