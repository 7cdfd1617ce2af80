"""Samplers for the discrete-time diffusion models of models/schedule.py: DDPM, DDIM and DPM-Solver++(2M),
classifier-free guidance, static clipping and dynamic thresholding of the predicted x_0.

Papers:
    Ho, Jain, Abbeel 2020, "Denoising Diffusion Probabilistic Models", arXiv 2006.11239 (Algorithm 2; Eq. 6-7).
    Song, Meng, Ermon 2020, "Denoising Diffusion Implicit Models", arXiv 2010.02502 (Eq. 12 and 16).
    Ho & Salimans 2022, "Classifier-Free Diffusion Guidance", arXiv 2207.12598 (Eq. 6).
    Saharia et al. 2022, "Photorealistic Text-to-Image Diffusion Models with Deep Language Understanding" (Imagen),
        arXiv 2205.11487 (Sec. 2.3, dynamic thresholding).
    Lin et al. 2023, arXiv 2305.08891 (Table 2: the leading / linspace / trailing timestep spacings).
    Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion Probabilistic Models",
        arXiv 2211.01095 (Algorithm 2, the multistep second-order solver of the data-prediction ODE).

Samplers are plain functions, as in k-diffusion: a step maps (model_output at x_t, t) to x_prev, and `sample` runs
the loop. A new sampler is one more `*_step` function and one more branch in `sample`.

Timesteps follow models/schedule.py: t in [0, T-1], t = 0 least noisy. A run visits the descending list
make_timesteps(...) = [t_0 > t_1 > ... > t_{n-1}] and steps t_i -> prev_t = t_{i+1}; the last step goes to
prev_t = -1, "one past 0", whose abar is 1 (DDIM: 1 or abar_0, per cfg.set_alpha_to_one). With fewer steps than
training steps (n < T) the jump t -> prev_t uses the respaced alpha = abar_t / abar_prev, beta = 1 - alpha, exactly
as diffusers' DDPMScheduler does.

Notation (code -> paper):
    abar_t, abar_prev   alpha_t, alpha_{t-1} in DDIM's notation (DDIM writes alpha for DDPM's alpha-bar)
    x0_hat              f_theta(x_t) = "predicted x_0" (DDIM Eq. 9 / DDPM Eq. 15)
    eps_hat             eps_theta(x_t)
    sigma               sigma_t(eta), DDIM Eq. 16
    guidance scale s    CFG's 1 + w (Ho & Salimans use w = s - 1; w = 0 is the plain conditional model)

Agreement with diffusers 0.42 (tests/test_samplers.py checks every statement here):
    Same numbers to 1e-5 as DDPMScheduler / DDIMScheduler for every combination they support, with one noise draw
    torch.randn(model_output.shape, generator, dtype=model_output.dtype) per stochastic step, as theirs. Where they
    differ from us, on purpose:
    1. DDIM's previous timestep. DDIMScheduler.step takes prev_t = t - T // n (diffusers issue 12633), which is the
       next entry of its own timestep list only for "leading" (with steps_offset < T // n), for "trailing" when n
       divides T, and for "linspace" when n is 1 or T. Elsewhere it steps to a timestep it never visits (linspace,
       n = 10: 999 -> 899, then 888 -> 788, ...; trailing, n = 13: the last step 76 -> 0 instead of 76 -> past 0).
       We always step to the next entry of the list (DDPMScheduler already does, since diffusers PR 9384).
    2. DDPM's last step. We add no noise on the last step (DDPM Alg. 2: z = 0 when t = 1), so x_0 is the posterior
       mean. DDPMScheduler adds noise whenever t > 0, so when the last visited t is not 0 (trailing spacing, or
       leading with steps_offset > 0) its last step adds noise of variance 1 - abar_t with variance_type
       "fixed_large"; with "fixed_small" that variance is 0 (clamped to 1e-20) and the results agree.
    3. "trailing" with some n (61, 103, 121, ... for T = 1000): diffusers' np.arange with a float step returns n + 1
       timesteps ending in -1, and then reads alphas_cumprod[-1] = abar_{T-1}. We return exactly n.
    4. Clipping and thresholding: like diffusers' default (use_clipped_model_output=False), DDIM's direction term
       uses the model's eps_hat, not one re-derived from the clipped x0_hat. Setting both clip_sample and
       thresholding is an error here (diffusers silently ignores clip_sample).
    5. DDIM with eta = 1 from a zero-SNR step (abar_t = 0): 1 - abar_prev - sigma^2 is exactly 0 but can round to
       -1 ulp in float32 (whether it does depends on abar_prev, and so on how the machine computed the schedule);
       we clamp it at 0, diffusers takes its square root and returns NaN there.
    6. DPM-Solver++(2M) against DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2): the same
       steps on the same timesteps. Its "linspace" and "leading" lists differ from DDIM's (n + 1 points with the
       last dropped), so it is compared on ours, handed over as set_timesteps(timesteps=...); its "trailing" list is
       ours. With zero terminal SNR it replaces abar_{T-1} = 0 by 2^-24; we keep 0 (the first step is then DDIM's
       step from pure noise, lambda = -inf, which the formulas take exactly).
"""

from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from models.schedule import NoiseSchedule, check_choice

SAMPLERS = ("ddpm", "ddim", "dpmpp_2m")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
VARIANCE_TYPES = ("fixed_small", "fixed_large")


@dataclass
class SamplerConfig:
    sampler: str = "ddim"               # ddpm | ddim | dpmpp_2m (DPM-Solver++(2M), a second-order ODE solver)
    num_inference_steps: int = 50       # n: number of model evaluations; 1 <= n <= num_train_timesteps
    timestep_spacing: str = "leading"   # leading | trailing | linspace (diffusers' names; Lin et al. Table 2)
    steps_offset: int = 0               # added to each "leading" timestep (Stable Diffusion v1: 1); others ignore it
    eta: float = 0.0                    # DDIM only: sigma = eta sqrt(beta_tilde) (Eq. 16); 0 deterministic, 1 = DDPM
                                        # (DPM-Solver++(2M) is the deterministic ODE solver: it has no eta)
    variance_type: str = "fixed_small"  # DDPM only: fixed_small (posterior beta_tilde) | fixed_large (beta_t)
    guidance_scale: float = 1.0         # classifier-free guidance s, applied by the caller's denoiser (see `guidance`)
    clip_sample: bool = False           # static clipping of x0_hat to [-clip_sample_range, clip_sample_range]
    clip_sample_range: float = 1.0      # bound of the static clipping
    thresholding: bool = False          # Imagen dynamic thresholding of x0_hat (pixel space; not for latents)
    dynamic_thresholding_ratio: float = 0.995  # percentile p of |x0_hat| that sets the threshold s
    sample_max_value: float = 1.0       # upper bound on s: diffusers' default 1.0 makes it static clipping to [-1, 1];
                                        # Imagen has none (.inf); DeepFloyd IF uses 1.5
    set_alpha_to_one: bool = True       # DDIM only: abar of the step past t=0 is 1 (else abar_0); DDPM always uses 1

    def __str__(self):
        """One line for logs: 'ddim, 50 steps, guidance 3.0' and what differs from the usual."""
        extra = [f"eta {self.eta}"] * (self.eta != 0) + \
                [f"{self.timestep_spacing} spacing"] * (self.timestep_spacing != "leading") + \
                ["clipped x0"] * self.clip_sample + \
                [f"dynamic thresholding p={self.dynamic_thresholding_ratio} max={self.sample_max_value}"] * self.thresholding
        return ", ".join([f"{self.sampler}, {self.num_inference_steps} steps, guidance {self.guidance_scale}", *extra])

    def __post_init__(self):
        check_choice("sampler", self.sampler, SAMPLERS)
        check_choice("timestep_spacing", self.timestep_spacing, TIMESTEP_SPACINGS)
        check_choice("variance_type", self.variance_type, VARIANCE_TYPES)
        if not isinstance(self.num_inference_steps, int) or self.num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be an integer >= 1, got {self.num_inference_steps!r}")
        if not isinstance(self.steps_offset, int) or self.steps_offset < 0:
            raise ValueError(f"steps_offset must be an integer >= 0, got {self.steps_offset!r}")
        if not self.eta >= 0:
            raise ValueError(f"eta must be >= 0 (0 = DDIM, 1 = DDPM-like), got {self.eta}")
        if self.eta != 0 and self.sampler != "ddim":
            raise ValueError(f"eta is DDIM's (Eq. 16); the {self.sampler} sampler has none, so eta {self.eta} would be "
                             f"ignored: drop --eta (sampler.eta) or use --sampler ddim")
        if not self.clip_sample_range > 0:
            raise ValueError(f"clip_sample_range must be > 0, got {self.clip_sample_range}")
        if not 0 < self.dynamic_thresholding_ratio <= 1:
            raise ValueError(f"dynamic_thresholding_ratio must be in (0, 1], got {self.dynamic_thresholding_ratio}")
        if not self.sample_max_value >= 1:
            raise ValueError(f"sample_max_value must be >= 1 (the threshold s is clamped to [1, max]), "
                             f"got {self.sample_max_value}")
        if self.clip_sample and self.thresholding:
            raise ValueError("clip_sample and thresholding are exclusive; set one of them to False")


def make_timesteps(num_train_timesteps: int, num_inference_steps: int, spacing: str,
                   steps_offset: int = 0) -> torch.Tensor:
    """The n timesteps a sampler visits, descending, as a LongTensor (n,). For T = 1000, n = 10:
        leading:  [900, 800, ..., 100, 0] + steps_offset   (multiples of T // n; never reaches T-1)
        trailing: [999, 899, ..., 199, 99]                  (counted down from T-1; Lin et al. recommend it)
        linspace: [999, 888, ..., 111, 0]                   (n evenly spaced points over [0, T-1], rounded)
    trailing and linspace use numpy's float64 arange / linspace exactly as diffusers does, so that rounding ties
    fall the same way (diffusers' trailing list sometimes has an extra trailing -1; we keep the first n)."""
    T, n = num_train_timesteps, num_inference_steps
    if not 1 <= n <= T:
        raise ValueError(f"num_inference_steps must be in [1, num_train_timesteps={T}], got {n}")
    check_choice("timestep_spacing", spacing, TIMESTEP_SPACINGS)
    if spacing == "leading":
        timesteps = np.arange(n)[::-1] * (T // n) + steps_offset
        if timesteps[0] >= T:
            raise ValueError(f"leading spacing with n={n}, steps_offset={steps_offset} starts at t={timesteps[0]} "
                             f">= T={T}; lower steps_offset or num_inference_steps")
    elif spacing == "trailing":
        timesteps = np.round(np.arange(T, 0, -T / n))[:n] - 1
    elif spacing == "linspace":
        timesteps = np.linspace(0, T - 1, n).round()[::-1]
    return torch.from_numpy(timesteps.astype(np.int64))  # (n,)


def guidance(cond_out: torch.Tensor, uncond_out: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance, Ho & Salimans Eq. 6 with w = scale - 1:
        eps~ = (1 + w) eps(z, c) - w eps(z) = uncond + scale * (cond - uncond).
    scale 1 gives the conditional output, 0 the unconditional one. It is linear, so it applies unchanged to x0- or
    v-predictions (x0_hat and eps_hat are affine in the model output with the same coefficients for both)."""
    assert cond_out.shape == uncond_out.shape, f"cond {tuple(cond_out.shape)} != uncond {tuple(uncond_out.shape)}"
    return uncond_out + scale * (cond_out - uncond_out)


def dynamic_threshold(x0: torch.Tensor, ratio: float, max_value: float) -> torch.Tensor:
    """Imagen Sec. 2.3: per sample, s = the `ratio` percentile of |x0_hat|, clamped to [1, max_value]; then
    x0_hat <- clip(x0_hat, -s, s) / s. With s = 1 this is static clipping to [-1, 1]."""
    B = x0.shape[0]
    flat = x0.reshape(B, -1)  # (B, C*H*W)
    if flat.dtype not in (torch.float32, torch.float64):
        flat = flat.float()  # quantile needs float32/64 (bf16 / fp16 inputs)
    s = torch.quantile(flat.abs(), ratio, dim=1).clamp(min=1, max=max_value)  # (B,)
    s = s[:, None]  # (B, 1)
    return (flat.clamp(-s, s) / s).reshape(x0.shape).to(x0.dtype)


def clip_or_threshold_x0(x0: torch.Tensor, cfg: SamplerConfig) -> torch.Tensor:
    """Apply cfg's static clipping or dynamic thresholding (or neither) to the predicted x_0."""
    if cfg.thresholding:
        return dynamic_threshold(x0, cfg.dynamic_thresholding_ratio, cfg.sample_max_value)
    if cfg.clip_sample:
        return x0.clamp(-cfg.clip_sample_range, cfg.clip_sample_range)
    return x0


def step_noise(model_output: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """z ~ N(0, I) of model_output's shape and dtype, drawn as diffusers' randn_tensor draws it: on the generator's
    device (a CPU generator gives the same numbers on every device), then moved to model_output's device."""
    device = generator.device if generator is not None else model_output.device
    z = torch.randn(model_output.shape, generator=generator, device=device, dtype=model_output.dtype)
    return z.to(model_output.device)


def ddpm_step(schedule: NoiseSchedule, model_output: torch.Tensor, t: int, prev_t: int, x_t: torch.Tensor,
              cfg: SamplerConfig, generator: torch.Generator | None = None) -> torch.Tensor:
    """One ancestral step x_t -> x_prev ~ q(x_prev | x_t, x0_hat) (DDPM Alg. 2, written through x0_hat as in Eq. 7).

    t, prev_t: ints (prev_t = -1 for the last step, where x_0 is the noise-free posterior mean).
    x_t, model_output: (B, C, H, W); returns x_prev of the same shape."""
    t, prev_t = int(t), int(prev_t)
    x0_hat, _ = schedule.predict_x0_and_eps(model_output, x_t, t)
    x0_hat = clip_or_threshold_x0(x0_hat, cfg)
    # DDPM Eq. 7: mu_tilde = sqrt(abar_prev) beta / (1 - abar_t) x0 + sqrt(alpha) (1 - abar_prev) / (1 - abar_t) x_t
    coef_x0, coef_xt = schedule.posterior_mean_coefficients(t, prev_t)
    mean = coef_x0 * x0_hat + coef_xt * x_t
    if prev_t < 0:  # DDPM Alg. 2: z = 0 at the last step
        return mean
    if cfg.variance_type == "fixed_small":  # sigma^2 = beta_tilde (Eq. 7), the posterior's own variance
        variance = schedule.posterior_variance(t, prev_t).clamp(min=1e-20)
    elif cfg.variance_type == "fixed_large":  # sigma^2 = beta of the jump prev_t -> t (DDPM Sec. 3.2)
        variance = 1 - schedule.alphas_cumprod[t] / schedule.alphas_cumprod[prev_t]
    else:
        check_choice("variance_type", cfg.variance_type, VARIANCE_TYPES)
    # DDPM Alg. 2 line 4: x_{t-1} = mu + sigma_t z
    return mean + variance**0.5 * step_noise(model_output, generator)


def ddim_step(schedule: NoiseSchedule, model_output: torch.Tensor, t: int, prev_t: int, x_t: torch.Tensor,
              cfg: SamplerConfig, generator: torch.Generator | None = None) -> torch.Tensor:
    """One DDIM step x_t -> x_prev (Eq. 12 with sigma from Eq. 16); deterministic when cfg.eta = 0.

    t, prev_t: ints (prev_t = -1 for the last step). x_t, model_output: (B, C, H, W); returns x_prev."""
    t, prev_t = int(t), int(prev_t)
    abar_t = schedule.alphas_cumprod[t]
    if prev_t >= 0:
        abar_prev = schedule.alphas_cumprod[prev_t]
    elif cfg.set_alpha_to_one:
        abar_prev = torch.ones_like(abar_t)
    else:
        abar_prev = schedule.alphas_cumprod[0]
    x0_hat, eps_hat = schedule.predict_x0_and_eps(model_output, x_t, t)
    x0_hat = clip_or_threshold_x0(x0_hat, cfg)
    # DDIM Eq. 16: sigma_t(eta) = eta sqrt((1 - abar_prev) / (1 - abar_t)) sqrt(1 - abar_t / abar_prev)
    variance = (1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev)
    sigma = cfg.eta * variance**0.5
    # DDIM Eq. 12: x_prev = sqrt(abar_prev) x0_hat + sqrt(1 - abar_prev - sigma^2) eps_hat + sigma z
    # (clamp: with abar_t = 0 and eta = 1, 1 - abar_prev - sigma^2 is 0 up to rounding and may come out as -1e-8)
    direction = (1 - abar_prev - sigma**2).clamp(min=0) ** 0.5 * eps_hat
    x_prev = abar_prev**0.5 * x0_hat + direction
    if cfg.eta > 0:
        x_prev = x_prev + sigma * step_noise(model_output, generator)
    return x_prev


def log_snr_half(abar: torch.Tensor) -> torch.Tensor:
    """lambda = log(alpha / sigma) = log(sqrt(abar) / sqrt(1 - abar)), DPM-Solver's time variable (half the log-SNR):
    -inf at abar = 0 (pure noise), +inf at abar = 1 (the data)."""
    return torch.log(abar.sqrt()) - torch.log((1 - abar).sqrt())


def dpmpp_2m_step(schedule: NoiseSchedule, model_output: torch.Tensor, t: int, prev_t: int, x_t: torch.Tensor,
                  cfg: SamplerConfig, last: tuple | None = None) -> tuple:
    """One step of DPM-Solver++(2M) x_t -> x_prev (Lu et al. 2022, Algorithm 2, "midpoint" form), deterministic.

    The probability-flow ODE written for the data prediction x0_hat and in lambda = log(alpha / sigma) has the exact
    solution x_prev = (sigma_prev / sigma_t) x_t + alpha_prev int_{lambda_t}^{lambda_prev} e^{-(lambda_prev - l)}
    x0_hat(l) dl. Holding x0_hat constant over the step gives the first-order update, which is DDIM (eta = 0):
        x_prev = (sigma_prev / sigma_t) x_t - alpha_prev (e^{-h} - 1) D,   h = lambda_prev - lambda_t,   D = x0_hat.
    The second order takes x0_hat's slope in lambda from the previous step's prediction m1 (made at lambda_last,
    h_last = lambda_t - lambda_last, r = h_last / h):   D = m0 + (m0 - m1) / (2 r)    with m0 = x0_hat at t.
    The first step has no previous prediction, and the last one (to prev_t = -1, sigma = 0, h = inf) is taken first
    order, where it returns x0_hat, as diffusers' final_sigmas_type="zero" does.

    t, prev_t: ints; last: (x0_hat, t) of the previous step, None on the first. x_t, model_output: (B, C, H, W).
    Returns (x_prev, (x0_hat, t)) -- the second item is the next step's `last`. The update runs in float32 (as
    diffusers does; the solver's differences of predictions lose digits in bf16) and x_prev has x_t's dtype."""
    t, prev_t = int(t), int(prev_t)
    abar_t = schedule.alphas_cumprod[t].double()
    abar_prev = schedule.abar_prev(prev_t).double()  # 1 past t = 0
    x0_hat, _ = schedule.predict_x0_and_eps(model_output, x_t, t)
    x0_hat = clip_or_threshold_x0(x0_hat, cfg).float()
    alpha_prev, sigma_prev, sigma_t = abar_prev.sqrt(), (1 - abar_prev).sqrt(), (1 - abar_t).sqrt()
    lambda_t, lambda_prev = log_snr_half(abar_t), log_snr_half(abar_prev)
    h = lambda_prev - lambda_t
    D = x0_hat
    if last is not None and prev_t >= 0:  # second order: the slope from the previous step's prediction
        m1, t_last = last
        r = (lambda_t - log_snr_half(schedule.alphas_cumprod[t_last].double())) / h  # h_last / h
        D = x0_hat + (x0_hat - m1) / (2 * r).float()
    x_prev = (sigma_prev / sigma_t).float() * x_t.float() - (alpha_prev * torch.expm1(-h)).float() * D
    return x_prev.to(x_t.dtype), (x0_hat, t)


@torch.no_grad()
def sample(denoise, x_T: torch.Tensor, schedule: NoiseSchedule, cfg: SamplerConfig,
           generator: torch.Generator | None = None, progress: bool = True, desc: str | None = None) -> torch.Tensor:
    """Run the reverse process from x_T (B, C, H, W), usually torch.randn(..., generator=generator), to x_0.

    denoise(x_t, t) -> model output, with t a LongTensor (B,) on x_t's device. Guidance is the caller's:
        denoise = lambda x, t: guidance(model(x, t, cond), model(x, t, uncond), cfg.guidance_scale)
    Noise comes only from `generator` (never the global RNG), so a seeded generator reproduces a run.
    desc: the progress bar's label (default: the sampler's name)."""
    B = x_T.shape[0]
    timesteps = make_timesteps(schedule.num_train_timesteps, cfg.num_inference_steps, cfg.timestep_spacing,
                               cfg.steps_offset).tolist()
    if schedule.cfg.prediction_type == "epsilon" and float(schedule.alphas_cumprod[timesteps[0]]) == 0.0:
        raise ValueError(f"prediction_type='epsilon' cannot give x0 at t={timesteps[0]}, where abar_t = 0 (zero "
                         f"terminal SNR): use prediction_type='v_prediction' (Lin et al. 2023) or leading spacing")
    x = x_T
    last = None  # DPM-Solver++(2M): the previous step's x0_hat and t
    for i, t in enumerate(tqdm(timesteps, desc=desc or cfg.sampler, disable=not progress)):
        prev_t = timesteps[i + 1] if i + 1 < len(timesteps) else -1
        t_batch = torch.full((B,), t, dtype=torch.long, device=x.device)  # (B,)
        model_output = denoise(x, t_batch)
        if cfg.sampler == "ddpm":
            x = ddpm_step(schedule, model_output, t, prev_t, x, cfg, generator)
        elif cfg.sampler == "ddim":
            x = ddim_step(schedule, model_output, t, prev_t, x, cfg, generator)
        elif cfg.sampler == "dpmpp_2m":
            x, last = dpmpp_2m_step(schedule, model_output, t, prev_t, x, cfg, last)
        else:
            check_choice("sampler", cfg.sampler, SAMPLERS)
    return x
