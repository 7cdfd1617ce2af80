"""What Stable Diffusion v1 needs on this machine: loading, and one 512 x 512 picture in 25 DDIM steps with guidance.

    .venv/bin/python -m tests.bench_sd --make /tmp/sd_random          # a full-size SD v1 folder, random weights (4.3 GB)
    /work/bin/allcores .venv/bin/python -m tests.bench_sd --run /tmp/sd_random [--dtype bfloat16] [--steps 25]

--make builds our modules with SD v1's published sizes (U-Net 860M parameters, CLIP ViT-L/14's text tower 123M,
VAE 84M) with random weights and writes them with models/stable_diffusion.py's export as a diffusers folder, so
--run reads it through the same loader as the published weights (nothing here downloads). --run, in a fresh
process: load (seconds, peak memory), one prompt at 512 x 512 with guidance 7.5 (each step a U-Net pass on a batch
of 2: the prompt and the empty prompt), the VAE decode; it prints the seconds per step, the decode's seconds and
the peak resident memory of the process (ru_maxrss), and the torch thread count. Random weights cost what the
real ones cost: the same shapes, the same operations.
"""
import argparse
import resource
import time

import torch


def peak_gib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is in KiB on Linux


def make(folder):
    from models.schedule import NoiseSchedule
    from models.diffusers_export import export_diffusers
    from models.stable_diffusion import (DATA, SD_V1_SAMPLER, bundled_clip_vocab, read_tokenizer, schedule_config,
                                         text_config, unet_config, vae_config)
    from models.text2image import ModelConfig, Text2Image, TextConditionedUNet
    from models.tokenizer import TokenizerConfig
    from models.vae import AutoencoderKL

    # the published config.json values of stable-diffusion-v1-5 (unet/, vae/, text_encoder/, scheduler/)
    text = text_config({"vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                        "num_attention_heads": 12, "max_position_embeddings": 77, "hidden_act": "quick_gelu"})
    unet = unet_config({"sample_size": 64, "block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2,
                        "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                        "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3, "cross_attention_dim": 768,
                        "attention_head_dim": 8}, null_length=77)
    vae, scale = vae_config({"block_out_channels": [128, 256, 512, 512], "layers_per_block": 2,
                             "down_block_types": ["DownEncoderBlock2D"] * 4})
    schedule, _ = schedule_config({"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012})
    cfg = ModelConfig(tokenizer=TokenizerConfig(49408), text=text, unet=unet, schedule=schedule,
                      text_encoder="clip:random", padding="attended")
    torch.manual_seed(0)
    start = time.perf_counter()
    pipe = Text2Image(TextConditionedUNet(text, unet, "clip:random", "attended").eval(),
                      read_tokenizer(bundled_clip_vocab()), NoiseSchedule(schedule), cfg, SD_V1_SAMPLER, DATA,
                      AutoencoderKL(vae).eval(), scale)
    with torch.no_grad():  # the zero-initialised output layers would make every step a no-op: draw them too
        for name, p in pipe.model.unet.named_parameters():
            if name.endswith(("conv2.weight", "proj_out.weight", "conv_out.weight")):
                p.normal_(0, 0.02)
    print(f"built in {time.perf_counter() - start:.0f} s; parameters: U-Net "
          f"{sum(p.numel() for p in pipe.model.unet.parameters()):,}, text "
          f"{sum(p.numel() for p in pipe.model.text_encoder.parameters()):,}, VAE "
          f"{sum(p.numel() for p in pipe.vae.parameters()):,}", flush=True)
    export_diffusers(pipe, folder)
    print(f"wrote {folder}/ in {time.perf_counter() - start:.0f} s; peak memory {peak_gib():.2f} GiB")


def run(folder, dtype, steps):
    from models.stable_diffusion import load_stable_diffusion

    start = time.perf_counter()
    pipe = load_stable_diffusion(folder, "cpu", getattr(torch, dtype))
    print(f"load: {time.perf_counter() - start:.1f} s, peak memory {peak_gib():.2f} GiB ({dtype}, "
          f"{torch.get_num_threads()} threads)", flush=True)
    settings = pipe.settings_with(steps=steps)
    times = []
    decode = pipe.vae.decode

    def timed_decode(z):
        times.append(("decode", time.perf_counter()))
        return decode(z)

    pipe.vae.decode = timed_decode
    start = time.perf_counter()
    image = pipe(["a photograph of an astronaut riding a horse"], settings, torch.Generator().manual_seed(0))
    total = time.perf_counter() - start
    sampling = times[0][1] - start
    print(f"512 x 512, {steps} DDIM steps, guidance {settings.guidance_scale}: {sampling / steps:.2f} s per step "
          f"({sampling:.0f} s), VAE decode {total - sampling:.1f} s, total {total:.0f} s; peak memory "
          f"{peak_gib():.2f} GiB; image {tuple(image.shape)}")


parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--make", help="write a full-size random SD v1 folder here")
parser.add_argument("--run", help="load this folder and sample one 512 x 512 picture")
parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
parser.add_argument("--steps", type=int, default=25)
args = parser.parse_args()
if args.make:
    make(args.make)
if args.run:
    run(args.run, args.dtype, args.steps)
