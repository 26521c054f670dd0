"""Differential privacy at a site: DP-SGD with the case (patient) as the privacy unit, on Opacus.

A patient contributes many slices, and the guarantee a hospital needs is per patient. So DP-SGD here
samples whole cases (Poisson, Opacus ``UniformWithReplacementSampler``), computes one gradient per case
(the loss of its sampled slices together), clips that and adds Gaussian noise (Opacus ``DPOptimizer``),
and accounts every step with Opacus's RDP accountant.

The per-case gradients come from ``torch.func`` over the whole network (vmap of grad over cases)
rather than from Opacus's per-layer hooks: those give one gradient per slice, i.e. per batch row, and
a case spans several rows. This is the functorch path Opacus itself uses, applied to the whole model;
our selective scan has a vmap rule, so the Mamba blocks can train under DP.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn
from monai.networks.utils import one_hot
from opacus.accountants import RDPAccountant
from opacus.accountants.utils import get_noise_multiplier
from opacus.optimizers import DPOptimizer
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from torch.func import functional_call, grad_and_value, vmap
from torch.utils.data import Dataset

from .data.site_config import PrivacySpec
from .training import TrainResult, segmentation_loss, set_trainable

@dataclass(frozen=True)
class DPConfig:
    """The DP-SGD settings of one site for one run, all resolved to numbers."""

    noise_multiplier: float
    max_grad_norm: float
    delta: float
    sample_rate: float  # probability that a given case is in a step's batch
    cases_per_batch: int  # expected cases per batch (Opacus's expected_batch_size)
    slices_per_case: int
    budget: float | None  # total epsilon after which the site stops training
    frozen: tuple[str, ...] = ()  # layer groups or parameter-name prefixes never trained under DP
    lr_scale: float = 1.0  # DP steps use the stage's learning rate times this

    def describe(self) -> str:
        budget = "none" if self.budget is None else f"{self.budget:g}"
        return (f"unit case, noise {self.noise_multiplier:.3f}, clip {self.max_grad_norm:g}, delta {self.delta:.2e}, "
                f"sample rate {self.sample_rate:.3f}, lr x{self.lr_scale:g}, budget {budget}")


def privacy_spec(site: PrivacySpec, run_config: Mapping) -> PrivacySpec:
    """The site's own privacy section if it enables DP; otherwise the run config's (``dp-*`` keys)."""
    if site.enabled:
        return site
    epsilon, noise = float(run_config.get("dp-epsilon", 0) or 0), float(run_config.get("dp-noise-multiplier", 0) or 0)
    if epsilon <= 0 and noise <= 0:
        return site
    lr_scale = float(run_config.get("dp-lr-scale", 1.0) or 1.0)
    if lr_scale < 0:
        raise ValueError(f"run config dp-lr-scale must be a positive number, got {lr_scale}")
    return PrivacySpec(
        enabled=True,
        target_epsilon=epsilon or None,
        noise_multiplier=noise or None,
        max_grad_norm=float(run_config.get("dp-max-grad-norm", 1.0)),
        delta=float(run_config.get("dp-delta", 0) or 0) or None,
        slices_per_case=int(run_config.get("dp-slices-per-case", site.slices_per_case)),
        cases_per_batch=int(run_config.get("dp-cases-per-batch", 0) or 0) or None,
        local_steps=int(run_config.get("dp-local-steps", 0) or 0) or None,
        frozen=tuple(filter(None, (s.strip() for s in str(run_config.get("dp-frozen", "")).split(",")))),
        lr_scale=lr_scale,
    )


def steps_per_round(sample_rate: float, local_steps: int | None, epochs: int) -> int:
    """A DP "epoch" is 1 / sample_rate Poisson batches: each case is seen once in expectation."""
    return local_steps or epochs * math.ceil(1.0 / sample_rate)


def resolve(spec: PrivacySpec, num_cases: int, batch_size: int, planned_steps: Callable[[float], int]) -> DPConfig:
    """Numbers for ``spec`` at a site with ``num_cases`` training cases.

    ``planned_steps(sample_rate)`` is the number of DP steps the whole run will take; the noise for a
    target epsilon is derived from it, so that spending the plan spends the budget.
    """
    if num_cases < 1:
        raise ValueError("DP-SGD needs at least one training case")
    k = spec.slices_per_case
    cases_per_batch = min(num_cases, spec.cases_per_batch or max(1, batch_size // k))
    sample_rate = cases_per_batch / num_cases
    delta = spec.delta or min(1e-5, 1.0 / num_cases)
    noise = spec.noise_multiplier
    if noise is None:
        noise = get_noise_multiplier(target_epsilon=spec.target_epsilon, target_delta=delta, sample_rate=sample_rate, steps=planned_steps(sample_rate), accountant="rdp")
    return DPConfig(noise, spec.max_grad_norm, delta, sample_rate, cases_per_batch, k, spec.target_epsilon, spec.frozen, spec.lr_scale)


class PrivacyLedger:
    """One site's privacy accountant over a whole run, across rounds and unfreezing stages.

    ClientApp processes are short-lived, so the ledger is serialised (the accountant's history of
    (noise, sample rate, steps)) and kept in the node's ``context.state`` between messages.
    """

    def __init__(self, history: Sequence[Sequence[float]] = ()):
        self.accountant = RDPAccountant()
        self.accountant.history = [(float(s), float(q), int(n)) for s, q, n in history]

    @property
    def steps(self) -> int:
        return sum(n for _, _, n in self.accountant.history)

    def record(self, noise_multiplier: float, sample_rate: float, steps: int = 1) -> None:
        for _ in range(steps):
            self.accountant.step(noise_multiplier=noise_multiplier, sample_rate=sample_rate)

    def epsilon(self, delta: float) -> float:
        return float(self.accountant.get_epsilon(delta)) if self.accountant.history else 0.0

    def epsilon_after(self, noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float:
        """The epsilon this ledger would show after ``steps`` more steps."""
        ahead = PrivacyLedger(self.accountant.history)
        ahead.record(noise_multiplier, sample_rate, steps)
        return ahead.epsilon(delta)

    def to_json(self) -> str:
        return json.dumps(self.accountant.history)

    @classmethod
    def from_json(cls, text: str) -> PrivacyLedger:
        return cls(json.loads(text))


def per_case_gradients(
    model: nn.Module, modality: str, loss_fn: nn.Module, images: torch.Tensor, labels: torch.Tensor
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """One gradient per case of its slices' loss, for the trainable parameters.

    images (n, k, C, H, W), labels one-hot (n, k, K, H, W) -> ({name: (n, *shape)}, losses (n,)).
    """
    params = {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}

    def case_loss(trainable, image, label):
        return loss_fn(functional_call(model, trainable, (image, modality), strict=False), label)

    return vmap(grad_and_value(case_loss), in_dims=(None, 0, 0), randomness="different")(params, images, labels)


def train_private(
    model: nn.Module,
    modality: str,
    cases: Dataset,
    *,
    groups: Sequence[str],
    lr: float,
    steps: int,
    dp: DPConfig,
    ledger: PrivacyLedger,
    seed: int,
    weight_decay: float = 1e-5,
    on_step: Callable[[int, float], None] | None = None,
) -> TrainResult:
    """``steps`` DP-SGD steps (AdamW on the privatised gradient, learning rate ``lr * dp.lr_scale``) on the
    stage's groups, less ``dp.frozen``.

    ``cases`` yields one case per item: image (k, C, H, W), label (k, 1, H, W). The optimiser is built
    for this round's trainable groups (a stage change re-wraps it); ``ledger`` carries over.
    """
    params = set_trainable(model, groups, dp.frozen)
    if not params:
        raise ValueError(f"the stage trains no parameter (groups {list(groups)}, frozen under DP {list(dp.frozen)})")
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    device = params[0].device
    optimizer = DPOptimizer(
        torch.optim.AdamW(params, lr=lr * dp.lr_scale, weight_decay=weight_decay),
        noise_multiplier=dp.noise_multiplier,
        max_grad_norm=dp.max_grad_norm,
        expected_batch_size=dp.cases_per_batch,
        generator=torch.Generator(device).manual_seed(seed),  # Opacus draws the noise on the parameters' device with it
    )
    sampler = UniformWithReplacementSampler(num_samples=len(cases), sample_rate=dp.sample_rate, generator=torch.Generator().manual_seed(seed + 1))
    num_classes = model.num_classes
    loss_fn = segmentation_loss(model, one_hot_labels=True)
    model.train()
    batches, total, sampled = iter(sampler), 0.0, 0
    for step in range(1, steps + 1):
        indices = next(batches, None)
        if indices is None:
            batches = iter(sampler)
            indices = next(batches)
        if indices:
            items = [cases[i] for i in indices]
            images = torch.stack([it["image"] for it in items]).to(device)
            labels = torch.stack([it["label"] for it in items]).to(device)
            labels = one_hot(labels.flatten(0, 1), num_classes).view(*labels.shape[:2], num_classes, *labels.shape[3:])
            grads, losses = per_case_gradients(model, modality, loss_fn, images, labels)
            if not torch.isfinite(losses).all():
                raise FloatingPointError(f"training loss became non-finite at DP step {step}")
            total += losses.sum().item()
            sampled += len(indices)
        else:  # an empty Poisson batch is still a step: noise only
            grads = {name: p.new_zeros((0, *p.shape)) for name, p in named}
        for name, p in named:
            p.grad_sample = grads[name]
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ledger.record(dp.noise_multiplier, dp.sample_rate)
        if on_step:
            on_step(step, losses.mean().item() if indices else float("nan"))
    return TrainResult(total / sampled if sampled else float("nan"), steps, sampled)


def dp_metrics(dp: DPConfig, ledger: PrivacyLedger, exhausted: bool) -> dict[str, float]:
    """The scalars a site reports about its privacy: spent epsilon and the mechanism's parameters."""
    metrics = {
        "epsilon": ledger.epsilon(dp.delta),
        "dp-delta": dp.delta,
        "dp-noise-multiplier": dp.noise_multiplier,
        "dp-max-grad-norm": dp.max_grad_norm,
        "dp-sample-rate": dp.sample_rate,
        "dp-steps": ledger.steps,
        "dp-budget-exhausted": int(exhausted),
    }
    if dp.budget is not None:
        metrics["dp-budget"] = dp.budget
    return metrics
