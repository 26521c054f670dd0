"""Local training and evaluation at one site: MONAI loss, metric and sliding-window inference.

Knows nothing of Flower: the ClientApp calls these with the round's stage, and the simulation's
centralized baseline calls them on pooled data.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn
from monai.inferers import sliding_window_inference
from monai.losses import DeepSupervisionLoss, DiceCELoss
from monai.metrics import DiceMetric
from monai.networks.utils import one_hot

from .params import group_of


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
    weight_decay: float = 1e-5,
    optimizer_factory: Callable[[list[nn.Parameter]], torch.optim.Optimizer] | None = None,
    on_step: Callable[[int, float], None] | None = None,
) -> TrainResult:
    """AdamW on the stage's groups for ``epochs`` passes over ``batches`` (or ``max_steps`` steps).

    ``proximal_mu`` > 0 adds FedProx's term mu/2 * ||w - w_round_start||^2 over the trained weights.
    """
    device = next(model.parameters()).device
    params = set_trainable(model, groups)
    if not params:
        raise ValueError(f"the stage trains no parameter (groups {list(groups)})")
    optimizer = optimizer_factory(params) if optimizer_factory else torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    anchors = [p.detach().clone() for p in params] if proximal_mu > 0 else None
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


@torch.no_grad()
def predict_volume(model: nn.Module, modality: str, image: torch.Tensor, roi_size: Sequence[int], sw_batch_size: int = 8) -> torch.Tensor:
    """Slice-wise sliding-window segmentation of a case.

    image (C, H, W, S) with the S slices last -> integer labels (1, H, W, S).
    """
    model.eval()
    device = next(model.parameters()).device
    slices = image.permute(3, 0, 1, 2).to(device)  # (S, C, H, W): the slices form the batch
    logits = sliding_window_inference(slices, tuple(roi_size), sw_batch_size, lambda x: model(x, modality), overlap=0.25, mode="gaussian")
    return logits.argmax(dim=1, keepdim=True).permute(1, 2, 3, 0).cpu()  # (1, H, W, S)


@dataclass
class EvalResult:
    dice: dict[str, float]  # per foreground class; NaN where no case has that class
    dice_mean: float
    num_cases: int


def evaluate_cases(
    model: nn.Module,
    modality: str,
    cases: Iterable[Mapping[str, torch.Tensor]],
    class_names: Sequence[str],
    roi_size: Sequence[int],
) -> EvalResult:
    """Dice per foreground class over held-out cases, each case's volume scored as a whole.

    ``class_names`` are the foreground classes (index 1..K); a class absent from a case's ground truth
    does not count for that case (MONAI ``ignore_empty``).
    """
    num_classes = len(class_names) + 1
    metric = DiceMetric(include_background=False, reduction="mean_batch", ignore_empty=True, num_classes=num_classes)
    n = 0
    for case in cases:
        pred = predict_volume(model, modality, case["image"], roi_size)
        label = torch.as_tensor(case["label"]).long()
        metric(one_hot(pred[None], num_classes), one_hot(label[None], num_classes))
        n += 1
    if n == 0:
        raise ValueError("no held-out case to evaluate")
    per_class = metric.aggregate().tolist()
    dice = dict(zip(class_names, (float(v) for v in per_class)))
    valid = [v for v in dice.values() if not math.isnan(v)]
    return EvalResult(dice, sum(valid) / len(valid) if valid else float("nan"), n)
