"""The shared unfreezing schedule, the round wire format and modality-aware aggregation."""

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, Metadata, MetricRecord, RecordDict

from fed_swinumamba.model import ModelConfig
from fed_swinumamba.params import LAYER_GROUPS
from fed_swinumamba.protocol import ARRAYS, METRICS, Instructions
from fed_swinumamba.schedule import Stage, UnfreezingSchedule
from server.aggregation import ModalityAwareAggregator, strategy_factory


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
    ins = Instructions(3, Stage(1, ("stem", "heads"), 8e-5), ModelConfig(dims=(8, 16, 32, 64)), ("organ", "lesion"), version=2, base_version=1)
    back = Instructions.from_config(ConfigRecord(ins.to_config()))
    assert back == ins


def _reply(site_arrays: dict, num_examples: int, node: int) -> Message:
    """A train reply from ``node`` as the grid delivers it."""
    content = RecordDict(
        {ARRAYS: ArrayRecord({k: Array(np.asarray(v, dtype=np.float32)) for k, v in site_arrays.items()}), METRICS: MetricRecord({"num-examples": num_examples})}
    )
    metadata = Metadata(run_id=1, message_id=f"m{node}", src_node_id=node, dst_node_id=0, reply_to_message_id=f"i{node}", group_id="1", created_at=0.0, ttl=60.0, message_type=MessageType.TRAIN)
    return Message(content=content, metadata=metadata)


SHARED, CT, MRI, FROZEN = "decoder.x", "modality_encoders.ct.stem.0.weight", "modality_encoders.mri.stem.0.weight", "encoder.layers.0.blocks.0.ln_1.weight"


def test_fedavg_shared_over_all_sites_and_each_encoder_within_its_modality():
    global_state = {SHARED: np.zeros(2, np.float32), CT: np.zeros(2, np.float32), MRI: np.zeros(2, np.float32), FROZEN: np.full(2, 7.0, np.float32)}
    replies = [
        _reply({SHARED: [1, 1], CT: [1, 2]}, 10, node=1),  # CT site a
        _reply({SHARED: [2, 2], CT: [5, 6]}, 30, node=2),  # CT site b
        _reply({SHARED: [3, 3], MRI: [9, 9]}, 20, node=3),  # MRI site
    ]
    updated = ModalityAwareAggregator(strategy_factory("fedavg")).aggregate(1, global_state, replies)
    np.testing.assert_allclose(updated[SHARED], [(10 * 1 + 30 * 2 + 20 * 3) / 60] * 2)
    np.testing.assert_allclose(updated[CT], [(10 * 1 + 30 * 5) / 40, (10 * 2 + 30 * 6) / 40])
    np.testing.assert_allclose(updated[MRI], [9, 9])  # the only MRI site: the CT sites do not dilute it
    assert FROZEN not in updated  # nobody trained it: it stays exactly as it was


def test_trimmed_mean_and_median_run_per_partition():
    global_state = {SHARED: np.zeros(1, np.float32), CT: np.zeros(1, np.float32)}
    replies = [_reply({SHARED: [v], CT: [v]}, 1, node=i) for i, v in enumerate([0.0, 1.0, 2.0, 100.0])]
    updated = ModalityAwareAggregator(strategy_factory("fedmedian")).aggregate(1, global_state, replies)
    np.testing.assert_allclose(updated[SHARED], [1.5])
    updated = ModalityAwareAggregator(strategy_factory("fedtrimmedavg", trimmed_beta=0.25)).aggregate(1, global_state, replies)
    np.testing.assert_allclose(updated[CT], [1.5])  # 0 and 100 trimmed


def test_fedadam_keeps_separate_server_moments_per_partition():
    aggregator = ModalityAwareAggregator(strategy_factory("fedadam"))
    global_state = {SHARED: np.zeros(1, np.float32), CT: np.zeros(1, np.float32), MRI: np.zeros(1, np.float32)}
    replies = [_reply({SHARED: [1.0], CT: [1.0]}, 1, node=1), _reply({SHARED: [1.0], MRI: [-1.0]}, 1, node=2)]
    updated = aggregator.aggregate(1, global_state, replies)
    assert updated[SHARED][0] > 0 and updated[CT][0] > 0 and updated[MRI][0] < 0  # server step towards each mean
    assert set(aggregator._strategies) == {"shared", "ct", "mri"}


def test_sites_that_trained_different_stages_are_refused():
    replies = [_reply({SHARED: [1.0]}, 1, node=1), _reply({SHARED: [1.0], "heads.0.conv.weight": [1.0]}, 1, node=2)]
    with pytest.raises(ValueError, match="different weight sets"):
        ModalityAwareAggregator(strategy_factory("fedavg")).aggregate(1, {SHARED: np.zeros(1), "heads.0.conv.weight": np.zeros(1)}, replies)


def test_pyproject_run_config_and_server_defaults_agree():
    """`flwr run` reads pyproject; the simulation's Python API passes nothing and uses DEFAULTS: same run either way."""
    import tomllib
    from pathlib import Path

    from server.settings import DEFAULTS

    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    assert pyproject["tool"]["flwr"]["app"]["config"] == DEFAULTS
