"""Differential privacy against the coordinator: tests that fail if the guarantee breaks.

Unpredictable noise, noise of the calibrated size, Poisson sampling at the accounted rate, a ledger per
study that survives a coordinator's crash, no other site's encoder on the wire, one weighting unit.
"""

import itertools
import json
import logging

import numpy as np
import pytest
import torch
from conftest import TINY, ScriptedGrid, private_site, tiny_model
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MessageType, Metadata, RecordDict
from flwr.common.constant import ErrorCode
from opacus.accountants import RDPAccountant
from test_privacy import ALL_GROUPS, RandomCases, _tiny_model

from client import client_app
from client.site import SiteError, SiteRound
from fed_swinumamba.data import load_site_config
from fed_swinumamba.data.site_config import PrivacySpec
from fed_swinumamba.dp_options import RunDPOptions
from fed_swinumamba.model import build_model
from fed_swinumamba.params import SHARED, partition_of
from fed_swinumamba.privacy import (
    DPConfig,
    KeyStreamDPOptimizer,
    PrivacyLedger,
    disclosed_patient_count,
    ledger_file,
    privacy_spec,
    proximal_term,
    resolve,
    train_private,
)
from fed_swinumamba.protocol import ARRAYS, CONFIG, FULL_SYNC, METRICS, Instructions
from fed_swinumamba.schedule import Stage
from fed_swinumamba.secure_random import KeyStream, reproducible_key, secure_key
from fed_swinumamba.simulated import generate_phantoms, split_dataset
from server.federation import PATIENT_WEIGHTS, Federation
from server.settings import FederationSettings

pytestmark = pytest.mark.usefixtures("task_identity")

TINY_CT = tiny_model("ct")
STAGE = Stage(0, ("stem", "stage4", "decoder", "heads"), 1e-3)
NO_RUN_DP = RunDPOptions()  # the run asks for no DP: a site with a privacy section of its own uses that


# ------------------------------------------------------------------ unpredictable noise
def _dp_round(yaml, dp: RunDPOptions = NO_RUN_DP) -> dict:
    """One DP training round at a fresh node, the same instructions and initial weights every time."""
    torch.manual_seed(0)
    state = build_model(TINY_CT).state_dict()
    ins = Instructions(
        1,
        STAGE,
        TINY_CT,
        ("organ", "lesion"),
        version=0,
        base_version=FULL_SYNC,
        local_steps=2,
        seed=7,
        planned_rounds=2,
        dp=dp,
    )
    content = RecordDict({ARRAYS: ArrayRecord(state), CONFIG: ConfigRecord(ins.to_config())})
    context = Context(run_id=1, node_id=1, node_config={"site-config": str(yaml)}, state=RecordDict(), run_config={})
    reply = SiteRound(content, context).train()
    return {"arrays": {k: a.numpy() for k, a in reply[ARRAYS].items()}, "metrics": dict(reply[METRICS])}


def test_two_dp_runs_with_the_same_config_seeds_and_data_draw_different_noise(three_sites, tmp_path, caplog):
    """...and only the reproducible switch, which the site must allow, makes them equal, marked NOT PRIVATE."""
    yaml = private_site(
        three_sites[0], tmp_path, noise_multiplier=1.0, cases_per_batch=1, allow_insecure_reproducible="true"
    )
    first, second = _dp_round(yaml), _dp_round(yaml)
    assert any(not np.array_equal(first["arrays"][k], second["arrays"][k]) for k in first["arrays"])
    assert first["metrics"]["dp-reproducible"] == 0

    reproducible = RunDPOptions(insecure_reproducible=True)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="fed_swinumamba.client"):
        same, again = _dp_round(yaml, reproducible), _dp_round(yaml, reproducible)
    assert all(np.array_equal(same["arrays"][k], again["arrays"][k]) for k in same["arrays"])
    assert same["metrics"]["dp-reproducible"] == 1
    dp_lines = [r.getMessage() for r in caplog.records if "DP-SGD" in r.getMessage()]
    assert dp_lines and all(line.startswith("NOT PRIVATE (dp-insecure-reproducible)") for line in dp_lines)

    refusing = private_site(three_sites[0], tmp_path / "refusing", noise_multiplier=1.0, cases_per_batch=1)
    with pytest.raises(SiteError, match="privacy.allow_insecure_reproducible"):
        _dp_round(refusing, reproducible)


def test_noise_per_coordinate_has_std_sigma_c_over_the_expected_batch_size():
    """Per-patient gradients of norm 5 are clipped to C: what p.grad holds beyond their clipped mean is the noise."""
    sigma, clip, batch, patients = 1.3, 0.7, 4, 5
    param = torch.nn.Parameter(torch.zeros(100_000))
    optimizer = KeyStreamDPOptimizer(
        torch.optim.SGD([param], lr=0.0),
        stream=KeyStream(secure_key()),
        noise_multiplier=sigma,
        max_grad_norm=clip,
        expected_batch_size=batch,
    )
    directions = torch.randn(patients, param.numel(), generator=torch.Generator().manual_seed(0))
    per_patient = 5.0 * directions / directions.norm(dim=1, keepdim=True)
    clipped_mean = (per_patient * (clip / (5.0 + 1e-6))).sum(0) / batch  # Opacus's clip factor C / (|g| + 1e-6)
    draws = []
    for _ in range(20):
        param.grad_sample = per_patient.clone()
        optimizer.step()
        draws.append(param.grad - clipped_mean)
        optimizer.zero_grad(set_to_none=True)
    noise = torch.stack(draws)
    assert noise.std().item() == pytest.approx(sigma * clip / batch, rel=0.01)
    assert abs(noise.mean().item()) < 0.005 * sigma * clip / batch  # about 7 standard errors over 2 M draws
    assert (noise.abs() > 2 * sigma * clip / batch).float().mean().item() == pytest.approx(
        0.0455, rel=0.02
    )  # Gaussian tails
    assert not torch.equal(noise[0], noise[1])  # a fresh draw every step


def test_poisson_inclusion_rate_is_the_accountants_q_and_q_follows_the_patient_count():
    stream = KeyStream(secure_key())
    patients, q, draws = 60, 0.05, 4000
    counts = np.zeros(patients)
    for _ in range(draws):
        counts[stream.poisson_sample(patients, q)] += 1
    rate = counts / draws
    assert rate.mean() == pytest.approx(q, abs=4 * np.sqrt(q * (1 - q) / (patients * draws)))
    assert np.abs(rate - q).max() < 6 * np.sqrt(q * (1 - q) / draws)  # every patient, not only on average

    class Recording(KeyStream):
        calls = []

        def poisson_sample(self, num_samples, sample_rate):
            self.calls.append((num_samples, sample_rate))
            return super().poisson_sample(num_samples, sample_rate)

    dp = resolve(PrivacySpec(True, noise_multiplier=1.0, cases_per_batch=2), len(RandomCases()), 8, lambda q: 10)
    ledger = PrivacyLedger()
    train_private(
        _tiny_model(),
        "ct",
        RandomCases(),
        groups=ALL_GROUPS,
        lr=1e-3,
        steps=3,
        dp=dp,
        ledger=ledger,
        stream=Recording(secure_key()),
    )
    assert Recording.calls == [(6, 2 / 6)] * 3  # every step's batch: all 6 patients, each at rate q
    assert ledger.steps == 3 and {(sigma, rate) for sigma, rate, _ in ledger.accountant.history} == {
        (1.0, 2 / 6)
    }  # the q accounted
    # Beyond 100 patients q and delta follow the disclosed count, not the exact one.
    assert [disclosed_patient_count(n) for n in (3, 99, 100, 3217, 4000, 12345)] == [3, 99, 100, 3200, 4000, 12000]
    big = resolve(PrivacySpec(True, noise_multiplier=1.0, cases_per_batch=64), 3217, 8, lambda q: 10)
    assert big.sample_rate == 64 / 3200 and big.disclosed_patients == 3200 and big.delta == 1e-5


def test_fedprox_proximal_gradient_is_added_to_the_privatised_one():
    param = torch.nn.Parameter(torch.ones(3))
    hook = proximal_term([param], mu=0.5)
    with torch.no_grad():
        param += torch.tensor([1.0, -2.0, 0.0])
    param.grad = torch.full((3,), 0.25)  # the privatised gradient
    hook(None)
    torch.testing.assert_close(param.grad, torch.tensor([0.75, -0.75, 0.25]))

    def trained(mu, steps):  # same key: same batches and noise; only the proximal term differs
        model = _tiny_model()
        train_private(
            model,
            "ct",
            RandomCases(),
            groups=ALL_GROUPS,
            lr=1e-2,
            steps=steps,
            dp=DPConfig(1.0, 1.0, 1e-5, 0.5, 3, 2, None),
            ledger=PrivacyLedger(),
            stream=KeyStream(reproducible_key(0)),
            proximal_mu=mu,
        )
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    assert torch.equal(trained(0.0, 1), trained(5.0, 1))  # at the round's start w = w_start: no pull yet
    assert not torch.equal(trained(0.0, 2), trained(5.0, 2))
    with pytest.raises(ValueError, match="run config dp-max-grad-norm must be > 0"):
        FederationSettings.from_run_config({"dp-epsilon": 8.0, "dp-max-grad-norm": 0})


# ------------------------------------------------------------------ real sites behind a grid
class CoordinatorKilled(RuntimeError):
    pass


class SiteGrid:
    """The ClientApp's handlers on real site YAMLs, in this process; each node's Context lasts the run as
    a SuperNode's does, and every message a node receives is kept (what arrives at the site).

    ``fail``: (node, message type) pairs whose first message is answered with an error, as a crashed
    ClientApp's is; ``kill_at_round``: the coordinator dies before the first message of that round.
    """

    def __init__(self, yamls, fail=(), kill_at_round=None):
        # Sites follow their instructions and never read the run config: a SuperNode's context has one, these have none.
        self.contexts = {
            i + 1: Context(
                run_id=1, node_id=i + 1, node_config={"site-config": str(y)}, state=RecordDict(), run_config={}
            )
            for i, y in enumerate(yamls)
        }
        self.received = {node: [] for node in self.contexts}
        self.replies: list[Message] = []
        self.fail, self.kill_at_round = set(fail), kill_at_round
        self.ids = itertools.count()

    def get_node_ids(self):
        return list(self.contexts)

    def send_and_receive(self, messages, timeout=None):
        replies = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = f"m{next(self.ids)}"
            node, kind = msg.metadata.dst_node_id, msg.metadata.message_type
            if (
                CONFIG in msg.content
                and Instructions.from_config(msg.content[CONFIG]).server_round == self.kill_at_round
            ):
                raise CoordinatorKilled
            self.received[node].append(msg)
            if (node, kind) in self.fail:
                self.fail.discard((node, kind))
                replies.append(
                    Message(error=Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, "the ClientApp crashed"), reply_to=msg)
                )
                continue
            handler = {
                MessageType.QUERY: client_app.query,
                MessageType.TRAIN: client_app.train,
                MessageType.EVALUATE: client_app.evaluate,
            }[kind]
            replies.append(handler(msg, self.contexts[node]))
            self.replies.append(replies[-1])
        return replies


@pytest.fixture
def replies_as_a_grid_delivers_them(monkeypatch):
    """A reply made inside a node gets the metadata the SuperLink gives it (from the node, to the coordinator)."""
    init = Message.__init__

    def patched(self, *args, reply_to=None, **kwargs):
        if reply_to is not None:
            m = reply_to.metadata
            kwargs["metadata"] = Metadata(
                run_id=1,
                message_id="r" + m.message_id,
                src_node_id=m.dst_node_id,
                dst_node_id=0,
                reply_to_message_id=m.message_id,
                group_id="1",
                created_at=0.0,
                ttl=60.0,
                message_type=m.message_type,
            )
        return init(self, *args, **kwargs)

    monkeypatch.setattr(Message, "__init__", patched)


def _settings(out, **overrides):
    return FederationSettings.from_run_config(
        {
            **TINY,
            "output-dir": str(out),
            "max-update-norm-ratio": 0,
            "cross-site-eval": False,
            "local-steps": 1,
            "lr": 1e-3,
            **overrides,
        }
    )


def _encoders(msg: Message) -> set[str]:
    names = msg.content[ARRAYS].keys() if ARRAYS in msg.content else ()
    return {n.split(".")[1] for n in names if n.startswith("modality_encoders.")}


@pytest.mark.usefixtures("replies_as_a_grid_delivers_them")
def test_no_node_ever_receives_another_modality_s_encoder_first_contact_and_after_an_error(three_sites, tmp_path):
    settings = _settings(tmp_path / "run", **{"num-server-rounds": 2, "rounds-per-stage": 1})
    grid = SiteGrid(three_sites, fail={(2, MessageType.TRAIN)})
    Federation(grid, settings).run()

    for node, yaml in zip(grid.contexts, three_sites, strict=True):
        own, received = load_site_config(yaml).modality, grid.received[node]
        assert (
            received[0].metadata.message_type == MessageType.QUERY and not received[0].content.keys()
        )  # no weights at all
        assert all(_encoders(m) <= {own} for m in received), node
        assert _encoders(received[1]) == {own}  # the first weights are a full sync of its own modality
    after_error = grid.received[2][
        grid.received[2].index(next(m for m in grid.received[2] if m.metadata.message_type == MessageType.TRAIN)) + 1 :
    ]
    assert after_error[0].metadata.message_type == MessageType.QUERY and not after_error[0].content.keys()
    assert Instructions.from_config(after_error[1].content[CONFIG]).base_version == FULL_SYNC and _encoders(
        after_error[1]
    ) == {"mri"}


@pytest.fixture(scope="module")
def larger_us_site(tmp_path_factory):
    """An ultrasound site with 7 phantom patients (6 for training), beside the fixture's sites of 3."""
    root = tmp_path_factory.mktemp("larger")
    data = generate_phantoms(root / "data", "us", num_cases=7, seed=5, size=32, num_slices=3)
    (yaml,) = split_dataset(data, "us", 1, "iid", 0, root / "sites")
    yaml.write_text(
        yaml.read_text()
        .replace("patch_size: [64, 64]", "patch_size: [32, 32]")
        .replace("site: us_site", "site: larger_us_site")
    )
    return yaml


@pytest.mark.usefixtures("replies_as_a_grid_delivers_them")
def test_a_mixed_federation_weights_every_site_by_its_training_patients(three_sites, larger_us_site, tmp_path):
    """One DP site (its disclosed count) and two without DP (their exact counts): FedAvg's shared weights
    are the patient-weighted mean of the three updates, and metrics.json says which weighting it was."""
    dp_ct = private_site(three_sites[0], tmp_path, noise_multiplier=1.0, cases_per_batch=1)
    settings = _settings(
        tmp_path / "run", **{"num-server-rounds": 1, "strategy": "fedprox"}
    )  # the DP site keeps its proximal term
    grid = SiteGrid([dp_ct, three_sites[1], larger_us_site])
    federation = Federation(grid, settings)
    federation.run()
    sent = [r for r in grid.replies if r.metadata.message_type == MessageType.TRAIN]
    weights = [int(r.content[METRICS]["num-examples"]) for r in sent]
    assert weights == [3, 3, 6] and "epsilon" in sent[0].content[METRICS]
    shared = [k for k in sent[0].content[ARRAYS].keys() if partition_of(k) == SHARED]
    assert shared
    for name in shared:
        expected = sum(w * r.content[ARRAYS][name].numpy() for w, r in zip(weights, sent, strict=True)) / sum(weights)
        np.testing.assert_allclose(federation.state[name], expected, rtol=1e-5, atol=1e-7)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["weighting"] == PATIENT_WEIGHTS and metrics["study"] == "run"
    assert metrics["rounds"][0]["sites"]["ct_site"]["privacy"]["disclosed_patients"] == 3


@pytest.mark.usefixtures("replies_as_a_grid_delivers_them")
def test_a_resumed_run_continues_the_study_s_epsilon_and_stops_at_the_same_round(three_sites, tmp_path):
    """Coordinator killed after round 2 of 4, rerun with resume=true: the site's ledger of the study goes on
    from round 2's epsilon, and the budget stops training at the round an uninterrupted run stops."""
    sigma, q, steps = 1.5, 1 / 3, 2

    def epsilon(n):
        accountant = RDPAccountant()
        for _ in range(n):
            accountant.step(noise_multiplier=sigma, sample_rate=q)
        return accountant.get_epsilon(1e-5)

    budget = (epsilon(3 * steps) + epsilon(4 * steps)) / 2  # room for three rounds
    yaml = private_site(three_sites[0], tmp_path, noise_multiplier=sigma, cases_per_batch=1, target_epsilon=budget)
    run = {"num-server-rounds": 4, "local-steps": steps, "eval-interval": 4}

    def epsilons(out, resume=False, kill_at_round=None):
        settings = _settings(out, **run, resume=resume)
        Federation(SiteGrid([yaml], kill_at_round=kill_at_round), settings).run()
        rounds = json.loads((out / "metrics.json").read_text())["rounds"]
        return [r["sites"]["ct_site"]["epsilon"] for r in rounds], [
            bool(r["sites"]["ct_site"].get("privacy_budget_exhausted")) for r in rounds
        ]

    whole = epsilons(tmp_path / "whole")
    with pytest.raises(CoordinatorKilled):
        epsilons(tmp_path / "killed", kill_at_round=3)
    assert json.loads((tmp_path / "killed" / "metrics.json").read_text())["rounds"][-1]["round"] == 2
    resumed = epsilons(tmp_path / "killed", resume=True)
    assert whole[1] == resumed[1] == [False, False, False, True]
    assert resumed[0] == pytest.approx(whole[0], rel=1e-9) and resumed[0] == pytest.approx(
        [epsilon(steps * r) for r in (1, 2, 3, 3)], rel=1e-9
    )
    ledger = PrivacyLedger.from_json(ledger_file(load_site_config(yaml).state_dir, "killed").read_text())
    assert ledger.steps == 3 * steps  # one ledger for the study, across both runs


# ------------------------------------------------------------------ where the ledger lives, which study it is
def test_the_ledger_lives_in_the_site_s_state_dir_under_a_checked_study_name(three_sites, tmp_path, site_state_home):
    assert load_site_config(three_sites[0]).state_dir == site_state_home / "fed_swinumamba" / "ct_site"
    yaml = tmp_path / "site.yaml"
    yaml.write_text(
        three_sites[0].read_text() + "state_dir: ledgers\nprivacy:\n  study_budget: 3.5\n"
    )  # relative to the YAML
    config = load_site_config(yaml)
    assert config.state_dir == tmp_path / "ledgers" and config.privacy.study_budget == 3.5
    assert ledger_file(config.state_dir, "liver-2025") == tmp_path / "ledgers" / "privacy" / "liver-2025.json"
    for bad in ("../other_site", ".hidden", "a/b", ""):
        with pytest.raises(ValueError, match="study name"):
            ledger_file(config.state_dir, bad)
    # The coordinator's default study is its output folder's name; a resumed run into it keeps it.
    assert _settings(tmp_path / "runs" / "liver 2025").study == "liver-2025"
    assert _settings(tmp_path / "x", study="ct-pilot").study == "ct-pilot"
    with pytest.raises(ValueError, match="study name"):
        _settings(tmp_path / "x", study="../escape")
    # The site's own cap applies to run-config DP as well, and the smaller budget wins.
    spec = privacy_spec(config.privacy, RunDPOptions(epsilon=8.0))
    assert resolve(spec, 3, 8, lambda q: 10).budget == 3.5


def test_a_reproducible_run_is_marked_not_private_in_every_log_line_and_metrics_entry(tmp_path, caplog):
    settings = _settings(tmp_path, **{"num-server-rounds": 2, "dp-insecure-reproducible": True})
    with caplog.at_level(logging.INFO, logger="fed_swinumamba.server"):
        Federation(ScriptedGrid({"site_a": 0.01, "site_b": 0.02}), settings).run()
    ours = [r.getMessage() for r in caplog.records if r.name == "fed_swinumamba.server"]
    assert len(ours) > 4 and all("NOT PRIVATE" in line for line in ours)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["not_private"].startswith("NOT PRIVATE") and all(
        r["not_private"].startswith("NOT PRIVATE") for r in metrics["rounds"]
    )
    assert "NOT PRIVATE" in (tmp_path / "report.html").read_text()
    caplog.clear()
    Federation(ScriptedGrid({"site_a": 0.01}), _settings(tmp_path / "private", **{"num-server-rounds": 1})).run()
    assert not any("NOT PRIVATE" in r.getMessage() for r in caplog.records)  # the marking ends with its run
