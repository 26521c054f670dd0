"""Fixtures and checks shared by the federation tests: three tiny phantom sites (CT, MRI, ultrasound)."""

import dataclasses
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, Metadata, MetricRecord, RecordDict
from flwr.server.superlink.linkstate.utils import create_message_error_unavailable_res_message
from flwr.supercore.task_identity import TaskIdentity

from fed_swinumamba.checkpoint import Checkpoint
from fed_swinumamba.compression import Packet, decompress, with_error_feedback
from fed_swinumamba.data import SiteData, load_site_config
from fed_swinumamba.model import ModelConfig, build_model
from fed_swinumamba.params import LAYER_GROUPS, group_of
from fed_swinumamba.protocol import (
    ARRAYS,
    COMPRESSED,
    CONFIG,
    FULL_SYNC,
    METRICS,
    SITE,
    EvalReply,
    Instructions,
    TrainReply,
)
from fed_swinumamba.simulated import generate_phantoms, split_dataset
from fed_swinumamba.training import train_local


@pytest.fixture(scope="session", autouse=True)
def user_folders(tmp_path_factory):
    """The sites' default cache and state folders (XDG) inside the test's temporary folder, not the user's home."""
    root = tmp_path_factory.mktemp("xdg")
    patch = pytest.MonkeyPatch()
    patch.setenv("XDG_CACHE_HOME", str(root / "cache"))
    patch.setenv("XDG_DATA_HOME", str(root / "data"))
    yield root
    patch.undo()


# The tests' one tiny network (dims 8-64): fast on a CPU. TINY_MODEL for code that takes a ModelConfig,
# TINY the run-config overrides of a federation of that network, whose sites fine-tune their personal
# models for 2 steps at the end, not 80 (personal models have tests of their own; 80 steps at every
# site of every test federation took minutes of the suite's time).
TINY_MODEL = ModelConfig(dims=(8, 16, 32, 64), depths=(1, 1, 1, 1), stem_width=8, d_state=4)
CLASSES = ("organ", "lesion")  # the phantoms' foreground classes
TINY = {
    "model-dims": "8,16,32,64",
    "model-depths": "1,1,1,1",
    "model-stem-width": 8,
    "model-d-state": 4,
    "finetune-steps": 2,
}


def tiny_model(*modalities: str) -> ModelConfig:
    """TINY_MODEL with encoders for ``modalities`` only (all of them when none are given)."""
    return dataclasses.replace(TINY_MODEL, modalities=modalities) if modalities else TINY_MODEL


@pytest.fixture(scope="session")
def three_sites(tmp_path_factory):
    """Site YAMLs of a CT, an MRI and an ultrasound site: 4 phantom cases each, 32x32, 3 slices."""
    root = tmp_path_factory.mktemp("demo")
    yamls = []
    for i, modality in enumerate(("ct", "mri", "us")):
        data = generate_phantoms(root / "data" / modality, modality, num_cases=4, seed=i, size=32, num_slices=3)
        yamls += split_dataset(data, modality, 1, "iid", 0, root / "sites" / modality)
    for y in yamls:  # tiny local budget: two steps of batch 4 at 32x32
        y.write_text(y.read_text().replace("patch_size: [64, 64]", "patch_size: [32, 32]"))
    return yamls


@pytest.fixture(scope="session")
def trained_checkpoint(three_sites, tmp_path_factory):
    """A tiny CT + ultrasound network trained a little on the CT site, saved as a run would save it:
    (checkpoint path, network, CT site config, CT site data)."""
    config = tiny_model("ct", "us")
    torch.manual_seed(0)
    model = build_model(config)
    ct = load_site_config(three_sites[0])
    data = SiteData.from_config(ct, CLASSES)
    train_local(
        model, "ct", data.training_batches(4, np.random.default_rng(0)), groups=LAYER_GROUPS, lr=3e-3, max_steps=60
    )
    path = tmp_path_factory.mktemp("ckpt") / "best.safetensors"
    Checkpoint(model.state_dict(), config, CLASSES, server_round=3, stage=1).save(path)
    return path, model, ct, data


def _copy_of_site(site_yaml: Path, folder: Path, name: str, text: str, added: str) -> Path:
    """``folder/name``: ``text`` (of ``site_yaml``) with its data root made absolute, then ``added``."""
    root = load_site_config(site_yaml).data.root
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(re.sub(r"(?m)^  root: .*$", f"  root: {root}", text) + added)
    return path


def private_site(site_yaml: Path, folder: Path, **privacy) -> Path:
    """A copy of ``site_yaml`` in ``folder`` with a DP section of its own (``privacy`` fields), its data where it was."""
    lines = "".join(f"  {k}: {v}\n" for k, v in {"enabled": "true", **privacy}.items())
    added = f"training:\n  cache_dir: {folder / 'cache'}\nprivacy:\n" + lines
    return _copy_of_site(
        site_yaml, folder, f"private_{site_yaml.stem}.yaml", site_yaml.read_text().split("privacy:")[0], added
    )


def with_test_split(site_yaml: Path, folder: Path) -> Path:
    """A copy of a ``three_sites`` YAML (4 patients) in ``folder`` that keeps 1 validation and 2 test patients apart."""
    added = "split:\n  val_fraction: 0.25\n  test_fraction: 0.5\n"
    return _copy_of_site(site_yaml, folder, f"tested_{site_yaml.stem}.yaml", site_yaml.read_text(), added)


@pytest.fixture(autouse=True)
def site_state_home(tmp_path, monkeypatch):
    """Sites keep their privacy ledgers under $XDG_DATA_HOME unless their YAML says otherwise: a test's
    own folder, never the user's (and never another test's ledger of the same study)."""
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg-data"))
    return tmp_path / "xdg-data"


@pytest.fixture
def task_identity(monkeypatch):
    """Messages are created inside a running Flower app, which knows its run and node; tests have none."""
    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)


class ScriptedGrid:
    """A grid whose sites answer at once. Each site holds its copy of the global model as a real site does
    (a full sync replaces it, an update overwrites what it brings); a train reply is that copy's
    trainable weights moved by the site's step.

    With compression a site applies the packets it gets and sends its change as a packet, with error
    feedback, as a real site does (``replies`` keeps each train reply; ``held_at_train`` each site's copy
    when it starts training, per round).

    Queries are answered with the site's name and modality (``modalities``, CT by default). A site in
    ``offline`` answers no train message: the SuperLink's own error reply for a node that stopped
    sending heartbeats comes instead. ``eval_timing`` gives a site's evaluations their seconds per case,
    the cases of its full split (0.1 s and 1 case by default) and optionally its selection cases; ``waits`` keeps each exchange's
    messages and the timeout it was given.
    """

    def __init__(
        self,
        steps: dict[str, float],
        num_examples: dict[str, int] | None = None,
        offline: tuple[str, ...] = (),
        modalities: dict[str, str] | None = None,
        eval_timing: dict[str, tuple[float, ...]] | None = None,
    ):
        self.steps = steps  # site -> value added to every weight it trains (NaN: a diverged site)
        self.num_examples = num_examples or dict.fromkeys(steps, 10)
        self.offline = offline
        self.modalities = modalities or dict.fromkeys(steps, "ct")
        self.nodes = {i + 1: site for i, site in enumerate(steps)}
        self.train_instructions: list[Instructions] = []
        self.sent: list[Message] = []
        self.held: dict[str, dict[str, np.ndarray]] = {site: {} for site in steps}
        self.held_at_train: dict[tuple[int, str], dict[str, np.ndarray]] = {}
        self.residuals: dict[str, dict[str, np.ndarray]] = {site: {} for site in steps}
        self.replies: list[Message] = []
        self.eval_timing = eval_timing or {}
        self.waits: list[tuple[list[Message], float | None]] = []

    def get_node_ids(self):
        return list(self.nodes)

    def send_and_receive(self, messages, timeout=None):
        messages = list(messages)
        self.waits.append((messages, timeout))
        replies = []
        for i, msg in enumerate(messages):
            msg.metadata.__dict__["_message_id"] = f"m{i}"  # as a grid numbers what it pushes
            self.sent.append(msg)
            site = self.nodes[msg.metadata.dst_node_id]
            identity = ConfigRecord({"site": site, "modality": self.modalities[site]})
            if msg.metadata.message_type == MessageType.TRAIN and site in self.offline:
                replies.append(create_message_error_unavailable_res_message(msg.metadata, "node_unavail"))
                continue
            if msg.metadata.message_type == MessageType.QUERY:
                content = RecordDict({SITE: identity})
            elif msg.metadata.message_type == MessageType.TRAIN:
                ins = Instructions.from_config(msg.content[CONFIG])
                self.train_instructions.append(ins)
                held = self._sync(site, ins, msg.content)
                self.held_at_train[(ins.server_round, site)] = {k: v.copy() for k, v in held.items()}
                step = np.float32(self.steps[site])
                trained = {k: v + step for k, v in held.items() if group_of(k) in ins.stage.trainable_groups}
                reply = TrainReply(self.num_examples[site], 2, train_loss=1.0, first_batch_s=0.5, train_s=1.0)
                content = RecordDict({METRICS: MetricRecord(reply.to_metrics()), SITE: identity})
                if ins.compression.enabled:
                    changes = {k: v - held[k] for k, v in trained.items()}
                    packet, self.residuals[site] = with_error_feedback(changes, self.residuals[site], ins.compression)
                    content[ARRAYS] = ArrayRecord({k: Array(v) for k, v in packet.arrays().items()})
                    content[COMPRESSED] = ConfigRecord({"names": list(packet.names)})
                else:
                    content[ARRAYS] = ArrayRecord({k: Array(v) for k, v in trained.items()})
            else:
                ins = Instructions.from_config(msg.content[CONFIG])
                if not ins.foreign_model:
                    self._sync(site, ins, msg.content)
                classes = ("organ", "lesion")
                seconds_per_case, full_split_cases, *selection = self.eval_timing.get(site, (0.1, 1))
                scores = EvalReply(
                    dict.fromkeys(classes, 0.5),
                    dict.fromkeys(classes, 3.0),
                    dict.fromkeys(classes, 0.7),
                    dict.fromkeys(classes, 0),
                    0.5,
                    1,
                    1,
                    seconds_per_case,
                    full_split_cases=full_split_cases,
                    selection_cases=selection[0] if selection else 0,
                )
                content = RecordDict({METRICS: MetricRecord(scores.to_metrics()), SITE: identity})
            metadata = Metadata(
                run_id=1,
                message_id=f"r{i}",
                src_node_id=msg.metadata.dst_node_id,
                dst_node_id=0,
                reply_to_message_id=f"m{i}",
                group_id="1",
                created_at=0.0,
                ttl=60.0,
                message_type=msg.metadata.message_type,
            )
            replies.append(Message(content=content, metadata=metadata))
        self.replies += [r for r in replies if r.metadata.message_type == MessageType.TRAIN]
        return replies

    def _sync(self, site: str, ins: Instructions, content: RecordDict) -> dict[str, np.ndarray]:
        sent = {k: a.numpy() for k, a in content[ARRAYS].items()}
        if COMPRESSED in content:
            packet = Packet.from_arrays(content[COMPRESSED]["names"], sent)
            shapes = {k: v.shape for k, v in self.held[site].items()}
            changes = decompress(packet, shapes, ins.compression.block)
            sent = {k: self.held[site][k] + v for k, v in changes.items()}
        self.held[site] = sent if ins.base_version == FULL_SYNC else {**self.held[site], **sent}
        return self.held[site]


def assert_only_weights_and_scalars(reply: dict, parameter_names: set[str], identity: dict) -> None:
    """Privacy: a site's reply, as ``client.audit.describe`` puts it, holds float32 weights named after
    the network's parameters, numbers, and the site's name and modality: nothing else."""
    assert set(reply) in ({"arrays", "metrics", "site"}, {"metrics", "site"}), set(reply)
    if "arrays" in reply:
        assert reply["arrays"]["type"] == "ArrayRecord"
        arrays = reply["arrays"]["arrays"]
        assert arrays and set(arrays) <= parameter_names
        assert all(a["dtype"] == "float32" for a in arrays.values())
    assert reply["metrics"]["type"] == "MetricRecord"
    assert all(isinstance(v, (int, float)) for v in reply["metrics"]["values"].values())
    assert reply["site"] == {"type": "ConfigRecord", "values": identity}
