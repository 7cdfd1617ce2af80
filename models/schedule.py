"""Noise schedules of the variance-preserving diffusion process, and the conversions between what a model predicts.

Papers:
    Ho, Jain, Abbeel 2020, "Denoising Diffusion Probabilistic Models", arXiv 2006.11239 (DDPM: linear schedule,
        q(x_t | x_0) Eq. 4, posterior q(x_{t-1} | x_t, x_0) Eq. 6-7, x0 from eps Eq. 15).
    Nichol & Dhariwal 2021, "Improved Denoising Diffusion Probabilistic Models", arXiv 2102.09672 (cosine, Eq. 17).
    Lin, Liu, Li, Yang 2023, "Common Diffusion Noise Schedules and Sample Steps are Flawed", arXiv 2305.08891
        (zero terminal SNR, Algorithm 1).
    Salimans & Ho 2022, "Progressive Distillation for Fast Sampling of Diffusion Models", arXiv 2202.00512
        (v-prediction, Sec. 4: v = alpha_t eps - sigma_t x).
    Xu et al. 2022, "GeoDiff", arXiv 2203.02923 (the sigmoid schedule).
    Karras, Aittala, Aila, Laine 2022, "Elucidating the Design Space of Diffusion-Based Generative Models",
        arXiv 2206.00364 (EDM: the preconditioning of Table 1, D = c_skip x + c_out F, loss weight 1 / c_out^2).

Timestep convention (the whole codebase uses it; identical to diffusers'):
    t is an integer in [0, T-1] (T = num_train_timesteps) indexing `alphas_cumprod`. t = 0 is the LEAST noisy
    step, t = T-1 the noisiest. Training draws t uniformly from {0, ..., T-1} and noises with
        x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps,   abar_t = alphas_cumprod[t],   eps ~ N(0, I).
    The paper's 1-based t (1..T) is our t + 1. Sampling ends with a step from the last sampled t to "one past 0",
    a virtual step whose abar is 1 (a clean image). Images are float in [-1, 1], shape (B, C, H, W).

Numbers: betas, alphas and alphas_cumprod are float32 and computed with exactly the operations diffusers'
DDPMScheduler / DDIMScheduler use, so that our samplers match theirs to 1e-5. (Float32 rounding then puts up to
~1e-3 relative error into small differences such as 1 - abar_0 vs beta_0; the identity tests rebuild the tables
from the betas in float64.) Coefficients
are computed in the tables' dtype and then cast to the input's dtype, so a bfloat16 input never sees 1 - abar
computed in bfloat16.

Notation (code -> paper):
    betas[t]           beta_t                 (paper's beta_{t+1} in 1-based indexing)
    alphas[t]          alpha_t = 1 - beta_t
    alphas_cumprod[t]  abar_t = prod_{s<=t} alpha_s   (Lin et al. and Salimans & Ho write alpha_t^2 for abar_t,
                                                        sigma_t^2 for 1 - abar_t)
    noise, eps         eps
    v                  v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0
    sigma_data         EDM's sigma_data; EDM's sigma is sqrt((1 - abar_t) / abar_t) and its x is x_t / sqrt(abar_t)

EDM's preconditioning in these variables (prediction_type "edm"; K = 1 - abar + abar sigma_data^2, a = sqrt(abar),
s = sqrt(1 - abar)): EDM's c_skip x = sigma_data^2 a x_t / K and c_out = sigma_data s / sqrt(K), so the network's
output F gives
    x0 = (sigma_data^2 a x_t + sigma_data s sqrt(K) F) / K,   eps = (s x_t - sigma_data a sqrt(K) F) / K,
and its target is F = (s x0 - sigma_data^2 a eps) / (sigma_data sqrt(K)), finite at every t. The plain MSE on F is
EDM's loss weight lambda = 1 / c_out^2 on ||D - x0||^2. With sigma_data = 1 (K = 1) F = -v: EDM is v-prediction with
a smaller sigma_data, and as sigma_data -> 0 it tends to x0-prediction. EDM's input scaling c_in = 1 / sqrt(sigma^2 +
sigma_data^2) is, in VP terms, x_t / sqrt(K): the U-Net here gets x_t, whose variance K is between sigma_data^2 and 1
already (for data of variance sigma_data^2), so c_in is left out; EDM's c_noise (log sigma / 4) is the timestep t.
    prev_t             the timestep a sampler steps to; the paper's t-1, or any s < t with respacing; -1 = past 0
"""

import difflib
import math
from dataclasses import dataclass

import torch

BETA_SCHEDULES = ("linear", "scaled_linear", "cosine", "sigmoid")
PREDICTION_TYPES = ("epsilon", "sample", "v_prediction", "edm")


def check_choice(field: str, value, valid) -> None:
    """Raise a one-line ValueError naming the valid values (and the closest one) if `value` is not in `valid`."""
    if value in valid:
        return
    close = difflib.get_close_matches(str(value), [str(v) for v in valid], n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise ValueError(f"unknown {field} {value!r}{hint}; valid values: {', '.join(map(str, valid))}")


@dataclass
class ScheduleConfig:
    num_train_timesteps: int = 1000      # T: number of diffusion steps the model is trained on; t in [0, T-1]
    beta_schedule: str = "linear"        # linear (DDPM) | scaled_linear (Stable Diffusion) | cosine (improved DDPM;
                                         # diffusers calls it squaredcos_cap_v2) | sigmoid (GeoDiff)
    beta_start: float = 0.0001           # beta_0 of linear / scaled_linear / sigmoid (cosine ignores it)
    beta_end: float = 0.02               # beta_{T-1} of linear / scaled_linear / sigmoid (cosine ignores it)
    rescale_betas_zero_snr: bool = False # Lin et al. 2023 Alg. 1: shift/scale sqrt(abar) so abar_{T-1} = 0 exactly
    prediction_type: str = "epsilon"     # what the model outputs: epsilon | sample (x_0) | v_prediction (v) |
                                         # edm (Karras et al.'s F, preconditioned with sigma_data; see above)
    sigma_data: float = 0.5              # EDM's sigma_data, the data's standard deviation (prediction_type edm only)
    log_snr_shift: float = 0.0           # added to log SNR at every t (simple diffusion, resolution_shift below)

    def __post_init__(self):
        if self.beta_schedule == "squaredcos_cap_v2":
            raise ValueError("beta_schedule 'squaredcos_cap_v2' is diffusers' name; use beta_schedule='cosine'")
        check_choice("beta_schedule", self.beta_schedule, BETA_SCHEDULES)
        check_choice("prediction_type", self.prediction_type, PREDICTION_TYPES)
        if not self.sigma_data > 0:
            raise ValueError(f"sigma_data must be > 0 (EDM uses 0.5 for images in [-1, 1]), got {self.sigma_data}")
        if not isinstance(self.num_train_timesteps, int) or self.num_train_timesteps < 2:
            raise ValueError(f"num_train_timesteps must be an integer >= 2, got {self.num_train_timesteps!r}")
        if self.beta_schedule != "cosine" and not 0.0 < self.beta_start <= self.beta_end < 1.0:
            raise ValueError(
                f"need 0 < beta_start <= beta_end < 1, got beta_start={self.beta_start}, beta_end={self.beta_end}"
            )


def cosine_betas(T: int, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """Nichol & Dhariwal Eq. 17: abar(t) = f(t) / f(0), f(t) = cos((t/T + s) / (1 + s) * pi/2)^2, and
    beta_t = 1 - abar(t+1) / abar(t) clipped to max_beta (their Sec. 3.2) so the last steps stay finite.
    Computed in float64 Python floats, then stored as float32 (as diffusers does)."""
    def f(u):
        return math.cos((u + s) / (1 + s) * math.pi / 2) ** 2
    betas = [min(1 - f((i + 1) / T) / f(i / T), max_beta) for i in range(T)]
    return torch.tensor(betas, dtype=torch.float32)


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Lin et al. 2023 Algorithm 1: make abar_{T-1} = 0 (zero SNR at the last step) and keep abar_0.

    sqrt(abar) is shifted so its last entry is 0, then scaled so its first entry is unchanged; betas are recovered
    from the ratios of consecutive abar. The last beta becomes exactly 1."""
    alphas_bar_sqrt = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = alphas_bar_sqrt[0].clone(), alphas_bar_sqrt[-1].clone()
    alphas_bar_sqrt = (alphas_bar_sqrt - last) * (first / (first - last))  # sqrt(abar): last -> 0, first kept
    alphas_bar = alphas_bar_sqrt**2
    alphas = torch.cat([alphas_bar[0:1], alphas_bar[1:] / alphas_bar[:-1]])  # undo the cumulative product
    return 1.0 - alphas


def resolution_shift(resolution: int, reference: int = 64) -> float:
    """Hoogeboom et al. 2023, "simple diffusion", arXiv 2301.11093, Sec. 3.1: a schedule tuned at `reference` px used
    at d px gets log SNR_d(t) = log SNR_ref(t) + 2 log(reference / d): a larger image needs more noise to hide the same
    structure, since averaging s x s pixels raises the SNR by s^2. The value for ScheduleConfig.log_snr_shift."""
    return 2 * math.log(reference / resolution)


def shift_log_snr(betas: torch.Tensor, shift: float) -> torch.Tensor:
    """betas whose abar has log SNR = log(abar / (1 - abar)) + shift at every t (simple diffusion Sec. 3.1):
    abar' = sigmoid(logit(abar) + shift), then betas from the ratios of consecutive abar', in float64."""
    abar = torch.cumprod(1.0 - betas.double(), dim=0)
    abar = torch.sigmoid(torch.logit(abar) + shift)  # (T,) abar' (a zero terminal SNR stays 0)
    alphas = torch.cat([abar[:1], abar[1:] / abar[:-1]])
    return (1.0 - alphas).float()


class NoiseSchedule:
    """betas / alphas / alphas_cumprod of one schedule, and every formula that only needs them.

    All methods take t either as an int (same t for the whole batch) or as a LongTensor of shape (B,)."""

    def __init__(self, cfg: ScheduleConfig):
        self.cfg = cfg
        T = cfg.num_train_timesteps
        if cfg.beta_schedule == "linear":  # DDPM Sec. 4: beta from 1e-4 to 0.02
            betas = torch.linspace(cfg.beta_start, cfg.beta_end, T, dtype=torch.float32)
        elif cfg.beta_schedule == "scaled_linear":  # latent diffusion: linear in sqrt(beta)
            betas = torch.linspace(cfg.beta_start**0.5, cfg.beta_end**0.5, T, dtype=torch.float32) ** 2
        elif cfg.beta_schedule == "cosine":
            betas = cosine_betas(T)
        elif cfg.beta_schedule == "sigmoid":  # GeoDiff: sigmoid over [-6, 6] mapped onto [beta_start, beta_end]
            betas = torch.sigmoid(torch.linspace(-6, 6, T)) * (cfg.beta_end - cfg.beta_start) + cfg.beta_start
        else:
            check_choice("beta_schedule", cfg.beta_schedule, BETA_SCHEDULES)
        if cfg.rescale_betas_zero_snr:
            betas = rescale_zero_terminal_snr(betas)
        if cfg.log_snr_shift:
            betas = shift_log_snr(betas, cfg.log_snr_shift)
        self.betas = betas                                    # (T,) beta_t
        self.alphas = 1.0 - betas                             # (T,) alpha_t
        self.alphas_cumprod = torch.cumprod(self.alphas, 0)   # (T,) abar_t

    @property
    def num_train_timesteps(self) -> int:
        return self.cfg.num_train_timesteps

    def to(self, device) -> "NoiseSchedule":
        """Move the tables to `device` in place, like nn.Module.to; returns self."""
        for name in ("betas", "alphas", "alphas_cumprod"):
            setattr(self, name, getattr(self, name).to(device))
        return self

    # --- looking values up -------------------------------------------------------------------------------------

    def abar(self, t, like: torch.Tensor) -> torch.Tensor:
        """abar_t in the schedule's dtype, on like's device, shaped (B, 1, ..., 1) to broadcast against `like`
        (B, ...). t: int or LongTensor (B,)."""
        B = like.shape[0]
        T = self.num_train_timesteps
        if isinstance(t, int) and not 0 <= t < T:  # (a tensor t is not range-checked: that would sync a GPU)
            raise ValueError(f"t must be in [0, {T - 1}], got {t}")
        t = torch.as_tensor(t, device=like.device)
        if t.is_floating_point():
            raise ValueError(f"t must be integer timesteps in [0, {T - 1}], got a {t.dtype} tensor")
        if t.ndim == 0:
            t = t.expand(B)
        if t.shape != (B,):
            raise ValueError(f"t must be an int or a tensor of shape (B,) = ({B},), got shape {tuple(t.shape)}")
        abar = self.alphas_cumprod.to(like.device)[t]  # (B,)
        return abar.view(B, *([1] * (like.ndim - 1)))  # (B, 1, ..., 1)

    def snr(self, t) -> torch.Tensor:
        """Signal-to-noise ratio abar_t / (1 - abar_t) (Lin et al. Sec. 2; 0 at t = T-1 with zero terminal SNR)."""
        abar = self.alphas_cumprod[torch.as_tensor(t, device=self.alphas_cumprod.device)]
        return abar / (1 - abar)

    # --- forward process and training targets ------------------------------------------------------------------

    def q_sample(self, x0: torch.Tensor, t, noise: torch.Tensor) -> torch.Tensor:
        """DDPM Eq. 4 (reparameterized as Eq. 9): x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps. Shapes (B, ...)."""
        assert x0.shape == noise.shape, f"x0 {tuple(x0.shape)} and noise {tuple(noise.shape)} differ"
        abar = self.abar(t, x0)
        return abar.sqrt().to(x0.dtype) * x0 + (1 - abar).sqrt().to(x0.dtype) * noise

    def velocity(self, x0: torch.Tensor, noise: torch.Tensor, t) -> torch.Tensor:
        """Salimans & Ho Sec. 4: v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0."""
        assert x0.shape == noise.shape, f"x0 {tuple(x0.shape)} and noise {tuple(noise.shape)} differ"
        abar = self.abar(t, x0)
        return abar.sqrt().to(x0.dtype) * noise - (1 - abar).sqrt().to(x0.dtype) * x0

    def training_target(self, x0: torch.Tensor, noise: torch.Tensor, t) -> torch.Tensor:
        """What the model should output for x_t = q_sample(x0, t, noise), per cfg.prediction_type."""
        if self.cfg.prediction_type == "epsilon":
            return noise
        elif self.cfg.prediction_type == "sample":
            return x0
        elif self.cfg.prediction_type == "v_prediction":
            return self.velocity(x0, noise, t)
        elif self.cfg.prediction_type == "edm":
            a, s, sd, root_k = self.edm_coefficients(t, x0)
            return (s * x0 - sd**2 * a * noise) / (sd * root_k)
        check_choice("prediction_type", self.cfg.prediction_type, PREDICTION_TYPES)

    def min_snr_weight(self, t, gamma: float, plus_one: bool = False) -> torch.Tensor:
        """Min-SNR-gamma loss weights (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting
        Strategy", arXiv 2303.09556), per sample (B,), for the MSE on this schedule's training target.

        Their Eq. 9 weights the x0-space loss ||x0 - x0_hat||^2 by min(SNR_t, gamma): high-SNR (nearly clean)
        steps stop dominating the gradient. The same weight expressed on the target we regress:
            sample (x0):   ||x0 - x0_hat||^2                        -> w = min(SNR, gamma)
            epsilon:       ||eps - eps_hat||^2 = SNR ||x0 - x0_hat||^2 -> w = min(SNR, gamma) / SNR = min(1, gamma / SNR)
            v:             ||v - v_hat||^2 = (SNR + 1) ||x0 - x0_hat||^2 -> w = min(SNR, gamma) / (SNR + 1)
            edm:           ||F - F_hat||^2 = (1 / sd^2 + SNR) ||x0 - x0_hat||^2 -> w = min(SNR, gamma) / (1 / sd^2 + SNR)
        (epsilon's weight is written min(1, gamma / SNR) so that SNR = 0, zero terminal SNR, gives 1, its limit.)

        plus_one (v-prediction only): the variant of kohya-ss sd-scripts and SimpleTuner, which clamp SNR + 1
        instead, w = min(SNR + 1, gamma) / (SNR + 1) = min(1, gamma / (SNR + 1)): the v-loss as it is where
        SNR + 1 <= gamma and capped above. The paper's v weight tends to 0 with the SNR, so the noisiest steps,
        where the picture's layout is decided, are barely trained; this one keeps them at full weight.
        """
        if gamma <= 0:
            raise ValueError(f"the Min-SNR gamma must be > 0 (the paper uses 5), got {gamma}")
        snr = self.snr(t).float()  # (B,)
        if plus_one:
            if self.cfg.prediction_type != "v_prediction":
                raise ValueError(f"the Min-SNR plus_one variant is for v_prediction, not {self.cfg.prediction_type}; "
                                 f"set schedule.prediction_type=v_prediction or drop it")
            return torch.clamp(gamma / (snr + 1), max=1.0)
        if self.cfg.prediction_type == "epsilon":
            return torch.clamp(gamma / snr, max=1.0)  # gamma / 0 = inf -> 1
        elif self.cfg.prediction_type == "sample":
            return torch.clamp(snr, max=gamma)
        elif self.cfg.prediction_type == "v_prediction":
            return torch.clamp(snr, max=gamma) / (snr + 1)
        elif self.cfg.prediction_type == "edm":
            return torch.clamp(snr, max=gamma) / (1 / self.cfg.sigma_data**2 + snr)
        check_choice("prediction_type", self.cfg.prediction_type, PREDICTION_TYPES)

    def predict_x0_and_eps(self, model_output: torch.Tensor, x_t: torch.Tensor, t):
        """Turn the model's output at (x_t, t) into (x0_hat, eps_hat), both of x_t's shape.

        epsilon:      DDPM Eq. 15:  x0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar)
        sample:       eps = (x_t - sqrt(abar) x0) / sqrt(1 - abar)
        v_prediction: x0 = sqrt(abar) x_t - sqrt(1 - abar) v,  eps = sqrt(abar) v + sqrt(1 - abar) x_t
        edm:          the two lines of the module docstring (EDM's c_skip, c_out)
        With zero terminal SNR (abar_{T-1} = 0), epsilon cannot give x0 at t = T-1 (division by 0): use v or x0.
        """
        assert model_output.shape == x_t.shape, f"model_output {tuple(model_output.shape)} != x_t {tuple(x_t.shape)}"
        abar = self.abar(t, x_t)
        sqrt_abar = abar.sqrt().to(x_t.dtype)            # (B, 1, ..., 1)
        sqrt_one_minus_abar = (1 - abar).sqrt().to(x_t.dtype)
        if self.cfg.prediction_type == "epsilon":
            eps = model_output
            x0 = (x_t - sqrt_one_minus_abar * eps) / sqrt_abar
        elif self.cfg.prediction_type == "sample":
            x0 = model_output
            eps = (x_t - sqrt_abar * x0) / sqrt_one_minus_abar
        elif self.cfg.prediction_type == "v_prediction":
            x0 = sqrt_abar * x_t - sqrt_one_minus_abar * model_output
            eps = sqrt_abar * model_output + sqrt_one_minus_abar * x_t
        elif self.cfg.prediction_type == "edm":
            a, s, sd, root_k = self.edm_coefficients(t, x_t)
            k = root_k * root_k
            x0 = (sd**2 * a * x_t + sd * s * root_k * model_output) / k
            eps = (s * x_t - sd * a * root_k * model_output) / k
        else:
            check_choice("prediction_type", self.cfg.prediction_type, PREDICTION_TYPES)
        return x0, eps

    def edm_coefficients(self, t, like: torch.Tensor):
        """(sqrt(abar), sqrt(1 - abar), sigma_data, sqrt(K)) with K = 1 - abar + abar sigma_data^2, each (B, 1, ..., 1)
        in like's dtype: the pieces of EDM's c_skip and c_out in VP terms (module docstring)."""
        abar = self.abar(t, like)
        sd = self.cfg.sigma_data
        root_k = (1 - abar + abar * sd**2).sqrt()
        return abar.sqrt().to(like.dtype), (1 - abar).sqrt().to(like.dtype), sd, root_k.to(like.dtype)

    # --- posterior q(x_prev | x_t, x_0) -------------------------------------------------------------------------

    def abar_prev(self, prev_t) -> torch.Tensor:
        """abar at prev_t; prev_t < 0 means "one past t = 0", where abar = 1 (DDPM's x_0 is noise-free)."""
        prev_t = torch.as_tensor(prev_t, device=self.alphas_cumprod.device)
        one = torch.ones((), dtype=self.alphas_cumprod.dtype, device=self.alphas_cumprod.device)
        return torch.where(prev_t >= 0, self.alphas_cumprod[prev_t.clamp(min=0)], one)

    def posterior_mean_coefficients(self, t, prev_t=None):
        """DDPM Eq. 7: mean of q(x_prev | x_t, x_0) = coef_x0 * x_0 + coef_xt * x_t, with
            coef_x0 = sqrt(abar_prev) beta / (1 - abar_t),   coef_xt = sqrt(alpha) (1 - abar_prev) / (1 - abar_t),
        where alpha = abar_t / abar_prev and beta = 1 - alpha are those of the (possibly respaced) jump
        prev_t -> t; with prev_t = t - 1 (the default) they are the paper's alpha_t and beta_t.
        Returns two tensors shaped like t (0-dim for an int t), in the schedule's dtype."""
        t = torch.as_tensor(t, device=self.alphas_cumprod.device)
        abar_t = self.alphas_cumprod[t]
        abar_prev = self.abar_prev(t - 1 if prev_t is None else prev_t)
        alpha = abar_t / abar_prev
        beta = 1 - alpha
        coef_x0 = (abar_prev**0.5 * beta) / (1 - abar_t)
        coef_xt = alpha**0.5 * (1 - abar_prev) / (1 - abar_t)
        return coef_x0, coef_xt

    def posterior_variance(self, t, prev_t=None) -> torch.Tensor:
        """DDPM Eq. 7: beta_tilde = (1 - abar_prev) / (1 - abar_t) * beta (0 when prev_t is past 0)."""
        t = torch.as_tensor(t, device=self.alphas_cumprod.device)
        abar_t = self.alphas_cumprod[t]
        abar_prev = self.abar_prev(t - 1 if prev_t is None else prev_t)
        beta = 1 - abar_t / abar_prev
        return (1 - abar_prev) / (1 - abar_t) * beta
