"""Every config file shipped under configs/ loads into its component's dataclass (no unknown keys, values of the
right types) and passes the checks its script makes before it loads any data."""
from pathlib import Path

import pytest
import torch

from core.config import load_config
from models.dalle import check_config as check_dalle_config
from models.dalle_pipeline import DallePipelineConfig, PRESETS as DALLE_PRESETS
from models import imagen
from models.pipeline import DiffusionPipelineConfig
from models.prompt_lm import check_config as check_prompt_lm_config
from models.text2image import PRESETS
from models.unet import UNet
from train import diffusion
from train.classifier import ClassifierTrainConfig
from train.dalle import DalleTrainConfig
from train.dvae import DVAETrainConfig, check_config as check_dvae_config
from train.clip import ClipTrainConfig
from train.prior import PriorTrainConfig
from train.prompt_lm import PromptLMTrainConfig
from models.unclip import UnCLIPPipelineConfig
from train.text_lm import TextLMTrainConfig
from train.vae import VAETrainConfig

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").rglob("*.yaml"))
KINDS = {"classifier": ClassifierTrainConfig, "clip": ClipTrainConfig, "text_lm": TextLMTrainConfig,
         "diffusion": diffusion.DiffusionConfig, "vae": VAETrainConfig, "pipeline_unclip": UnCLIPPipelineConfig,
         "pipeline_dalle": DallePipelineConfig, "dalle": DalleTrainConfig, "dvae": DVAETrainConfig,
         "imagen_": diffusion.DiffusionConfig, "pipeline_imagen": imagen.ImagenPipelineConfig,
         "pipeline": DiffusionPipelineConfig, "prior": PriorTrainConfig, "decoder": diffusion.DiffusionConfig,
         "prompt_lm": PromptLMTrainConfig}


def kind_of(path):
    for prefix, cls in KINDS.items():
        if path.stem.startswith(prefix):
            return cls
    raise AssertionError(f"{path}: no config class for this file name; add its prefix to KINDS")


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_shipped_config_loads(path):
    cfg = load_config(kind_of(path), path)
    if isinstance(cfg, diffusion.DiffusionConfig):
        diffusion.check_config(cfg)
        if cfg.space == "latent":  # diffusion_latent[_x].yaml fits the latents of vae[_x].yaml
            vae_name = "vae" if path.stem == "decoder_unclip" else path.stem.replace("diffusion_latent", "vae")
            vae_cfg = load_config(VAETrainConfig, path.with_name(vae_name + ".yaml"))
            assert vae_cfg.data.resolution == cfg.data.resolution
            diffusion.check_latent_config(cfg, vae_cfg.vae)
        with torch.device("meta"):  # no memory: the paper-shaped Imagen base has 2.9B parameters
            UNet(cfg.unet)  # the structure is valid (attention levels, divisibility, groups)
    if isinstance(cfg, (DiffusionPipelineConfig, UnCLIPPipelineConfig)):
        assert cfg.preset in PRESETS
    if isinstance(cfg, imagen.ImagenPipelineConfig):
        assert cfg.preset in ("", *imagen.PRESETS) and len(cfg.steps) == len(cfg.guidance) == 3
    if isinstance(cfg, DallePipelineConfig):
        assert cfg.preset in DALLE_PRESETS
    if isinstance(cfg, DVAETrainConfig):
        check_dvae_config(cfg)
    if isinstance(cfg, PromptLMTrainConfig):
        check_prompt_lm_config(cfg.model)
    if isinstance(cfg, DalleTrainConfig):
        check_dalle_config(cfg.model)
        cfg.sampling.check()
        if path.stem == "dalle":  # the tiny preset fits the tokens of the tiny dVAE
            dvae_cfg = load_config(DVAETrainConfig, path.with_name("dvae.yaml"))
            assert dvae_cfg.dvae.vocab_size == cfg.model.image_vocab
            assert dvae_cfg.data.resolution // dvae_cfg.dvae.factor == cfg.model.image_size


def test_every_kind_is_shipped():
    assert {kind_of(p) for p in CONFIGS} == set(KINDS.values())
