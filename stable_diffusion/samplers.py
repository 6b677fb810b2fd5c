"""Samplers: the update rule of each, as a small step function of (model output, step index, sample).

Each reproduces the diffusers scheduler of the same family on the same inputs (tests/test_samplers.py),
reading the model folder's scheduler config: beta schedule, steps_offset, timestep_spacing, prediction
type. The arithmetic uses only + - * / with Python floats, so samples can be numpy arrays or Paddle
tensors. `noise` is drawn by the caller (the pipeline's per-call generator) for the stochastic samplers.
"""
import math

import numpy as np

SAMPLERS = ("plms", "ddim", "euler", "euler_a", "dpmpp_2m", "dpmpp_2m_karras", "unipc")
# diffusers' default spacing for each family, used when the scheduler config does not name one.
DEFAULT_SPACING = {"plms": "leading", "ddim": "leading", "euler": "linspace", "euler_a": "linspace",
                   "dpmpp_2m": "linspace", "dpmpp_2m_karras": "linspace", "unipc": "linspace"}


def alphas_cumprod(config):
    n = config.get("num_train_timesteps", 1000)
    start, end = config.get("beta_start", 0.00085), config.get("beta_end", 0.012)
    schedule = config.get("beta_schedule", "scaled_linear")
    if config.get("trained_betas"):
        betas = np.asarray(config["trained_betas"], np.float32)
    elif schedule == "scaled_linear":
        betas = np.linspace(start ** 0.5, end ** 0.5, n, dtype=np.float32) ** 2
    elif schedule == "linear":
        betas = np.linspace(start, end, n, dtype=np.float32)
    else:
        raise ValueError(f"beta_schedule {schedule!r} is not supported; use 'scaled_linear' or 'linear'")
    return np.cumprod(1.0 - betas.astype(np.float64)).astype(np.float32)


def discrete_timesteps(config, steps, spacing):
    """`steps` timesteps, descending, spaced as diffusers' `timestep_spacing`."""
    n = config.get("num_train_timesteps", 1000)
    if spacing == "leading":
        return (np.arange(0, steps) * (n // steps)).round()[::-1] + config.get("steps_offset", 0)
    if spacing == "trailing":
        return np.arange(n, 0, -n / steps).round() - 1
    if spacing == "linspace":
        return np.linspace(0, n - 1, steps)[::-1]
    raise ValueError(f"timestep_spacing {spacing!r} is not supported")


def x0_and_epsilon(model_output, sample, alpha_prod, prediction_type):
    """The denoised sample and the noise implied by the model output at cumulative alpha `alpha_prod`."""
    a, b = alpha_prod ** 0.5, (1 - alpha_prod) ** 0.5
    if prediction_type == "epsilon":
        return (sample - b * model_output) / a, model_output
    if prediction_type == "v_prediction":
        return a * sample - b * model_output, a * model_output + b * sample
    raise ValueError(f"prediction_type {prediction_type!r} is not supported")


class Sampler:
    """What every sampler shares. `timesteps[i]` is the UNet's timestep at step i; `step(model_output,
    i, sample, noise)` is the update rule; `noise` is drawn by the caller when `needs_noise`.

    `init_noise_sigma` scales unit noise into the first sample; `scale_model_input` what the UNet is
    given at step i; `add_noise(x0, noise, i)` noises a clean sample to step i's level (image-to-image
    starts there). The alpha-based samplers (PLMS, DDIM) noise by the cumulative alpha of timestep i;
    the sigma-based ones override it."""
    init_noise_sigma = 1.0
    needs_noise = False

    def __init__(self, config):
        self.alphas_cumprod = alphas_cumprod(config)
        self.prediction_type = config.get("prediction_type", "epsilon")

    def scale_model_input(self, sample, i):
        return sample

    def add_noise(self, x0, noise, i):
        alpha_prod = float(self.alphas_cumprod[int(self.timesteps[i])])
        return alpha_prod ** 0.5 * x0 + (1 - alpha_prod) ** 0.5 * noise

    def skip_steps(self, count):
        """Start `count` steps into the schedule (image-to-image): step 0 is then what was step `count`,
        as diffusers' pipelines slice `timesteps` and set the scheduler's begin index."""
        self.timesteps = self.timesteps[count:]


class PLMS(Sampler):
    """PNDM with skip_prk_steps (PLMS): linear multistep over the last four noise predictions."""

    def __init__(self, config, steps):
        super().__init__(config)
        self.prediction_type = config.get("prediction_type", "epsilon")
        self.final_alpha = 1.0 if config.get("set_alpha_to_one", False) else float(self.alphas_cumprod[0])
        self.stride = config.get("num_train_timesteps", 1000) // steps
        base = discrete_timesteps(config, steps, config.get("timestep_spacing", "leading"))[::-1]
        # PNDM runs one extra model call: the second timestep twice, to bootstrap the multistep.
        self.timesteps = np.concatenate([base[:-1], base[-2:-1], base[-1:]])[::-1].astype(np.int64)
        self.outputs, self.first_sample = [], None

    def step(self, model_output, i, sample, noise=None):
        t = int(self.timesteps[i])
        prev_t = t - self.stride
        if i != 1:
            self.outputs = self.outputs[-3:] + [model_output]
        else:
            prev_t, t = t, t + self.stride
        outputs = self.outputs
        if len(outputs) == 1 and i == 0:
            self.first_sample = sample
        elif len(outputs) == 1 and i == 1:
            model_output = (model_output + outputs[-1]) / 2
            sample, self.first_sample = self.first_sample, None
        elif len(outputs) == 2:
            model_output = (3 * outputs[-1] - outputs[-2]) / 2
        elif len(outputs) == 3:
            model_output = (23 * outputs[-1] - 16 * outputs[-2] + 5 * outputs[-3]) / 12
        else:
            model_output = (55 * outputs[-1] - 59 * outputs[-2] + 37 * outputs[-3] - 9 * outputs[-4]) / 24
        a_t = float(self.alphas_cumprod[t])
        a_prev = float(self.alphas_cumprod[prev_t]) if prev_t >= 0 else self.final_alpha
        if self.prediction_type == "v_prediction":
            model_output = a_t ** 0.5 * model_output + (1 - a_t) ** 0.5 * sample
        denominator = a_t * (1 - a_prev) ** 0.5 + (a_t * (1 - a_t) * a_prev) ** 0.5
        return (a_prev / a_t) ** 0.5 * sample - (a_prev - a_t) * model_output / denominator


class DDIM(Sampler):
    """DDIM; eta=0 is deterministic, eta=1 adds DDPM-sized noise."""

    def __init__(self, config, steps, eta=0.0):
        super().__init__(config)
        self.final_alpha = 1.0 if config.get("set_alpha_to_one", True) else float(self.alphas_cumprod[0])
        self.clip_sample = config.get("clip_sample", True)
        self.clip_range = config.get("clip_sample_range", 1.0)
        self.stride = config.get("num_train_timesteps", 1000) // steps
        self.timesteps = discrete_timesteps(config, steps, config.get("timestep_spacing", "leading")).astype(np.int64)
        self.eta = eta
        self.needs_noise = eta > 0

    def step(self, model_output, i, sample, noise=None):
        t = int(self.timesteps[i])
        prev_t = t - self.stride
        a_t = float(self.alphas_cumprod[t])
        a_prev = float(self.alphas_cumprod[prev_t]) if prev_t >= 0 else self.final_alpha
        x0, eps = x0_and_epsilon(model_output, sample, a_t, self.prediction_type)
        if self.clip_sample:
            x0 = x0.clip(-self.clip_range, self.clip_range)
        std = self.eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)) ** 0.5
        prev = a_prev ** 0.5 * x0 + (1 - a_prev - std ** 2) ** 0.5 * eps
        return prev + std * noise if self.needs_noise else prev


def sigmas_of(alpha_prods):
    return ((1 - alpha_prods) / alpha_prods) ** 0.5


class Euler(Sampler):
    """Euler (k-diffusion's sample_euler); `ancestral` adds noise each step (sample_euler_ancestral)."""

    def __init__(self, config, steps, ancestral=False):
        super().__init__(config)
        spacing = config.get("timestep_spacing", "linspace")
        self.timesteps = discrete_timesteps(config, steps, spacing).astype(np.float32)
        train_sigmas = sigmas_of(self.alphas_cumprod)
        sigmas = np.interp(self.timesteps, np.arange(len(train_sigmas)), train_sigmas)
        self.sigmas = np.concatenate([sigmas, [0.0]]).astype(np.float32)
        top = float(self.sigmas.max())
        self.init_noise_sigma = top if spacing in ("linspace", "trailing") else (top ** 2 + 1) ** 0.5
        self.ancestral = self.needs_noise = ancestral

    def scale_model_input(self, sample, i):
        return sample / (float(self.sigmas[i]) ** 2 + 1) ** 0.5

    def add_noise(self, x0, noise, i):
        return x0 + float(self.sigmas[i]) * noise

    def skip_steps(self, count):
        super().skip_steps(count)
        self.sigmas = self.sigmas[count:]

    def step(self, model_output, i, sample, noise=None):
        sigma, sigma_next = float(self.sigmas[i]), float(self.sigmas[i + 1])
        if self.prediction_type == "epsilon":
            x0 = sample - sigma * model_output
        elif self.prediction_type == "v_prediction":
            x0 = model_output * (-sigma / (sigma ** 2 + 1) ** 0.5) + sample / (sigma ** 2 + 1)
        else:
            raise ValueError(f"prediction_type {self.prediction_type!r} is not supported")
        derivative = (sample - x0) / sigma
        if not self.ancestral:
            return sample + derivative * (sigma_next - sigma)
        sigma_up = (sigma_next ** 2 * (sigma ** 2 - sigma_next ** 2) / sigma ** 2) ** 0.5
        sigma_down = (sigma_next ** 2 - sigma_up ** 2) ** 0.5
        return sample + derivative * (sigma_down - sigma) + noise * sigma_up


class DPMSolverPP2M(Sampler):
    """DPM-Solver++(2M): second-order multistep in log-SNR, first order on the first and last step."""

    def __init__(self, config, steps, karras=False):
        super().__init__(config)
        sigmas = sigmas_of(self.alphas_cumprod)
        log_sigmas = np.log(sigmas)
        spacing = config.get("timestep_spacing", "linspace")
        if spacing == "trailing":
            timesteps = discrete_timesteps(config, steps, spacing)
        else:  # diffusers spaces steps + 1 timesteps and drops the last (t = 0)
            timesteps = discrete_timesteps(config, steps + 1, spacing).round()[:-1]
        if karras:
            sigmas = karras_sigmas(sigma_max=float(sigmas[-1]), sigma_min=float(sigmas[0]), steps=steps)
            timesteps = np.array([sigma_to_t(s, log_sigmas) for s in sigmas]).round()
        else:
            sigmas = np.interp(timesteps, np.arange(len(sigmas)), sigmas)
        self.timesteps = timesteps.astype(np.int64)
        self.sigmas = np.concatenate([sigmas, [0.0]]).astype(np.float32)
        self.previous_x0 = None

    def add_noise(self, x0, noise, i):
        alpha, sigma, _ = self.alpha_sigma_lambda(float(self.sigmas[i]))
        return alpha * x0 + sigma * noise

    def skip_steps(self, count):
        super().skip_steps(count)
        self.sigmas = self.sigmas[count:]

    @staticmethod
    def alpha_sigma_lambda(sigma):
        alpha = 1 / (sigma ** 2 + 1) ** 0.5
        lam = math.log(alpha) - math.log(sigma * alpha) if sigma > 0 else math.inf
        return alpha, sigma * alpha, lam

    def step(self, model_output, i, sample, noise=None):
        alpha_s, sigma_s_vp, lambda_s = self.alpha_sigma_lambda(float(self.sigmas[i]))
        x0, _ = x0_and_epsilon(model_output, sample, alpha_s ** 2, self.prediction_type)
        alpha_t, sigma_t_vp, lambda_t = self.alpha_sigma_lambda(float(self.sigmas[i + 1]))
        h = lambda_t - lambda_s
        decay = math.expm1(-h) if math.isfinite(h) else -1.0
        last = i == len(self.timesteps) - 1
        if self.previous_x0 is None or last:
            prev = (sigma_t_vp / sigma_s_vp) * sample - alpha_t * decay * x0
        else:
            _, _, lambda_prev = self.alpha_sigma_lambda(float(self.sigmas[i - 1]))
            r = (lambda_s - lambda_prev) / h
            d1 = (x0 - self.previous_x0) / r
            prev = (sigma_t_vp / sigma_s_vp) * sample - alpha_t * decay * x0 - 0.5 * alpha_t * decay * d1
        self.previous_x0 = x0
        return prev


class UniPC(DPMSolverPP2M):
    """UniPC (Zhao et al. 2023) as diffusers' UniPCMultistepScheduler runs it by default: order 2 in
    x0-prediction, B(h) = e^h - 1 ("bh2"), first order on the last step. Each step first corrects the
    previous step's result with the model output just computed (UniC), then predicts the next sample
    (UniP); the same timesteps and sigmas as DPM-Solver++. Good pictures in 10-15 steps."""

    ORDER = 2  # diffusers' solver_order default; the update below is written for orders 1 and 2

    def __init__(self, config, steps):
        super().__init__(config, steps)
        self.x0s = []  # the model's x0 predictions, latest last (at most ORDER)
        self.last_sample, self.last_order, self.warmed_orders = None, 1, 0

    def lambda_at(self, i):
        return self.alpha_sigma_lambda(float(self.sigmas[i]))

    def update(self, x, x0s, i, order, target, model_t=None):
        """From x at step i with x0 predictions `x0s` (latest last) to the level of step `target`: UniP
        when model_t is None, else UniC with the model's x0 at the target (arXiv:2302.04867, eq. 8, 9)."""
        alpha_t, sigma_t, lambda_t = self.lambda_at(target)
        _, sigma_s, lambda_s = self.lambda_at(i)
        h = lambda_t - lambda_s
        m0 = x0s[-1]
        ratios = [(self.lambda_at(i - k)[2] - lambda_s) / h for k in range(1, order)]
        differences = [(x0s[-(k + 1)] - m0) / r for k, r in enumerate(ratios, 1)]
        hh = -h
        h_phi_1 = math.expm1(hh)
        b_h = h_phi_1
        h_phi_k, factorial, b = h_phi_1 / hh - 1, 1, []
        for k in range(1, order + 1):
            b.append(h_phi_k * factorial / b_h)
            factorial *= k + 1
            h_phi_k = h_phi_k / hh - 1 / factorial
        x_t = (sigma_t / sigma_s) * x - alpha_t * h_phi_1 * m0
        if model_t is None:  # UniP; at order 2 its coefficient is 1/2 (diffusers' rhos_p)
            return x_t - alpha_t * b_h * (0.5 * differences[0] if differences else 0.0)
        # UniC: the coefficients solve R rho = b, R's rows the ratios' powers (1 for the target itself)
        rhos = [0.5] if order == 1 else np.linalg.solve(
            np.array([[r ** (k - 1) for r in ratios + [1.0]] for k in range(1, order + 1)]), np.array(b))
        residual = sum(float(rho) * d for rho, d in zip(rhos[:-1], differences)) if differences else 0.0
        return x_t - alpha_t * b_h * (residual + float(rhos[-1]) * (model_t - m0))

    def step(self, model_output, i, sample, noise=None):
        x0, _ = x0_and_epsilon(model_output, sample, self.lambda_at(i)[0] ** 2, self.prediction_type)
        if self.last_sample is not None:  # UniC: the sample this step started from, corrected
            sample = self.update(self.last_sample, self.x0s, i - 1, self.last_order, i, model_t=x0)
        self.x0s = (self.x0s + [x0])[-self.ORDER:]
        order = min(self.ORDER, len(self.timesteps) - i, self.warmed_orders + 1)
        self.warmed_orders = min(self.warmed_orders + 1, self.ORDER)
        self.last_sample, self.last_order = sample, order
        return self.update(sample, self.x0s, i, order, i + 1)


def karras_sigmas(sigma_max, sigma_min, steps, rho=7.0):
    ramp = np.linspace(0, 1, steps)
    return (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho


def sigma_to_t(sigma, log_sigmas):
    """The (fractional) training timestep whose sigma is `sigma`, by log-linear interpolation."""
    log_sigma = np.log(max(sigma, 1e-10))
    low = int(np.clip(np.cumsum(log_sigma - log_sigmas >= 0).argmax(), 0, len(log_sigmas) - 2))
    w = np.clip((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[low + 1]), 0, 1)
    return (1 - w) * low + w * (low + 1)


def make_sampler(name, config, steps, eta=0.0):
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"num_inference_steps must be an integer >= 1, got {steps!r}")
    config = {**config, "timestep_spacing": config.get("timestep_spacing") or DEFAULT_SPACING[name]}
    if name == "plms":
        return PLMS(config, steps)
    if name == "ddim":
        return DDIM(config, steps, eta)
    if name in ("euler", "euler_a"):
        return Euler(config, steps, ancestral=name == "euler_a")
    if name == "unipc":
        return UniPC(config, steps)
    return DPMSolverPP2M(config, steps, karras=name == "dpmpp_2m_karras")
