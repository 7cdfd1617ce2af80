"""A model of ours out as a diffusers folder, so that it runs in the tools the field already uses.

    export_diffusers(pipe, DIR)   any Text2Image (models/text2image.py; latent or pixel space) -> DIR/ with unet/
                                  (UNet2DConditionModel), vae/ (AutoencoderKL), scheduler/ (DDIMScheduler),
                                  text_encoder/ (transformers' CLIPTextModel) and tokenizer/ (CLIPTokenizer) where
                                  those classes can hold ours, model_index.json, every weight in safetensors

The names go through models/weight_names.py, the maps that read Stable Diffusion's published weights
(models/stable_diffusion.py), in the writing direction. What diffusers' classes cannot hold is said, not faked:
    - the null condition of classifier-free guidance is a learned token in our U-Nets (Ho & Salimans 2022,
      arXiv 2207.12598); diffusers encodes an empty prompt instead. It is written as null_context.safetensors,
      (L, D) at the prompt length: pass it as negative_prompt_embeds;
    - our models mask the padding out of cross-attention (ModelConfig.padding = masked); diffusers' pipeline
      does not pass the mask, its UNet2DConditionModel takes it as encoder_attention_mask;
    - CLIPTextModel is always causal: a bidirectional text encoder (text.causal=false) is not exported;
    - CLIPTokenizer reads CLIP's vocabulary only: a byte-level BPE trained here is not exported.
tests/test_published_weights.py loads the folder with diffusers' and transformers' classes and gets our outputs.
"""
import json
from pathlib import Path

from safetensors.torch import save_file

from models.samplers import SamplerConfig
from models.schedule import NoiseSchedule, ScheduleConfig
from models.text2image import Text2Image
from models.tokenizer import END_TOKEN
from models.unet import UNetConfig
from models.vae import VAEConfig
from models.weight_names import clip_text_names, scatter, text_encoder_names, unet_names, vae_names


def diffusers_unet_config(cfg: UNetConfig):
    """UNetConfig -> UNet2DConditionModel's config (its keyword arguments)."""
    cross = [cfg.image_size // cfg.patch_size // 2**i in cfg.attention_resolutions for i in range(len(cfg.channel_mult))]
    return {"_class_name": "UNet2DConditionModel", "sample_size": cfg.image_size, "in_channels": cfg.in_channels,
            "out_channels": cfg.out_channels,
            "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in cross],
            "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(cross)],
            "block_out_channels": [cfg.channels * m for m in cfg.channel_mult], "layers_per_block": cfg.num_res_blocks,
            "attention_head_dim": cfg.num_heads, "cross_attention_dim": cfg.context_dim,
            "transformer_layers_per_block": cfg.transformer_depth, "norm_num_groups": cfg.norm_groups,
            "use_linear_projection": True,
            "resnet_time_scale_shift": "scale_shift" if cfg.use_scale_shift_norm else "default"}


def diffusers_vae_config(cfg: VAEConfig, scale_factor):
    levels = len(cfg.channel_mult)
    return {"_class_name": "AutoencoderKL", "in_channels": cfg.in_channels, "out_channels": cfg.in_channels,
            "block_out_channels": [cfg.channels * m for m in cfg.channel_mult], "layers_per_block": cfg.num_res_blocks,
            "down_block_types": ["DownEncoderBlock2D"] * levels, "up_block_types": ["UpDecoderBlock2D"] * levels,
            "latent_channels": cfg.latent_channels, "norm_num_groups": cfg.norm_groups,
            "mid_block_add_attention": cfg.mid_attention, "use_quant_conv": cfg.quant_conv,
            "use_post_quant_conv": cfg.quant_conv, "scaling_factor": scale_factor}


def diffusers_scheduler_config(schedule: ScheduleConfig, settings: SamplerConfig):
    """DDIMScheduler's config: our schedule (a sigmoid or log-SNR-shifted one as its betas) and the checkpoint's DDIM
    settings. EDM's preconditioned output has no diffusers prediction_type: refused with one line."""
    if schedule.prediction_type == "edm":
        raise ValueError("a model trained with prediction_type edm has no diffusers scheduler (they predict epsilon, "
                         "sample or v_prediction); export one trained with those")
    config = {"_class_name": "DDIMScheduler", "num_train_timesteps": schedule.num_train_timesteps,
              "beta_start": schedule.beta_start, "beta_end": schedule.beta_end,
              "beta_schedule": {"cosine": "squaredcos_cap_v2"}.get(schedule.beta_schedule, schedule.beta_schedule),
              "prediction_type": schedule.prediction_type, "rescale_betas_zero_snr": schedule.rescale_betas_zero_snr,
              "clip_sample": False, "set_alpha_to_one": settings.set_alpha_to_one,
              "steps_offset": settings.steps_offset, "timestep_spacing": settings.timestep_spacing}
    if schedule.beta_schedule == "sigmoid" or schedule.log_snr_shift:
        config["trained_betas"] = NoiseSchedule(schedule).betas.tolist()
    return config


def text_encoder_export(model, tokenizer):
    """(CLIPTextModel config, names) for the pipeline's text encoder, or (None, why not)."""
    encoder, cfg = model.text_encoder, model.text_encoder.cfg
    if hasattr(encoder, "encoder") and hasattr(encoder.encoder, "transformer"):  # a frozen CLIP text tower
        act, names, module = "quick_gelu", clip_text_names(cfg), encoder.encoder
    elif cfg.causal:  # models/text_encoder.py (joint, or the masked LM's): separate q, k, v, GELU MLP
        act, names, module = "gelu", text_encoder_names(cfg), getattr(encoder, "encoder", encoder)
    else:
        return None, None, "it is bidirectional (text.causal=false) and CLIPTextModel is always causal"
    config = {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model", "vocab_size": cfg.vocab_size,
              "hidden_size": cfg.width, "intermediate_size": 4 * cfg.width, "num_hidden_layers": cfg.layers,
              "num_attention_heads": cfg.heads, "max_position_embeddings": cfg.max_length, "hidden_act": act,
              "layer_norm_eps": 1e-5, "projection_dim": cfg.width, "bos_token_id": tokenizer.start_id,
              "eos_token_id": tokenizer.end_id, "pad_token_id": tokenizer.pad_id}
    return config, scatter(module.state_dict(), names, "text_model."), None


def export_diffusers(pipe: Text2Image, out_dir):
    """A Text2Image -> a diffusers folder (see the module docstring). Returns notes on what was not exported."""
    out, notes = Path(out_dir), []
    scheduler = diffusers_scheduler_config(pipe.model_cfg.schedule, pipe.settings)  # (refuses before anything is written)
    unet = pipe.model.unet
    write_component(out / "unet", diffusers_unet_config(unet.cfg),
                    scatter(unet.state_dict(), unet_names(unet.cfg, "diffusers")), "diffusion_pytorch_model")
    L = pipe.model.text_encoder.cfg.max_length
    null = unet.null_context.detach().expand(L, unet.cfg.context_dim) if unet.null_context.ndim == 1 else unet.null_context
    save_file({"null_context": null.contiguous().float().cpu()}, str(out / "null_context.safetensors"))
    index = {"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
             "scheduler": ["diffusers", "DDIMScheduler"], "vae": [None, None], "text_encoder": [None, None],
             "tokenizer": [None, None], "safety_checker": [None, None], "feature_extractor": [None, None],
             "requires_safety_checker": False}
    if pipe.vae is not None:
        write_component(out / "vae", diffusers_vae_config(pipe.vae.cfg, pipe.scale_factor),
                        scatter(pipe.vae.state_dict(), vae_names(pipe.vae.cfg, "diffusers")), "diffusion_pytorch_model")
        index["vae"] = ["diffusers", "AutoencoderKL"]
    else:
        notes.append("no vae/: a pixel-space model")
    (out / "scheduler").mkdir(parents=True, exist_ok=True)
    (out / "scheduler" / "scheduler_config.json").write_text(
        json.dumps(scheduler, indent=2))
    config, state, why = text_encoder_export(pipe.model, pipe.tokenizer)
    if config is None:
        notes.append(f"no text_encoder/: {why}")
    else:
        write_component(out / "text_encoder", config, state, "model")
        index["text_encoder"] = ["transformers", "CLIPTextModel"]
    if pipe.tokenizer.end_of_word == "</w>":  # CLIP's vocabulary: CLIPTokenizer reads it
        tok = out / "tokenizer"
        tok.mkdir(parents=True, exist_ok=True)
        (tok / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(pipe.tokenizer.vocab)}))
        (tok / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in pipe.tokenizer.merges))
        special = {"bos_token": pipe.tokenizer.vocab[pipe.tokenizer.start_id], "unk_token": END_TOKEN,
                   "eos_token": pipe.tokenizer.vocab[pipe.tokenizer.end_id],
                   "pad_token": pipe.tokenizer.vocab[pipe.tokenizer.pad_id]}
        (tok / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "CLIPTokenizer",
                                                               "model_max_length": L, **special}, indent=2))
        index["tokenizer"] = ["transformers", "CLIPTokenizer"]
    else:
        notes.append("no tokenizer/: a byte-level BPE trained here, which CLIPTokenizer cannot express")
    if pipe.model_cfg.padding == "masked":
        notes.append("the U-Net was trained with padding masked out: pass unet(..., encoder_attention_mask=mask)")
    (out / "model_index.json").write_text(json.dumps(index, indent=2))
    return notes


def write_component(folder, config, state, stem):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    save_file({k: v.detach().float().cpu() for k, v in state.items()}, str(folder / f"{stem}.safetensors"),
              metadata={"format": "pt"})
