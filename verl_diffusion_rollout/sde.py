"""One reverse step of a flow-matching sampler, with the log-probability of the step.

These are pure functions: the rollout samples with them and the trainer replays them with the same code,
so rollout and trainer log-probabilities agree bit for bit when the inputs do.

Notation (FlowGRPO): ``sigma`` is the current noise level, ``sigma_next`` the next one (``sigma_next < sigma``),
``dt = sigma_next - sigma < 0``, ``x`` the current latent and ``v`` the model's velocity.

* ``"sde"``: FlowGRPO's reverse SDE. ``std_t = eta * sqrt(sigma / (1 - sigma'))`` with ``sigma' = sigma``
  except ``sigma' = sigma_max`` where ``sigma == 1``;
  ``mean = x * (1 + std_t**2 / (2 sigma) * dt) + v * (1 + std_t**2 (1 - sigma) / (2 sigma)) * dt``;
  ``prev = mean + std_t * sqrt(-dt) * eps``. Full Gaussian log-density by default.
* ``"cps"``: coefficient-preserving sampling. ``std = sigma_next * sin(eta * pi / 2)``, ``x0 = x - sigma v``,
  ``x1 = x + (1 - sigma) v``, ``mean = x0 (1 - sigma_next) + x1 sqrt(sigma_next**2 - std**2)``,
  ``prev = mean + std * eps``. Log-prob without constants, ``-(prev - mean)**2``, by default (FlowGRPO).
* ``"ode"``: the deterministic Euler step ``prev = x + dt * v``, computed exactly as
  ``diffusers.FlowMatchEulerDiscreteScheduler.step`` does (bit-identical), log-prob 0.

``sde`` and ``cps`` compute in float32 whatever the input dtype; the log-prob is averaged over every
non-batch dimension and returned as float32 ``[B]``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = ["SDE_TYPES", "SDEStep", "sde_step_with_logprob", "randn_per_sample", "default_log_prob_no_const",
           "to_device_async"]

SDE_TYPES: tuple[str, ...] = ("sde", "cps", "ode")

_LOG_SQRT_2PI = math.log(math.sqrt(2.0 * math.pi))

ScalarOrTensor = float | torch.Tensor


@dataclass
class SDEStep:
    """Result of one reverse step.

    Attributes:
        prev_sample: ``[B, ...]`` the next latent; float32 for ``sde``/``cps``, the model dtype for ``ode``.
        log_prob: ``[B]`` float32, log-density of ``prev_sample`` under the step's Gaussian (0 for ``ode``).
        prev_sample_mean: ``[B, ...]`` the Gaussian's mean (float32; equals ``prev_sample`` for ``ode``).
        std_dev: ``[B]`` float32, the standard deviation of ``prev_sample`` around the mean
            (``std_t * sqrt(-dt)`` for ``sde``, ``std`` for ``cps``, 0 for ``ode``).
        std_dev_t: ``[B]`` float32, the std as FlowGRPO's ``sde_step_with_logprob`` returns it: ``std_t`` for
            ``sde`` (without the ``sqrt(-dt)`` factor), ``std`` for ``cps`` (there it equals ``std_dev``), 0 for
            ``ode``. FlowGRPO's KL to the reference divides by ``2 * std_dev_t**2``.
        noise: ``[B, ...]`` float32 standard-normal noise that was added, or ``None`` when ``prev_sample`` was
            given (replay) or the step is deterministic.
    """

    prev_sample: torch.Tensor
    log_prob: torch.Tensor
    prev_sample_mean: torch.Tensor
    std_dev: torch.Tensor
    std_dev_t: torch.Tensor
    noise: torch.Tensor | None


def default_log_prob_no_const(sde_type: str) -> bool:
    """FlowGRPO's convention: full Gaussian for ``sde``, constants dropped for ``cps``."""
    return sde_type == "cps"


def randn_per_sample(
    shape: Sequence[int],
    generators: Sequence[torch.Generator],
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Draw ``[len(generators), *shape[1:]]`` standard-normal noise, row ``b`` from ``generators[b]`` only.

    Each row is drawn at its full shape from its own generator, so a sample's noise depends on its seed and
    never on the batch size or its position in the batch. The draw happens on each generator's device and
    the result is moved to ``device``.
    """
    if len(shape) < 1 or shape[0] != len(generators):
        raise ValueError(f"shape[0] must equal the number of generators ({len(generators)}), got shape {tuple(shape)}")
    rows = [torch.randn(tuple(shape[1:]), generator=g, device=g.device, dtype=dtype) for g in generators]
    out = torch.stack(rows)
    return out if device is None else to_device_async(out, device)


def to_device_async(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """``t.to(device)`` without making the host wait for the device: a CPU tensor bound for a CUDA device is
    staged in pinned memory and copied with a non-blocking copy (the caching host allocator keeps the staging
    buffer alive until the copy has run). Same values, bit for bit; a blocking ``.to()`` would first wait for
    every kernel queued on the stream, a stall at every denoising step."""
    device = torch.device(device)
    if t.device == device or t.device.type != "cpu" or device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def _as_sigma(value: ScalarOrTensor, name: str, batch: int) -> torch.Tensor:
    """Return ``value`` as a float32 tensor of shape ``()`` or ``[batch]`` (on the device it came on)."""
    t = torch.as_tensor(value, dtype=torch.float32)
    if t.ndim == 0 or (t.ndim == 1 and t.shape[0] == batch):
        return t
    raise ValueError(f"{name} must be a scalar or a tensor of shape [{batch}], got shape {tuple(t.shape)}")


def _check_sigmas(sigma: torch.Tensor, sigma_next: torch.Tensor) -> None:
    if not bool(torch.isfinite(sigma).all()) or not bool(torch.isfinite(sigma_next).all()):
        raise ValueError(f"sigma and sigma_next must be finite, got sigma={sigma.tolist()} sigma_next={sigma_next.tolist()}")
    if bool((sigma_next >= sigma).any()):
        raise ValueError(
            f"sigma_next must be smaller than sigma (dt < 0), got sigma={sigma.tolist()} sigma_next={sigma_next.tolist()}"
        )
    if bool((sigma > 1).any()) or bool((sigma_next < 0).any()):
        raise ValueError(f"sigmas must lie in [0, 1], got sigma={sigma.tolist()} sigma_next={sigma_next.tolist()}")


def _bcast(t: torch.Tensor, ndim: int) -> torch.Tensor:
    """``()`` stays a scalar tensor; ``[B]`` becomes ``[B, 1, ..., 1]`` for broadcasting over a sample."""
    return t if t.ndim == 0 else t.view(-1, *([1] * (ndim - 1)))


def _euler_step(model_output: torch.Tensor, sample: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor):
    """``diffusers.FlowMatchEulerDiscreteScheduler.step`` (deterministic branch), operation for operation.

    diffusers upcasts the sample to float32, multiplies the velocity by a 0-dim float32 ``dt`` (which keeps the
    velocity's dtype under type promotion), adds, and casts back to the velocity's dtype. Per-sample sigmas are
    stepped one sample at a time with the same 0-dim ``dt`` so every element sees exactly those operations.
    """
    if sigma.ndim == 0 and sigma_next.ndim == 0:
        dt = sigma_next - sigma
        return (sample.to(torch.float32) + dt * model_output).to(model_output.dtype)
    batch = sample.shape[0]
    sigma = sigma.expand(batch) if sigma.ndim == 0 else sigma
    sigma_next = sigma_next.expand(batch) if sigma_next.ndim == 0 else sigma_next
    rows = []
    for b in range(batch):
        dt = sigma_next[b] - sigma[b]
        rows.append((sample[b].to(torch.float32) + dt * model_output[b]).to(model_output.dtype))
    return torch.stack(rows)


def sde_step_with_logprob(
    model_output: torch.Tensor,
    sample: torch.Tensor,
    sigma: ScalarOrTensor,
    sigma_next: ScalarOrTensor,
    *,
    sde_type: str = "sde",
    noise_level: float = 0.7,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    prev_sample: torch.Tensor | None = None,
    log_prob_no_const: bool | None = None,
    sigma_max: ScalarOrTensor | None = None,
) -> SDEStep:
    """Take one reverse step from ``sigma`` to ``sigma_next`` and return the step's log-probability.

    Args:
        model_output: ``[B, ...]`` velocity predicted by the model (any float dtype).
        sample: ``[B, ...]`` current latent ``x`` (any float dtype).
        sigma: current noise level, a scalar or a per-sample ``[B]`` tensor.
        sigma_next: next noise level (``< sigma``), a scalar or ``[B]``.
        sde_type: ``"sde"``, ``"cps"`` or ``"ode"``.
        noise_level: ``eta >= 0``; 0 makes ``sde``/``cps`` deterministic (their log-prob is then 0).
        noise: ``[B, ...]`` standard-normal noise to use; drawn from ``generator`` when omitted.
        generator: one generator, or one per sample (row ``b`` drawn only from ``generator[b]``).
        prev_sample: ``[B, ...]`` a given next latent: its log-prob is computed (trainer replay), no noise drawn.
        log_prob_no_const: drop the Gaussian's constant terms; ``None`` follows FlowGRPO (``cps`` drops them).
        sigma_max: the ``sigma'`` used where ``sigma == 1`` in ``sde`` (FlowGRPO's ``sigmas[1]``); defaults to
            ``sigma_next``, which is ``sigmas[1]`` at the only step where ``sigma == 1``.

    Returns:
        An :class:`SDEStep`.

    Raises:
        ValueError: unknown ``sde_type``, negative or non-finite ``noise_level``, mismatched shapes,
            ``sigma_next >= sigma`` or sigmas outside ``[0, 1]``.
    """
    if sde_type not in SDE_TYPES:
        raise ValueError(f"unknown sde_type {sde_type!r}; expected one of {list(SDE_TYPES)}")
    noise_level = float(noise_level)
    if not math.isfinite(noise_level) or noise_level < 0:
        raise ValueError(f"noise_level must be finite and >= 0, got {noise_level}")
    if model_output.shape != sample.shape:
        raise ValueError(
            f"model_output shape {tuple(model_output.shape)} does not match sample shape {tuple(sample.shape)}"
        )
    if sample.ndim < 2:
        raise ValueError(f"sample must have a batch dimension and at least one more, got shape {tuple(sample.shape)}")
    for name, t in (("prev_sample", prev_sample), ("noise", noise)):
        if t is not None and t.shape != sample.shape:
            raise ValueError(f"{name} shape {tuple(t.shape)} does not match sample shape {tuple(sample.shape)}")
    batch, ndim, device = sample.shape[0], sample.ndim, sample.device
    sigma_t = _as_sigma(sigma, "sigma", batch)
    sigma_next_t = _as_sigma(sigma_next, "sigma_next", batch)
    sigma_max_t = sigma_next_t if sigma_max is None else _as_sigma(sigma_max, "sigma_max", batch)
    # Checked before moving to the sample's device: host values cost no device sync.
    _check_sigmas(sigma_t, sigma_next_t)
    if sde_type == "sde" and bool((torch.where(sigma_t == 1, sigma_max_t, sigma_t) >= 1).any()):
        raise ValueError(f"sigma_max must be < 1 where sigma == 1, got sigma_max={sigma_max_t.tolist()}")
    sigma_t, sigma_next_t = to_device_async(sigma_t, device), to_device_async(sigma_next_t, device)

    if sde_type == "ode":
        prev = _euler_step(model_output, sample, sigma_t, sigma_next_t)
        zeros = torch.zeros(batch, dtype=torch.float32, device=device)
        return SDEStep(
            prev_sample=prev,
            log_prob=zeros,
            prev_sample_mean=prev,
            std_dev=zeros.clone(),
            std_dev_t=zeros.clone(),
            noise=None,
        )

    if log_prob_no_const is None:
        log_prob_no_const = default_log_prob_no_const(sde_type)
    # FlowGRPO: bf16 overflows in the mean, so the whole stochastic step runs in float32.
    x = sample.float()
    v = model_output.float()
    s = _bcast(sigma_t, ndim)
    s_next = _bcast(sigma_next_t, ndim)
    dt = s_next - s

    if sde_type == "sde":
        s_max = _bcast(to_device_async(sigma_max_t, device), ndim)
        s_tilde = torch.where(s == 1, s_max, s)
        std_t = torch.sqrt(s / (1 - s_tilde)) * noise_level
        mean = x * (1 + std_t**2 / (2 * s) * dt) + v * (1 + std_t**2 * (1 - s) / (2 * s)) * dt
        std = std_t * torch.sqrt(-dt)
    else:  # cps
        std = s_next * math.sin(noise_level * math.pi / 2)
        x0 = x - s * v
        x1 = x + v * (1 - s)
        mean = x0 * (1 - s_next) + x1 * torch.sqrt(s_next**2 - std**2)
        std_t = std

    std = std.expand(batch, *([1] * (ndim - 1))) if std.ndim == 0 else std
    std_t = std_t.expand(batch, *([1] * (ndim - 1))) if std_t.ndim == 0 else std_t
    drawn = None
    if prev_sample is None:
        if noise is None:
            if generator is None or isinstance(generator, torch.Generator):
                noise = torch.randn(sample.shape, generator=generator, device=device, dtype=torch.float32)
            else:
                noise = randn_per_sample(sample.shape, generator, device=device)
        drawn = noise.float()
        prev = mean + std * drawn
    else:
        prev = prev_sample.float()

    sq = (prev.detach() - mean) ** 2
    if sde_type == "cps" and log_prob_no_const:
        log_prob = -sq
    else:
        # A zero std (eta == 0) is a deterministic step: its log-prob is defined as 0.
        safe_std = torch.where(std > 0, std, torch.ones_like(std))
        log_prob = -sq / (2 * safe_std**2)
        if not log_prob_no_const:
            log_prob = log_prob - torch.log(safe_std) - _LOG_SQRT_2PI
        log_prob = torch.where(std > 0, log_prob, torch.zeros_like(log_prob))
    log_prob = log_prob.mean(dim=tuple(range(1, ndim)))
    return SDEStep(
        prev_sample=prev,
        log_prob=log_prob,
        prev_sample_mean=mean,
        std_dev=std.reshape(batch),
        std_dev_t=std_t.reshape(batch),
        noise=drawn,
    )
