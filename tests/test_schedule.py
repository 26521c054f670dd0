"""The shared unfreezing schedule and the round instructions' wire format."""

import pytest
from flwr.app import ConfigRecord

from fed_swinumamba.dp_options import RunDPOptions
from fed_swinumamba.model import ModelConfig
from fed_swinumamba.params import LAYER_GROUPS
from fed_swinumamba.protocol import Instructions
from fed_swinumamba.schedule import Stage, UnfreezingSchedule


def test_default_schedule_unfreezes_one_group_per_stage_shallow_to_deep():
    schedule = UnfreezingSchedule(rounds_per_stage=2)
    frozen_per_round = {r: set(LAYER_GROUPS) - set(schedule.stage_for_round(r).trainable_groups) for r in range(1, 10)}
    assert frozen_per_round[1] == frozen_per_round[2] == {"stage1", "stage2", "stage3"}
    assert frozen_per_round[3] == frozen_per_round[4] == {"stage2", "stage3"}
    assert frozen_per_round[5] == {"stage3"}
    assert frozen_per_round[7] == frozen_per_round[9] == set()
    assert [schedule.stage_for_round(r).index for r in (1, 3, 5, 7, 9)] == [0, 1, 2, 3, 3]
    assert schedule.stage_for_round(5).lr == pytest.approx(1e-4 * 0.8**2)
    assert schedule.stage_for_round(1).trainable_groups == ("stem", "stage4", "decoder", "heads")


def test_groups_changed_between_versions_is_what_a_lagging_site_lacks():
    schedule = UnfreezingSchedule(rounds_per_stage=1)
    assert schedule.groups_changed_between(0, 1) == ("stem", "stage4", "decoder", "heads")
    assert schedule.groups_changed_between(1, 3) == ("stem", "stage1", "stage2", "stage4", "decoder", "heads")
    assert schedule.groups_changed_between(2, 2) == ()


def test_bad_schedules_and_stages_are_rejected():
    with pytest.raises(ValueError, match="unknown layer groups"):
        UnfreezingSchedule(frozen_at_start=("stage9",))
    with pytest.raises(ValueError, match="rounds_per_stage"):
        UnfreezingSchedule(rounds_per_stage=0)
    with pytest.raises(ValueError, match="lack the stage field"):
        Stage.from_config({"lr": 1.0})


def test_instructions_round_trip_through_a_config_record():
    dp = RunDPOptions(epsilon=4.0, local_steps=10, frozen=("stage4", "up_blocks.0."), lr_scale=4.0)
    ins = Instructions(
        3,
        Stage(1, ("stem", "heads"), 8e-5),
        ModelConfig(dims=(8, 16, 32, 64)),
        ("organ", "lesion"),
        version=2,
        base_version=1,
        planned_rounds=12,
        dp=dp,
    )
    back = Instructions.from_config(ConfigRecord(ins.to_config()))
    assert back == ins
