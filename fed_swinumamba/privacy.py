"""Differential privacy at a site: DP-SGD with the case (patient) as the privacy unit, on Opacus.

A patient contributes many slices, and the guarantee a hospital needs is per patient. So DP-SGD here
samples whole cases (Poisson, Opacus ``UniformWithReplacementSampler``), computes one gradient per case
(the loss of its sampled slices together), clips that and adds Gaussian noise (Opacus ``DPOptimizer``),
and accounts every step with Opacus's RDP accountant.

What the coordinator must not be able to predict, it cannot: the noise and the Poisson sampling come
from a ChaCha20 keystream under a key from OS entropy (``secure_random``), and the slice choice,
augmentation and PyTorch's generator are seeded from it too. The accountant of a site lives on the
site's disk, one per study (``study_ledger``), so resumed and repeated runs of a study go on spending
from it. No exact patient count leaves a DP site: its sample rate, default delta and aggregation weight
all follow from ``disclosed_patient_count``.

The per-case gradients come from ``torch.func`` over the whole network (vmap of grad over cases)
rather than from Opacus's per-layer hooks: those give one gradient per slice, i.e. per batch row, and
a case spans several rows. This is the functorch path Opacus itself uses, applied to the whole model;
our selective scan has a vmap rule, so the Mamba blocks can train under DP.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from monai.networks.utils import one_hot
from opacus.accountants import RDPAccountant
from opacus.accountants.utils import get_noise_multiplier
from opacus.optimizers import DPOptimizer
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed
from torch.func import functional_call, grad_and_value, vmap
from torch.utils.data import Dataset

from .data.site_config import PrivacySpec
from .dp_options import RunDPOptions
from .protocol import DPRecord, check_study
from .secure_random import KeyStream
from .training import TrainResult, segmentation_loss, set_trainable

UNIT = "patient"  # the privacy unit (today one training case is taken as one patient)


@dataclass(frozen=True)
class DPConfig:
    """The DP-SGD settings of one site for one run, all resolved to numbers."""

    noise_multiplier: float
    max_grad_norm: float
    delta: float
    sample_rate: float  # probability that a given patient is in a step's batch: cases_per_batch / disclosed_patients
    cases_per_batch: int  # expected patients per batch at the disclosed count (Opacus's expected_batch_size)
    slices_per_case: int
    budget: float | None  # the study's epsilon (all runs) after which the site stops training
    frozen: tuple[str, ...] = ()  # layer groups or parameter-name prefixes never trained under DP
    lr_scale: float = 1.0  # DP steps use the stage's learning rate times this
    disclosed_patients: int = 0  # the coarsened patient count the site discloses (0: not given)
    cases_per_pass: int = 0  # patients whose gradients are computed at once (memory); 0: the whole batch

    def describe(self) -> str:
        budget = "none" if self.budget is None else f"{self.budget:g}"
        return (
            f"unit {UNIT}, noise {self.noise_multiplier:.3f}, clip {self.max_grad_norm:g}, delta {self.delta:.2e}, "
            f"sample rate {self.sample_rate:.3f}, lr x{self.lr_scale:g}, study budget {budget}"
        )


def privacy_spec(site: PrivacySpec, run: RunDPOptions) -> PrivacySpec:
    """The site's own privacy section if it enables DP; otherwise the run's DP request (``dp-*`` keys).

    The site's lifetime budget per study, its consent to reproducible noise and its memory setting
    (``cases_per_pass``) stay the site's own either way: the coordinator can change none of them.
    """
    if site.enabled or not run.enabled:
        return site
    return PrivacySpec(
        enabled=True,
        target_epsilon=run.epsilon or None,
        noise_multiplier=run.noise_multiplier or None,
        max_grad_norm=run.max_grad_norm,
        delta=run.delta or None,
        slices_per_case=run.slices_per_case,
        cases_per_batch=run.cases_per_batch or None,
        local_steps=run.local_steps or None,
        frozen=run.frozen,
        lr_scale=run.lr_scale,
        cases_per_pass=site.cases_per_pass,
        study_budget=site.study_budget,
        allow_insecure_reproducible=site.allow_insecure_reproducible,
    )


def disclosed_patient_count(num_patients: int) -> int:
    """The training-patient count a DP site discloses: rounded down to two significant digits.

    3217 -> 3200, 4000 -> 4000, below 100 the count itself. Under add/remove adjacency the exact count
    is private, and the sample rate B/N and the noise derived from it would give it away; so they, the
    default delta and the aggregation weight are computed from this coarser count, which the site
    discloses outside the DP guarantee.
    """
    step = 10 ** max(0, len(str(num_patients)) - 2)
    return num_patients // step * step


def steps_per_round(sample_rate: float, local_steps: int | None, epochs: int) -> int:
    """A DP "epoch" is 1 / sample_rate Poisson batches: each case is seen once in expectation."""
    return local_steps or epochs * math.ceil(1.0 / sample_rate)


def resolve(spec: PrivacySpec, num_cases: int, batch_size: int, planned_steps: Callable[[float], int]) -> DPConfig:
    """Numbers for ``spec`` at a site with ``num_cases`` training patients, from their disclosed count only.

    ``planned_steps(sample_rate)`` is the number of DP steps the whole run will take; the noise for a
    target epsilon is derived from it, so that spending the plan spends the budget. The budget is the
    smaller of the run's target and the site's own ``study_budget``.
    """
    if num_cases < 1:
        raise ValueError("DP-SGD needs at least one training patient")
    disclosed = disclosed_patient_count(num_cases)
    k = spec.slices_per_case
    cases_per_batch = min(disclosed, spec.cases_per_batch or max(1, batch_size // k))
    sample_rate = cases_per_batch / disclosed
    delta = spec.delta or min(1e-5, 1.0 / disclosed)
    noise = spec.noise_multiplier
    if noise is None:
        noise = get_noise_multiplier(
            target_epsilon=spec.target_epsilon,
            target_delta=delta,
            sample_rate=sample_rate,
            steps=planned_steps(sample_rate),
            accountant="rdp",
        )
    budgets = [b for b in (spec.target_epsilon, spec.study_budget) if b is not None]
    return DPConfig(
        noise,
        spec.max_grad_norm,
        delta,
        sample_rate,
        cases_per_batch,
        k,
        min(budgets, default=None),
        spec.frozen,
        spec.lr_scale,
        disclosed,
        spec.cases_per_pass,
    )


class PrivacyLedger:
    """One site's privacy accountant for a study: every DP step of all its runs, rounds and stages.

    Serialised as the accountant's history of (noise, sample rate, steps); kept on the site's disk
    (``study_ledger``), because ClientApp processes, SuperNodes and runs all end before a study does.
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


def ledger_file(state_dir: Path, study: str) -> Path:
    """Where a site keeps its ledger of ``study``: ``<state_dir>/privacy/<study>.json``."""
    return state_dir / "privacy" / f"{check_study(study)}.json"


@contextmanager
def study_ledger(path: Path) -> Iterator[PrivacyLedger]:
    """The ledger at ``path``, held under an exclusive lock for the block and written back when it ends.

    The lock makes two messages of one study at this site (two runs at once) spend one after the
    other, never both from the same starting point. The write is atomic (a synced temporary file
    renamed over the old one): a crash leaves the old ledger or the new one, not a torn file. A block
    that raises writes nothing: its update is not sent.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.with_suffix(".lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        ledger = PrivacyLedger.from_json(path.read_text()) if path.is_file() else PrivacyLedger()
        yield ledger
        tmp = path.with_suffix(".tmp")
        with tmp.open("w") as out:
            out.write(ledger.to_json())
            out.flush()
            os.fsync(out.fileno())
        tmp.replace(path)


class KeyStreamDPOptimizer(DPOptimizer):
    """Opacus's ``DPOptimizer`` whose Gaussian noise comes from a ChaCha20 keystream.

    Opacus draws the noise with a ``torch.Generator`` (Mersenne Twister: predictable from its seed, or
    from its outputs); its secure mode would need torchcsprng. Only ``add_noise`` changes: clipping,
    the noise's scale sigma * C and the division by the expected batch size are Opacus's own.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, *, stream: KeyStream, **kwargs):
        super().__init__(optimizer, **kwargs)
        self.stream = stream

    def add_noise(self) -> None:
        """One draw for all parameters (a handful of tensor operations per step, not per parameter)."""
        params = self.params
        sizes = [p.summed_grad.numel() for p in params]
        noise = self.stream.normal(
            (sum(sizes),), self.noise_multiplier * self.max_grad_norm, params[0].summed_grad.device
        )
        for p, n in zip(params, noise.split(sizes), strict=True):
            _check_processed_flag(p.summed_grad)
            p.grad = (p.summed_grad + n.view_as(p.summed_grad)).view_as(p)
            _mark_as_processed(p.summed_grad)


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


def _case_gradients(model, modality, loss_fn, cases, indices, num_classes, device):
    """Per-case gradients and losses of the patients ``indices`` of ``cases``."""
    items = [cases[i] for i in indices]
    images = torch.stack([it["image"] for it in items]).to(device)
    labels = torch.stack([it["label"] for it in items]).to(device)
    labels = one_hot(labels.flatten(0, 1), num_classes).view(*labels.shape[:2], num_classes, *labels.shape[3:])
    return per_case_gradients(model, modality, loss_fn, images, labels)


def proximal_term(params: Sequence[nn.Parameter], mu: float) -> Callable[[DPOptimizer], None]:
    """A ``DPOptimizer`` step hook (it runs after the noise and the division by the batch size) that adds
    FedProx's gradient mu * (w - w_start) of mu/2 * ||w - w_start||^2, as ``train_local`` does."""
    anchors = [p.detach().clone() for p in params]

    def add(_optimizer: DPOptimizer) -> None:
        for p, anchor in zip(params, anchors, strict=True):
            p.grad.add_(p.detach() - anchor, alpha=mu)

    return add


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
    stream: KeyStream,
    proximal_mu: float = 0.0,
    weight_decay: float = 1e-5,
    on_step: Callable[[int, float], None] | None = None,
) -> TrainResult:
    """``steps`` DP-SGD steps (AdamW on the privatised gradient, learning rate ``lr * dp.lr_scale``) on the
    stage's groups, less ``dp.frozen``; noise and Poisson batches drawn from ``stream``.

    ``cases`` yields one patient per item: image (k, C, H, W), label (k, 1, H, W). A Poisson batch is
    processed ``dp.cases_per_pass`` patients at a time (Opacus's virtual steps: clip and sum each pass,
    noise once), so memory stays bounded whatever the batch size. The optimiser is built
    for this round's trainable groups (a stage change re-wraps it); ``ledger`` carries over.
    ``proximal_mu`` > 0 adds FedProx's gradient mu * (w - w_round_start) to the privatised one: it does
    not depend on the data, so adding it is post-processing and costs no privacy.
    """
    params = set_trainable(model, groups, dp.frozen)
    if not params:
        raise ValueError(f"the stage trains no parameter (groups {list(groups)}, frozen under DP {list(dp.frozen)})")
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    device = params[0].device
    optimizer = KeyStreamDPOptimizer(
        torch.optim.AdamW(params, lr=lr * dp.lr_scale, weight_decay=weight_decay),
        stream=stream,
        noise_multiplier=dp.noise_multiplier,
        max_grad_norm=dp.max_grad_norm,
        expected_batch_size=dp.cases_per_batch,
    )
    if proximal_mu > 0:
        optimizer.attach_step_hook(proximal_term(params, proximal_mu))
    num_classes = model.num_classes
    loss_fn = segmentation_loss(model, one_hot_labels=True)
    model.train()
    total, sampled = 0.0, 0
    for step in range(1, steps + 1):
        indices = stream.poisson_sample(len(cases), dp.sample_rate)
        width = dp.cases_per_pass or max(1, len(indices))
        passes = [indices[i : i + width] for i in range(0, len(indices), width)] or [[]]
        step_losses = []
        for n, chunk in enumerate(passes):
            if chunk:
                grads, losses = _case_gradients(model, modality, loss_fn, cases, chunk, num_classes, device)
                if not torch.isfinite(losses).all():
                    raise FloatingPointError(f"training loss became non-finite at DP step {step}")
                step_losses.append(losses)
            else:  # an empty Poisson batch is still a step: noise only
                grads = {name: p.new_zeros((0, *p.shape)) for name, p in named}
            for name, p in named:
                p.grad_sample = grads[name]
            # Opacus's virtual steps: every pass but the last only clips and adds to the sum.
            optimizer.signal_skip_step(do_skip=n < len(passes) - 1)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        ledger.record(dp.noise_multiplier, dp.sample_rate)
        if step_losses:
            losses = torch.cat(step_losses)
            total += losses.sum().item()
            sampled += len(losses)
        if on_step:
            on_step(step, losses.mean().item() if step_losses else float("nan"))
    return TrainResult(total / sampled if sampled else float("nan"), steps, sampled)


def dp_record(
    dp: DPConfig, ledger: PrivacyLedger, exhausted: bool, reproducible: bool, patients_mapped: bool
) -> DPRecord:
    """What a site reports about its privacy: the study's spent epsilon and the mechanism's parameters."""
    return DPRecord(
        epsilon=ledger.epsilon(dp.delta),
        disclosed_patients=dp.disclosed_patients,
        delta=dp.delta,
        noise_multiplier=dp.noise_multiplier,
        max_grad_norm=dp.max_grad_norm,
        sample_rate=dp.sample_rate,
        steps=ledger.steps,
        budget=dp.budget,
        budget_exhausted=exhausted,
        reproducible=reproducible,
        patients_mapped=patients_mapped,
    )
