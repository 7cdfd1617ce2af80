"""unCLIP (Ramesh et al. 2022, arXiv 2204.06125): the diffusion prior and its sampler against diffusers'
PriorTransformer and UnCLIPScheduler (random weights), the prior's properties (causality, guidance dropout,
the normalisation round trip, the best-of-2 rule), the decoder's projection against UnCLIPTextProjModel, and the
smoke runs and bad-input contract of train/prior.py, the decoder and the unclip pipeline."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.reference_imports import make_torchvision_importable

make_torchvision_importable()

from models.conditioning import Conditioning  # noqa: E402
from models.prior import DiffusionPrior, PriorConfig, load_diffusers_prior, sample_image_embeddings  # noqa: E402
from models.samplers import SamplerConfig, ddpm_step, make_timesteps, sample  # noqa: E402
from models.schedule import NoiseSchedule, ScheduleConfig  # noqa: E402

E, L, D = 8, 5, 16


def text_condition(B, g, padded=True):
    tokens = torch.randn(B, L, E, generator=g)
    mask = torch.ones(B, L, dtype=torch.bool)
    if padded:
        mask[0, 3:] = False  # row 0: <start> a b <end> then padding
    return Conditioning(tokens=tokens, mask=mask, pooled=torch.randn(B, E, generator=g))


def test_prior_equals_diffusers_prior_transformer():
    from diffusers import PriorTransformer
    torch.manual_seed(0)
    ref = PriorTransformer(num_attention_heads=2, attention_head_dim=8, num_layers=2, embedding_dim=E,
                           num_embeddings=L, additional_embeddings=4).eval()
    with torch.no_grad():  # diffusers zero-initialises these; random values so that every weight is checked
        for name in ("positional_embedding", "prd_embedding", "clip_mean"):
            getattr(ref, name).normal_()
        ref.clip_std.uniform_(0.5, 2.0)
    ours = DiffusionPrior(PriorConfig(embed_dim=E, text_width=E, text_length=L, width=D, layers=2, heads=2)).eval()
    load_diffusers_prior(ours, ref.state_dict())
    g = torch.Generator().manual_seed(1)
    B = 3
    cond = text_condition(B, g)
    x_t = torch.randn(B, E, generator=g)
    t = torch.tensor([0, 411, 999])
    with torch.no_grad():
        expected = ref(x_t, t, proj_embedding=cond.pooled, encoder_hidden_states=cond.tokens,
                       attention_mask=cond.mask).predicted_image_embedding
        got = ours(x_t, t, cond)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours.denormalise(got), F.normalize(ref.post_process_latents(expected), dim=-1))


def test_prior_is_causal_and_reads_its_condition():
    """The prediction reads the text (changing a real token changes it; a padding token does not), and z_t; the
    output at the query is the last position, so no token is hidden from it."""
    torch.manual_seed(0)
    prior = DiffusionPrior(PriorConfig(embed_dim=E, text_width=E, text_length=L, width=D, layers=2, heads=2)).eval()
    g = torch.Generator().manual_seed(2)
    cond = text_condition(2, g)
    x_t, t = torch.randn(2, E, generator=g), torch.tensor([10, 500])
    with torch.no_grad():
        base = prior(x_t, t, cond)
        padded = cond.tokens.clone()
        padded[0, 4] += 10  # a padding position of row 0
        assert torch.allclose(prior(x_t, t, Conditioning(tokens=padded, mask=cond.mask, pooled=cond.pooled)), base)
        real = cond.tokens.clone()
        real[0, 1] += 1
        assert not torch.allclose(prior(x_t, t, Conditioning(tokens=real, mask=cond.mask, pooled=cond.pooled))[0],
                                  base[0])
        assert not torch.allclose(prior(x_t, t, Conditioning(tokens=cond.tokens, mask=cond.mask,
                                                             pooled=cond.pooled + 1))[0], base[0])
        # dropped rows ignore the caption entirely: two different captions give the same prediction
        other = text_condition(2, torch.Generator().manual_seed(3))
        drop = torch.tensor([True, False])
        a = prior(x_t, t, Conditioning(cond.tokens, cond.mask, cond.pooled, drop=drop))
        b = prior(x_t, t, Conditioning(other.tokens, other.mask, other.pooled, drop=drop))
        assert torch.allclose(a[0], b[0]) and not torch.allclose(a[1], b[1])


def test_normalise_round_trip():
    prior = DiffusionPrior(PriorConfig(embed_dim=E, text_width=E, text_length=L, width=D, layers=1, heads=2))
    prior.clip_mean.normal_()
    prior.clip_std.uniform_(0.1, 1.0)
    z = torch.randn(4, E) * 3
    torch.testing.assert_close(prior.denormalise(prior.normalise(z)), F.normalize(z, dim=-1))


def test_sampler_equals_unclip_scheduler():
    """The prior's sampler settings (DDPM, cosine betas, x_0 prediction clipped to +-5, 'linspace' steps, equal to
    Karlo's (T - 1) / (n - 1) ratio, fixed_small variance) give UnCLIPScheduler's steps, the noise drawn from the
    same generator. One difference, stated in models/prior.py: on the last step (t = 0 -> past 0) UnCLIPScheduler
    multiplies x0_hat by beta_0 / (1 - abar_0), which float32 rounding makes 1 + 1e-3 instead of 1; ours returns
    x0_hat itself (DDPM Alg. 2's noise-free last step)."""
    from diffusers import UnCLIPScheduler
    T, n, B = 1000, 25, 3
    ref = UnCLIPScheduler(num_train_timesteps=T, variance_type="fixed_small_log", clip_sample=True,
                          clip_sample_range=5.0, prediction_type="sample")
    ref.set_timesteps(n)
    schedule = NoiseSchedule(ScheduleConfig(num_train_timesteps=T, beta_schedule="cosine", prediction_type="sample"))
    torch.testing.assert_close(schedule.alphas_cumprod, ref.alphas_cumprod)
    settings = SamplerConfig(sampler="ddpm", num_inference_steps=n, timestep_spacing="linspace",
                             variance_type="fixed_small", clip_sample=True, clip_sample_range=5.0)
    assert make_timesteps(T, n, "linspace").tolist() == ref.timesteps.tolist()
    W = torch.randn(E, E, generator=torch.Generator().manual_seed(0)) / E ** 0.5
    model = lambda x, t: 6 * torch.tanh(x @ W) + t[:, None] / 500  # any deterministic x0 predictor (beyond +-5)

    g_ref, g_ours = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    x = torch.randn(B, E, generator=torch.Generator().manual_seed(5))
    timesteps = ref.timesteps.tolist()
    for i, t in enumerate(timesteps):
        prev = timesteps[i + 1] if i + 1 < len(timesteps) else None  # as UnCLIPPipeline passes it
        out = model(x, torch.full((B,), t))
        expected = ref.step(out, t, x, prev_timestep=prev, generator=g_ref).prev_sample
        got = ddpm_step(schedule, out, t, -1 if prev is None else prev, x, settings, g_ours)
        if prev is None:
            torch.testing.assert_close(got, out.clamp(-5, 5))
            ratio = float(ref.betas[0] / (1 - ref.alphas_cumprod[0]))
            torch.testing.assert_close(expected, got * ratio)
            assert 1e-6 < abs(ratio - 1) < 1e-2
        else:
            torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
        x = expected
    # and the whole loop, our sample() against the steps above
    g = torch.Generator().manual_seed(4)
    whole = sample(model, torch.randn(B, E, generator=torch.Generator().manual_seed(5)), schedule, settings,
                   generator=g, progress=False)
    torch.testing.assert_close(whole * ratio, x, atol=1e-4, rtol=1e-4)


def test_best_of_candidates_keeps_the_largest_dot_product():
    """With K candidates the kept z_i has the largest <z_i, z_t> among them; K = 1 is the plain sample."""
    torch.manual_seed(0)
    prior = DiffusionPrior(PriorConfig(embed_dim=E, text_width=E, text_length=L, width=D, layers=1, heads=2)).eval()
    schedule = NoiseSchedule(ScheduleConfig(beta_schedule="cosine", prediction_type="sample"))
    settings = SamplerConfig(sampler="ddpm", num_inference_steps=4, timestep_spacing="linspace", clip_sample=True,
                             clip_sample_range=5.0, guidance_scale=2.0)
    cond = text_condition(3, torch.Generator().manual_seed(5))
    z_t = F.normalize(cond.pooled, dim=-1)
    best = sample_image_embeddings(prior, schedule, cond, settings, candidates=4,
                                   generator=torch.Generator().manual_seed(6))
    all_four = sample_image_embeddings(prior, schedule, Conditioning(
        tokens=cond.tokens.repeat(4, 1, 1), mask=cond.mask.repeat(4, 1), pooled=cond.pooled.repeat(4, 1)),
        settings, candidates=1, generator=torch.Generator().manual_seed(6)).view(4, 3, E)
    torch.testing.assert_close(best.norm(dim=-1), torch.ones(3))
    scores = (all_four * z_t).sum(-1)  # (4, 3)
    torch.testing.assert_close(best, all_four[scores.argmax(0), torch.arange(3)])
    assert not torch.allclose(all_four[0], all_four[1])


# ---------------------------------------------------------------- smoke runs

CLIP_TINY = ["model.embed_dim=16", "model.text.width=16", "model.text.layers=1", "model.text.max_length=16",
             "model.text.causal=true", "model.vision.kind=conv", "model.vision.image_size=16", "model.vision.width=8",
             "model.vision.layers=2", "tokenizer.vocab_size=300", "data.resolution=16", "data.num_images=64",
             "train.steps=3", "train.batch_size=16", "train.log_every=1", "train.eval_images=0", "train.device=cpu"]
PRIOR_TINY = ["data.resolution=16", "data.num_images=64", "prior.width=16", "prior.layers=1", "prior.heads=2",
              "train.steps=3", "train.batch_size=16", "train.log_every=1", "train.eval_images=8", "train.device=cpu",
              "sampler.num_inference_steps=3"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A tiny CLIP, and a tiny prior on it: {name: checkpoint path}."""
    from train import clip as train_clip
    from train import prior as train_prior
    root = tmp_path_factory.mktemp("unclip")
    train_clip.main(CLIP_TINY + [f"train.out_dir={root / 'clip'}"])
    train_clip.main(CLIP_TINY + [f"train.out_dir={root / 'clip2'}", "train.seed=1"])
    out = {"clip": root / "clip" / "ckpt.pt", "clip2": root / "clip2" / "ckpt.pt", "root": root}
    out["figures"] = train_prior.main(PRIOR_TINY + [f"clip={out['clip']}", f"train.out_dir={root / 'prior'}"])
    out["prior"] = root / "prior" / "ckpt.pt"
    return out


def test_prior_training_smoke_run(runs, capsys):
    from core.checkpoint import load_checkpoint
    from models.clip import clip_fingerprint, load_clip
    from train.prior import load_prior
    ckpt = load_checkpoint(runs["prior"], "prior")
    assert ckpt["step"] == 3 and ckpt["config"]["prior"]["embed_dim"] == 16
    assert ckpt["clip"]["sha256"] == clip_fingerprint(load_clip(runs["clip"])[0])
    prior, _, cfg, _ = load_prior(runs["prior"])
    # the normalisation statistics are those of the unit training z_i: the mean has norm below 1, the std > 0
    assert 0 < prior.clip_mean.norm() < 1 and (prior.clip_std > 0).all()
    figures = runs["figures"]
    assert set(figures) == {"heldin", "heldout"}
    assert figures["heldin"]["cosine random pair"] < 1 and 0 <= figures["heldin"]["retrieval prior"] <= 1


def test_decoder_projection_equals_unclip_text_proj_model():
    """Karlo's UnCLIPTextProjModel (E = W = 8, time embedding 64, context 16) with our weights copied in gives our
    extra tokens + projected text tokens and our addition to the timestep embedding, for z_i given and for z_i
    replaced by the learned null (its classifier-free guidance rows)."""
    from diffusers.pipelines.deprecated.unclip.text_proj import UnCLIPTextProjModel
    from models.text2image import FrozenTextEncoder
    from models.text_encoder import TextEncoderConfig
    from models.unclip_decoder import UnCLIPDecoder, diffusers_text_proj_weights
    from models.unet import UNetConfig
    torch.manual_seed(0)
    text_cfg = TextEncoderConfig(vocab_size=50, max_length=L, width=E, layers=1, heads=2, causal=True)
    unet_cfg = UNetConfig(image_size=8, in_channels=4, out_channels=4, channels=16, channel_mult=(1, 2),
                          num_res_blocks=1, attention_resolutions=(4,), context_dim=16, pooled_dim=2 * E,
                          norm_groups=8)
    decoder = UnCLIPDecoder(FrozenTextEncoder("clip", text_cfg), unet_cfg, E).eval()
    ref = UnCLIPTextProjModel(clip_extra_context_tokens=4, clip_embeddings_dim=E, time_embed_dim=64,
                              cross_attention_dim=16).eval()
    ref.load_state_dict(diffusers_text_proj_weights(decoder))
    g = torch.Generator().manual_seed(7)
    B = 3
    z_i, z_t, tokens = torch.randn(B, E, generator=g), torch.randn(B, E, generator=g), torch.randn(B, L, E, generator=g)
    mask = torch.ones(B, L, dtype=torch.bool)
    with torch.no_grad():
        context, time = ref(image_embeddings=z_i, prompt_embeds=torch.cat([z_t, z_t]),
                            text_encoder_hidden_states=torch.cat([tokens, tokens]), do_classifier_free_guidance=True)
        cond = Conditioning(tokens=tokens, mask=mask, pooled=z_t, image_embed=z_i)
        for rows, drop_image in ((slice(B, None), None), (slice(0, B), torch.ones(B, dtype=torch.bool))):
            ours = decoder.unet_condition(cond, drop_image=drop_image)
            torch.testing.assert_close(ours.tokens, context[rows])
            torch.testing.assert_close(decoder.unet.pooled_proj(ours.pooled), time[rows])
            assert ours.mask.shape == (B, 4 + L) and ours.mask.all()


def test_decoder_dropping_and_guidance_rows():
    """drop_text removes the caption alone (the output no longer depends on it but still on z_i), drop_image z_i
    alone, cond.drop both (the unconditional rows of guidance)."""
    from models.text2image import FrozenTextEncoder
    from models.text_encoder import TextEncoderConfig
    from models.unclip_decoder import UnCLIPDecoder
    from models.unet import UNetConfig
    torch.manual_seed(0)
    text_cfg = TextEncoderConfig(vocab_size=50, max_length=L, width=E, layers=1, heads=2, causal=True)
    unet_cfg = UNetConfig(image_size=8, in_channels=4, out_channels=4, channels=16, channel_mult=(1, 2),
                          num_res_blocks=1, attention_resolutions=(4,), context_dim=16, pooled_dim=2 * E,
                          norm_groups=8)
    decoder = UnCLIPDecoder(FrozenTextEncoder("clip", text_cfg), unet_cfg, E).eval()
    for p in decoder.unet.parameters():  # the zero-initialised output layers would hide every difference
        p.data.add_(0.05 * torch.randn_like(p))
    g = torch.Generator().manual_seed(8)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([100, 600])
    a = Conditioning(tokens=torch.randn(2, L, E, generator=g), mask=torch.ones(2, L, dtype=torch.bool),
                     pooled=torch.randn(2, E, generator=g), image_embed=torch.randn(2, E, generator=g))
    b = Conditioning(tokens=torch.randn(2, L, E, generator=g), mask=a.mask, pooled=torch.randn(2, E, generator=g),
                     image_embed=a.image_embed)  # another caption, the same z_i
    c = Conditioning(tokens=a.tokens, mask=a.mask, pooled=a.pooled, image_embed=torch.randn(2, E, generator=g))
    yes = torch.ones(2, dtype=torch.bool)
    with torch.no_grad():
        assert not torch.allclose(decoder.denoise(x, t, a), decoder.denoise(x, t, b))
        torch.testing.assert_close(decoder.denoise(x, t, a, drop_text=yes), decoder.denoise(x, t, b, drop_text=yes))
        assert not torch.allclose(decoder.denoise(x, t, a, drop_text=yes), decoder.denoise(x, t, c, drop_text=yes))
        torch.testing.assert_close(decoder.denoise(x, t, a, drop_image=yes), decoder.denoise(x, t, c, drop_image=yes))
        both = decoder.denoise(x, t, a.unconditional())
        torch.testing.assert_close(both, decoder.denoise(x, t, c, drop_text=yes, drop_image=yes))


DECODER_TINY = ["data.num_images=48", "data.resolution=16", "unet.image_size=16", "unet.channels=16",
                "unet.channel_mult=[1, 2]", "unet.num_res_blocks=1", "unet.attention_resolutions=[8]",
                "unet.norm_groups=8", "unet.context_dim=32", "unet.pooled_dim=32", "image_embed_dim=16",
                "train.batch_size=8", "train.log_every=1", "train.sample_every=0", "train.sample_steps=2",
                "train.device=cpu", "train.sample_prompts=[a red circle, a blue square]", "train.steps=3",
                "train.cond_drop_prob=0.5", "train.image_drop_prob=0.1"]


@pytest.fixture(scope="module")
def decoder(runs):
    from train import diffusion
    out = runs["root"] / "decoder"
    diffusion.main(DECODER_TINY + [f"text_encoder=clip:{runs['clip']}", f"train.out_dir={out}"])
    return out / "ckpt.pt"


def test_decoder_training_smoke_run(runs, decoder):
    from core.checkpoint import load_checkpoint
    from models.clip import clip_fingerprint, load_clip
    ckpt = load_checkpoint(decoder, "diffusion")
    assert ckpt["step"] == 3 and ckpt["config"]["image_embed_dim"] == 16
    assert ckpt["clip"]["sha256"] == clip_fingerprint(load_clip(runs["clip"])[0])
    assert (decoder.parent / "samples" / "step_0000003.png").is_file()


# ---------------------------------------------------------------- the pipeline

def pipeline_config(runs, name="pipeline.yaml", prior=None, decoder=None):
    path = runs["root"] / name
    path.write_text(f"prior: {prior or runs['prior']}\ndecoder: {decoder or runs['decoder']}\ndevice: cpu\n"
                    f"preset: fast\n")
    return path


@pytest.fixture(scope="module")
def unclip_runs(runs, decoder):
    return {**runs, "decoder": decoder}


def sample_args(runs, out, *extra):
    return ["--pipeline", "unclip", "--config", str(pipeline_config(runs)), "--steps", "2", "--prior-steps", "2",
            "--seed", "3", "--out", str(out), *extra]


def test_slerp_ends_and_stays_on_the_sphere():
    from models.unclip import slerp
    g = torch.Generator().manual_seed(9)
    a, b = F.normalize(torch.randn(3, E, generator=g), dim=-1), F.normalize(torch.randn(3, E, generator=g), dim=-1)
    torch.testing.assert_close(slerp(a, b, torch.zeros(3, 1)), a)
    torch.testing.assert_close(slerp(a, b, torch.ones(3, 1)), b)
    mid = slerp(a, b, torch.full((3, 1), 0.5))
    torch.testing.assert_close(mid.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close((mid * a).sum(-1), (mid * b).sum(-1))  # halfway: equally far from both ends


def test_unclip_pipeline_samples_variations_and_interpolations(unclip_runs, tmp_path):
    import json
    from PIL import Image
    import sample.__main__ as sample_cli
    runs = unclip_runs
    sample_cli.main(sample_args(runs, tmp_path / "a.png", "--prompt", "a red circle", "--prompt", "a blue square",
                                "--n", "2"))
    sample_cli.main(sample_args(runs, tmp_path / "b.png", "--prompt", "a red circle", "--prompt", "a blue square",
                                "--n", "2"))
    a, b = np.array(Image.open(tmp_path / "a.png")), np.array(Image.open(tmp_path / "b.png"))
    assert np.array_equal(a, b)  # the same seed gives the same pixels
    assert len((tmp_path / "a" / "metadata.jsonl").read_text().splitlines()) == 4
    for embedding in ("text", "true"):
        sample_cli.main(sample_args(runs, tmp_path / f"{embedding}.png", "--prompt", "a purple circle",
                                    "--embedding", embedding))
    render = tmp_path / "render.png"
    Image.fromarray(np.full((16, 16, 3), 200, dtype=np.uint8)).save(render)
    sample_cli.main(sample_args(runs, tmp_path / "v.png", "--variations", str(render), str(render), "--n", "3"))
    assert Image.open(tmp_path / "v.png").size[1] > Image.open(tmp_path / "v.png").size[0] / 3  # 2 rows of 4
    assert len((tmp_path / "v" / "metadata.jsonl").read_text().splitlines()) == 8
    sample_cli.main(sample_args(runs, tmp_path / "i.png", "--interpolate", "a red circle", "a blue square",
                                "--n", "4"))
    texts = [json.loads(line)["text"] for line in (tmp_path / "i" / "metadata.jsonl").read_text().splitlines()]
    assert texts[0].endswith("(0/3)") and len(texts) == 4


def test_unclip_interpolation_ends_are_the_decoded_endpoints(unclip_runs):
    """theta = 0 and 1 decode the two embeddings themselves, with the shared noise."""
    from models.pipeline import load_family_pipeline, pipeline_config as read_config
    pipe, _ = load_family_pipeline("unclip", read_config("unclip", str(pipeline_config(unclip_runs))), "cpu")
    settings = pipe.settings_with(steps=2, prior_steps=2)
    z = F.normalize(torch.randn(2, pipe.prior.cfg.embed_dim, generator=torch.Generator().manual_seed(1)), dim=-1)
    row = pipe.interpolate(z[:1], z[1:], 3, settings, torch.Generator().manual_seed(2))
    u = pipe.decoder.model.unet.cfg
    x_T = torch.randn(1, u.out_channels, u.image_size, u.image_size, generator=torch.Generator().manual_seed(2))
    from dataclasses import replace
    ends = pipe.decode(z, None, replace(settings, decoder=replace(settings.decoder, eta=0.0)), progress=False,
                       x_T=x_T.expand(2, -1, -1, -1))
    torch.testing.assert_close(row[[0, 2]], ends, atol=1e-5, rtol=1e-5)
    # a call's intermediate product is the prior's z_i, which the decoder then reads with the generator as it is
    images = pipe(["a red circle"], settings, torch.Generator().manual_seed(3), progress=False)
    g = torch.Generator().manual_seed(3)
    z_i = pipe.image_embeddings(["a red circle"], settings, g)
    torch.testing.assert_close(pipe.intermediate, z_i)
    torch.testing.assert_close(pipe.decode(z_i, ["a red circle"], settings, g, progress=False), images)


def test_unclip_bad_input(unclip_runs, tmp_path, capsys):
    from tests.test_train_diffusion import cli_error
    from train import prior as train_prior
    import sample.__main__ as sample_cli
    runs = unclip_runs
    other = runs["root"] / "prior_other_clip"
    if not other.exists():
        train_prior.main(PRIOR_TINY + [f"clip={runs['clip2']}", f"train.out_dir={other}", "train.eval_images=0"])
    capsys.readouterr()
    args = ["--pipeline", "unclip", "--config", str(pipeline_config(runs, "other.yaml", prior=other / "ckpt.pt")),
            "--prompt", "a red circle", "--out", str(tmp_path / "x.png")]
    err = cli_error(sample_cli.main, args, capsys)
    assert str(runs["clip"]) in err and str(runs["clip2"]) in err
    no_dropout = runs["root"] / "prior_no_dropout"
    if not no_dropout.exists():
        train_prior.main(PRIOR_TINY + [f"clip={runs['clip']}", f"train.out_dir={no_dropout}", "train.eval_images=0",
                                       "train.cond_drop_prob=0", "sampler.guidance_scale=1"])
    capsys.readouterr()
    args = ["--pipeline", "unclip", "--config", str(pipeline_config(runs, "nd.yaml", prior=no_dropout / "ckpt.pt")),
            "--prompt", "a red circle", "--prior-guidance", "0.5", "--out", str(tmp_path / "x.png")]
    assert "--prior-guidance 1" in cli_error(sample_cli.main, args, capsys)
    wrong_size = tmp_path / "big.png"
    Image = pytest.importorskip("PIL.Image")
    Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)).save(wrong_size)
    assert "16x16" in cli_error(sample_cli.main, sample_args(runs, tmp_path / "x.png", "--variations", str(wrong_size)),
                                capsys)
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    assert "not an image" in cli_error(sample_cli.main, sample_args(runs, tmp_path / "x.png", "--variations",
                                                                    str(text)), capsys)
    assert "two endpoints" in cli_error(sample_cli.main, sample_args(runs, tmp_path / "x.png", "--interpolate", "a",
                                                                     "b", "c"), capsys)
    with pytest.raises(ValueError, match="unCLIP's decoder"):
        from models.pipeline import load_pipeline
        load_pipeline(runs["decoder"])
    assert not (tmp_path / "x.png").exists()


def test_demo_smoke_run_writes_the_unclip_figures(tmp_path, capsys):
    """python -m sample.demo --family unclip at a few steps per stage: every stage runs, and metrics.json has the
    latent demo's keys plus the prior's figures and the decoder's accuracy with the true z_i and with z_t."""
    import json
    from sample import demo
    demo.main(["--family", "unclip", "--runs", str(tmp_path), "--smoke", "--sequential", "--fid-images", "8",
               "--n", "1", "--accuracy-n", "1", "--steps", "2"])
    report = json.loads((tmp_path / "demo" / "unclip" / "metrics.json").read_text())
    assert {"prompt_accuracy", "fid", "clip_score", "stage_seconds", "total_seconds", "prior",
            "prompt_accuracy_true_embedding", "prompt_accuracy_text_embedding"} <= set(report)
    assert {"CLIP", "VAE", "prior", "decoder"} <= set(report["stage_seconds"])
    for key in ("prompt_accuracy", "prompt_accuracy_true_embedding", "prompt_accuracy_text_embedding"):
        assert {"colour", "shape"} <= set(report[key]["heldin"]) and "shape" in report[key]["heldout"]
    assert {"cosine prior", "cosine z_t", "cosine train mean", "retrieval prior"} <= set(report["prior"]["heldin"])
    assert (tmp_path / "demo" / "unclip" / "samples.png").is_file()
