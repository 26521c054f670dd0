"""The baselines a federation is compared with: what a site gets alone (local-only) and from pooled data."""

import json
import re

import pytest
from conftest import TINY, TINY_MODEL

from fed_swinumamba.data import load_site_config
from fed_swinumamba.schedule import UnfreezingSchedule
from fed_swinumamba.simulated import Budget, train_centralized, train_local_only
from simulation.__main__ import main as simulation_main
from simulation.runner import run_federated_simulation

CLASSES = ("organ", "lesion")


def _budget(**kw):
    defaults = dict(
        model_config=TINY_MODEL,
        class_names=CLASSES,
        schedule=UnfreezingSchedule(rounds_per_stage=1, base_lr=1e-3),
        num_rounds=3,
        local_steps=2,
        seed=5,
        eval_interval=2,
    )
    return Budget(**{**defaults, **kw})


def test_local_only_trains_each_site_on_its_own_data_alone(three_sites):
    """A site's local-only scores do not depend on which other sites take part; its centralized ones do."""
    ct, mri, us = (load_site_config(p) for p in three_sites)
    budget = _budget()
    with_mri, with_us = train_local_only([ct, mri], budget), train_local_only([ct, us], budget)
    assert [r["round"] for r in with_mri] == [2, 3]  # every eval-interval-th round and the last
    assert set(with_mri[-1]["sites"]) == {"ct_site", "mri_site"} and set(with_us[-1]["sites"]) == {"ct_site", "us_site"}
    for a, b in zip(with_mri, with_us, strict=True):
        for score in ("dice", "hd95", "nsd"):
            assert a["sites"]["ct_site"][score] == pytest.approx(b["sites"]["ct_site"][score], abs=0, nan_ok=True)
    last = with_mri[-1]["sites"]["ct_site"]
    assert set(last["hd95"]) == set(last["nsd"]) == set(CLASSES) and last["num_val_cases"] == last["held_out_cases"]

    pooled_mri, pooled_us = train_centralized([ct, mri], budget), train_centralized([ct, us], budget)
    assert pooled_mri[-1]["sites"]["ct_site"]["dice"] != pooled_us[-1]["sites"]["ct_site"]["dice"]
    assert pooled_mri[-1]["sites"]["ct_site"]["dice"] != last["dice"]


@pytest.mark.slow
def test_local_only_is_what_a_one_site_federation_trains(three_sites, tmp_path):
    """Same initial weights, stages, learning rates, steps and batches: FedAvg over one site is that site
    training alone, so the budget the baseline gets is exactly the federation's."""
    overrides = {**TINY, "num-server-rounds": 3, "rounds-per-stage": 1, "local-steps": 2, "lr": 1e-3, "seed": 5}
    federated = run_federated_simulation(three_sites[:1], tmp_path / "run", {**overrides, "eval-interval": 2})
    alone = train_local_only([load_site_config(three_sites[0])], _budget())
    assert [r["round"] for r in federated["rounds"] if "dice" in r["sites"]["ct_site"]] == [2, 3]
    scored = [r for r in federated["rounds"] if "dice" in r["sites"]["ct_site"]]
    for fed, own in zip(scored, alone, strict=True):
        for score in ("dice", "nsd"):
            assert fed["sites"]["ct_site"][score] == pytest.approx(
                own["sites"]["ct_site"][score], abs=1e-6, nan_ok=True
            )


@pytest.mark.slow
def test_simulation_local_only_reports_each_site_s_gain(three_sites, tmp_path, capsys):
    """...of the global model and of its personal (Ditto) model over training alone."""
    out = tmp_path / "run"
    run = {**TINY, "rounds-per-stage": 1, "local-steps": 2, "lr": 1e-3, "personalization": "ditto"}
    sets = [f"{k}={v}" for k, v in run.items()]
    args = ["run", "--sites", *map(str, three_sites), "--rounds", "2", "--out", str(out), "--local-only"]
    assert simulation_main(args + [a for s in sets for a in ("--set", s)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    local, federated = metrics["local_only"][-1]["sites"], metrics["rounds"][-1]["sites"]
    assert set(local) == set(federated) == {"ct_site", "mri_site", "us_site"}
    printed = capsys.readouterr().out
    page = (out / "report.html").read_text()
    for site in local:
        gain = f"{federated[site]['dice_mean'] - local[site]['dice_mean']:+.3f}"
        line = re.search(rf"^{site}\s+global\s+(\S+)\s+\S+\s+\S+\s+(\S+)$", printed, re.M)
        assert line and line.groups() == (f"{federated[site]['dice_mean']:.3f}", gain)
        assert re.search(rf"^{site}\s+local-only\s+{local[site]['dice_mean']:.3f}\s", printed, re.M)
        assert f"<td>{site}</td><td>global</td><td>{federated[site]['dice_mean']:.3f}</td>" in page
        assert f"<td>{gain}</td>" in page
        personal = federated[site]["personal"]  # scored beside the global model every evaluation round
        assert all("personal" in r["sites"][site] for r in metrics["rounds"])
        gain = f"{personal['dice_mean'] - local[site]['dice_mean']:+.3f}"
        assert re.search(
            rf"^{site}\s+personalised\s+{personal['dice_mean']:.3f}\s.*\s{re.escape(gain)}$", printed, re.M
        )
