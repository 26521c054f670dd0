"""Update validation on the server: a poisoned or diverged site does not harm the global model."""

import json
import logging

import numpy as np
import pytest
from conftest import TINY, ScriptedGrid

from server.federation import Federation
from server.settings import FederationSettings

pytestmark = pytest.mark.usefixtures("task_identity")


@pytest.mark.parametrize("strategy", ["fedavg", "fedmedian"])
@pytest.mark.parametrize("poison", [1e4, float("nan")])
def test_a_poisoned_site_is_rejected_and_the_global_model_is_what_the_honest_sites_make(
    tmp_path, caplog, strategy, poison
):
    settings = FederationSettings.from_run_config(
        {**TINY, "num-server-rounds": 1, "strategy": strategy, "output-dir": str(tmp_path), "cross-site-eval": False}
    )
    grid = ScriptedGrid({"honest_a": 0.01, "honest_b": 0.03, "poisoned": poison})
    federation = Federation(grid, settings)
    before = dict(federation.state)
    with caplog.at_level(logging.WARNING, logger="fed_swinumamba.server"):
        federation.run()
    trained = [k for k in federation.state if not np.array_equal(federation.state[k], before[k])]
    assert trained
    for k in trained:  # the mean / median of the two honest steps, nothing of the poison
        np.testing.assert_allclose(federation.state[k], before[k] + 0.02, rtol=1e-5, atol=1e-6)
    sites = json.loads((tmp_path / "metrics.json").read_text())["rounds"][0]["sites"]
    assert (
        "rejected" in sites["poisoned"] and "rejected" not in sites["honest_a"] and "rejected" not in sites["honest_b"]
    )
    reason = "non-finite values" if np.isnan(poison) else "update norm"
    assert reason in sites["poisoned"]["rejected"]
    assert any("update of site poisoned rejected" in r.getMessage() for r in caplog.records)


def test_without_the_norm_check_a_large_update_is_aggregated(tmp_path):
    """The check is what protects the model: switched off, the poison goes through."""
    settings = FederationSettings.from_run_config(
        {
            **TINY,
            "num-server-rounds": 1,
            "output-dir": str(tmp_path),
            "cross-site-eval": False,
            "max-update-norm-ratio": 0,
        }
    )
    federation = Federation(ScriptedGrid({"honest_a": 0.01, "honest_b": 0.03, "poisoned": 1e4}), settings)
    before = dict(federation.state)
    federation.run()
    moved = [k for k in federation.state if not np.array_equal(federation.state[k], before[k])]
    assert all(np.all(federation.state[k] - before[k] > 1000) for k in moved)
