"""Tests for models/schedule.py: the paper identities of the forward process, and equality with diffusers' tables.

Identities are checked on float64 tables rebuilt from the schedule's betas, so that the only error left is float64
rounding; equality with diffusers is checked on the float32 tables, bit for bit."""

import math
import warnings

import pytest
import torch

from models.schedule import NoiseSchedule, ScheduleConfig, rescale_zero_terminal_snr

warnings.filterwarnings("ignore", category=FutureWarning)


def reference():
    """diffusers, the test-only reference, imported by the tests that compare with it and by nothing else: the
    identities of this file run without it."""
    return pytest.importorskip("diffusers")

SCHEDULES = ["linear", "scaled_linear", "cosine", "sigmoid"]
DIFFUSERS_NAME = {"linear": "linear", "scaled_linear": "scaled_linear", "cosine": "squaredcos_cap_v2",
                  "sigmoid": "sigmoid"}
PREDICTIONS = ["epsilon", "sample", "v_prediction"]
SD_BETAS = dict(beta_start=0.00085, beta_end=0.012)  # Stable Diffusion's scaled_linear range


def make(beta_schedule="linear", zero_snr=False, prediction_type="epsilon", T=1000, float64=False, **kw):
    """A schedule; float64=True rebuilds alphas and alphas_cumprod from the betas in float64, so that identities
    hold to float64 rounding (the float32 tables, like diffusers', carry ~1e-4 relative error in 1 - abar_0)."""
    cfg = ScheduleConfig(num_train_timesteps=T, beta_schedule=beta_schedule, rescale_betas_zero_snr=zero_snr,
                         prediction_type=prediction_type, **kw)
    s = NoiseSchedule(cfg)
    if float64:
        s.betas = s.betas.double()
        s.alphas = 1 - s.betas
        s.alphas_cumprod = torch.cumprod(s.alphas, 0)
    return s


# --- the timestep convention --------------------------------------------------------------------------------------

def test_timestep_convention_t0_is_least_noisy_and_matches_diffusers_add_noise():
    s = make("scaled_linear", **SD_BETAS)
    abar = s.alphas_cumprod
    assert abar.shape == (1000,) and abar.dtype == torch.float32
    assert (abar[1:] < abar[:-1]).all(), "abar must decrease: t = 0 least noisy, t = T-1 noisiest"
    assert abar[0] == 1 - s.betas[0]  # abar_0 = alpha_0: one step of noise at t = 0
    ref = reference().DDPMScheduler(beta_schedule="scaled_linear", **SD_BETAS)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(5, 3, 4, 4, generator=g), torch.randn(5, 3, 4, 4, generator=g)
    t = torch.tensor([0, 1, 500, 998, 999])
    x_t = s.q_sample(x0, t, noise)
    torch.testing.assert_close(x_t, ref.add_noise(x0, noise, t), rtol=0, atol=0)
    # and by hand, per sample: x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps with abar_t = alphas_cumprod[t]
    for i, ti in enumerate(t.tolist()):
        expected = abar[ti].sqrt() * x0[i] + (1 - abar[ti]).sqrt() * noise[i]
        torch.testing.assert_close(x_t[i], expected)


@pytest.mark.parametrize("zero_snr", [False, True])
@pytest.mark.parametrize("beta_schedule", SCHEDULES)
def test_tables_equal_diffusers_bit_for_bit(beta_schedule, zero_snr):
    kw = SD_BETAS if beta_schedule == "scaled_linear" else {}
    ours = make(beta_schedule, zero_snr, **kw)
    ref = reference().DDPMScheduler(beta_schedule=DIFFUSERS_NAME[beta_schedule], rescale_betas_zero_snr=zero_snr, **kw)
    for name in ("betas", "alphas", "alphas_cumprod"):
        assert torch.equal(getattr(ours, name), getattr(ref, name)), name


def test_linear_and_cosine_follow_their_papers():
    # DDPM Sec. 4: betas linear from 1e-4 to 0.02
    s = make("linear", float64=True)
    torch.testing.assert_close(s.betas, torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), rtol=1e-6, atol=0)
    # Improved DDPM Eq. 17, independently in float64: abar at our t is f((t+1)/T) / f(0), while beta <= 0.999
    s = make("cosine", float64=True)
    T, tau = 1000, 0.008
    u = torch.arange(1, T + 1, dtype=torch.float64) / T
    f = torch.cos((u + tau) / (1 + tau) * math.pi / 2) ** 2
    abar = f / math.cos(tau / (1 + tau) * math.pi / 2) ** 2
    unclipped = s.betas < 0.999
    assert unclipped[:-1].all() and not unclipped[-1]  # only the last beta hits the 0.999 cap
    torch.testing.assert_close(s.alphas_cumprod[:-1], abar[:-1], rtol=1e-5, atol=1e-9)


# --- forward-process identities -------------------------------------------------------------------------------------

@pytest.mark.parametrize("beta_schedule", SCHEDULES)
def test_closed_form_q_xt_x0_equals_composed_one_step_noising(beta_schedule):
    """DDPM Eq. 4 from Eq. 2: composing q(x_t | x_{t-1}) = N(sqrt(alpha_t) x_{t-1}, beta_t) from x_0 gives mean
    coefficient prod sqrt(alpha_s) = sqrt(abar_t) and variance v_t = alpha_t v_{t-1} + beta_t = 1 - abar_t."""
    s = make(beta_schedule, float64=True)
    mean_coef, var = 1.0, 0.0
    mean_coefs, variances = [], []
    for alpha, beta in zip(s.alphas.tolist(), s.betas.tolist()):
        mean_coef, var = math.sqrt(alpha) * mean_coef, alpha * var + beta
        mean_coefs.append(mean_coef)
        variances.append(var)
    abar = s.alphas_cumprod
    torch.testing.assert_close(torch.tensor(mean_coefs, dtype=torch.float64), abar.sqrt(), rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(torch.tensor(variances, dtype=torch.float64), 1 - abar, rtol=1e-12, atol=1e-15)

    # the same on sample paths: running the chain with noises z_1..z_t gives exactly q_sample(x0, t, eps) for the
    # eps = sum_s c_s z_s / sqrt(1 - abar_t) that the composition implies, and that eps has unit variance
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 2, 3, 3, generator=g, dtype=torch.float64)
    x, noise_sum = x0, torch.zeros_like(x0)  # the chain, and the noise it has accumulated
    for t in range(1000):
        z = torch.randn(x0.shape, generator=g, dtype=torch.float64)
        x = s.alphas[t].sqrt() * x + s.betas[t].sqrt() * z
        noise_sum = s.alphas[t].sqrt() * noise_sum + s.betas[t].sqrt() * z
        if t in (0, 10, 500, 999):
            eps = noise_sum / (1 - s.alphas_cumprod[t]).sqrt()
            torch.testing.assert_close(s.q_sample(x0, t, eps), x, rtol=1e-10, atol=1e-12)
            assert abs(float(noise_sum.pow(2).mean() / (1 - s.alphas_cumprod[t])) - 1) < 0.5  # unit-variance eps


def test_monte_carlo_matches_closed_form_moments():
    """A loose complement to the exact check above: empirical moments of the simulated chain."""
    s = make("linear", float64=True)
    g = torch.Generator().manual_seed(1)
    N = 20000
    x0 = torch.full((N,), 0.7, dtype=torch.float64)
    x = x0.clone()
    for t in range(300):
        x = s.alphas[t].sqrt() * x + s.betas[t].sqrt() * torch.randn(N, generator=g, dtype=torch.float64)
    abar = s.alphas_cumprod[299]
    assert abs(x.mean() - abar.sqrt() * 0.7) < 4 * (1 / N) ** 0.5
    assert abs(x.var() / (1 - abar) - 1) < 4 * (2 / N) ** 0.5


@pytest.mark.parametrize("beta_schedule", ["linear", "cosine"])
def test_posterior_equals_gaussian_conditioning(beta_schedule):
    """DDPM Eq. 6-7 against conditioning the joint Gaussian of (x_prev, x_t) given x_0, for prev = t - 1 and for
    respaced jumps prev < t - 1:  x_prev = a x0 + sqrt(A) z1,  x_t = b x_prev + sqrt(Bv) z2  with a = sqrt(abar_prev),
    A = 1 - abar_prev, b = sqrt(abar_t / abar_prev), Bv = 1 - abar_t / abar_prev. Then
    E[x_prev | x_t, x0] = a x0 + C / V (x_t - b a x0), Var = A - C^2 / V, with C = b A, V = b^2 A + Bv."""
    s = make(beta_schedule, float64=True)
    abar = s.alphas_cumprod
    for gap in (1, 7, 100):
        t = torch.arange(gap, 1000)
        prev = t - gap
        a, A = abar[prev].sqrt(), 1 - abar[prev]
        b, Bv = (abar[t] / abar[prev]).sqrt(), 1 - abar[t] / abar[prev]
        C, V = b * A, b**2 * A + Bv
        coef_xt = C / V
        coef_x0 = a - coef_xt * b * a
        var = A - C**2 / V
        ours_x0, ours_xt = s.posterior_mean_coefficients(t, None if gap == 1 else prev)
        torch.testing.assert_close(ours_x0, coef_x0, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(ours_xt, coef_xt, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(s.posterior_variance(t, None if gap == 1 else prev), var, rtol=1e-7, atol=1e-15)
    # from t = 0 the previous step is "past 0", abar = 1: the posterior is a point mass at x_0
    c0, ct = s.posterior_mean_coefficients(0)
    assert float(c0) == pytest.approx(1.0, abs=1e-12) and float(ct) == 0.0 and float(s.posterior_variance(0)) == 0.0
    # with full steps the jump's beta is the schedule's own beta_t (the textbook form of Eq. 7)
    t = torch.arange(1, 1000)
    textbook = (1 - abar[t - 1]) / (1 - abar[t]) * s.betas[t]
    torch.testing.assert_close(s.posterior_variance(t), textbook, rtol=1e-6, atol=0)


# --- prediction-type conversions ------------------------------------------------------------------------------------

@pytest.mark.parametrize("prediction_type", [*PREDICTIONS, "edm"])
@pytest.mark.parametrize("zero_snr", [False, True])
def test_training_target_round_trips_through_predict_x0_and_eps(prediction_type, zero_snr):
    s = make("scaled_linear", zero_snr, prediction_type, float64=True, **SD_BETAS)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(6, 3, 4, 4, generator=g, dtype=torch.float64)
    eps = torch.randn(6, 3, 4, 4, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 1, 250, 500, 998, 999])
    if zero_snr and prediction_type == "epsilon":
        t[-1] = 997  # abar_{T-1} = 0: x0 = (x_t - eps) / 0 is undefined (the reason Lin et al. use v)
    x_t = s.q_sample(x0, t, eps)
    x0_hat, eps_hat = s.predict_x0_and_eps(s.training_target(x0, eps, t), x_t, t)
    torch.testing.assert_close(x0_hat, x0, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(eps_hat, eps, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("prediction_type", [*PREDICTIONS, "edm"])
def test_min_snr_weight_turns_the_target_loss_into_min_snr_gamma_times_the_x0_loss(prediction_type):
    # Hang et al. 2023 Eq. 9: loss = min(SNR_t, gamma) ||x0 - x0_hat||^2. For any model output, the weight times
    # the MSE on the regressed target must equal that, whatever the target (eps, x0 or v).
    s = make("cosine", prediction_type=prediction_type, float64=True)
    g = torch.Generator().manual_seed(0)
    x0, eps, out = (torch.randn(5, 3, 4, 4, generator=g, dtype=torch.float64) for _ in range(3))
    t = torch.tensor([0, 30, 200, 600, 990])  # SNR from ~1e5 down to ~1e-3: both sides of gamma
    gamma = 5.0
    x_t = s.q_sample(x0, t, eps)
    x0_hat, _ = s.predict_x0_and_eps(out, x_t, t)
    weighted = s.min_snr_weight(t, gamma).double() * (out - s.training_target(x0, eps, t)).pow(2).mean((1, 2, 3))
    expected = torch.clamp(s.snr(t), max=gamma) * (x0_hat - x0).pow(2).mean((1, 2, 3))
    torch.testing.assert_close(weighted, expected, rtol=1e-5, atol=0)
    snr = s.snr(t)
    assert (snr > gamma).any() and (snr < gamma).any()


@pytest.mark.parametrize("prediction_type", PREDICTIONS)
def test_min_snr_weight_equals_diffusers_training_script_and_is_finite_at_zero_snr(prediction_type):
    # diffusers' examples/text_to_image/train_text_to_image.py: min(snr, gamma), / snr for epsilon, / (snr + 1) for v
    reference()
    from diffusers.training_utils import compute_snr
    s = make("linear", zero_snr=True, prediction_type=prediction_type)
    ref = reference().DDPMScheduler(rescale_betas_zero_snr=True, prediction_type=prediction_type)
    t = torch.tensor([0, 100, 500, 998, 999])
    snr = compute_snr(ref, t)
    expected = torch.clamp(snr, max=5.0)
    if prediction_type == "epsilon":
        expected = expected / snr
        expected[-1] = 1.0  # SNR = 0: diffusers' 0/0 is nan; the limit of min(SNR, gamma) / SNR is 1
    elif prediction_type == "v_prediction":
        expected = expected / (snr + 1)
    w = s.min_snr_weight(t, 5.0)
    assert torch.isfinite(w).all()
    torch.testing.assert_close(w, expected.float(), rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="gamma must be > 0"):
        s.min_snr_weight(t, 0.0)


def test_min_snr_plus_one_caps_the_v_loss_and_keeps_the_noisiest_steps():
    # the sd-scripts / SimpleTuner variant: weight * ||v - v_hat||^2 = min(SNR + 1, gamma) ||x0 - x0_hat||^2, so it
    # is the plain v-loss where SNR + 1 <= gamma (weight 1, also at zero terminal SNR) and min-SNR's cap above
    s = make("cosine", prediction_type="v_prediction", float64=True)
    g = torch.Generator().manual_seed(1)
    x0, eps, out = (torch.randn(5, 3, 4, 4, generator=g, dtype=torch.float64) for _ in range(3))
    t = torch.tensor([0, 30, 200, 600, 990])
    x0_hat, _ = s.predict_x0_and_eps(out, s.q_sample(x0, t, eps), t)
    w = s.min_snr_weight(t, 5.0, plus_one=True)
    weighted = w.double() * (out - s.training_target(x0, eps, t)).pow(2).mean((1, 2, 3))
    expected = torch.clamp(s.snr(t) + 1, max=5.0) * (x0_hat - x0).pow(2).mean((1, 2, 3))
    torch.testing.assert_close(weighted, expected, rtol=1e-5, atol=0)
    assert w[-1] == 1.0 and w[0] < 1e-3  # the noisiest step keeps its weight (the paper's gives ~SNR ~ 1e-3)
    assert s.min_snr_weight(t, 5.0)[-1] < 1e-2
    with pytest.raises(ValueError, match="plus_one variant is for v_prediction"):
        make("cosine", prediction_type="epsilon").min_snr_weight(t, 5.0, plus_one=True)


@pytest.mark.parametrize("sigma_data", [0.5, 0.2])
def test_edm_prediction_is_karras_preconditioning_in_vp_variables(sigma_data):
    # EDM (arXiv 2206.00364) Table 1 in its own variables: sigma = sqrt((1 - abar) / abar), x = x_t / sqrt(abar),
    # D(x) = c_skip x + c_out F, c_skip = sd^2 / (sigma^2 + sd^2), c_out = sigma sd / sqrt(sigma^2 + sd^2), and the
    # loss lambda ||D - x0||^2 with lambda = 1 / c_out^2. Ours must give the same x0 from F, and its plain MSE on F
    # must be EDM's weighted loss.
    s = make("cosine", prediction_type="edm", float64=True, sigma_data=sigma_data)
    g = torch.Generator().manual_seed(2)
    x0, eps, out = (torch.randn(5, 3, 4, 4, generator=g, dtype=torch.float64) for _ in range(3))
    t = torch.tensor([0, 30, 200, 600, 990])
    x_t = s.q_sample(x0, t, eps)
    abar = s.alphas_cumprod[t].view(-1, 1, 1, 1)
    sigma = ((1 - abar) / abar).sqrt()
    c_skip = sigma_data**2 / (sigma**2 + sigma_data**2)
    c_out = sigma * sigma_data / (sigma**2 + sigma_data**2).sqrt()
    denoised = c_skip * (x_t / abar.sqrt()) + c_out * out
    torch.testing.assert_close(s.predict_x0_and_eps(out, x_t, t)[0], denoised, rtol=1e-9, atol=1e-9)
    edm_loss = ((denoised - x0).pow(2) / c_out**2).mean((1, 2, 3))
    torch.testing.assert_close((out - s.training_target(x0, eps, t)).pow(2).mean((1, 2, 3)), edm_loss,
                               rtol=1e-7, atol=0)


def test_edm_with_sigma_data_one_is_minus_v():
    s = make("cosine", prediction_type="edm", sigma_data=1.0, float64=True)
    v = make("cosine", prediction_type="v_prediction", float64=True)
    g = torch.Generator().manual_seed(3)
    x0, eps = (torch.randn(4, 3, 4, 4, generator=g, dtype=torch.float64) for _ in range(2))
    t = torch.tensor([0, 300, 700, 999])
    torch.testing.assert_close(s.training_target(x0, eps, t), -v.training_target(x0, eps, t), rtol=1e-9, atol=1e-9)


def test_velocity_identities_and_diffusers_get_velocity():
    s = make("linear")
    ref = reference().DDPMScheduler()
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(4, 3, 4, 4, generator=g), torch.randn(4, 3, 4, 4, generator=g)
    t = torch.tensor([0, 10, 600, 999])
    v = s.velocity(x0, eps, t)
    torch.testing.assert_close(v, ref.get_velocity(x0, eps, t), rtol=0, atol=0)
    # Salimans & Ho: with x_t = a x0 + s eps and a^2 + s^2 = 1, v = a eps - s x0 rotates (x0, eps):
    # x0 = a x_t - s v and eps = s x_t + a v, and |v|^2 + |x_t|^2 = |x0|^2 + |eps|^2 elementwise
    x_t = s.q_sample(x0, t, eps)
    torch.testing.assert_close(v**2 + x_t**2, x0**2 + eps**2, rtol=1e-5, atol=1e-5)


def test_zero_terminal_snr_gives_abar_last_zero_and_keeps_abar_first():
    for beta_schedule in SCHEDULES:
        plain, zsnr = make(beta_schedule), make(beta_schedule, zero_snr=True)
        assert zsnr.alphas_cumprod[-1] == 0.0 and zsnr.snr(999) == 0.0
        assert zsnr.betas[-1] == 1.0 and ((zsnr.betas > 0) & (zsnr.betas <= 1)).all()
        torch.testing.assert_close(zsnr.alphas_cumprod[0], plain.alphas_cumprod[0], rtol=1e-6, atol=0)
        assert (zsnr.alphas_cumprod[1:] < zsnr.alphas_cumprod[:-1]).all()
        # Alg. 1 is an affine map of sqrt(abar): (sqrt(abar) - last) * first / (first - last)
        r_old, r_new = plain.alphas_cumprod.double().sqrt(), zsnr.alphas_cumprod.double().sqrt()
        expected = (r_old - r_old[-1]) * r_old[0] / (r_old[0] - r_old[-1])
        torch.testing.assert_close(r_new, expected, rtol=1e-5, atol=1e-6)
    # with v-prediction the noisiest step is still well posed: x0_hat = -v, eps_hat = x_t
    s = make("linear", zero_snr=True, prediction_type="v_prediction")
    x_t, v = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    x0_hat, eps_hat = s.predict_x0_and_eps(v, x_t, 999)
    torch.testing.assert_close(x0_hat, -v)
    torch.testing.assert_close(eps_hat, x_t)


def test_rescale_zero_terminal_snr_function_equals_diffusers():
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2
    ref = reference().schedulers.scheduling_ddim.rescale_zero_terminal_snr(betas.clone())
    assert torch.equal(rescale_zero_terminal_snr(betas), ref)


def test_snr_is_abar_over_one_minus_abar_and_decreasing():
    s = make("cosine", float64=True)
    t = torch.arange(1000)
    snr = s.snr(t)
    torch.testing.assert_close(snr, s.alphas_cumprod / (1 - s.alphas_cumprod))
    assert (snr[1:] < snr[:-1]).all()
    assert float(s.snr(0)) == pytest.approx(float(s.alphas_cumprod[0] / s.betas[0]))


# --- dtypes and devices ---------------------------------------------------------------------------------------------

def test_dtypes_follow_the_input():
    """The float32 tables are cast to the input's dtype: bf16 and float64 inputs give outputs of their own dtype."""
    s = make("linear", prediction_type="v_prediction")
    x0 = torch.randn(2, 3, 4, 4)
    for dtype in (torch.bfloat16, torch.float64):
        x, n = x0.to(dtype), torch.randn(2, 3, 4, 4).to(dtype)
        assert s.q_sample(x, 5, n).dtype == dtype and s.training_target(x, n, 5).dtype == dtype
        assert s.predict_x0_and_eps(n, x, 5)[0].dtype == dtype
    assert s.to("cpu") is s  # in place, like nn.Module.to


# --- bad input ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, message", [
    (dict(beta_schedule="cosin"), "did you mean 'cosine'"),
    (dict(beta_schedule="quadratic"), "linear, scaled_linear, cosine, sigmoid"),
    (dict(beta_schedule="squaredcos_cap_v2"), "beta_schedule='cosine'"),
    (dict(prediction_type="eps"), "epsilon, sample, v_prediction, edm"),
    (dict(prediction_type="edm", sigma_data=0.0), "sigma_data must be > 0"),
    (dict(num_train_timesteps=1), "num_train_timesteps"),
    (dict(num_train_timesteps=10.0), "num_train_timesteps"),
    (dict(beta_start=0.02, beta_end=0.0001), "beta_start <= beta_end"),
    (dict(beta_end=1.5), "beta_end < 1"),
])
def test_bad_config_raises_a_clear_error(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        ScheduleConfig(**kwargs)


def test_bad_timesteps_raise_a_clear_error():
    s = make()
    x = torch.randn(2, 3, 4, 4)
    with pytest.raises(ValueError, match=r"t must be in \[0, 999\]"):
        s.q_sample(x, 1000, x)
    with pytest.raises(ValueError, match="shape"):
        s.q_sample(x, torch.tensor([1, 2, 3]), x)
    with pytest.raises(ValueError, match="integer"):
        s.q_sample(x, torch.tensor([1.0, 2.0]), x)
