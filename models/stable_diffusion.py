"""Stable Diffusion v1's published weights in our modules, and our models out in diffusers' folder format.

Paper: Rombach et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion Models", arXiv 2112.10752; the
released v1.x weights (CompVis, RunwayML): CLIP ViT-L/14's text tower (12 layers, 768 wide, 77 tokens), a
cross-attention U-Net on 4 x 64 x 64 latents (320 channels, 8 heads, attention at 64, 32 and 16), the f = 8 VAE
(latent scale 0.18215), DDPM's scaled-linear betas 0.00085 -> 0.012 over 1000 steps, epsilon prediction.

    load_stable_diffusion(PATH)      a diffusers folder (unet/, vae/, text_encoder/, tokenizer/, scheduler/) or a
                                     single CompVis file (.safetensors / .ckpt) -> Text2Image (models/text2image.py)
    write_checkpoints(pipe, DIR)     -> DIR/diffusion.pt + DIR/vae.pt, our checkpoint format (python -m sample --ckpt)
The other direction, any model of ours out as a diffusers folder, is models/diffusers_export.py.

The configs come from the files (diffusers' config.json files; in a CompVis file, from the tensors' shapes, with
the values of SD v1's v1-inference.yaml for what shapes do not tell: 8 heads, 32 groups, CLIP's 64-wide heads, the
latent scale). Weights go through the name maps of models/weight_names.py; every key of a file is read or
explained, tensors are read with safetensors or torch.load(weights_only=True), nothing is executed.

Two choices of Stable Diffusion differ from the models trained here (models/text2image.py ModelConfig.padding, the
U-Net's null_length): prompts are padded with <|endoftext|> to 77 tokens and every position, padding included, is
read by CLIP and attended by the U-Net; and the condition that guidance pushes away from is not a learned null
token but CLIP's output for the empty prompt (77 x 768), which this loader computes once and stores as the U-Net's
null_context. With both, our pipeline computes what diffusers' StableDiffusionPipeline computes (with
DDIMScheduler: same noise in, same picture out).

Memory (fp32, 512 x 512, docs/results.md): the weights are 4.3 GB (U-Net 860M parameters, text 123M, VAE 84M);
models are built on the meta device and the file's tensors assigned, so loading holds one copy. dtype=float16 or
bfloat16 halves that (on a GPU; the CPU's float16 convolutions are slow). Attention runs through
F.scaled_dot_product_attention, whose fused kernels never hold the 4096 x 4096 attention matrix of the 64 x 64
level: that is the "attention slicing" a 16 GB machine needs, done by the kernel.
"""
import importlib.util
import json
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from core.config import config_to_dict
from models.clip import CLIP, CLIPConfig
from models.samplers import SamplerConfig
from models.schedule import NoiseSchedule, ScheduleConfig
from models.text2image import ModelConfig, Text2Image, TextConditionedUNet, vae_fingerprint
from models.text_encoder import TextEncoderConfig
from models.tokenizer import END_TOKEN, BPETokenizer, TokenizerConfig
from models.unet import UNet, UNetConfig
from models.vae import AutoencoderKL, VAEConfig
from models.weight_names import check_all_used, clip_text_names, gather, unet_names, vae_names

# SD v1's values that a CompVis file's tensors do not tell (configs/stable-diffusion/v1-inference.yaml)
SD_V1_HEADS = 8            # U-Net attention heads at every level (head width 40, 80, 160)
SD_V1_GROUPS = 32          # GroupNorm groups (LDM's normalization() and Normalize() hard-code 32)
SD_V1_SCALE_FACTOR = 0.18215  # latent scale (LDM Sec. 4.3.2: 1 / std of the VAE's latents)
SD_V1_LATENT_SIZE = 64     # 512 px / f = 8
CLIP_HEAD_WIDTH = 64       # OpenAI's text towers have width / 64 heads (ViT-L/14's: 768 / 64 = 12)
SD_V1_SAMPLER = SamplerConfig(sampler="ddim", num_inference_steps=50, guidance_scale=7.5, steps_offset=1,
                              set_alpha_to_one=False)  # diffusers' StableDiffusionPipeline defaults, DDIM
DATA = {"dataset": "laion (Stable Diffusion v1's training data, not here)"}  # + resolution
COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
COMPVIS_PREFIXES = {"unet": "model.diffusion_model.", "vae": "first_stage_model.",
                    "text": "cond_stage_model.transformer.text_model."}
# A CompVis file's keys that no module reads: LatentDiffusion's schedule buffers (functions of `betas`, recomputed
# by models/schedule.py) and the EMA bookkeeping.
COMPVIS_DERIVED = ("alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
                   "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
                   "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1",
                   "posterior_mean_coef2", "model_ema.decay", "model_ema.num_updates")
POSITION_IDS = "embeddings.position_ids"  # transformers < 4.31 saved this buffer (0 .. 76), not a weight


# ---------------------------------------------------------------- reading files

class TensorFile:
    """The tensors of one weights file, read one at a time as `dtype`: .safetensors with safetensors,
    anything else with torch.load(weights_only=True) (a CompVis .ckpt keeps them under "state_dict")."""

    def __init__(self, path, dtype=torch.float32):
        self.path, self.dtype = Path(path), dtype
        if not self.path.is_file():
            raise FileNotFoundError(f"weights file not found: {self.path}")
        if self.path.suffix == ".safetensors":
            try:
                self.handle = safe_open(str(self.path), framework="pt")
            except SafetensorError as e:
                raise ValueError(f"cannot read {self.path} as safetensors ({e}); the file is truncated or damaged: "
                                 f"download it again") from None
            self.keys = list(self.handle.keys())
            self.key_set = set(self.keys)
            return
        try:
            data = torch.load(self.path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # UnpicklingError for code in the pickle, RuntimeError for a damaged zip
            if "Weights only load failed" in str(e):
                found = ", ".join(sorted(set(re.findall(r"GLOBAL ([\w.]+)", str(e))))) or "Python objects"
                raise ValueError(
                    f"{self.path} needs pickle code execution to load (it stores {found}); we never run it. Use the "
                    f".safetensors release of these weights, or, if you trust the file, convert it once: python -c "
                    f"\"import torch, safetensors.torch as s; d = torch.load('{self.path}', weights_only=False); "
                    f"d = d.get('state_dict', d); s.save_file({{k: v.contiguous() for k, v in d.items() if "
                    f"isinstance(v, torch.Tensor)}}, '{self.path.with_suffix('.safetensors')}')\"") from None
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise ValueError(f"cannot read {self.path} ({first[:120]}); it is truncated or not a weights file") from None
        if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
            data = data["state_dict"]
        if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
            raise ValueError(f"{self.path} holds no state dict of tensors; pass a model's weights file")
        self.handle, self.tensors, self.keys = None, data, list(data)

    def __call__(self, name):
        """The tensor stored as `name` (KeyError when absent), floating point ones cast to dtype."""
        if self.handle is not None:
            if name not in self.key_set:
                raise KeyError(name)
            tensor = self.handle.get_tensor(name)
        else:
            tensor = self.tensors[name]
        return tensor.to(self.dtype) if tensor.is_floating_point() else tensor

    def shape(self, name):
        if self.handle is not None:
            return tuple(self.handle.get_slice(name).get_shape())
        return tuple(self.tensors[name].shape)


def read_json(path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {path} ({e}); the folder is incomplete or damaged") from None


def weights_file(folder, stems):
    """The first of <stem>.safetensors, <stem>.bin (and their .fp16 variants) that exists in folder."""
    for name in [f"{s}{v}.{ext}" for v in ("", ".fp16") for ext in ("safetensors", "bin") for s in stems]:
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(f"no weights file in {folder}/ (looked for {stems[0]}.safetensors and .bin)")


def read_tokenizer(path):
    """CLIP's tokenizer, padding with <|endoftext|> as Stable Diffusion's does, from a tokenizer/ folder
    (vocab.json + merges.txt, or transformers' tokenizer.json) or OpenAI's bpe_simple_vocab_16e6.txt.gz."""
    path = Path(path)
    if path.is_file():  # OpenAI's merge list: the same vocabulary and merges, padded here as SD pads
        state = BPETokenizer.from_clip_vocab(path).state_dict()
        return BPETokenizer.from_state_dict({**state, "pad_id": state["end_id"]})
    settings = {**read_json(path / "tokenizer_config.json")} if (path / "tokenizer_config.json").is_file() else {}
    if (path / "special_tokens_map.json").is_file():
        settings.update(read_json(path / "special_tokens_map.json"))
    pad = settings.get("pad_token", END_TOKEN)
    pad = pad["content"] if isinstance(pad, dict) else pad
    if (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
        vocab = read_json(path / "vocab.json")
        lines = (path / "merges.txt").read_text(encoding="utf-8").splitlines()
        merges = [tuple(line.split()) for line in lines if line and not line.startswith("#version")]
    elif (path / "tokenizer.json").is_file():
        model = read_json(path / "tokenizer.json")["model"]
        vocab = model["vocab"]
        merges = [tuple(m.split() if isinstance(m, str) else m) for m in model["merges"]]
    else:
        raise FileNotFoundError(f"{path}/ has no vocab.json + merges.txt nor tokenizer.json; it is not a CLIP tokenizer")
    return BPETokenizer.from_clip_files(vocab, merges, pad_token=pad)


def bundled_clip_vocab():
    """OpenAI's CLIP merge list shipped inside an installed open_clip or clip package (found without importing
    it), or None."""
    for package in ("open_clip", "clip"):
        spec = importlib.util.find_spec(package)
        for folder in (spec.submodule_search_locations or []) if spec else []:
            if (Path(folder) / "bpe_simple_vocab_16e6.txt.gz").is_file():
                return Path(folder) / "bpe_simple_vocab_16e6.txt.gz"
    return None


# ---------------------------------------------------------------- configs: diffusers' and transformers' -> ours

def single(value):
    """diffusers writes some per-level settings as lists; one value repeated is that value."""
    if isinstance(value, list) and len(set(map(str, value))) == 1:
        return value[0]
    return value


# What our U-Net computes, as UNet2DConditionModel's config states it (a key absent from a config has this default)
UNET_FIXED = {"act_fn": "silu", "norm_eps": 1e-5, "flip_sin_to_cos": True, "freq_shift": 0, "center_input_sample": False,
              "downsample_padding": 1, "mid_block_scale_factor": 1, "class_embed_type": None,
              "addition_embed_type": None, "time_embedding_type": "positional", "encoder_hid_dim": None,
              "mid_block_type": "UNetMidBlock2DCrossAttn", "only_cross_attention": False,
              "dual_cross_attention": False, "conv_in_kernel": 3, "conv_out_kernel": 3, "num_class_embeds": None,
              "time_cond_proj_dim": None, "resnet_skip_time_act": False, "resnet_out_scale_factor": 1.0,
              "timestep_post_act": None, "time_embedding_dim": None, "cross_attention_norm": None,
              "class_embeddings_concat": False, "attention_type": "default"}


def refuse_unless_v1(where, unet=None, text=None, index=None):
    """A ValueError naming what was found when a folder is Stable Diffusion 2.x or SDXL, not v1."""
    index, unet, text = index or {}, unet or {}, text or {}
    if "text_encoder_2" in index or "XL" in str(index.get("_class_name", "")) or unet.get("addition_embed_type"):
        raise ValueError(f"{where} is Stable Diffusion XL ({index.get('_class_name', 'addition_embed_type=')}"
                         f"{unet.get('addition_embed_type') or ''}, two text encoders); only Stable Diffusion v1 is "
                         f"supported")
    heads = unet.get("attention_head_dim")
    if text.get("hidden_act", "quick_gelu") != "quick_gelu" or isinstance(single(heads), list) or \
            unet.get("cross_attention_dim") == 1024:
        raise ValueError(f"{where} is Stable Diffusion 2.x (text encoder hidden_act={text.get('hidden_act')!r} width "
                         f"{text.get('hidden_size')}, U-Net attention_head_dim={heads}, cross_attention_dim="
                         f"{unet.get('cross_attention_dim')}); only Stable Diffusion v1 (CLIP ViT-L/14, 8 heads, "
                         f"768-wide context) is supported")


def unet_config(c, null_length):
    """UNet2DConditionModel's config.json -> UNetConfig; a setting our U-Net does not have is a ValueError."""
    for key, wanted in UNET_FIXED.items():
        if key in c and single(c[key]) != wanted:
            raise ValueError(f"unet/config.json has {key}={c[key]!r}; our U-Net computes {key}={wanted!r} only")
    widths, down, up = c["block_out_channels"], c["down_block_types"], c["up_block_types"]
    cross = [kind == "CrossAttnDownBlock2D" for kind in down]
    if [kind == "CrossAttnUpBlock2D" for kind in up] != cross[::-1] or \
            {*down, *up} - {"CrossAttnDownBlock2D", "DownBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"}:
        raise ValueError(f"unet/config.json's blocks {down} / {up} are not SD v1's (cross-attention down and up at "
                         f"the same levels)")
    size = c.get("sample_size", SD_V1_LATENT_SIZE)
    heads = c.get("num_attention_heads") or single(c.get("attention_head_dim", 8))  # diffusers' old name for heads
    return UNetConfig(image_size=size, in_channels=c.get("in_channels", 4), out_channels=c.get("out_channels", 4),
                      channels=widths[0], channel_mult=tuple(w // widths[0] for w in widths),
                      num_res_blocks=single(c.get("layers_per_block", 2)),
                      attention_resolutions=tuple(size // 2**i for i, a in enumerate(cross) if a), num_heads=heads,
                      transformer_depth=single(c.get("transformer_layers_per_block", 1)),
                      context_dim=c["cross_attention_dim"], norm_groups=c.get("norm_num_groups", 32),
                      use_scale_shift_norm=c.get("resnet_time_scale_shift", "default") == "scale_shift",
                      null_length=null_length)


def text_config(c):
    """CLIPTextModel's config.json -> our TextEncoderConfig for CLIP's text tower (QuickGELU, 4x MLP)."""
    if c.get("intermediate_size") != 4 * c["hidden_size"] or c.get("layer_norm_eps", 1e-5) != 1e-5:
        raise ValueError(f"text_encoder/config.json has intermediate_size={c.get('intermediate_size')} and "
                         f"layer_norm_eps={c.get('layer_norm_eps')}; CLIP's text tower has 4 x hidden_size and 1e-5")
    return TextEncoderConfig(vocab_size=c["vocab_size"], max_length=c["max_position_embeddings"], width=c["hidden_size"],
                             layers=c["num_hidden_layers"], heads=c["num_attention_heads"], causal=True)


def vae_config(c):
    """AutoencoderKL's config.json -> (VAEConfig, latent scale factor)."""
    if c.get("shift_factor") is not None or c.get("use_post_quant_conv", True) != c.get("use_quant_conv", True) or \
            set(c.get("down_block_types", [])) != {"DownEncoderBlock2D"} or c.get("act_fn", "silu") != "silu":
        raise ValueError("vae/config.json is not SD v1's AutoencoderKL (shift_factor, quant convs, block types or "
                         "act_fn differ)")
    widths = c["block_out_channels"]
    return VAEConfig(in_channels=c.get("in_channels", 3), channels=widths[0],
                     channel_mult=tuple(w // widths[0] for w in widths), num_res_blocks=c.get("layers_per_block", 2),
                     latent_channels=c.get("latent_channels", 4), norm_groups=c.get("norm_num_groups", 32),
                     mid_attention=c.get("mid_block_add_attention", True), quant_conv=c.get("use_quant_conv", True)), \
        c.get("scaling_factor") or SD_V1_SCALE_FACTOR


def schedule_config(c):
    """scheduler_config.json (any of diffusers' DDPM-family schedulers) -> (ScheduleConfig, SamplerConfig)."""
    if c.get("trained_betas") is not None:
        raise ValueError("scheduler/scheduler_config.json lists trained_betas; SD v1's schedule is scaled_linear")
    schedule = ScheduleConfig(num_train_timesteps=c.get("num_train_timesteps", 1000),
                              beta_schedule={"squaredcos_cap_v2": "cosine"}.get(c.get("beta_schedule", "linear"),
                                                                                c.get("beta_schedule", "linear")),
                              beta_start=c.get("beta_start", 0.0001), beta_end=c.get("beta_end", 0.02),
                              prediction_type=c.get("prediction_type", "epsilon"),
                              rescale_betas_zero_snr=c.get("rescale_betas_zero_snr", False))
    sampler = SamplerConfig(sampler="ddim", num_inference_steps=SD_V1_SAMPLER.num_inference_steps,
                            guidance_scale=SD_V1_SAMPLER.guidance_scale,
                            timestep_spacing=c.get("timestep_spacing", "leading"), steps_offset=c.get("steps_offset", 0),
                            set_alpha_to_one=c.get("set_alpha_to_one", True))
    return schedule, sampler


# ---------------------------------------------------------------- the two layouts -> our parts

def read_published(path, tokenizer=None, use_ema=True, dtype=torch.float32):
    """A diffusers folder or a CompVis file -> dict(model_cfg, vae_cfg, scale_factor, sampler, tokenizer, text
    (state of CLIP's text tower), unet (U-Net state without null_context), vae (state))."""
    path = Path(path)
    if path.is_dir():
        return read_folder(path, dtype)
    if not path.exists():
        raise FileNotFoundError(f"no Stable Diffusion weights at {path}; pass a diffusers folder or a .safetensors / "
                                f".ckpt file")
    return read_single_file(path, tokenizer, use_ema, dtype)


def read_folder(folder, dtype):
    index = read_json(folder / "model_index.json") if (folder / "model_index.json").is_file() else {}
    refuse_unless_v1(folder, index=index)
    missing = [c + "/" for c in COMPONENTS if not (folder / c).is_dir()]
    if missing:
        raise ValueError(f"{folder} is missing {', '.join(missing)}; a Stable Diffusion folder has unet/, vae/, "
                         f"text_encoder/, tokenizer/ and scheduler/ (download the whole repository)")
    unet_json, text_json = read_json(folder / "unet/config.json"), read_json(folder / "text_encoder/config.json")
    refuse_unless_v1(folder, unet_json, text_json)
    text_cfg = text_config(text_json)
    unet_cfg = unet_config(unet_json, null_length=text_cfg.max_length)
    vae_cfg, scale_factor = vae_config(read_json(folder / "vae/config.json"))
    schedule, sampler = schedule_config(read_json(folder / "scheduler/scheduler_config.json"))

    unet_file = TensorFile(weights_file(folder / "unet", ["diffusion_pytorch_model"]), dtype)
    unet, used = gather(unet_file, unet_names(unet_cfg, "diffusers"), shapes("unet", unet_cfg), unet_file.path)
    check_all_used(unet_file.keys, used, unet_file.path)
    vae_file = TensorFile(weights_file(folder / "vae", ["diffusion_pytorch_model"]), dtype)
    legacy = "encoder.mid_block.attentions.0.query.weight" in vae_file.keys  # saved before diffusers 0.14
    vae, used = gather(vae_file, vae_names(vae_cfg, "diffusers", legacy), shapes("vae", vae_cfg), vae_file.path)
    check_all_used(vae_file.keys, used, vae_file.path)
    text_file = TensorFile(weights_file(folder / "text_encoder", ["model", "pytorch_model"]), dtype)
    prefix = "text_model." if any(k.startswith("text_model.") for k in text_file.keys) else ""
    names = {k: tuple(prefix + n for n in v) for k, v in clip_text_names(text_cfg).items()}
    text, used = gather(text_file, names, shapes("text", text_cfg), text_file.path)
    check_all_used(text_file.keys, used, text_file.path, explained=[prefix + POSITION_IDS])
    return dict(model_cfg=model_config(text_cfg, unet_cfg, schedule, f"clip:{folder}"), vae_cfg=vae_cfg,
                scale_factor=scale_factor, sampler=sampler, tokenizer=read_tokenizer(folder / "tokenizer"), text=text,
                unet=unet, vae=vae)


def read_single_file(path, tokenizer, use_ema, dtype):
    f = TensorFile(path, dtype)
    keys = f.keys
    if any(k.startswith("conditioner.embedders.") for k in keys):
        raise ValueError(f"{path} is Stable Diffusion XL (conditioner.embedders.*: two text encoders); only Stable "
                         f"Diffusion v1 is supported")
    if any(k.startswith("cond_stage_model.model.") for k in keys):
        raise ValueError(f"{path} is Stable Diffusion 2.x (cond_stage_model.model.*: OpenCLIP ViT-H/14's text "
                         f"encoder); only Stable Diffusion v1 (CLIP ViT-L/14) is supported")
    known = (*COMPVIS_PREFIXES.values(), "model_ema.", "betas", *COMPVIS_DERIVED)
    if not all(any(k.startswith(p) for k in keys) for p in COMPVIS_PREFIXES.values()):
        unknown = [k for k in keys if not k.startswith(known)][:5] or keys[:5]
        raise ValueError(f"{path}: its keys match no known layout (Stable Diffusion v1 in CompVis' layout has "
                         f"model.diffusion_model.*, first_stage_model.* and cond_stage_model.transformer.*); first "
                         f"unknown keys: {', '.join(unknown)}")
    text_cfg, unet_cfg, vae_cfg = compvis_configs(f)
    schedule = compvis_schedule(f)

    p = COMPVIS_PREFIXES["text"]
    names = {k: tuple(p + n for n in v) for k, v in clip_text_names(text_cfg).items()}
    text, used_text = gather(f, names, shapes("text", text_cfg), f"{path} (text encoder)")
    p = COMPVIS_PREFIXES["unet"]
    ema = use_ema and any(k.startswith("model_ema.diffusion_model") for k in keys)
    # LDM's EMA (LitEma) keeps each U-Net weight as a buffer named without dots: model_ema.diffusion_modelout2weight
    their = (lambda n: "model_ema." + ("diffusion_model." + n).replace(".", "")) if ema else (lambda n: p + n)
    names = {k: tuple(their(n) for n in v) for k, v in unet_names(unet_cfg, "compvis").items()}
    unet, used_unet = gather(f, names, shapes("unet", unet_cfg), f"{path} (U-Net{', EMA weights' if ema else ''})")
    p = COMPVIS_PREFIXES["vae"]
    names = {k: tuple(p + n for n in v) for k, v in vae_names(vae_cfg, "compvis").items()}
    vae, used_vae = gather(f, names, shapes("vae", vae_cfg), f"{path} (VAE)")
    # the U-Net copy not used (raw weights when the EMA ones are, and the reverse) is explained, not read
    other = [k for k in keys if k.startswith(COMPVIS_PREFIXES["unet"] if ema else "model_ema.")]
    check_all_used(keys, used_text | used_unet | used_vae, path,
                   explained=["betas", *COMPVIS_DERIVED, COMPVIS_PREFIXES["text"] + POSITION_IDS, *other])
    vocab = tokenizer or bundled_clip_vocab()
    if vocab is None:
        raise ValueError(f"{path} holds no tokenizer; pass --tokenizer with a tokenizer/ folder of an SD v1 diffusers "
                         f"download (vocab.json, merges.txt) or CLIP's bpe_simple_vocab_16e6.txt.gz")
    sampler = SD_V1_SAMPLER
    return dict(model_cfg=model_config(text_cfg, unet_cfg, schedule, f"clip:{path}"), vae_cfg=vae_cfg,
                scale_factor=SD_V1_SCALE_FACTOR, sampler=sampler, tokenizer=read_tokenizer(vocab), text=text,
                unet=unet, vae=vae)


def compvis_configs(f):
    """The text encoder's, U-Net's and VAE's configs from a CompVis file's tensor shapes (and SD v1's constants)."""
    keys = f.keys

    def count(prefix):  # how many numbered modules sit under prefix: 1 + the largest N of prefix + "N."
        return 1 + max(int(k[len(prefix):].split(".")[0]) for k in keys if k.startswith(prefix))

    t = COMPVIS_PREFIXES["text"]
    vocab, width = f.shape(t + "embeddings.token_embedding.weight")
    if f.shape(t + "encoder.layers.0.mlp.fc1.weight")[0] != 4 * width:
        raise ValueError(f"{f.path}: the text encoder's MLP is not 4 x {width} wide; it is not CLIP's text tower")
    text_cfg = TextEncoderConfig(vocab_size=vocab, max_length=f.shape(t + "embeddings.position_embedding.weight")[0],
                                 width=width, layers=count(t + "encoder.layers."), heads=width // CLIP_HEAD_WIDTH,
                                 causal=True)

    u = COMPVIS_PREFIXES["unet"]
    channels, in_channels = f.shape(u + "input_blocks.0.0.weight")[:2]
    if in_channels != 4:
        raise ValueError(f"{f.path}: the U-Net takes {in_channels} channels (an inpainting or image-conditioned "
                         f"model); only text-to-image Stable Diffusion v1 (4 latent channels) is supported")
    downsamplers = len({k for k in keys if k.startswith(u + "input_blocks.") and ".0.op." in k}) // 2  # weight, bias
    levels = downsamplers + 1
    per_level = (count(u + "input_blocks.") - 1 - downsamplers) // levels  # ResBlocks per level
    first = [1 + level * (per_level + 1) for level in range(levels)]  # input_blocks index of each level's first step
    widths = [f.shape(f"{u}input_blocks.{n}.0.out_layers.3.weight")[0] for n in first]
    attention = [any(k.startswith(f"{u}input_blocks.{n}.1.") for k in keys) for n in first]
    unet_cfg = UNetConfig(
        image_size=SD_V1_LATENT_SIZE, in_channels=in_channels, out_channels=f.shape(u + "out.2.weight")[0],
        channels=channels, channel_mult=tuple(w // channels for w in widths), num_res_blocks=per_level,
        attention_resolutions=tuple(SD_V1_LATENT_SIZE // 2**i for i, a in enumerate(attention) if a),
        num_heads=SD_V1_HEADS, transformer_depth=count(u + "middle_block.1.transformer_blocks."),
        context_dim=f.shape(u + "middle_block.1.transformer_blocks.0.attn2.to_k.weight")[1], norm_groups=SD_V1_GROUPS,
        use_scale_shift_norm=f.shape(u + "input_blocks.1.0.emb_layers.1.weight")[0] == 2 * widths[0],
        null_length=text_cfg.max_length)

    v = COMPVIS_PREFIXES["vae"]
    vae_channels, vae_in = f.shape(v + "encoder.conv_in.weight")[:2]
    vae_levels = count(v + "encoder.down.")
    vae_cfg = VAEConfig(
        in_channels=vae_in, channels=vae_channels,
        channel_mult=tuple(f.shape(f"{v}encoder.down.{i}.block.0.conv2.weight")[0] // vae_channels
                           for i in range(vae_levels)),
        num_res_blocks=count(v + "encoder.down.0.block."), latent_channels=f.shape(v + "decoder.conv_in.weight")[1],
        norm_groups=SD_V1_GROUPS, mid_attention=v + "encoder.mid.attn_1.q.weight" in keys,
        quant_conv=v + "quant_conv.weight" in keys)
    return text_cfg, unet_cfg, vae_cfg


def compvis_schedule(f):
    """The schedule whose betas the file stores (LDM's "linear" = our scaled_linear), checked; SD v1's if absent."""
    if "betas" not in f.keys:
        return ScheduleConfig(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    betas = f("betas").double()
    cfg = ScheduleConfig(num_train_timesteps=len(betas), beta_schedule="scaled_linear",
                         beta_start=round(betas[0].item(), 8), beta_end=round(betas[-1].item(), 8))
    if not torch.allclose(NoiseSchedule(cfg).betas.double(), betas, rtol=1e-4, atol=1e-8):
        raise ValueError(f"{f.path}: its betas are not a scaled-linear schedule from {cfg.beta_start} to "
                         f"{cfg.beta_end}; it is not Stable Diffusion v1's diffusion")
    return cfg


def model_config(text_cfg, unet_cfg, schedule, source):
    return ModelConfig(tokenizer=TokenizerConfig(vocab_size=text_cfg.vocab_size), text=text_cfg, unet=unet_cfg,
                       schedule=schedule, text_encoder=source, padding="attended")


def shapes(module, cfg):
    """{our parameter name: shape} of one of our modules built from cfg, on the meta device (no memory)."""
    with torch.device("meta"):
        built = {"unet": UNet, "vae": AutoencoderKL, "text": lambda c: CLIP(CLIPConfig(text=c), text_only=True)}
        return {k: v.shape for k, v in built[module](cfg).state_dict().items()}


# ---------------------------------------------------------------- our parts -> a pipeline, our checkpoints

def empty_prompt_tokens(model, tokenizer):
    """CLIP's output for the empty prompt: <start> <end> then padding, all read (1, L, D): SD's null condition."""
    L = model.text_encoder.cfg.max_length
    ids = torch.full((1, L), tokenizer.pad_id, dtype=torch.long)  # (1, L)
    ids[0, :2] = torch.tensor([tokenizer.start_id, tokenizer.end_id])
    with torch.no_grad():
        return model.text_encoder(ids, torch.ones_like(ids, dtype=torch.bool))[0]  # (1, L, D)


def load_stable_diffusion(path, device="cpu", dtype=torch.float32, tokenizer=None, use_ema=True) -> Text2Image:
    """Stable Diffusion v1 weights (a diffusers folder or a CompVis file) -> Text2Image in eval mode on device, the
    networks in dtype. tokenizer: a single file's vocabulary (default: the one inside an installed open_clip)."""
    parts = read_published(path, tokenizer, use_ema, dtype)
    cfg = parts["model_cfg"]
    with torch.device("meta"):  # built without memory, then the file's tensors become the parameters
        model = TextConditionedUNet(cfg.text, cfg.unet, cfg.text_encoder, cfg.padding)
        vae = AutoencoderKL(parts["vae_cfg"])
    model.text_encoder.encoder.load_state_dict(parts["text"], assign=True)
    null = empty_prompt_tokens(model, parts["tokenizer"])[0]  # (L, D)
    model.unet.load_state_dict({**parts["unet"], "null_context": null}, assign=True)
    vae.load_state_dict(parts["vae"], assign=True)
    data = {**DATA, "resolution": cfg.unet.image_size * vae.cfg.factor}
    return Text2Image(model.to(device).eval(), parts["tokenizer"], NoiseSchedule(cfg.schedule).to(device), cfg,
                      parts["sampler"], data, vae.to(device).eval(), parts["scale_factor"])


def write_checkpoints(pipe: Text2Image, out_dir, source):
    """A latent Text2Image -> out_dir/diffusion.pt and out_dir/vae.pt in our format (core/checkpoint.py), which
    `python -m sample --ckpt out_dir/diffusion.pt`, the metrics and the notebooks read. Returns the two paths."""
    from core.checkpoint import save_checkpoint
    out_dir = Path(out_dir)
    vae_path, diffusion_path = out_dir / "vae.pt", out_dir / "diffusion.pt"
    save_checkpoint(vae_path, {"kind": "vae", "step": 0, "config": {"vae": config_to_dict(pipe.vae.cfg)},
                               "model": pipe.vae.state_dict(), "ema": None, "scale_factor": pipe.scale_factor,
                               "source": str(source)})
    m = pipe.model_cfg
    config = {"tokenizer": config_to_dict(m.tokenizer), "text": config_to_dict(m.text), "unet": config_to_dict(m.unet),
              "schedule": config_to_dict(m.schedule), "text_encoder": m.text_encoder, "padding": m.padding,
              "sampler": config_to_dict(pipe.settings), "data": pipe.data, "space": "latent", "vae": str(vae_path)}
    save_checkpoint(diffusion_path, {"kind": "diffusion", "step": 0, "config": config, "model": pipe.model.state_dict(),
                                     "ema": None, "tokenizer": pipe.tokenizer.state_dict(),
                                     "vae": vae_fingerprint(pipe.vae, pipe.scale_factor), "source": str(source)})
    return diffusion_path, vae_path
