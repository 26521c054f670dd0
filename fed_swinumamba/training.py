"""Local training and evaluation at one site: MONAI loss, metric and sliding-window inference.

Knows nothing of Flower: the ClientApp calls these with the round's stage, and the simulation's
centralized baseline calls them on pooled data.
"""

from __future__ import annotations

import math
import time
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
from monai.inferers import sliding_window_inference
from monai.losses import DeepSupervisionLoss, DiceCELoss

from .data.cache import CachedCase
from .metrics import SiteScores, case_scores
from .params import group_of
from .protocol import VALIDATION, EvalReply


def set_trainable(model: nn.Module, groups: Iterable[str], frozen: Iterable[str] = ()) -> list[nn.Parameter]:
    """Train exactly the parameters of ``groups``; freeze the rest. Returns the trainable ones.

    ``frozen`` keeps parts of those groups fixed as well: each entry is a layer group or a parameter-name
    prefix (a DP site trains fewer parameters, so that its noise is spread over fewer coordinates).
    """
    groups, frozen = set(groups), tuple(frozen)
    names = [name for name, _ in model.named_parameters()]
    unknown = [f for f in frozen if not any(group_of(n) == f or n.startswith(f) for n in names)]
    if unknown:
        raise ValueError(f"frozen {unknown} names no layer group or parameter-name prefix of this network")
    trainable = []
    for name, p in model.named_parameters():
        group = group_of(name)
        p.requires_grad_(group in groups and group not in frozen and not name.startswith(frozen))
        if p.requires_grad:
            trainable.append(p)
    return trainable


def segmentation_loss(model: nn.Module, one_hot_labels: bool = False) -> nn.Module:
    """Dice + cross-entropy on softmax logits (deep-supervised when the model is).

    Labels are integer maps (B, 1, H, W), or already one-hot (B, K, H, W) with ``one_hot_labels``, which
    per-case gradients under vmap need (one-hot encoding writes in place).
    """
    loss = DiceCELoss(to_onehot_y=not one_hot_labels, softmax=True)
    return DeepSupervisionLoss(loss, weight_mode="exp") if getattr(model, "deep_supervision", False) else loss


@dataclass
class TrainResult:
    loss: float
    steps: int
    num_examples: int


def round_seed(run_seed: int, server_round: int, site: str) -> int:
    """The seed of a site's local training in a round: the same run seed, round and site give the same
    batches and augmentations (so reruns, and a site's local-only baseline, reproduce its training). The
    coordinator knows all three: only for what may be reproducible (never DP noise)."""
    return (run_seed * 1_000_003 + server_round * 7919 + zlib.crc32(site.encode())) % 2**31


def train_local(
    model: nn.Module,
    modality: str,
    batches: Iterable[Mapping[str, torch.Tensor]],
    *,
    groups: Sequence[str],
    lr: float,
    max_steps: int | None = None,
    epochs: int = 1,
    proximal_mu: float = 0.0,
    proximal_anchor: Mapping[str, torch.Tensor] | None = None,
    weight_decay: float = 1e-5,
    optimizer_factory: Callable[[list[nn.Parameter]], torch.optim.Optimizer] | None = None,
    on_step: Callable[[int, float], None] | None = None,
) -> TrainResult:
    """AdamW on the stage's groups for ``epochs`` passes over ``batches`` (or ``max_steps`` steps).

    ``proximal_mu`` > 0 adds the term mu/2 * ||w - anchor||^2 over the trained weights: the anchor is
    FedProx's w_round_start (the weights at the start), or ``proximal_anchor`` by parameter name (Ditto's
    global model, towards which a personal model is pulled).
    """
    device = next(model.parameters()).device
    params = set_trainable(model, groups)
    if not params:
        raise ValueError(f"the stage trains no parameter (groups {list(groups)})")
    optimizer = (
        optimizer_factory(params) if optimizer_factory else torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    )
    anchors = None
    if proximal_mu > 0:
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        anchors = [(proximal_anchor[n].to(p) if proximal_anchor else p).detach().clone() for n, p in named]
    loss_fn = segmentation_loss(model)
    model.train()
    steps, examples, total, epoch = 0, 0, 0.0, 0
    while max_steps is not None or epoch < epochs:
        steps_before = steps
        for batch in batches:
            image, label = batch["image"].to(device), batch["label"].to(device)
            loss = loss_fn(model(image, modality), label)
            if anchors is not None:
                loss = loss + proximal_mu / 2 * sum((p - a).pow(2).sum() for p, a in zip(params, anchors))
            if not torch.isfinite(loss):
                raise FloatingPointError(f"training loss became {loss.item()} at step {steps + 1}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            steps += 1
            examples += image.shape[0]
            total += loss.item()
            if on_step:
                on_step(steps, loss.item())
            if max_steps is not None and steps >= max_steps:
                return TrainResult(total / steps, steps, examples)
        if steps == steps_before:
            raise ValueError("no training batch: the site's training split is empty")
        epoch += 1
    return TrainResult(total / steps, steps, examples)


def once_per_constant_window(predict: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    """``predict`` over a batch of windows (N, C, h, w), running the network once per distinct value among
    the windows whose pixels all share one value (air after the CT window, padding): each window's logits
    depend on that window alone, so such windows have the same logits."""

    def run(windows: torch.Tensor) -> torch.Tensor:
        flat = windows.flatten(1)
        constant = (flat == flat[:, :1]).all(dim=1)
        if constant.sum() < 2:
            return predict(windows)
        values, which = torch.unique(flat[constant, 0], return_inverse=True)
        varied = windows[~constant]
        logits = predict(torch.cat([varied, values.view(-1, 1, 1, 1).expand(-1, *windows.shape[1:])]))
        out = logits.new_empty((windows.shape[0], *logits.shape[1:]))
        out[~constant] = logits[: len(varied)]
        out[constant] = logits[len(varied) :][which]
        return out

    return run


# Pixels of the windows batched into one network call by ``predict_slices``: 16 of the demo's 64 x 64 windows
# (as fast per window as 64, at half the memory), a single full-size 512 x 512 one (the full-size network took 20 %
# longer per window in batches of 4, with twice the memory: benchmarks/RESULTS.md).
WINDOW_PIXELS_PER_CALL = 16 * 64 * 64


@torch.inference_mode()
def predict_slices(
    model: nn.Module | Callable[[torch.Tensor, str], torch.Tensor],
    modality: str,
    slices: torch.Tensor | np.ndarray,
    roi_size: Sequence[int],
    sw_batch_size: int | None = None,
    slices_per_pass: int = 8,
) -> torch.Tensor:
    """Slice-wise sliding-window segmentation: slices (S, H, W) or (S, C, H, W) -> class indices (S, H, W) uint8.

    ``slices_per_pass`` slices go through MONAI's sliding window together, their windows batched by
    ``sw_batch_size`` (default: as many as make ``WINDOW_PIXELS_PER_CALL`` pixels, at least one), while the
    logits in memory stay a few slices' worth. Windows of one constant value are computed once per value.
    ``model`` is a network or anything called like one (``export.OnnxNetwork``, which runs on the CPU).
    """
    device = torch.device("cpu")
    if isinstance(model, nn.Module):
        model.eval()
        device = next(model.parameters()).device
    sw_batch_size = sw_batch_size or max(1, WINDOW_PIXELS_PER_CALL // math.prod(roi_size))
    network = once_per_constant_window(lambda x: model(x, modality))
    out = torch.empty((slices.shape[0], *slices.shape[-2:]), dtype=torch.uint8)
    for start in range(0, slices.shape[0], slices_per_pass):
        chunk = torch.as_tensor(slices[start : start + slices_per_pass]).to(device, torch.float32)
        chunk = chunk[:, None] if chunk.ndim == 3 else chunk
        logits = sliding_window_inference(chunk, tuple(roi_size), sw_batch_size, network, overlap=0.25, mode="gaussian")
        # Classes last and contiguous: argmax over the strided class axis took 15x longer (8% of a CT's prediction).
        out[start : start + len(chunk)] = logits.movedim(1, -1).contiguous().argmax(dim=-1).to(torch.uint8).cpu()
    return out


DEFAULT_NSD_TOLERANCE_MM = 2.0  # surface Dice tolerance when a federation gives none


@dataclass
class EvalResult:
    """Per foreground class (by name): means over the cases of that class; NaN where no case has it."""

    dice: dict[str, float]
    hd95: dict[str, float]  # mm (pixels for images without spacing); finite cases only
    nsd: dict[str, float]
    hd95_unbounded: dict[str, int]  # cases where only one of truth and prediction has the class
    num_cases: int
    seconds_per_case: float
    case_dice: tuple[float, ...]  # per case scored, in order: its mean Dice over its classes (NaN: none)

    @property
    def dice_mean(self) -> float:
        valid = [v for v in self.dice.values() if not math.isnan(v)]
        return sum(valid) / len(valid) if valid else float("nan")

    def reply(
        self, held_out_cases: int, split: str = VALIDATION, full_split_cases: int = 0, selection_cases: int = 0
    ) -> EvalReply:
        """These scores as a site sends them (and metrics.json records them): of ``split``, out of its
        ``held_out_cases``; a full-split evaluation of the site would score ``full_split_cases``, and its
        choice of a personal model ``selection_cases`` validation cases (each once per candidate model)."""
        return EvalReply(
            self.dice,
            self.hd95,
            self.nsd,
            self.hd95_unbounded,
            self.dice_mean,
            self.num_cases,
            held_out_cases,
            self.seconds_per_case,
            split=split,
            full_split_cases=full_split_cases,
            selection_cases=selection_cases,
        )


def evaluate_cases(
    model: nn.Module,
    modality: str,
    cases: Iterable[CachedCase],
    class_names: Sequence[str],
    roi_size: Sequence[int],
    nsd_tolerance_mm: float | Sequence[float] = DEFAULT_NSD_TOLERANCE_MM,
) -> EvalResult:
    """Dice, HD95 and NSD per foreground class over held-out cases (``fed_swinumamba.metrics``), each case
    scored as a whole volume with its voxel spacing. Cases are read one at a time and freed.

    ``class_names`` are the foreground classes (index 1..K); a class in neither a case's truth nor its
    prediction does not count for that case.
    """
    site = SiteScores()
    if not isinstance(nsd_tolerance_mm, (int, float)) and len(nsd_tolerance_mm) == 1:
        nsd_tolerance_mm = nsd_tolerance_mm[0]  # one tolerance for every class
    started, n = time.perf_counter(), 0
    for case in cases:
        pred = predict_slices(model, modality, case.image_slices(), roi_size)
        truth = torch.from_numpy(case.label_slices())
        if case.num_slices == 1:  # a 2-D image: its surfaces are 2-D
            pred, truth, spacing = pred[0], truth[0], case.spacing[:2]
        else:  # (S, H, W) -> (H, W, S), the axis order of the case's spacing
            pred, truth, spacing = pred.permute(1, 2, 0), truth.permute(1, 2, 0), case.spacing
        site.add(case_scores(pred, truth, len(class_names) + 1, nsd_tolerance_mm, spacing))
        n += 1
    if n == 0:
        raise ValueError("no held-out case to evaluate")
    summary = site.summary()
    by_name = {name: summary[i] for i, name in enumerate(class_names, start=1)}
    return EvalResult(
        {c: s.dice for c, s in by_name.items()},
        {c: s.hd95 for c, s in by_name.items()},
        {c: s.nsd for c, s in by_name.items()},
        {c: s.hd95_unbounded for c, s in by_name.items()},
        n,
        (time.perf_counter() - started) / n,
        tuple(site.case_dice),
    )
