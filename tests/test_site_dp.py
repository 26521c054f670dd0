"""Site-level DP: sites clip their updates, the coordinator averages with equal weights, adds calibrated
noise (Flower's central-DP wrapper) and accounts one release per round across resumes."""

import json

import numpy as np
import pytest
from conftest import TINY, ScriptedGrid
from dp_accounting import dp_event, rdp
from flwr.app import Array, ArrayRecord

from client.site import clip_update
from server.federation import Federation
from server.settings import FederationSettings

pytestmark = pytest.mark.usefixtures("task_identity")

STEPS = {"site_a": 0.01, "site_b": 0.02, "site_c": 0.03}


def _settings(tmp_path, **overrides):
    return FederationSettings.from_run_config(
        {**TINY, "output-dir": str(tmp_path), "max-update-norm-ratio": 0, **overrides}
    )


def _epsilon_after(releases: int, sigma: float, delta: float) -> float:
    """The accountant's answer, computed here with Google's dp-accounting directly."""
    accountant = rdp.RdpAccountant()
    accountant.compose(dp_event.GaussianDpEvent(sigma), releases)
    return accountant.get_epsilon(delta)


def test_updates_are_averaged_with_equal_weights_plus_noise_of_sigma_c_over_n(tmp_path):
    sigma, clip = 0.3, 0.1
    settings = _settings(
        tmp_path, **{"num-server-rounds": 1, "site-dp-noise-multiplier": sigma, "site-dp-clipping-norm": clip}
    )
    # site_c holds 100x the examples: FedAvg would weight it; site-level DP must not.
    grid = ScriptedGrid(STEPS, num_examples={"site_a": 1, "site_b": 1, "site_c": 100})
    federation = Federation(grid, settings)
    before = {k: v.copy() for k, v in federation.state.items()}
    federation.run()

    assert [ins.clipping_norm for ins in grid.train_instructions] == [clip] * 3
    trained = [k for k in federation.state if not np.array_equal(federation.state[k], before[k])]
    residual = np.concatenate([(federation.state[k] - before[k] - 0.02).ravel() for k in trained])
    assert residual.size > 10_000
    assert abs(residual.mean()) < 1e-3  # the unweighted mean 0.02, not the example-weighted 0.0297
    assert residual.std() == pytest.approx(sigma * clip / 3, rel=0.05)  # three sites in every partition here
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["rounds"][0]["site_dp"]["unit"] == "site"
    assert "cross_site" not in metrics  # it would send un-noised local models around


def test_epsilon_is_accounted_per_round_and_the_budget_stops_training(tmp_path):
    sigma, delta = 1.0, 1e-5
    budget = (_epsilon_after(2, sigma, delta) + _epsilon_after(3, sigma, delta)) / 2  # room for two rounds
    settings = _settings(
        tmp_path,
        **{
            "num-server-rounds": 4,
            "site-dp-noise-multiplier": sigma,
            "site-dp-delta": delta,
            "site-dp-epsilon": budget,
        },
    )
    grid = ScriptedGrid(STEPS)
    Federation(grid, settings).run()

    assert len(grid.train_instructions) == 2 * 3  # rounds 3 and 4 only evaluate
    rounds = json.loads((tmp_path / "metrics.json").read_text())["rounds"]
    epsilons = [r["site_dp"]["epsilon"] for r in rounds]
    expected = [_epsilon_after(n, sigma, delta) for n in (1, 2, 2, 2)]
    assert epsilons == pytest.approx(expected, rel=1e-6)
    assert epsilons[0] < epsilons[1] <= budget
    assert [r["site_dp"]["budget_exhausted"] for r in rounds] == [False, True, True, True]
    assert all("dice_mean" in s for r in rounds for s in r["sites"].values())


def test_a_resumed_run_goes_on_counting(tmp_path):
    sigma, delta = 1.0, 1e-5
    dp = {"site-dp-noise-multiplier": sigma, "site-dp-delta": delta}
    Federation(ScriptedGrid(STEPS), _settings(tmp_path, **{"num-server-rounds": 2, **dp})).run()
    Federation(ScriptedGrid(STEPS), _settings(tmp_path, **{"num-server-rounds": 3, "resume": True, **dp})).run()
    rounds = json.loads((tmp_path / "metrics.json").read_text())["rounds"]
    assert [r["site_dp"]["epsilon"] for r in rounds] == pytest.approx(
        [_epsilon_after(n, sigma, delta) for n in (1, 2, 3)], rel=1e-6
    )


def test_site_level_dp_needs_an_averaging_strategy(tmp_path):
    with pytest.raises(ValueError, match="fedavg or fedprox"):
        _settings(tmp_path, **{"strategy": "fedmedian", "site-dp-noise-multiplier": 1.0})


def test_a_site_clips_its_update_to_the_clipping_norm():
    rng = np.random.default_rng(0)
    start = {"a": rng.normal(size=(4, 5)).astype(np.float32), "b": rng.normal(size=7).astype(np.float32)}
    update = {"a": rng.normal(size=(4, 5)).astype(np.float32), "b": rng.normal(size=7).astype(np.float32)}
    norm = np.sqrt(sum(float((u**2).sum()) for u in update.values()))
    record = lambda d: ArrayRecord({k: Array(v) for k, v in d.items()})  # noqa: E731

    clipped = clip_update(record({k: start[k] + update[k] for k in start}), record(start), clipping_norm=norm / 4)
    for k in start:  # same direction, a quarter of the length
        np.testing.assert_allclose(clipped[k].numpy() - start[k], update[k] / 4, atol=1e-6)

    small = clip_update(record({k: start[k] + update[k] for k in start}), record(start), clipping_norm=norm * 2)
    for k in start:
        np.testing.assert_allclose(small[k].numpy(), start[k] + update[k], atol=1e-6)
