"""End to end: three tiny sites (CT, MRI, ultrasound phantoms) federated on Flower's simulation engine,
and what a site's replies may contain."""

import json

import numpy as np
import pytest
import torch
from conftest import TINY, assert_only_weights_and_scalars, tiny_model
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict

from client import client_app
from client.audit import describe
from fed_swinumamba.checkpoint import Checkpoint
from fed_swinumamba.model import ModelConfig
from fed_swinumamba.protocol import ARRAYS, CONFIG, FULL_SYNC, Instructions
from fed_swinumamba.schedule import Stage
from server.federation import Federation
from simulation.runner import run_federated_simulation


@pytest.mark.slow
def test_three_sites_two_rounds_write_per_site_dice_and_checkpoints(three_sites, tmp_path):
    """...and a fourth site whose data folder is missing fails with a clear error without stopping the others."""
    broken = tmp_path / "broken.yaml"
    broken.write_text(
        three_sites[2]
        .read_text()
        .replace("site: us_site", "site: broken_site")
        .replace("root: us_site", "root: no_such_folder")
    )
    overrides = {**TINY, "num-server-rounds": 2, "rounds-per-stage": 1, "local-steps": 2, "lr": 1e-3}
    metrics = run_federated_simulation([*three_sites, broken], tmp_path / "run", overrides)
    assert [r["round"] for r in metrics["rounds"]] == [1, 2]
    for rnd in metrics["rounds"]:
        failed = {k: v for k, v in rnd["sites"].items() if "errors" in v}
        assert len(failed) == 1
        (entry,) = failed.values()
        errors = entry["errors"]
        assert len(errors) == 2  # its train and its evaluate message each failed, with the site's own message
        assert all("site broken_site: data folder <path> does not exist" in e for e in errors)
        assert not any("no_such_folder" in e for e in errors)  # the coordinator never sees the site's paths
        for k in failed:
            del rnd["sites"][k]
    assert [r["stage"] for r in metrics["rounds"]] == [0, 1]
    assert (
        "stage1" not in metrics["rounds"][0]["trainable_groups"]
        and "stage1" in metrics["rounds"][1]["trainable_groups"]
    )
    for rnd in metrics["rounds"]:
        sites = rnd["sites"]
        assert {s["modality"] for s in sites.values()} == {"ct", "mri", "us"} and len(sites) == 3
        for site in sites.values():
            assert "errors" not in site
            assert set(site["dice"]) == {"organ", "lesion"}
            assert 0.0 <= site["dice_mean"] <= 1.0
            assert site["bytes_up"] > 0 and site["bytes_down"] > 0
    # First contact sends everything; round 2 sends only what changed, so less goes down.
    first, second = (metrics["rounds"][i]["sites"] for i in (0, 1))
    assert all(second[s]["bytes_down"] < first[s]["bytes_down"] for s in first)
    on_disk = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert [r["round"] for r in on_disk["rounds"]] == [1, 2]
    assert all(on_disk["rounds"][i]["sites"][s] == metrics["rounds"][i]["sites"][s] for i in (0, 1) for s in first)
    ckpt = Checkpoint.load(tmp_path / "run" / "checkpoints" / "latest.safetensors")
    assert ckpt.server_round == 2 and ckpt.stage == 1 and ckpt.class_names == ("organ", "lesion")
    ckpt.build_model()  # strict: every parameter of the described network is there

    # Cross-site evaluation after the last round: each site's local model at every site.
    cross = on_disk["cross_site"]
    assert cross["round"] == 2 and cross["sites"] == sorted(first) and cross["models"] == ["global", *sorted(first)]
    assert cross["dice_mean"]["global"] == {s: second[s]["dice_mean"] for s in first}
    for model in sorted(first):
        assert set(cross["dice_mean"][model]) == set(first) and all(
            0.0 <= v <= 1.0 for v in cross["dice_mean"][model].values()
        )
    # A local model differs from the global one, so somewhere its Dice does too.
    assert any(cross["dice_mean"][m][s] != cross["dice_mean"]["global"][s] for m in first for s in first)
    report = (tmp_path / "run" / "report.html").read_text()
    assert f"{cross['dice_mean'][sorted(first)[0]][sorted(first)[-1]]:.3f}" in report


def _train_message(model_config: ModelConfig, seed: int = 0) -> Message:
    from fed_swinumamba.model import build_model

    torch.manual_seed(0)
    state = build_model(model_config).state_dict()
    ins = Instructions(
        1,
        Stage(0, ("stem", "stage4", "decoder", "heads"), 1e-3),
        model_config,
        ("organ", "lesion"),
        version=0,
        base_version=FULL_SYNC,
        local_steps=2,
        seed=seed,
    )
    content = RecordDict({ARRAYS: ArrayRecord(state), CONFIG: ConfigRecord(ins.to_config())})
    return Message(content=content, dst_node_id=1, message_type=MessageType.TRAIN)


def test_a_site_sends_back_only_weights_and_scalars(three_sites, monkeypatch, task_identity):
    """Privacy: the reply holds the trained weights (names of the network), numbers, and the site's name."""
    model_config = tiny_model()
    msg = _train_message(model_config)
    context = Context(
        run_id=1, node_id=1, node_config={"site-config": str(three_sites[0])}, state=RecordDict(), run_config={}
    )
    monkeypatch.setattr(Message, "__init__", _reply_without_task_identity(Message.__init__))
    content = client_app.train(msg, context).content
    assert set(content.keys()) == {"arrays", "metrics", "site"}
    identity = {"site": context_site_name(three_sites[0]), "modality": "ct"}
    assert_only_weights_and_scalars(describe(content), set(msg.content[ARRAYS].keys()), identity)
    assert not any(".layers.0." in n for n in content["arrays"].keys())  # frozen stage1 is never sent back


def context_site_name(yaml_path) -> str:
    from fed_swinumamba.data import load_site_config

    return load_site_config(yaml_path).site


def _reply_without_task_identity(init):
    """Replies outside a running Flower node have no task identity to read; give them the instruction's."""

    def patched(self, *args, reply_to=None, **kwargs):
        if reply_to is not None:
            kwargs["metadata"] = reply_to.metadata
        return init(self, *args, **kwargs)

    return patched


def test_federation_refuses_to_resume_with_a_different_model(tmp_path):
    from server.settings import FederationSettings

    settings = FederationSettings.from_run_config({**TINY, "output-dir": str(tmp_path)})
    fed = Federation(grid=None, settings=settings)
    fed._checkpoint(3, 1, "latest")
    resumed = Federation(
        grid=None, settings=FederationSettings.from_run_config({**TINY, "output-dir": str(tmp_path), "resume": True})
    )
    assert resumed.start_round == 4
    with pytest.raises(ValueError, match="model config differs"):
        Federation(
            grid=None,
            settings=FederationSettings.from_run_config(
                {**TINY, "model-d-state": 8, "output-dir": str(tmp_path), "resume": True}
            ),
        )


def test_local_training_is_reproducible_for_a_run_seed(three_sites, monkeypatch, task_identity):
    """Same seed, round and site: the same update (shuffling and augmentation seeded); another seed: another."""
    model_config = tiny_model()
    monkeypatch.setattr(Message, "__init__", _reply_without_task_identity(Message.__init__))

    def update(seed):
        context = Context(
            run_id=1, node_id=1, node_config={"site-config": str(three_sites[1])}, state=RecordDict(), run_config={}
        )
        torch.manual_seed(1234 + seed)  # whatever the process state, the seed in the instructions decides
        reply = client_app.train(_train_message(model_config, seed), context)
        return {k: a.numpy() for k, a in reply.content["arrays"].items()}

    first, again, other = update(0), update(0), update(1)
    assert all(np.array_equal(first[k], again[k]) for k in first)
    assert any(not np.array_equal(first[k], other[k]) for k in first)


def _error_reason(reply: Message) -> str:
    assert reply.has_error()
    return reply.error.reason


def test_a_model_config_differing_from_the_site_is_refused_with_a_clear_error(three_sites, monkeypatch, task_identity):
    """The site answers with an error naming itself and the problem; it does not crash the node."""
    context = Context(
        run_id=1, node_id=1, node_config={"site-config": str(three_sites[0])}, state=RecordDict(), run_config={}
    )
    told = tiny_model()
    msg = _train_message(told)
    wider = _train_message(ModelConfig(dims=(16, 32, 64, 128), depths=(1, 1, 1, 1), stem_width=8, d_state=4))
    msg.content[ARRAYS] = wider.content[ARRAYS]  # weights of another network than the instructions describe
    mri_only = _train_message(tiny_model("mri"))
    monkeypatch.setattr(Message, "__init__", _reply_without_task_identity(Message.__init__))
    reason = _error_reason(client_app.train(msg, context))
    assert "site ct_site:" in reason and "has shape" in reason and "model configs differ" in reason
    reason = _error_reason(client_app.train(mri_only, context))
    assert "site ct_site: modality 'ct' is not in this federation's ['mri']" in reason


def test_a_site_follows_its_message_and_yaml_only_never_the_run_config(three_sites, monkeypatch, task_identity):
    """A ClientApp given an empty run config trains exactly as one given a run config that says otherwise
    (DP on, other rounds, steps, seed, learning rate): what a site does is in its instructions."""
    model_config = tiny_model()
    monkeypatch.setattr(Message, "__init__", _reply_without_task_identity(Message.__init__))
    contrary = {
        "dp-epsilon": 8.0,
        "num-server-rounds": 50,
        "local-steps": 99,
        "seed": 5,
        "lr": 1.0,
        "dp-insecure-reproducible": True,
    }

    def update(run_config):
        context = Context(
            run_id=1,
            node_id=1,
            node_config={"site-config": str(three_sites[2])},
            state=RecordDict(),
            run_config=run_config,
        )
        reply = client_app.train(_train_message(model_config), context)
        assert "epsilon" not in reply.content["metrics"]  # no DP: the instructions ask for none
        return {k: a.numpy() for k, a in reply.content["arrays"].items()}

    empty, told_otherwise = update({}), update(contrary)
    assert set(empty) == set(told_otherwise) and all(np.array_equal(empty[k], told_otherwise[k]) for k in empty)
