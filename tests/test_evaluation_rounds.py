"""The coordinator's evaluation: a fixed subset of the validation cases per round, every test case after the
last round for the final and the best model, HD95 and NSD beside Dice."""

import dataclasses
import json

import numpy as np
import pytest
from conftest import TINY, ScriptedGrid, tiny_model, with_test_split
from flwr.app import MessageType

from fed_swinumamba.checkpoint import Checkpoint
from fed_swinumamba.protocol import ARRAYS, CONFIG, TEST, VALIDATION, Instructions, PersonalOptions
from server.federation import Federation
from server.settings import FederationSettings

pytestmark = pytest.mark.usefixtures("task_identity")


def _settings(tmp_path, **overrides):
    return FederationSettings.from_run_config(
        {**TINY, "output-dir": str(tmp_path), "cross-site-eval": False, "rounds-per-stage": 1, **overrides}
    )


def test_rounds_score_a_subset_and_the_end_scores_every_held_out_case_of_the_final_and_best_models(tmp_path):
    grid = ScriptedGrid({"site_a": 0.01, "site_b": 0.02})  # every evaluation scores 0.5: round 1 stays the best
    Federation(grid, _settings(tmp_path, **{"num-server-rounds": 2, "eval-cases": 3, "nsd-tolerance-mm": "2,1"})).run()

    evaluations = [
        (Instructions.from_config(m.content[CONFIG]), m)
        for m in grid.sent
        if m.metadata.message_type == MessageType.EVALUATE
    ]
    assert [ins.eval_cases for ins, _ in evaluations] == [3] * 4 + [
        0
    ] * 4  # 2 rounds x 2 sites, then the final and the best
    assert all(ins.nsd_tolerance_mm == (2.0, 1.0) for ins, _ in evaluations)
    # The rounds (which choose the best checkpoint) score the validation cases, the end the test cases.
    assert [ins.eval_split for ins, _ in evaluations] == [VALIDATION] * 4 + [TEST] * 4
    assert [ins.final_evaluation for ins, _ in evaluations] == [False] * 4 + [True] * 2 + [False] * 2
    best = [(ins, m) for ins, m in evaluations if ins.foreign_model]
    assert [ins.foreign_model for ins, _ in best] == ["best checkpoint (round 1)"] * 2
    round_1 = Checkpoint.load(tmp_path / "checkpoints" / "best.safetensors")
    assert round_1.server_round == 1
    for _, message in best:  # the weights sent are round 1's, not the final model's
        sent = message.content[ARRAYS]
        assert all(np.array_equal(sent[k].numpy(), round_1.state[k].numpy()) for k in sent.keys())

    metrics = json.loads((tmp_path / "metrics.json").read_text())
    final = metrics["final_evaluation"]
    assert final["global"]["round"] == 2 and final["best"]["round"] == 1
    assert set(final["global"]["sites"]) == set(final["best"]["sites"]) == {"site_a", "site_b"}
    site = metrics["rounds"][0]["sites"]["site_a"]
    assert site["hd95"] == {"organ": 3.0, "lesion": 3.0} and site["nsd"] == {"organ": 0.7, "lesion": 0.7}
    assert site["timing"] == {"first_batch_s": 0.5, "train_s": 1.0}
    report = (tmp_path / "report.html").read_text()
    assert "Best checkpoint (round 1) on every test case" in report and "HD95 organ (mm)" in report


def test_without_a_subset_the_rounds_score_every_validation_case_and_the_end_every_test_case(tmp_path):
    grid = ScriptedGrid({"site_a": 0.01})
    Federation(grid, _settings(tmp_path, **{"num-server-rounds": 1})).run()
    evaluations = [
        Instructions.from_config(m.content[CONFIG])
        for m in grid.sent
        if m.metadata.message_type == MessageType.EVALUATE
    ]
    assert [(ins.eval_cases, ins.eval_split) for ins in evaluations] == [(0, VALIDATION), (0, TEST)]
    assert json.loads((tmp_path / "metrics.json").read_text())["final_evaluation"]["global"]["round"] == 1


def _waits(grid: ScriptedGrid) -> list[tuple[str, float]]:
    """Each exchange of ``grid`` by kind (an evaluation: of a round, the final one, the best checkpoint's) and its wait."""
    waits = []
    for messages, timeout in grid.waits:
        kind = messages[0].metadata.message_type
        if kind == MessageType.EVALUATE:
            ins = Instructions.from_config(messages[0].content[CONFIG])
            kind = "final" if ins.final_evaluation else "best" if ins.foreign_model else "round"
        waits.append((kind, timeout))
    return waits


@pytest.mark.parametrize("personalization, final_wait", [("finetune", 3680.0), ("ditto", 3600.0), ("none", 1200.0)])
def test_the_end_waits_as_long_as_the_sites_own_timings_say(tmp_path, personalization, final_wait):
    """A round scores a subset within round-timeout (900 s); the end scores every case of the full split,
    twice over what a site's last figures say: site_a scores 20 test cases at 30 s each, for the global
    model and the personal model beside it (finetune, ditto), plus the 20 validation-case scorings it
    says it makes to choose which it keeps, and first fine-tunes up to 80 steps at 0.5 s (its training:
    2 steps in 1 s): 2 x (30 x (20 x 2 + 20) + 80 x 0.5) = 3680 s; without a personal model, nor a choice,
    and for the best checkpoint's model: 2 x 30 x 20 = 1200 s. site_b's 5 cases at 1 s need less than the
    round's 900 s."""
    timing = {"site_a": (30.0, 20, 20), "site_b": (1.0, 5)}
    grid = ScriptedGrid({"site_a": 0.01, "site_b": 0.02}, eval_timing=timing)
    overrides = {
        "num-server-rounds": 2,
        "round-timeout": 900.0,
        "personalization": personalization,
        "finetune-steps": 80,
    }
    Federation(grid, _settings(tmp_path, **overrides)).run()
    train = [(MessageType.TRAIN, 900.0), ("round", 900.0)]
    assert _waits(grid) == [(MessageType.QUERY, 900.0), *train, *train, ("final", final_wait), ("best", 1200.0)]

    # The coordinator killed during the final evaluation and resumed: a new process, whose wait for the final
    # evaluation comes from the figures in metrics.json (it first asks the nodes who they are).
    grid = ScriptedGrid({"site_a": 0.01, "site_b": 0.02}, eval_timing=timing)
    Federation(grid, _settings(tmp_path, **overrides, resume=True)).run()
    assert _waits(grid) == [(MessageType.QUERY, 900.0), ("final", final_wait), ("best", 1200.0)]

    grid = ScriptedGrid({"site_b": 0.02}, eval_timing={"site_b": (1.0, 5)})
    Federation(grid, _settings(tmp_path / "fast", **overrides)).run()
    assert {timeout for _, timeout in grid.waits} == {900.0}


def test_a_final_evaluation_longer_than_flowers_message_ttl_lives_as_long_as_its_wait(tmp_path):
    """Flower drops a message and its reply after the message's ttl (12 h by default): 20 test cases at
    3000 s each scored for two models and 20 validation-case scorings make the final wait 2 x (3000 x
    (20 x 2 + 20) + 80 x 0.5) = 360080 s, so its messages live that long and 600 s more (to be pushed); the
    rounds' keep Flower's default."""
    from flwr.app import DEFAULT_TTL

    grid = ScriptedGrid({"site_a": 0.01}, eval_timing={"site_a": (3000.0, 20, 20)})
    overrides = {"num-server-rounds": 1, "round-timeout": 900.0, "personalization": "finetune", "finetune-steps": 80}
    Federation(grid, _settings(tmp_path, **overrides)).run()
    ttl = {kind: {m.metadata.ttl for m in messages} for (messages, _), (kind, _) in zip(grid.waits, _waits(grid))}
    assert ttl["final"] == {360680.0}
    assert ttl[MessageType.TRAIN] == ttl["round"] == {DEFAULT_TTL}


def test_a_site_silent_at_the_end_is_reported_with_the_wait_it_was_given(tmp_path, caplog):
    """site_a (20 cases at 30 s, with Ditto's personal model) does not answer the final evaluation: its
    error names the 2 x 30 x 20 x 2 = 2400 s waited for it there, not the round's 900 s."""
    grid = ScriptedGrid({"site_a": 0.01, "site_b": 0.02}, eval_timing={"site_a": (30.0, 20), "site_b": (1.0, 5)})
    answer = grid.send_and_receive

    def without_site_a_at_the_end(messages, timeout=None):
        replies = answer(messages, timeout)
        final = [
            m.metadata.message_type == MessageType.EVALUATE
            and Instructions.from_config(m.content[CONFIG]).final_evaluation
            for m in messages
        ]
        return [
            r for r, m, f in zip(replies, messages, final) if not (f and grid.nodes[m.metadata.dst_node_id] == "site_a")
        ]

    grid.send_and_receive = without_site_a_at_the_end
    overrides = {"num-server-rounds": 1, "round-timeout": 900.0, "personalization": "ditto"}
    Federation(grid, _settings(tmp_path, **overrides)).run()
    assert "round 1 evaluate: site site_a failed: no reply within 2400 s" in caplog.text
    assert "no reply within 900 s" not in caplog.text


@pytest.mark.parametrize("overrides", [{"eval-cases": -1}, {"nsd-tolerance-mm": "1,2,3"}, {"nsd-tolerance-mm": "-2"}])
def test_bad_evaluation_settings_are_refused(tmp_path, overrides):
    with pytest.raises(ValueError, match=next(iter(overrides))):
        _settings(tmp_path, **overrides)


def test_a_site_with_a_test_split_scores_it_only_when_told(three_sites, tmp_path, monkeypatch):
    """Validation cases every round; the test cases, never seen by a round's choice, at the end only."""
    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
    from test_federation_e2e import _reply_without_task_identity

    from client import client_app
    from fed_swinumamba.data import SiteData, load_site_config
    from fed_swinumamba.model import build_model
    from fed_swinumamba.protocol import FULL_SYNC, METRICS, EvalReply
    from fed_swinumamba.schedule import Stage

    monkeypatch.setattr(Message, "__init__", _reply_without_task_identity(Message.__init__))
    site_yaml = with_test_split(three_sites[0], tmp_path)
    site = load_site_config(site_yaml)
    data = SiteData.from_config(site, ["organ", "lesion"])
    assert (len(data.val_cases), len(data.test_cases), len(data.train_cases)) == (1, 2, 1)
    context = Context(
        run_id=1, node_id=1, node_config={"site-config": str(site_yaml)}, state=RecordDict(), run_config={}
    )
    config = tiny_model()
    state = build_model(config).state_dict()
    scored = {}
    for split in (VALIDATION, TEST):
        ins = Instructions(1, Stage(0, ("heads",), 1e-3), config, ("organ", "lesion"), 0, FULL_SYNC, eval_split=split)
        ins = dataclasses.replace(ins, personal=PersonalOptions("finetune", finetune_checks=3))
        msg = Message(
            content=RecordDict({ARRAYS: ArrayRecord(state), CONFIG: ConfigRecord(ins.to_config())}),
            dst_node_id=1,
            message_type=MessageType.EVALUATE,
        )
        scored[split] = EvalReply.from_metrics(client_app.evaluate(msg, context).content[METRICS], ("organ", "lesion"))
    assert [scored[s].split for s in (VALIDATION, TEST)] == [VALIDATION, TEST]
    assert [scored[s].held_out_cases for s in (VALIDATION, TEST)] == [1, 2] and scored[TEST].record()["split"] == "test"
    # both tell the coordinator how many cases the final evaluation will score, which sizes its wait
    assert [scored[s].full_split_cases for s in (VALIDATION, TEST)] == [2, 2]
    # its validation case, for the global model and three fine-tuning checks, at the end
    assert [scored[s].selection_cases for s in (VALIDATION, TEST)] == [4, 4]
