"""The shared progressive-unfreezing schedule and the wire format of a stage.

All sites train in lockstep: the coordinator computes the stage of each round and sends it with the
round's instructions; a site trains exactly the stage's layer groups with the stage's learning rate.
Default (the design notes): the first three VMamba stages start frozen and are unfrozen one group per
stage from shallow to deep, the learning rate decaying x0.8 per stage.
"""

from __future__ import annotations

from dataclasses import dataclass

from .params import LAYER_GROUPS, check_groups


@dataclass(frozen=True)
class Stage:
    """What every site trains in one round."""

    index: int
    trainable_groups: tuple[str, ...]
    lr: float

    def to_config(self) -> dict:
        """Wire format (values a Flower ConfigRecord holds)."""
        return {"stage": self.index, "trainable-groups": list(self.trainable_groups), "lr": self.lr}

    @classmethod
    def from_config(cls, config) -> Stage:
        try:
            return cls(int(config["stage"]), check_groups(config["trainable-groups"]), float(config["lr"]))
        except KeyError as err:
            raise ValueError(f"round instructions lack the stage field {err}") from err


@dataclass(frozen=True)
class UnfreezingSchedule:
    """Stage k (rounds ``k * rounds_per_stage + 1`` ..) trains every group but ``frozen_at_start[k:]``."""

    frozen_at_start: tuple[str, ...] = ("stage1", "stage2", "stage3")
    rounds_per_stage: int = 2
    base_lr: float = 1e-4
    lr_decay: float = 0.8

    def __post_init__(self) -> None:
        object.__setattr__(self, "frozen_at_start", check_groups(self.frozen_at_start))
        if self.rounds_per_stage < 1:
            raise ValueError(f"rounds_per_stage must be >= 1, got {self.rounds_per_stage}")
        if not (self.base_lr > 0 and 0 < self.lr_decay <= 1):
            raise ValueError(f"need base_lr > 0 and 0 < lr_decay <= 1, got {self.base_lr}, {self.lr_decay}")

    @property
    def num_stages(self) -> int:
        return len(self.frozen_at_start) + 1

    def stage_for_round(self, server_round: int) -> Stage:
        if server_round < 1:
            raise ValueError(f"rounds count from 1, got {server_round}")
        k = min((server_round - 1) // self.rounds_per_stage, self.num_stages - 1)
        frozen = set(self.frozen_at_start[k:])
        trainable = tuple(g for g in LAYER_GROUPS if g not in frozen)
        return Stage(k, trainable, self.base_lr * self.lr_decay**k)

    def groups_changed_between(self, after_round: int, up_to_round: int) -> tuple[str, ...]:
        """Groups trained in rounds ``after_round + 1 .. up_to_round``: what a site synced at ``after_round`` lacks."""
        groups = set()
        for r in range(after_round + 1, up_to_round + 1):
            groups.update(self.stage_for_round(r).trainable_groups)
        return check_groups(groups)
