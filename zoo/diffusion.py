"""The diffusion processes moezoo's generative models train and sample with — one home for models, training
and pipelines.

- Objectives: ``"rf"``, rectified flow (``z_t = (1 - t) x0 + t eps`` for t in [0, 1], the model predicts the
  velocity ``v = eps - x0``; DiT-MoE's XL/G), and ``"ddpm"``, epsilon prediction on DiT's linear schedule
  (1000 steps, betas 1e-4 .. 0.02; DiT-MoE's S/B).
- :func:`training_pair`: the noisy input, its timestep and the regression target for clean data ``x0``.
- :func:`make_scheduler`: the diffusers scheduler that samples a model trained for an objective (flow-match
  Euler; DDIM or ancestral DDPM on the same betas).
- :func:`vae_scaling_factor`: latent models scale latents by the VAE's own ``config.scaling_factor``
  (0.18215 for sd-vae-ft-mse, as DiT), read from the VAE rather than written down here.
"""

from __future__ import annotations

import torch
from diffusers import DDIMScheduler, DDPMScheduler, FlowMatchEulerDiscreteScheduler, FlowMatchHeunDiscreteScheduler
from diffusers.utils.torch_utils import randn_tensor

OBJECTIVES = ("rf", "ddpm")
DDPM_NUM_TIMESTEPS = 1000
#: DiT's schedule: betas linear from 1e-4 to 0.02 over 1000 steps (diffusers' names and values).
DDPM_BETAS = dict(beta_schedule="linear", beta_start=1e-4, beta_end=0.02)
SCHEDULERS = ("flow_match_euler", "ddim", "ddpm")


def check_objective(objective: str) -> str:
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; accepted: {', '.join(OBJECTIVES)}")
    return objective


def ddpm_alphas_cumprod(num_timesteps: int = DDPM_NUM_TIMESTEPS) -> torch.Tensor:
    """DiT's linear DDPM schedule (float64): ``alpha_bar_t = prod_{s<=t} (1 - beta_s)``, betas linear from
    ``beta_start * 1000 / T`` to ``beta_end * 1000 / T`` (diffusers: ``DDPMScheduler(beta_schedule="linear")``)."""
    scale = 1000 / num_timesteps
    betas = torch.linspace(scale * DDPM_BETAS["beta_start"], scale * DDPM_BETAS["beta_end"], num_timesteps,
                           dtype=torch.float64)
    return torch.cumprod(1.0 - betas, dim=0)


def shift_time(t: torch.Tensor, shift: float) -> torch.Tensor:
    """Rectified-flow time shifted toward noise: ``s t / (1 + (s - 1) t)`` (0 and 1 stay put; diffusers'
    FlowMatchEulerDiscreteScheduler(shift=s) shifts its sigmas the same way)."""
    return t if shift == 1.0 else shift * t / (1 + (shift - 1) * t)


def training_pair(x0: torch.Tensor, objective: str, *, time_shift: float = 1.0,
                  generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(z_t, t_B, target)`` for clean data ``x0 [B, ...]``, one timestep per sample (a clip's frames share
    it). ``"rf"``: logit-normal t shifted by ``time_shift``, ``z_t = (1 - t) x0 + t eps``, target ``eps - x0``;
    ``"ddpm"``: uniform integer t, ``z_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps``, target ``eps``. Noise is drawn
    on the generator's device (a CPU generator gives the same numbers everywhere)."""
    check_objective(objective)
    batch = x0.shape[0]
    noise = randn_tensor(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    per_sample = (batch,) + (1,) * (x0.dim() - 1)
    if objective == "rf":
        t_B = shift_time(torch.sigmoid(randn_tensor((batch,), generator=generator, device=x0.device, dtype=x0.dtype)),
                         time_shift)
        t_bc = t_B.view(per_sample)
        return (1 - t_bc) * x0 + t_bc * noise, t_B, noise - x0
    draw_device = generator.device if generator is not None else x0.device
    t_B = torch.randint(0, DDPM_NUM_TIMESTEPS, (batch,), generator=generator, device=draw_device).to(x0.device)
    alpha_bar = ddpm_alphas_cumprod().to(x0.device)[t_B].view(per_sample).to(x0.dtype)
    return alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * noise, t_B, noise


def make_scheduler(objective: str, name: str | None = None, shift: float = 1.0):
    """The diffusers scheduler for a training objective: rectified flow -> flow-match Euler (default) or Heun
    (second order: two model calls per step but the last; ``shift``: the model's ``config.time_shift``; 1 gives
    DiT-MoE's uniform steps); DDPM epsilon -> DDIM (default) or ancestral DDPM on DiT's linear betas."""
    if objective == "rf":
        flow = {"flow_match_euler": FlowMatchEulerDiscreteScheduler, "flow_match_heun": FlowMatchHeunDiscreteScheduler}
        if name not in (None, *flow):
            raise ValueError(f"a rectified-flow model samples with 'flow_match_euler' or 'flow_match_heun', not {name!r}")
        return flow[name or "flow_match_euler"](num_train_timesteps=DDPM_NUM_TIMESTEPS, shift=shift)
    check_objective(objective)
    betas = dict(num_train_timesteps=DDPM_NUM_TIMESTEPS, **DDPM_BETAS, clip_sample=False, prediction_type="epsilon")
    if name in (None, "ddim"):
        return DDIMScheduler(**betas, set_alpha_to_one=False, timestep_spacing="trailing")
    if name == "ddpm":
        return DDPMScheduler(**betas, variance_type="fixed_small")
    raise ValueError(f"unknown scheduler {name!r} for an epsilon model; accepted: 'ddim', 'ddpm'")


def vae_scaling_factor(vae) -> float:
    """The factor latents were scaled by in training (``latents = vae.encode(x) * factor``), from the VAE's
    own config, as diffusers' pipelines read it."""
    factor = getattr(getattr(vae, "config", None), "scaling_factor", None)
    if factor is None:
        raise ValueError(f"the VAE ({type(vae).__name__}) has no config.scaling_factor; pass a diffusers "
                         "AutoencoderKL (e.g. stabilityai/sd-vae-ft-mse, scaling_factor 0.18215)")
    return float(factor)
