"""Tests for models/samplers.py.

1. Identities: an oracle denoiser makes every sampler return x_0; DDIM with eta = 1 is DDPM (same variance at every
   step, same chain); CFG at scale 1 / 0; dynamic thresholding's properties.
2. Equality with diffusers' DDPMScheduler / DDIMScheduler (test-only reference), step by step and for whole loops,
   with the same generator seeds, over every combination both support.
3. The deliberate differences listed in the samplers.py docstring, each shown explicitly, together with equality
   once diffusers is handed the same previous timestep.
4. Bad input."""

import functools
import itertools
import warnings

import pytest
import torch

from models.samplers import (SamplerConfig, ddim_step, ddpm_step, dpmpp_2m_step, dynamic_threshold, guidance,
                             make_timesteps, sample)
from models.schedule import NoiseSchedule, ScheduleConfig

warnings.filterwarnings("ignore", category=FutureWarning)


def reference():
    """diffusers, the test-only reference, imported by the tests that compare with it and by nothing else: the
    identities of this file run without it."""
    return pytest.importorskip("diffusers")

T = 1000
SHAPE = (2, 3, 4, 4)  # (B, C, H, W)
SCHEDULES = ["linear", "scaled_linear", "cosine", "sigmoid"]
DDIM_SCHEDULES = ["linear", "scaled_linear", "cosine"]  # diffusers' DDIMScheduler has no sigmoid
DIFFUSERS_NAME = {"linear": "linear", "scaled_linear": "scaled_linear", "cosine": "squaredcos_cap_v2",
                  "sigmoid": "sigmoid"}
PREDICTIONS = ["epsilon", "sample", "v_prediction"]
SPACINGS = ["leading", "trailing", "linspace"]
TOL = dict(rtol=1e-5, atol=1e-5)


def betas_kw(beta_schedule):
    return dict(beta_start=0.00085, beta_end=0.012) if beta_schedule == "scaled_linear" else {}


@functools.lru_cache(maxsize=None)
def schedule(beta_schedule="linear", zero_snr=False, prediction_type="epsilon"):
    return NoiseSchedule(ScheduleConfig(beta_schedule=beta_schedule, rescale_betas_zero_snr=zero_snr,
                                        prediction_type=prediction_type, **betas_kw(beta_schedule)))


def schedule64(beta_schedule="linear", prediction_type="epsilon"):
    """The same schedule with alphas / alphas_cumprod rebuilt from its betas in float64 (for tight identities)."""
    s = NoiseSchedule(ScheduleConfig(beta_schedule=beta_schedule, prediction_type=prediction_type,
                                     **betas_kw(beta_schedule)))
    s.betas = s.betas.double()
    s.alphas = 1 - s.betas
    s.alphas_cumprod = torch.cumprod(s.alphas, 0)
    return s


def diffusers_ddpm(beta_schedule, zero_snr, prediction_type, variance_type, spacing, n, steps_offset=0, **kw):
    options = dict(beta_schedule=DIFFUSERS_NAME[beta_schedule], rescale_betas_zero_snr=zero_snr,
                   prediction_type=prediction_type, variance_type=variance_type, clip_sample=False,
                   timestep_spacing=spacing, steps_offset=steps_offset, **betas_kw(beta_schedule))
    d = reference().DDPMScheduler(**{**options, **kw})
    d.set_timesteps(n)
    return d


def diffusers_ddim(beta_schedule, zero_snr, prediction_type, spacing, n, steps_offset=0, set_alpha_to_one=True, **kw):
    options = dict(beta_schedule=DIFFUSERS_NAME[beta_schedule], rescale_betas_zero_snr=zero_snr,
                   prediction_type=prediction_type, clip_sample=False, timestep_spacing=spacing,
                   steps_offset=steps_offset, set_alpha_to_one=set_alpha_to_one, **betas_kw(beta_schedule))
    d = reference().DDIMScheduler(**{**options, **kw})
    d.set_timesteps(n)
    return d


def gen(seed):
    return torch.Generator().manual_seed(seed)


def pairs(timesteps):
    """[(t, prev_t)] as the samplers visit them; the last step goes to -1, past 0."""
    ts = timesteps.tolist()
    return list(zip(ts, ts[1:] + [-1]))


def diffusers_ddim_prev(t, n):
    """The previous timestep DDIMScheduler.step uses (scheduling_ddim.py: timestep - T // num_inference_steps);
    any negative value means its final_alpha_cumprod, our -1."""
    return max(t - T // n, -1)


def diffusers_ddim_step_at(d, model_output, t, prev_t, x, eta, generator):
    """diffusers' DDIMScheduler.step made to step to OUR prev_t: the entry of alphas_cumprod that its formula reads
    as "previous" (t - T // n) temporarily holds abar at prev_t (or the final alpha). Its arithmetic is unchanged."""
    theirs = t - T // d.num_inference_steps
    wanted = d.alphas_cumprod[prev_t] if prev_t >= 0 else d.final_alpha_cumprod
    table, final = d.alphas_cumprod, d.final_alpha_cumprod
    if theirs >= 0:
        d.alphas_cumprod = table.clone()
        d.alphas_cumprod[theirs] = wanted
    else:
        d.final_alpha_cumprod = wanted
    try:
        return d.step(model_output, t, x, eta=eta, generator=generator).prev_sample
    finally:
        d.alphas_cumprod, d.final_alpha_cumprod = table, final


def diffusers_ddpm_step_no_last_noise(d, model_output, t, x, generator, is_last):
    """DDPMScheduler.step; on the last step, minus the noise it adds there when t > 0 (difference 2), which it draws
    as torch.randn(shape, generator): we replay the generator's state to recover that noise."""
    state = generator.get_state()
    out = d.step(model_output, t, x, generator=generator).prev_sample
    if is_last and t > 0:
        replay = torch.Generator()
        replay.set_state(state)
        out = out - d._get_variance(t) ** 0.5 * torch.randn(model_output.shape, generator=replay)
    return out


def pseudo_model(scale=1.0, seed=0):
    """A deterministic stand-in for a network: a fixed nonlinear function of (x_t, t)."""
    w = torch.randn(SHAPE[1:], generator=gen(seed))

    def denoise(x, t):
        assert t.shape == (x.shape[0],) and t.dtype == torch.long
        return scale * torch.tanh(w.to(x.dtype) * x + (t.to(x.dtype) / T).view(-1, 1, 1, 1))
    return denoise


def eps_undefined(zero_snr, prediction_type, t):
    """With zero terminal SNR abar_{T-1} = 0, and epsilon prediction cannot give x0 there (x0 = (x_t - eps) / 0)."""
    return zero_snr and prediction_type == "epsilon" and t == T - 1


# --- timesteps ------------------------------------------------------------------------------------------------------

def test_make_timesteps_examples():
    assert make_timesteps(1000, 10, "leading").tolist() == [900, 800, 700, 600, 500, 400, 300, 200, 100, 0]
    assert make_timesteps(1000, 10, "leading", 1).tolist() == [901, 801, 701, 601, 501, 401, 301, 201, 101, 1]
    assert make_timesteps(1000, 10, "trailing").tolist() == [999, 899, 799, 699, 599, 499, 399, 299, 199, 99]
    assert make_timesteps(1000, 10, "linspace").tolist() == [999, 888, 777, 666, 555, 444, 333, 222, 111, 0]
    assert make_timesteps(1000, 1000, "leading").tolist() == list(range(999, -1, -1))
    assert make_timesteps(1000, 10, "leading").dtype == torch.long


@pytest.mark.parametrize("spacing, steps_offset", [("leading", 0), ("leading", 1), ("trailing", 0),
                                                   ("linspace", 0)])
def test_make_timesteps_equals_diffusers_for_every_step_count(spacing, steps_offset):
    d = reference().DDIMScheduler(timestep_spacing=spacing, steps_offset=steps_offset)
    extra = []
    for n in range(1, T + (0 if steps_offset else 1)):
        ours = make_timesteps(T, n, spacing, steps_offset)
        d.set_timesteps(n)
        theirs = d.timesteps
        assert len(ours) == n and (ours[1:] < ours[:-1]).all() and 0 <= ours.min() and ours.max() < T
        if len(theirs) == n + 1:  # difference 3: diffusers' trailing list sometimes ends in an extra -1
            assert spacing == "trailing" and theirs[-1] == -1
            extra.append(n)
            theirs = theirs[:n]
        assert torch.equal(ours, theirs), (spacing, n)
    if spacing == "trailing":
        assert extra[:3] == [61, 103, 121]


# --- guidance and thresholding --------------------------------------------------------------------------------------

def test_guidance_scale_one_is_conditional_and_zero_is_unconditional():
    g = gen(0)
    cond, uncond = torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)
    torch.testing.assert_close(guidance(cond, uncond, 1.0), cond)
    assert torch.equal(guidance(cond, uncond, 0.0), uncond)
    w = 6.5  # Ho & Salimans Eq. 6: (1 + w) eps(z, c) - w eps(z), with scale = 1 + w
    torch.testing.assert_close(guidance(cond, uncond, 1 + w), (1 + w) * cond - w * uncond)
    with pytest.raises(AssertionError):
        guidance(cond, uncond[:1], 2.0)


def test_guided_sampling_at_scale_one_equals_the_conditional_model():
    s, cfg = schedule("linear"), SamplerConfig(sampler="ddim", num_inference_steps=10)
    cond_model, uncond_model = pseudo_model(seed=1), pseudo_model(seed=2)
    x_T = torch.randn(SHAPE, generator=gen(0))
    guided = sample(lambda x, t: guidance(cond_model(x, t), uncond_model(x, t), 1.0), x_T, s, cfg, progress=False)
    torch.testing.assert_close(guided, sample(cond_model, x_T, s, cfg, progress=False))
    unguided = sample(lambda x, t: guidance(cond_model(x, t), uncond_model(x, t), 0.0), x_T, s, cfg, progress=False)
    torch.testing.assert_close(unguided, sample(uncond_model, x_T, s, cfg, progress=False))


def test_dynamic_threshold_properties_and_diffusers():
    g = gen(0)
    x0 = torch.stack([0.5 * torch.rand(SHAPE[1:], generator=g),   # |x| < 1: s clamps to 1, unchanged
                      1.0 * torch.randn(SHAPE[1:], generator=g),  # 1 < s < max: clip to [-s, s], divide by s
                      9.0 * torch.randn(SHAPE[1:], generator=g)])  # s capped at max_value = 2.5
    out = dynamic_threshold(x0, 0.9, 2.5)
    assert out.shape == x0.shape and out.abs().max() <= 1
    assert torch.equal(out[0], x0[0])
    s1 = torch.quantile(x0[1].abs().flatten(), 0.9)
    assert 1 < s1 < 2.5
    torch.testing.assert_close(out[1], x0[1].clamp(-s1, s1) / s1)
    torch.testing.assert_close(out[2], x0[2].clamp(-2.5, 2.5) / 2.5)
    # per sample: changing sample 2 leaves sample 1 alone
    other = x0.clone()
    other[2] *= 3
    assert torch.equal(dynamic_threshold(other, 0.9, 2.5)[1], out[1])
    # max_value = 1 is static clipping to [-1, 1]
    assert torch.equal(dynamic_threshold(x0, 0.995, 1.0), x0.clamp(-1, 1))
    ref = reference().DDPMScheduler(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=2.5)
    assert torch.equal(out, ref._threshold_sample(x0))
    assert dynamic_threshold(x0.bfloat16(), 0.9, 2.5).dtype == torch.bfloat16


# --- oracle: a denoiser that knows x0 makes every sampler return x0 -------------------------------------------------

SAMPLER_VARIANTS = [dict(sampler="ddpm", variance_type="fixed_small"),
                    dict(sampler="ddpm", variance_type="fixed_large"),
                    dict(sampler="ddim", eta=0.0), dict(sampler="ddim", eta=0.5), dict(sampler="ddim", eta=1.0),
                    dict(sampler="dpmpp_2m")]


def oracle(s, x0):
    """Returns the exact training target (eps, x0 or v) of x_t for the known x0."""
    def denoise(x_t, t):
        abar = s.abar(t, x_t)
        eps = (x_t - abar.sqrt() * x0) / (1 - abar).sqrt()
        return s.training_target(x0, eps, t)
    return denoise


@pytest.mark.parametrize("variant", SAMPLER_VARIANTS, ids=lambda v: "-".join(map(str, v.values())))
@pytest.mark.parametrize("zero_snr, prediction_type, spacing", [
    (z, p, sp) for z, p, sp in itertools.product([False, True], PREDICTIONS, SPACINGS)
    if not eps_undefined(z, p, make_timesteps(T, 10, sp)[0])])  # epsilon from abar = 0 raises (tested below)
def test_oracle_denoiser_recovers_x0(variant, zero_snr, prediction_type, spacing):
    s = schedule("linear", zero_snr, prediction_type)
    x0 = torch.rand(SHAPE, generator=gen(1)) * 2 - 1
    x_T = torch.randn(SHAPE, generator=gen(2))
    for n in (10, 50):
        cfg = SamplerConfig(num_inference_steps=n, timestep_spacing=spacing, **variant)
        out = sample(oracle(s, x0), x_T, s, cfg, generator=gen(3), progress=False)
        torch.testing.assert_close(out, x0, rtol=0, atol=1e-5)


@pytest.mark.parametrize("variant", [SAMPLER_VARIANTS[0], SAMPLER_VARIANTS[2]], ids=["ddpm", "ddim"])
def test_oracle_denoiser_recovers_x0_with_all_training_steps(variant):
    s = schedule("cosine", False, "v_prediction")
    x0 = torch.rand(SHAPE, generator=gen(1)) * 2 - 1
    cfg = SamplerConfig(num_inference_steps=T, **variant)
    out = sample(oracle(s, x0), torch.randn(SHAPE, generator=gen(2)), s, cfg, generator=gen(3), progress=False)
    torch.testing.assert_close(out, x0, rtol=0, atol=1e-5)


# --- DDIM with eta = 1 is DDPM --------------------------------------------------------------------------------------

def noise_std(step, *args):
    """sigma of a stochastic step, measured from the outside: x_prev(seed) = mean + sigma z(seed)."""
    x1, x2 = step(*args, gen(11)), step(*args, gen(12))
    z1 = torch.randn(SHAPE, generator=gen(11), dtype=torch.float64)
    z2 = torch.randn(SHAPE, generator=gen(12), dtype=torch.float64)
    sigma = ((x1 - x2) * (z1 - z2)).sum() / ((z1 - z2) ** 2).sum()
    torch.testing.assert_close(x1 - x2, sigma * (z1 - z2), rtol=0, atol=1e-12)  # exactly proportional
    return float(sigma)


def test_ddim_eta_one_has_ddpm_posterior_variance_at_every_step():
    """DDIM Eq. 16 with eta = 1: sigma^2 = beta_tilde_t of DDPM Eq. 7 (fixed_small), at all T steps."""
    s = schedule64("linear")
    ddim_cfg = SamplerConfig(sampler="ddim", eta=1.0, num_inference_steps=T)
    ddpm_cfg = SamplerConfig(sampler="ddpm", variance_type="fixed_small", num_inference_steps=T)
    g = gen(0)
    x, model_output = torch.randn(SHAPE, generator=g, dtype=torch.float64), torch.randn(SHAPE, generator=g,
                                                                                           dtype=torch.float64)
    beta_tilde = s.posterior_variance(torch.arange(T))
    for t, prev_t in pairs(make_timesteps(T, T, "leading")):
        ddim_var = noise_std(lambda gg: ddim_step(s, model_output, t, prev_t, x, ddim_cfg, gg)) ** 2
        ddpm_var = noise_std(lambda gg: ddpm_step(s, model_output, t, prev_t, x, ddpm_cfg, gg)) ** 2
        assert ddim_var == pytest.approx(float(beta_tilde[t]), rel=1e-9, abs=1e-30), t
        assert ddpm_var == pytest.approx(float(beta_tilde[t]), rel=1e-9, abs=1e-30), t
    assert float(beta_tilde[0]) == 0  # the last step adds no noise


@pytest.mark.parametrize("n, spacing", [(T, "leading"), (50, "trailing"), (13, "linspace")])
def test_ddim_eta_one_chain_equals_ddpm_chain(n, spacing):
    """With eta = 1 the DDIM step has DDPM's posterior mean (DDIM Sec. 4.1) and variance, and draws its noise the
    same way, so the two chains coincide sample for sample, also with respacing."""
    s = schedule64("scaled_linear", "v_prediction")
    x_T = torch.randn(SHAPE, generator=gen(0), dtype=torch.float64)
    ddim = sample(pseudo_model(), x_T, s, SamplerConfig(sampler="ddim", eta=1.0, num_inference_steps=n,
                                                        timestep_spacing=spacing), gen(1), progress=False)
    ddpm = sample(pseudo_model(), x_T, s, SamplerConfig(sampler="ddpm", num_inference_steps=n,
                                                        timestep_spacing=spacing), gen(1), progress=False)
    torch.testing.assert_close(ddim, ddpm, rtol=1e-9, atol=1e-9)


# --- equality with diffusers, step by step --------------------------------------------------------------------------

def steps_to_check(n):
    return sorted({0, 1, n // 2, n - 2, n - 1})


@pytest.mark.parametrize("zero_snr", [False, True])
@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_large"])
@pytest.mark.parametrize("prediction_type", PREDICTIONS)
@pytest.mark.parametrize("beta_schedule", SCHEDULES)
def test_ddpm_step_equals_diffusers(beta_schedule, prediction_type, variance_type, spacing, zero_snr):
    s = schedule(beta_schedule, zero_snr, prediction_type)
    for n in (10, 50, 1000):
        d = diffusers_ddpm(beta_schedule, zero_snr, prediction_type, variance_type, spacing, n)
        cfg = SamplerConfig(sampler="ddpm", num_inference_steps=n, timestep_spacing=spacing,
                            variance_type=variance_type)
        steps = pairs(make_timesteps(T, n, spacing))
        assert [t for t, _ in steps] == d.timesteps.tolist()
        g = gen(n)
        for i in steps_to_check(n):
            t, prev_t = steps[i]
            x, model_output = torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)
            if eps_undefined(zero_snr, prediction_type, t):
                continue
            ours = ddpm_step(s, model_output, t, prev_t, x, cfg, gen(i))
            theirs = diffusers_ddpm_step_no_last_noise(d, model_output, t, x, gen(i), is_last=prev_t < 0)
            torch.testing.assert_close(ours, theirs, **TOL, msg=lambda m: f"n={n} t={t} prev_t={prev_t}: {m}")


@pytest.mark.parametrize("n", [10, 13, 50])
@pytest.mark.parametrize("zero_snr", [False, True])
@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("prediction_type", PREDICTIONS)
@pytest.mark.parametrize("beta_schedule", DDIM_SCHEDULES)
def test_ddim_step_equals_diffusers(beta_schedule, prediction_type, spacing, zero_snr, n):
    """Where diffusers' prev_t (t - T // n) is the next listed timestep we equal its step; where it is not
    (difference 1) we differ from it, and equal it once it is made to step to our prev_t."""
    s = schedule(beta_schedule, zero_snr, prediction_type)
    d = diffusers_ddim(beta_schedule, zero_snr, prediction_type, spacing, n)
    steps = pairs(make_timesteps(T, n, spacing))
    assert [t for t, _ in steps] == d.timesteps.tolist()
    g = gen(n)
    for i, eta in itertools.product(steps_to_check(n), [0.0, 0.5, 1.0]):
        cfg = SamplerConfig(sampler="ddim", num_inference_steps=n, timestep_spacing=spacing, eta=eta)
        t, prev_t = steps[i]
        x, model_output = torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)
        if eps_undefined(zero_snr, prediction_type, t):
            continue
        ours = ddim_step(s, model_output, t, prev_t, x, cfg, gen(i))
        theirs = d.step(model_output, t, x, eta=eta, generator=gen(i)).prev_sample
        if diffusers_ddim_prev(t, n) == prev_t:
            expected = theirs
        else:  # difference 1
            assert not torch.allclose(ours, theirs, **TOL), (t, prev_t)  # distinguishable at our tolerance
            expected = diffusers_ddim_step_at(d, model_output, t, prev_t, x, eta, gen(i))
        if zero_snr and eta == 1.0 and t == T - 1:  # difference 5: see the test below
            assert_close_to_ddim_eta_one_from_zero_snr(ours, s, model_output, prev_t, x, gen(i))
            if expected.isnan().any():
                continue
        torch.testing.assert_close(ours, expected, **TOL, msg=lambda m: f"t={t} prev_t={prev_t} eta={eta}: {m}")


# --- equality with diffusers, whole loops ---------------------------------------------------------------------------

def diffusers_loop(d, denoise, x, generator, ddim_eta=None):
    """The reference loop: DDPM as diffusers runs it (minus difference 2), DDIM stepping to the listed timesteps."""
    ts = d.timesteps.tolist()
    for i, t in enumerate(ts):
        model_output = denoise(x, torch.full((x.shape[0],), t))
        if ddim_eta is None:
            x = diffusers_ddpm_step_no_last_noise(d, model_output, t, x, generator, is_last=i == len(ts) - 1)
        else:
            prev_t = ts[i + 1] if i + 1 < len(ts) else -1
            x = diffusers_ddim_step_at(d, model_output, t, prev_t, x, ddim_eta, generator)
    return x


def loop_cases(schedules, extra):
    cases = []
    for beta_schedule, prediction_type, spacing, zero_snr, e in itertools.product(
            schedules, PREDICTIONS, SPACINGS, [False, True], extra):
        first_t = make_timesteps(T, 10, spacing)[0]
        if eps_undefined(zero_snr, prediction_type, first_t):
            continue  # raises, tested below
        if zero_snr and first_t == T - 1 and e == 1.0:
            continue  # DDIM eta = 1 from abar = 0: diffusers may give NaN (difference 5, tested step by step)
        cases.append((beta_schedule, prediction_type, spacing, zero_snr, e))
    return cases


@pytest.mark.parametrize("beta_schedule, prediction_type, spacing, zero_snr, variance_type",
                         loop_cases(SCHEDULES, ["fixed_small", "fixed_large"]))
def test_ddpm_loop_equals_diffusers(beta_schedule, prediction_type, spacing, zero_snr, variance_type):
    s = schedule(beta_schedule, zero_snr, prediction_type)
    x_T = torch.randn(SHAPE, generator=gen(0))
    cfg = SamplerConfig(sampler="ddpm", num_inference_steps=10, timestep_spacing=spacing, variance_type=variance_type)
    ours = sample(pseudo_model(), x_T, s, cfg, generator=gen(1), progress=False)
    d = diffusers_ddpm(beta_schedule, zero_snr, prediction_type, variance_type, spacing, 10)
    torch.testing.assert_close(ours, diffusers_loop(d, pseudo_model(), x_T, gen(1)), **TOL)


@pytest.mark.parametrize("beta_schedule, prediction_type, spacing, zero_snr, eta",
                         loop_cases(DDIM_SCHEDULES, [0.0, 0.5, 1.0]))
def test_ddim_loop_equals_diffusers(beta_schedule, prediction_type, spacing, zero_snr, eta):
    s = schedule(beta_schedule, zero_snr, prediction_type)
    x_T = torch.randn(SHAPE, generator=gen(0))
    for n in (10, 13):
        cfg = SamplerConfig(sampler="ddim", num_inference_steps=n, timestep_spacing=spacing, eta=eta)
        ours = sample(pseudo_model(), x_T, s, cfg, generator=gen(1), progress=False)
        d = diffusers_ddim(beta_schedule, zero_snr, prediction_type, spacing, n)
        torch.testing.assert_close(ours, diffusers_loop(d, pseudo_model(), x_T, gen(1), ddim_eta=eta), **TOL)


@pytest.mark.parametrize("sampler, n, spacing, steps_offset, set_alpha_to_one", [
    ("ddpm", 1000, "leading", 0, True), ("ddpm", 50, "trailing", 0, True), ("ddim", 1000, "trailing", 0, True),
    ("ddim", 50, "leading", 1, False),  # Stable Diffusion v1's scheduler config
    ("ddim", 50, "linspace", 0, False)])
def test_long_loops_equal_diffusers(sampler, n, spacing, steps_offset, set_alpha_to_one):
    s = schedule("scaled_linear", False, "epsilon")
    x_T = torch.randn(SHAPE, generator=gen(0))
    cfg = SamplerConfig(sampler=sampler, num_inference_steps=n, timestep_spacing=spacing, steps_offset=steps_offset,
                        eta=0.3 if sampler == "ddim" else 0.0, set_alpha_to_one=set_alpha_to_one)
    ours = sample(pseudo_model(), x_T, s, cfg, generator=gen(1), progress=False)
    if sampler == "ddpm":
        d = diffusers_ddpm("scaled_linear", False, "epsilon", "fixed_small", spacing, n, steps_offset)
        theirs = diffusers_loop(d, pseudo_model(), x_T, gen(1))
    else:
        d = diffusers_ddim("scaled_linear", False, "epsilon", spacing, n, steps_offset, set_alpha_to_one)
        theirs = diffusers_loop(d, pseudo_model(), x_T, gen(1), ddim_eta=0.3)
    torch.testing.assert_close(ours, theirs, **TOL)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
@pytest.mark.parametrize("mode", ["clip_sample", "thresholding"])
def test_clipping_and_thresholding_loops_equal_diffusers(sampler, mode):
    s = schedule("linear", False, "sample")
    x_T = torch.randn(SHAPE, generator=gen(0))
    options = dict(clip_sample=True, clip_sample_range=1.5) if mode == "clip_sample" else dict(
        thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=1.8)
    model = pseudo_model(scale=3.0)  # x0 predictions up to 3, so the clipping is active
    eta = 0.5 if sampler == "ddim" else 0.0  # DDPM has no eta
    cfg = SamplerConfig(sampler=sampler, num_inference_steps=10, eta=eta, **options)
    ours = sample(model, x_T, s, cfg, generator=gen(1), progress=False)
    unclipped = sample(model, x_T, s, SamplerConfig(sampler=sampler, num_inference_steps=10, eta=eta), gen(1),
                       progress=False)
    assert (ours - unclipped).abs().max() > 0.1
    if sampler == "ddpm":
        d = diffusers_ddpm("linear", False, "sample", "fixed_small", "leading", 10, **options)
        theirs = diffusers_loop(d, model, x_T, gen(1))
    else:
        d = diffusers_ddim("linear", False, "sample", "leading", 10, **options)
        theirs = diffusers_loop(d, model, x_T, gen(1), ddim_eta=0.5)
    torch.testing.assert_close(ours, theirs, **TOL)


# --- DPM-Solver++(2M) ------------------------------------------------------------------------------------------------

def diffusers_dpmpp_2m_loop(beta_schedule, prediction_type, spacing, n, denoise, x, **kw):
    """DPMSolverMultistepScheduler (dpmsolver++, order 2, midpoint, final sigma 0) run on OUR timestep list
    (difference 6: its own linspace / leading lists differ; its trailing list is ours)."""
    d = reference().DPMSolverMultistepScheduler(beta_schedule=DIFFUSERS_NAME[beta_schedule], algorithm_type="dpmsolver++",
                                                solver_order=2, solver_type="midpoint", prediction_type=prediction_type,
                                                final_sigmas_type="zero", **betas_kw(beta_schedule), **kw)
    d.set_timesteps(timesteps=make_timesteps(T, n, spacing).tolist())
    for t in d.timesteps.tolist():
        x = d.step(denoise(x, torch.full((x.shape[0],), t)), t, x).prev_sample
    return x


@pytest.mark.parametrize("beta_schedule, prediction_type, spacing",
                         list(itertools.product(DDIM_SCHEDULES, PREDICTIONS, SPACINGS)))
def test_dpmpp_2m_loop_equals_diffusers(beta_schedule, prediction_type, spacing):
    s = schedule(beta_schedule, False, prediction_type)
    x_T = torch.randn(SHAPE, generator=gen(0))
    for n in (1, 2, 10, 13, 20):
        cfg = SamplerConfig(sampler="dpmpp_2m", num_inference_steps=n, timestep_spacing=spacing)
        ours = sample(pseudo_model(), x_T, s, cfg, progress=False)
        theirs = diffusers_dpmpp_2m_loop(beta_schedule, prediction_type, spacing, n, pseudo_model(), x_T)
        torch.testing.assert_close(ours, theirs, **TOL)


def test_dpmpp_2m_trailing_timesteps_are_diffusers_own_and_thresholding_equals_diffusers():
    """With "trailing" diffusers' own list is ours; with dynamic thresholding of x0_hat the loops still agree."""
    d = reference().DPMSolverMultistepScheduler(timestep_spacing="trailing")
    d.set_timesteps(20)
    assert d.timesteps.tolist() == make_timesteps(T, 20, "trailing").tolist()
    s = schedule("linear", False, "sample")
    x_T = torch.randn(SHAPE, generator=gen(0))
    options = dict(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=1.8)
    model = pseudo_model(scale=3.0)  # x0 predictions up to 3, so the thresholding is active
    ours = sample(model, x_T, s, SamplerConfig(sampler="dpmpp_2m", num_inference_steps=10, **options), progress=False)
    plain = sample(model, x_T, s, SamplerConfig(sampler="dpmpp_2m", num_inference_steps=10), progress=False)
    assert (ours - plain).abs().max() > 0.1
    theirs = diffusers_dpmpp_2m_loop("linear", "sample", "leading", 10, model, x_T, **options)
    torch.testing.assert_close(ours, theirs, **TOL)


@pytest.mark.parametrize("prediction_type", PREDICTIONS)
def test_dpmpp_first_order_step_is_ddim(prediction_type):
    """Holding x0_hat constant over the step (the first step, with no previous prediction) is DDIM with eta = 0."""
    s = schedule("cosine", False, prediction_type)
    x = torch.randn(SHAPE, generator=gen(0))
    out = pseudo_model()(x, torch.full((SHAPE[0],), 700))
    for prev_t in (500, 0, -1):
        ours, _ = dpmpp_2m_step(s, out, 700, prev_t, x, SamplerConfig(sampler="dpmpp_2m"), last=None)
        ddim = ddim_step(s, out, 700, prev_t, x, SamplerConfig(sampler="ddim"))
        torch.testing.assert_close(ours, ddim, rtol=1e-5, atol=1e-5)


def test_dpmpp_2m_converges_at_second_order_where_ddim_is_first_order():
    """The solvers integrate the same probability-flow ODE. Against its solution (the 2M at T steps, float64),
    doubling the steps divides DDIM's error by ~2 (first order) and the 2M's by ~4 (second order), so that the 2M
    at 10 steps is closer than DDIM at 40 (Lu et al. 2022, Sec. 4)."""
    s = schedule64("cosine", "v_prediction")
    x_T = torch.randn(SHAPE, generator=gen(1), dtype=torch.float64)
    model = pseudo_model(scale=0.5)
    run = lambda sampler, n: sample(model, x_T, s, SamplerConfig(sampler=sampler, num_inference_steps=n,
                                                                  timestep_spacing="trailing"), progress=False)
    exact = run("dpmpp_2m", T)
    err = {(sampler, n): float((run(sampler, n) - exact).abs().max()) for sampler in ("ddim", "dpmpp_2m")
           for n in (10, 20, 40)}
    assert 1.8 < err["ddim", 20] / err["ddim", 40] < 2.2
    assert err["dpmpp_2m", 20] / err["dpmpp_2m", 40] > 3.5
    assert err["dpmpp_2m", 10] < err["ddim", 40]


def test_dpmpp_2m_from_zero_terminal_snr_is_finite():
    """Difference 6: abar_{T-1} = 0 kept (lambda = -inf); the first step is DDIM's from pure noise, then the 2M."""
    s = schedule("linear", True, "v_prediction")
    x_T = torch.randn(SHAPE, generator=gen(0))
    cfg = SamplerConfig(sampler="dpmpp_2m", num_inference_steps=10, timestep_spacing="trailing")
    out = sample(pseudo_model(), x_T, s, cfg, progress=False)
    assert torch.isfinite(out).all()
    first, _ = dpmpp_2m_step(s, pseudo_model()(x_T, torch.full((SHAPE[0],), T - 1)), T - 1, 899, x_T, cfg)
    ddim = ddim_step(s, pseudo_model()(x_T, torch.full((SHAPE[0],), T - 1)), T - 1, 899, x_T, SamplerConfig())
    torch.testing.assert_close(first, ddim, rtol=1e-5, atol=1e-5)


# --- the deliberate differences, shown explicitly -------------------------------------------------------------------

@pytest.mark.parametrize("spacing, steps_offset", [("leading", 0), ("leading", 1), ("trailing", 0),
                                                   ("linspace", 0)])
def test_which_runs_diffusers_ddim_steps_to_an_unlisted_timestep(spacing, steps_offset):
    """Difference 1, enumerated over every n: diffusers' DDIM prev_t = t - T // n is the next listed timestep
    exactly for leading with steps_offset < T // n, trailing with n dividing T, and linspace with n in {1, T}."""
    for n in range(1, T + (0 if steps_offset else 1)):
        steps = pairs(make_timesteps(T, n, spacing, steps_offset))
        agrees = all(diffusers_ddim_prev(t, n) == prev_t for t, prev_t in steps)
        expected = {"leading": steps_offset < T // n, "trailing": T % n == 0, "linspace": n in (1, T)}[spacing]
        assert agrees == expected, (spacing, steps_offset, n)


def test_ddim_linspace_and_trailing_differ_from_diffusers_as_documented():
    """The two examples of the docstring, on full loops: linspace n = 10 (every step) and trailing n = 13 (only the
    last step, 76 -> 0 in diffusers, 76 -> past 0 here)."""
    assert pairs(make_timesteps(T, 10, "linspace"))[0] == (999, 888) and diffusers_ddim_prev(999, 10) == 899
    assert pairs(make_timesteps(T, 13, "trailing"))[-1] == (76, -1) and diffusers_ddim_prev(76, 13) == 0
    s = schedule("linear", False, "epsilon")
    x_T = torch.randn(SHAPE, generator=gen(0))
    for n, spacing in [(10, "linspace"), (13, "trailing")]:
        ours = sample(pseudo_model(), x_T, s, SamplerConfig(num_inference_steps=n, timestep_spacing=spacing),
                      progress=False)
        d = diffusers_ddim("linear", False, "epsilon", spacing, n)
        x = x_T
        for t in d.timesteps:
            x = d.step(pseudo_model()(x, t.repeat(SHAPE[0])), t, x).prev_sample
        assert (ours - x).abs().max() > 1e-2
        torch.testing.assert_close(ours, diffusers_loop(d, pseudo_model(), x_T, None, ddim_eta=0.0), **TOL)


@pytest.mark.parametrize("spacing, steps_offset", [("trailing", 0), ("leading", 1)])
def test_ddpm_last_step_adds_no_noise_unlike_diffusers(spacing, steps_offset):
    """Difference 2: when the last visited t is > 0, diffusers' DDPM adds noise on its last step; we return the
    posterior mean, which from prev_t = past 0 is x0_hat itself. fixed_small agrees (its variance there is 0)."""
    s = schedule("linear", False, "epsilon")
    t, prev_t = pairs(make_timesteps(T, 10, spacing, steps_offset))[-1]
    assert t > 0 and prev_t == -1
    g = gen(0)
    x, model_output = torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)
    x0_hat, _ = s.predict_x0_and_eps(model_output, x, t)
    for variance_type in ("fixed_small", "fixed_large"):
        cfg = SamplerConfig(sampler="ddpm", num_inference_steps=10, timestep_spacing=spacing,
                            steps_offset=steps_offset, variance_type=variance_type)
        ours = ddpm_step(s, model_output, t, prev_t, x, cfg, gen(1))
        torch.testing.assert_close(ours, x0_hat)
        d = diffusers_ddpm("linear", False, "epsilon", variance_type, spacing, 10, steps_offset)
        theirs = d.step(model_output, t, x, generator=gen(1)).prev_sample
        if variance_type == "fixed_small":
            torch.testing.assert_close(ours, theirs, **TOL)
        else:
            z = torch.randn(SHAPE, generator=gen(1))
            torch.testing.assert_close(theirs, ours + (1 - s.alphas_cumprod[t]).sqrt() * z, **TOL)
            assert (theirs - ours).abs().max() > 1e-2


def assert_close_to_ddim_eta_one_from_zero_snr(ours, s, model_output, prev_t, x, generator):
    """DDIM Eq. 12 from t = T-1 where abar_t = 0, eta = 1: sigma^2 = (1 - abar_prev) (1 - 0) = 1 - abar_prev, so the
    direction term sqrt(1 - abar_prev - sigma^2) eps_hat vanishes: x_prev = sqrt(abar_prev) x0_hat + sigma z.
    In float32 the vanishing radicand rounds to 0 or +-1 ulp, whose square root leaves up to
    sqrt(ulp(1)) |eps_hat| ~ 3.5e-4 |eps_hat| of direction term (diffusers' arithmetic, which we keep)."""
    abar_prev = s.alphas_cumprod[prev_t]
    x0_hat, eps_hat = s.predict_x0_and_eps(model_output, x, T - 1)
    exact = abar_prev.sqrt() * x0_hat + (1 - abar_prev).sqrt() * torch.randn(x.shape, generator=generator)
    slack = torch.finfo(torch.float32).eps ** 0.5 * eps_hat.abs() + 1e-5
    assert ((ours - exact).abs() <= slack).all()


def zero_snr_radicand(abar_prev):
    """1 - abar_prev - sigma^2 of a DDIM step with eta = 1 from abar_t = 0, in float32 and by the same operations as
    ddim_step (and diffusers' DDIMScheduler.step): 0 in exact arithmetic, 0 or +-1 ulp after rounding."""
    abar_t = torch.zeros((), dtype=torch.float32)
    variance = (1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev)
    return 1 - abar_prev - (variance**0.5) ** 2


def abar_with_negative_radicand(start=0.3):
    """The first float32 abar at or above `start` whose zero-SNR radicand rounds to a negative number, so that the
    clamp in ddim_step is exercised on every machine (IEEE float32 arithmetic is the same everywhere; only how a
    machine computed the schedule's table differs). Near abar = 0 (t = 899 of the zero-SNR linear schedule) the
    radicand never rounds below 0; around 0.3 about one value in five does."""
    a = torch.tensor(start, dtype=torch.float32)
    for _ in range(1000):
        if zero_snr_radicand(a) < 0:
            return a
        a = torch.nextafter(a, torch.ones_like(a))
    raise AssertionError("no float32 abar near the schedule's has a negative radicand")


def test_ddim_eta_one_from_zero_terminal_snr_is_finite_where_diffusers_may_give_nan():
    """Difference 5: 1 - abar_prev - sigma^2 is 0 in exact arithmetic but can round to -1 ulp in float32; diffusers
    takes its square root (NaN), we clamp it at 0. Whether the schedule's own abar_prev rounds that way depends on
    how this machine computed the schedule, so the step is also taken to an abar_prev chosen to round negative:
    there ours must stay finite and close to the exact step (removing the clamp makes it NaN). Where diffusers is
    finite it must agree with ours within the same slack."""
    base = schedule("linear", True, "v_prediction")
    forced = NoiseSchedule(base.cfg)
    forced.alphas_cumprod = base.alphas_cumprod.clone()
    forced.alphas_cumprod[899] = abar_with_negative_radicand()
    assert zero_snr_radicand(forced.alphas_cumprod[899]) < 0
    cfg = SamplerConfig(num_inference_steps=10, timestep_spacing="trailing", eta=1.0)
    x, model_output = torch.randn(SHAPE, generator=gen(0)), torch.randn(SHAPE, generator=gen(1))
    for s in (base, forced):
        ours = ddim_step(s, model_output, 999, 899, x, cfg, gen(2))
        assert torch.isfinite(ours).all()
        assert_close_to_ddim_eta_one_from_zero_snr(ours, s, model_output, 899, x, gen(2))
        d = diffusers_ddim("linear", True, "v_prediction", "trailing", 10)
        d.alphas_cumprod = s.alphas_cumprod.clone()
        theirs = d.step(model_output, 999, x, eta=1.0, generator=gen(2)).prev_sample
        if s is forced:
            assert theirs.isnan().all()  # the documented difference, now on every machine
        elif not theirs.isnan().any():
            assert_close_to_ddim_eta_one_from_zero_snr(theirs, s, model_output, 899, x, gen(2))


# --- reproducibility, the denoiser's interface, dtypes ----------------------------------------------------------------

def test_sample_draws_noise_only_from_the_generator():
    s = schedule("linear")
    x_T = torch.randn(SHAPE, generator=gen(0))
    for cfg in (SamplerConfig(sampler="ddpm", num_inference_steps=10), SamplerConfig(eta=1.0, num_inference_steps=10)):
        torch.manual_seed(123)
        state = torch.get_rng_state()
        a = sample(pseudo_model(), x_T, s, cfg, generator=gen(5), progress=False)
        b = sample(pseudo_model(), x_T, s, cfg, generator=gen(5), progress=False)
        c = sample(pseudo_model(), x_T, s, cfg, generator=gen(6), progress=False)
        assert torch.equal(a, b) and (a - c).abs().max() > 1e-3
        assert torch.equal(torch.get_rng_state(), state), "the global RNG must not be used"


def test_denoise_is_called_with_the_listed_timesteps_as_a_batch():
    s = schedule("linear")
    seen = []

    def denoise(x, t):
        assert t.shape == (SHAPE[0],) and t.dtype == torch.long and t.device == x.device
        seen.append(int(t[0]))
        return torch.zeros_like(x)
    sample(denoise, torch.randn(SHAPE), s, SamplerConfig(num_inference_steps=7, timestep_spacing="trailing"),
           progress=False)
    assert seen == make_timesteps(T, 7, "trailing").tolist()


def test_sampling_keeps_the_dtype_of_x():
    """A bf16 model on bf16 x_T: every step stays in bf16 (the schedule's float32 coefficients are cast to x's dtype,
    the step noise is drawn in the model output's dtype), for DDPM and for DDIM with noise."""
    s = schedule("scaled_linear", False, "v_prediction")
    conv = torch.nn.Conv2d(3, 3, 3, padding=1).to(torch.bfloat16)
    seen = []

    def denoise(x, t):
        seen.append(x.dtype)
        return conv(x) * 0.1
    x_T = torch.randn(SHAPE, generator=gen(0)).bfloat16()
    for cfg in (SamplerConfig(sampler="ddpm", num_inference_steps=5), SamplerConfig(num_inference_steps=5, eta=0.5)):
        out = sample(denoise, x_T, s, cfg, gen(1), progress=False)
        assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert set(seen) == {torch.bfloat16}


# --- the DDIM trajectory of an oracle, and shapes other than images -------------------------------------------------

@pytest.mark.parametrize("spacing, n", [("leading", 10), ("trailing", 13), ("linspace", 7)])
def test_ddim_eta_zero_follows_the_forward_process_of_an_oracle(spacing, n):
    """DDIM Eq. 12 with eta = 0 and the oracle's eps_hat = eps: x_prev = sqrt(abar_prev) x0 + sqrt(1 - abar_prev) eps,
    so x_t at EVERY step equals q_sample(x0, t, eps) for the eps of x_T (the last step alone, at abar = 1, would hide
    a wrong intermediate step)."""
    s = schedule64("cosine", "v_prediction")
    x0 = torch.rand(SHAPE, generator=gen(1), dtype=torch.float64) * 2 - 1
    t_first = int(make_timesteps(T, n, spacing)[0])
    eps = torch.randn(SHAPE, generator=gen(2), dtype=torch.float64)
    x_T = s.q_sample(x0, t_first, eps)
    visited = []
    denoise = oracle(s, x0)

    def recording(x_t, t):
        visited.append((int(t[0]), x_t.clone()))
        return denoise(x_t, t)
    out = sample(recording, x_T, s, SamplerConfig(num_inference_steps=n, timestep_spacing=spacing, eta=0.0),
                 progress=False)
    assert [t for t, _ in visited] == make_timesteps(T, n, spacing).tolist()
    for t, x_t in visited:
        torch.testing.assert_close(x_t, s.q_sample(x0, t, eps), rtol=0, atol=1e-10, msg=lambda m: f"t={t}: {m}")
    torch.testing.assert_close(out, x0, rtol=0, atol=1e-10)


@pytest.mark.parametrize("variant", SAMPLER_VARIANTS, ids=lambda v: "-".join(map(str, v.values())))
def test_samplers_run_on_vectors(variant):
    """The samplers take any x of shape (B, ...): on (B, D) embeddings (unCLIP's prior) the oracle is recovered, and
    thresholding works per row."""
    s = schedule("cosine", False, "sample")
    x0 = torch.rand(4, 16, generator=gen(1)) * 2 - 1  # (B, D)
    out = sample(oracle(s, x0), torch.randn(4, 16, generator=gen(2)), s, SamplerConfig(num_inference_steps=20, **variant),
                 generator=gen(3), progress=False)
    assert out.shape == (4, 16)
    torch.testing.assert_close(out, x0, rtol=0, atol=1e-5)
    thresholded = sample(oracle(s, 3 * x0), torch.randn(4, 16, generator=gen(2)), s,
                         SamplerConfig(num_inference_steps=20, thresholding=True, sample_max_value=9.0, **variant),
                         generator=gen(3), progress=False)
    assert thresholded.shape == (4, 16) and thresholded.abs().max() <= 1 + 1e-6


# --- bad input ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, message", [
    (dict(sampler="plms"), "ddpm, ddim"),
    (dict(timestep_spacing="lead"), "did you mean 'leading'"),
    (dict(variance_type="learned"), "fixed_small, fixed_large"),
    (dict(num_inference_steps=0), "num_inference_steps"),
    (dict(steps_offset=-1), "steps_offset"),
    (dict(eta=-0.5), "eta"),
    (dict(sampler="ddpm", eta=0.5), "the ddpm sampler has none"),
    (dict(sampler="dpmpp_2m", eta=1.0), "drop --eta"),
    (dict(clip_sample_range=0.0), "clip_sample_range"),
    (dict(dynamic_thresholding_ratio=1.5), "dynamic_thresholding_ratio"),
    (dict(sample_max_value=0.5), "sample_max_value"),
    (dict(clip_sample=True, thresholding=True), "exclusive"),
])
def test_bad_config_raises_a_clear_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplerConfig(**kwargs)


def test_bad_step_counts_and_undefined_combinations_raise_clear_errors():
    with pytest.raises(ValueError, match=r"num_inference_steps must be in \[1, num_train_timesteps=1000\]"):
        make_timesteps(T, 1001, "leading")
    with pytest.raises(ValueError, match="steps_offset"):
        make_timesteps(T, T, "leading", steps_offset=1)  # would start at t = 1000
    with pytest.raises(ValueError, match="did you mean 'linspace'"):
        make_timesteps(T, 10, "linspac")
    x_T = torch.randn(SHAPE)
    with pytest.raises(ValueError, match="num_inference_steps"):
        sample(pseudo_model(), x_T, schedule("linear"), SamplerConfig(num_inference_steps=2000), progress=False)
    with pytest.raises(ValueError, match="v_prediction"):
        sample(pseudo_model(), x_T, schedule("linear", True, "epsilon"),
               SamplerConfig(timestep_spacing="trailing"), progress=False)
