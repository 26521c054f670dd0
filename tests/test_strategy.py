"""The modality-aware strategy: shared weights over every site, each encoder within its modality, every
rule across stage changes, server-optimiser state in the checkpoint, and the one run-config definition."""

import math
import tomllib
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY, ScriptedGrid

from fed_swinumamba.params import group_of, partition_of
from fed_swinumamba.run_config import defaults, resolve_run_config
from server.federation import Federation
from server.settings import FederationSettings

pytestmark = pytest.mark.usefixtures("task_identity")

# Two CT sites and one MRI site, each adding its own step to every weight it trains.
STEPS = {"ct_a": 1.0, "ct_b": 2.0, "mri_a": 3.0}
MODALITIES = {"ct_a": "ct", "ct_b": "ct", "mri_a": "mri"}
PATIENTS = {"ct_a": 10, "ct_b": 30, "mri_a": 20}


def _settings(tmp_path, **overrides):
    config = {
        **TINY,
        "output-dir": str(tmp_path),
        "cross-site-eval": False,
        "max-update-norm-ratio": 0,
        "modalities": "ct,mri",
        **overrides,
    }
    return FederationSettings.from_run_config(config)


def _run(tmp_path, steps=STEPS, modalities=MODALITIES, patients=PATIENTS, **overrides) -> Federation:
    federation = Federation(
        ScriptedGrid(steps, num_examples=patients, modalities=modalities), _settings(tmp_path, **overrides)
    )
    federation.run()
    return federation


def _a_tensor(state, partition: str, group: str) -> str:
    return next(k for k in state if partition_of(k) == partition and group_of(k) == group)


def test_fedavg_shared_over_all_sites_and_each_encoder_within_its_modality(tmp_path):
    federation = _run(tmp_path, **{"num-server-rounds": 1, "seed": 3})
    initial = Federation(None, _settings(tmp_path / "fresh", **{"seed": 3})).state
    shared, ct, mri = (_a_tensor(initial, p, g) for p, g in (("shared", "decoder"), ("ct", "stem"), ("mri", "stem")))
    frozen = _a_tensor(initial, "shared", "stage1")
    moved = {k: federation.state[k] - initial[k] for k in (shared, ct, mri, frozen)}
    np.testing.assert_allclose(
        moved[shared], (10 * 1 + 30 * 2 + 20 * 3) / 60, rtol=1e-5
    )  # patient-weighted over all sites
    np.testing.assert_allclose(moved[ct], (10 * 1 + 30 * 2) / 40, rtol=1e-5)  # the CT sites only
    np.testing.assert_allclose(moved[mri], 3.0, rtol=1e-5)  # the only MRI site: the CT sites do not dilute it
    assert np.array_equal(moved[frozen], np.zeros_like(moved[frozen]))  # nobody trained stage1 in round 1


@pytest.mark.parametrize(
    "strategy, extra, expected", [("fedmedian", {}, 1.5), ("fedtrimmedavg", {"trimmed-beta": 0.25}, 1.5)]
)
def test_median_and_trimmed_mean_ignore_an_outlying_site_per_partition(tmp_path, strategy, extra, expected):
    steps = {"a": 0.0, "b": 1.0, "c": 2.0, "d": 100.0}
    federation = _run(
        tmp_path,
        steps,
        dict.fromkeys(steps, "ct"),
        dict.fromkeys(steps, 1),
        **{"num-server-rounds": 1, "strategy": strategy, **extra},
    )
    initial = Federation(None, _settings(tmp_path / "fresh")).state
    for partition, group in (("shared", "decoder"), ("ct", "stem")):
        name = _a_tensor(initial, partition, group)
        np.testing.assert_allclose(federation.state[name] - initial[name], expected, rtol=1e-5, atol=1e-6)


def _adam_reference(
    kind: str, delta: float, rounds: int, x0: np.ndarray, eta=0.1, b1=0.9, b2=0.99, tau=1e-3
) -> np.ndarray:
    """The server optimiser's weights after ``rounds`` updates with a constant pseudo-gradient ``delta``,
    worked out here step by step from the FedOpt formulas (Reddi et al.; Flower's FedAdam/FedYogi)."""
    x, m, v = x0.astype(np.float64), 0.0, 0.0
    for t in range(1, rounds + 1):
        m = b1 * m + (1 - b1) * delta
        if kind == "fedadam":
            v = b2 * v + (1 - b2) * delta**2
            step = eta * math.sqrt(1 - b2 ** (t + 1)) / (1 - b1 ** (t + 1))
        else:  # fedyogi
            v = v - (1 - b2) * delta**2 * np.sign(v - delta**2)
            step = eta
        x = x + step * m / (np.sqrt(v) + tau)
    return x


@pytest.mark.parametrize("strategy", ["fedadam", "fedyogi"])
def test_server_optimisers_go_through_a_stage_change_with_moments_per_tensor(tmp_path, strategy):
    """3 rounds, stage1 unfrozen in round 3: its tensors get moments of their own, counted from their first update."""
    federation = _run(tmp_path, **{"num-server-rounds": 3, "rounds-per-stage": 2, "strategy": strategy})
    initial = Federation(None, _settings(tmp_path / "fresh")).state
    shared_mean = (10 * 1 + 30 * 2 + 20 * 3) / 60
    from_round_1 = _a_tensor(initial, "shared", "decoder")
    from_round_3 = _a_tensor(initial, "shared", "stage1")
    # A site adds its step to what it was sent, so each round's pseudo-gradient is the weighted mean step.
    np.testing.assert_allclose(
        federation.state[from_round_1],
        _adam_reference(strategy, shared_mean, 3, initial[from_round_1]),
        rtol=1e-5,
        atol=1e-6,
    )
    np.testing.assert_allclose(
        federation.state[from_round_3],
        _adam_reference(strategy, shared_mean, 1, initial[from_round_3]),
        rtol=1e-5,
        atol=1e-6,
    )
    ct = _a_tensor(initial, "ct", "stem")
    np.testing.assert_allclose(
        federation.state[ct], _adam_reference(strategy, (10 * 1 + 30 * 2) / 40, 3, initial[ct]), rtol=1e-5, atol=1e-6
    )
    rules = federation.strategy.rules
    assert set(rules) == {"shared", "ct", "mri"}  # one optimiser per partition
    assert (
        from_round_3 in rules["shared"].m
        and rules["shared"].t[from_round_3] == 1
        and rules["shared"].t[from_round_1] == 3
    )
    assert not any(partition_of(k) != "shared" for k in rules["shared"].m)


@pytest.mark.parametrize("strategy", ["fedadam", "fedyogi", "fedavg"])
def test_a_resume_after_round_2_ends_bit_identical_to_an_uninterrupted_run(tmp_path, strategy):
    config = {"rounds-per-stage": 2, "strategy": strategy}
    whole = _run(tmp_path / "whole", **{"num-server-rounds": 3, **config})
    _run(tmp_path / "cut", **{"num-server-rounds": 2, **config})  # the coordinator stops after round 2
    resumed = _run(tmp_path / "cut", **{"num-server-rounds": 3, "resume": True, **config})
    assert resumed.start_round == 3
    assert set(resumed.state) == set(whole.state)
    assert all(np.array_equal(resumed.state[k], whole.state[k]) for k in whole.state)
    if strategy != "fedavg":
        assert all(
            np.array_equal(resumed.strategy.rules["shared"].v[k], whole.strategy.rules["shared"].v[k])
            for k in whole.strategy.rules["shared"].v
        )


def test_an_unknown_or_mistyped_run_config_key_is_refused_by_name(tmp_path):
    with pytest.raises(ValueError, match=r"unknown run config keys \['num-rounds'\]"):
        _settings(tmp_path, **{"num-rounds": 3})
    with pytest.raises(ValueError, match="run config lr must be a float"):
        resolve_run_config({"lr": "fast"})
    with pytest.raises(ValueError, match="run config strategy must be one of"):
        resolve_run_config({"strategy": "fedsgd"})
    with pytest.raises(ValueError, match="run config eval-cases must be >= 0"):
        resolve_run_config({"eval-cases": -1})


def test_pyproject_lists_every_run_config_key_with_its_default():
    """`flwr run` reads pyproject; the simulation passes only overrides: the same run either way."""
    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    assert pyproject["tool"]["flwr"]["app"]["config"] == defaults()


@pytest.mark.parametrize(
    "strategy", ["fedavg", "fedprox", "fedadam", "fedyogi", "fedadagrad", "fedtrimmedavg", "fedmedian"]
)
@pytest.mark.parametrize("modalities", [dict.fromkeys(STEPS, "ct"), MODALITIES], ids=["one modality", "two modalities"])
def test_every_rule_trains_each_group_from_the_round_the_schedule_unfreezes_it(tmp_path, strategy, modalities):
    """Rounds-per-stage 1 over 3 rounds: stage1 joins in round 2, stage2 in round 3; every rule moves each
    group exactly in the rounds it is trained, each encoder only with its own modality's sites."""
    federation = _run(
        tmp_path, modalities=modalities, **{"num-server-rounds": 3, "rounds-per-stage": 1, "strategy": strategy}
    )
    initial = Federation(None, _settings(tmp_path / "fresh")).state
    for group, trained in (("decoder", True), ("stage1", True), ("stage2", True), ("stage3", False)):
        name = _a_tensor(initial, "shared", group)
        assert np.array_equal(federation.state[name], initial[name]) != trained, (group, strategy)
    for modality in set(modalities.values()):
        name = _a_tensor(initial, modality, "stem")
        assert not np.array_equal(federation.state[name], initial[name])
    if set(modalities.values()) == {"ct"}:
        name = _a_tensor(initial, "mri", "stem")
        assert np.array_equal(federation.state[name], initial[name])  # no MRI site: its encoder stays as initialised


def test_the_latest_checkpoint_carries_the_optimiser_state_apart_from_the_model(tmp_path):
    """predict and deployment load a checkpoint's model strictly: the moments must not be mistaken for weights."""
    from fed_swinumamba.checkpoint import Checkpoint

    federation = _run(tmp_path, **{"num-server-rounds": 2, "strategy": "fedadam"})
    latest = Checkpoint.load(tmp_path / "checkpoints" / "latest.safetensors")
    assert set(latest.state) == set(federation.state)
    latest.build_model()  # strict: every parameter, nothing else
    moments = federation.strategy.rules["shared"].m
    assert {k for k in latest.server_state if k.startswith("shared/m.")} == {f"shared/m.{k}" for k in moments}
    assert not Checkpoint.load(tmp_path / "checkpoints" / "best.safetensors").server_state


def test_modality_norms_stay_apart_while_shared_weights_are_averaged(tmp_path):
    """norm-partition = modality (FedBN-style): each modality's copy of a shared norm layer is averaged over
    that modality's sites only; the sites see their own copy under the network's name, never another's."""
    from fed_swinumamba.checkpoint import Checkpoint

    grid = ScriptedGrid(STEPS, num_examples=PATIENTS, modalities=MODALITIES)
    federation = Federation(grid, _settings(tmp_path, **{"num-server-rounds": 1, "norm-partition": "modality"}))
    federation.run()
    initial = Federation(None, _settings(tmp_path / "fresh", **{"norm-partition": "modality"})).state
    plain = "encoder.layers.3.blocks.0.ln_1.weight"  # a stage4 LayerNorm: trained in stage 0
    ct, mri = f"modality_norms.ct.{plain}", f"modality_norms.mri.{plain}"
    assert plain not in initial and group_of(ct) == "stage4" and partition_of(mri) == "mri"
    np.testing.assert_allclose(federation.state[ct] - initial[ct], (10 * 1 + 30 * 2) / 40, rtol=1e-5)
    np.testing.assert_allclose(federation.state[mri] - initial[mri], 3.0, rtol=1e-5)  # not diluted by CT
    shared = _a_tensor(initial, "shared", "decoder")
    np.testing.assert_allclose(federation.state[shared] - initial[shared], 130 / 60, rtol=1e-5)
    assert not any("modality_norms" in k for m in grid.sent for k in m.content.array_records.get("arrays", {}).keys())
    for site, copy in (("ct_a", ct), ("ct_b", ct), ("mri_a", mri)):  # after the round's evaluation message
        assert np.array_equal(grid.held[site][plain], federation.state[copy])

    latest = Checkpoint.load(tmp_path / "checkpoints" / "latest.safetensors")
    assert np.array_equal(latest.build_model("mri").state_dict()[plain].numpy(), federation.state[mri])
    with pytest.raises(ValueError, match="normalisation layers per modality: give the modality"):
        latest.build_model()
    with pytest.raises(ValueError, match="another norm-partition"):
        Federation(None, _settings(tmp_path, **{"num-server-rounds": 2, "resume": True}))
