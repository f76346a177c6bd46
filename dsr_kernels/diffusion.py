"""Diffusion and flow objectives and samplers, for any denoiser with the forward(x, t, y) of the reference models.

- :class:`FlowMatching`: the objective of RAE / DSR's stage 2 (and, mirrored in time,
  JiT's): x_t = (1 - t) x + t eps with t from a logit-normal law and the resolution
  shift s t / (1 + (s - 1) t), the network predicts the data x, the loss is on the
  implied velocity: v = (x_t - x_hat) / max(t, t_eps) against u = eps - x.
- :class:`GaussianDiffusion`: DiT's epsilon objective (DDPM, 1000 linear betas), with
  the variational bound term that trains the learned variance when ``learn_sigma``.
- :func:`sample_euler`: Euler steps of the flow ODE from noise (t = 1) to data (t = 0),
  with classifier-free guidance on the data prediction inside a time interval.
- :func:`sample_ddim`: DiT's deterministic DDIM sampler with guidance.
- :func:`train`: a minimal training loop, with an optional
  :class:`~dsr_kernels.outliers.Monitor` of outlier statistics every N steps.
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import Tensor, nn


def _expand(t: Tensor, x: Tensor) -> Tensor:
    return t.view(-1, *([1] * (x.dim() - 1)))


class FlowMatching:
    """x_t = (1 - t) x + t eps (t = 1 is noise); data prediction; velocity loss.

    Args:
        shift_dim, shift_base: the resolution shift s = sqrt(shift_dim / shift_base)
            (DSR on 16 x 16 x 768 RAE latents: 196608 / 4096); None for no shift.
        p_mean, p_std: t = sigmoid(N(p_mean, p_std)) before the shift.
        t_eps: clamp of t in the velocity (0.05).
        data_at_one: the model's clock runs the other way (JiT: t = 1 is clean); the
            objective passes it 1 - t.
    """

    def __init__(
        self,
        *,
        shift_dim: int | None = None,
        shift_base: int = 4096,
        p_mean: float = 0.0,
        p_std: float = 1.0,
        t_eps: float = 0.05,
        data_at_one: bool = False,
    ) -> None:
        self.shift = math.sqrt(shift_dim / shift_base) if shift_dim else 1.0
        self.p_mean, self.p_std, self.t_eps, self.data_at_one = p_mean, p_std, t_eps, data_at_one

    def shift_time(self, t: Tensor) -> Tensor:
        s = self.shift
        return s * t / (1 + (s - 1) * t)

    def sample_t(self, batch: int, device: torch.device) -> Tensor:
        return self.shift_time(torch.sigmoid(torch.randn(batch, device=device) * self.p_std + self.p_mean))

    def predict(self, model: nn.Module, x_t: Tensor, t: Tensor, y: Tensor) -> Tensor:
        return model(x_t, 1 - t if self.data_at_one else t, y)

    def loss(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        """Mean squared velocity error for clean data x [B, C, H, W] with labels y [B]."""
        t = self.sample_t(x.shape[0], x.device)
        eps = torch.randn_like(x)
        te = _expand(t, x)
        x_t = (1 - te) * x + te * eps
        x_hat = self.predict(model, x_t, t, y)
        v_pred = (x_t - x_hat) / te.clamp_min(self.t_eps)
        return (v_pred - (eps - x)).float().square().mean()


def _guided(model, x, t, y, predict, cfg_scale, cfg_interval, null_class) -> Tensor:
    lo, hi = cfg_interval
    t_val = float(t[0])
    if cfg_scale == 1.0 or not lo <= t_val <= hi:
        return predict(model, x, t, y)
    out = predict(model, torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, null_class)]))
    cond, uncond = out.chunk(2)
    return uncond + cfg_scale * (cond - uncond)


@torch.no_grad()
def sample_euler(
    model: nn.Module,
    noise: Tensor,
    y: Tensor,
    *,
    steps: int = 50,
    objective: FlowMatching | None = None,
    cfg_scale: float = 1.0,
    cfg_interval: tuple[float, float] = (0.0, 1.0),
    null_class: int = 1000,
) -> Tensor:
    """Euler integration of dx/dt = (x - x_hat) / max(t, t_eps) from t = 1 to 0 on the shifted grid.

    Classifier-free guidance: x_hat = uncond + cfg_scale (cond - uncond) while
    cfg_interval[0] <= t <= cfg_interval[1] (the unconditional label is ``null_class``).
    """
    objective = objective or FlowMatching()
    ts = objective.shift_time(1 - torch.linspace(0, 1, steps, device=noise.device, dtype=torch.float64))
    x = noise
    for i in range(steps - 1):
        t = torch.full((x.shape[0],), float(ts[i]), device=x.device)
        x_hat = _guided(model, x, t, y, objective.predict, cfg_scale, cfg_interval, null_class)
        v = (x - x_hat) / max(float(ts[i]), objective.t_eps)
        x = x + float(ts[i + 1] - ts[i]) * v
    return x


class GaussianDiffusion:
    """DiT's DDPM: 1000 linear betas (1e-4 to 2e-2), epsilon prediction, optional learned variance."""

    def __init__(self, num_timesteps: int = 1000) -> None:
        betas = torch.linspace(
            1e-4 * 1000 / num_timesteps, 2e-2 * 1000 / num_timesteps, num_timesteps, dtype=torch.float64
        )
        self.num_timesteps = num_timesteps
        self.betas = betas
        alphas_cumprod = torch.cumprod(1 - betas, 0)
        prev = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
        self.alphas_cumprod, self.alphas_cumprod_prev = alphas_cumprod, prev
        self.posterior_variance = betas * (1 - prev) / (1 - alphas_cumprod)
        self.posterior_log_variance_clipped = torch.log(
            torch.cat([self.posterior_variance[1:2], self.posterior_variance[1:]])
        )
        self.posterior_mean_coef1 = betas * prev.sqrt() / (1 - alphas_cumprod)
        self.posterior_mean_coef2 = (1 - prev) * (1 - betas).sqrt() / (1 - alphas_cumprod)

    def _at(self, arr: Tensor, t: Tensor, x: Tensor) -> Tensor:
        return _expand(arr.to(x.device)[t].float(), x)

    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        a = self._at(self.alphas_cumprod, t, x0)
        return a.sqrt() * x0 + (1 - a).sqrt() * noise

    def loss(self, model: nn.Module, x0: Tensor, y: Tensor) -> Tensor:
        """MSE on epsilon, plus (learn_sigma) the VLB term in bits that trains the variance."""
        t = torch.randint(0, self.num_timesteps, (x0.shape[0],), device=x0.device)
        noise = torch.randn_like(x0)
        x_t = self.q_sample(x0, t, noise)
        out = model(x_t, t, y)
        C = x0.shape[1]
        eps = out[:, :C]
        mse = (noise - eps).float().square().mean(dim=list(range(1, x0.dim())))
        if out.shape[1] == C:
            return mse.mean()
        # Learned variance: the VLB with the mean's gradient stopped (Nichol & Dhariwal).
        var_v = out[:, C:].float()
        min_log = self._at(self.posterior_log_variance_clipped, t, x0)
        max_log = self._at(torch.log(self.betas), t, x0)
        frac = (var_v + 1) / 2
        log_var = frac * max_log + (1 - frac) * min_log
        a_bar = self._at(self.alphas_cumprod, t, x0)
        pred_x0 = (x_t - (1 - a_bar).sqrt() * eps.detach().float()) / a_bar.sqrt()
        model_mean = (
            self._at(self.posterior_mean_coef1, t, x0) * pred_x0 + self._at(self.posterior_mean_coef2, t, x0) * x_t
        )
        true_mean = self._at(self.posterior_mean_coef1, t, x0) * x0 + self._at(self.posterior_mean_coef2, t, x0) * x_t
        true_log_var = min_log
        kl = 0.5 * (
            -1.0
            + log_var
            - true_log_var
            + torch.exp(true_log_var - log_var)
            + (true_mean - model_mean).square() * torch.exp(-log_var)
        )
        kl = kl.mean(dim=list(range(1, x0.dim()))) / math.log(2.0)
        nll = -_discretized_gaussian_log_likelihood(x0.float(), model_mean, 0.5 * log_var)
        nll = nll.mean(dim=list(range(1, x0.dim()))) / math.log(2.0)
        vb = torch.where(t == 0, nll, kl)
        return (mse + vb).mean()


def _discretized_gaussian_log_likelihood(x: Tensor, means: Tensor, log_scales: Tensor) -> Tensor:
    """log-likelihood of data in [-1, 1] discretised to 8 bits under a Gaussian (as in DDPM)."""

    def cdf(v: Tensor) -> Tensor:
        return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (v + 0.044715 * v.pow(3))))

    centered = x - means
    inv_std = torch.exp(-log_scales)
    cdf_plus = cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    cdf_delta = cdf_plus - cdf_min
    return torch.where(
        x < -0.999,
        log_cdf_plus,
        torch.where(x > 0.999, log_one_minus_cdf_min, torch.log(cdf_delta.clamp(min=1e-12))),
    )


@torch.no_grad()
def sample_ddim(
    model: nn.Module,
    noise: Tensor,
    y: Tensor,
    *,
    diffusion: GaussianDiffusion | None = None,
    steps: int = 50,
    cfg_scale: float = 1.0,
    null_class: int = 1000,
) -> Tensor:
    """Deterministic DDIM (eta = 0) over ``steps`` evenly spaced timesteps, guidance on epsilon."""
    diffusion = diffusion or GaussianDiffusion()
    C = noise.shape[1]
    ts = torch.linspace(diffusion.num_timesteps - 1, 0, steps, device=noise.device).round().long()
    x = noise
    for i, t_val in enumerate(ts):
        t = torch.full((x.shape[0],), int(t_val), device=x.device, dtype=torch.long)

        def eps_of(model, x_, t_, y_):
            return model(x_, t_, y_)[:, :C]

        eps = _guided(model, x, t, y, eps_of, cfg_scale, (-math.inf, math.inf), null_class)
        a = diffusion.alphas_cumprod[int(t_val)].item()
        a_prev = diffusion.alphas_cumprod[int(ts[i + 1])].item() if i + 1 < len(ts) else 1.0
        x0 = (x - math.sqrt(1 - a) * eps) / math.sqrt(a)
        x = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * eps
    return x


def train(
    model: nn.Module,
    objective: FlowMatching | GaussianDiffusion,
    batches,
    *,
    optimizer: torch.optim.Optimizer,
    steps: int | None = None,
    monitor=None,
) -> list[float]:
    """A minimal training loop: for each (x, y) of ``batches`` (at most ``steps`` of them),
    ``objective.loss(model, x, y)``, backward, ``optimizer.step()``. Returns the losses.

    ``monitor``: a :class:`dsr_kernels.outliers.Monitor` of ``model``; the forward and the
    backward of every step run inside ``monitor.step(i)`` (recorded every ``monitor.every``
    steps, i from 0), so either of its ``key_mass`` modes works. The caller closes it
    (``monitor.close()`` draws the plots).
    """
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 0):
        raise ValueError(f"train(): 'steps' must be an int >= 0 or None, got {steps!r}")
    if monitor is not None and getattr(monitor, "model", None) is not model:
        raise ValueError("train(): 'monitor' must be a Monitor of the model being trained (Monitor(model, ...))")
    model.train()
    losses: list[float] = []
    for i, (x, y) in enumerate(batches):
        if steps is not None and i >= steps:
            break
        optimizer.zero_grad(set_to_none=True)
        with monitor.step(i) if monitor is not None else contextlib.nullcontext():
            loss = objective.loss(model, x, y)
            loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    return losses
