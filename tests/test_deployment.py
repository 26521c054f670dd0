"""Deployment over loopback, driven by the project's own commands as a person would run them:
``python -m server make-ca / start / run`` on the coordinator, ``python -m client make-key / start`` at
the hospitals. A SuperLink with TLS, SuperNode authentication and a database; three SuperNodes playing
the demo's CT, MRI and ultrasound sites with a tiny network.

One set-up serves the module; every process started here is stopped by its PID at the end.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from functools import cached_property
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY, ScriptedGrid, assert_only_weights_and_scalars
from cryptography.hazmat.primitives import serialization
from flwr.app import Context, Message, MessageType, MetricRecord, RecordDict

from client.audit import audit_replies
from client.deployment import JOINED, REFUSED, SuperNodeRefused, start_and_join, start_supernode
from fed_swinumamba.deployment import (
    CONNECTION,
    Background,
    free_port,
    is_running,
    start_background,
    stop,
    wait_for_output,
)
from fed_swinumamba.model import build_model
from fed_swinumamba.params import select
from fed_swinumamba.protocol import CONFIG, FULL_SYNC, Instructions
from fed_swinumamba.simulated import make_demo_sites
from server.deployment import superexec_pids
from server.federation import Federation
from server.settings import FederationSettings

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="processes are followed through /proc")

ROOT = Path(__file__).resolve().parents[1]
HOSPITALS = {"hospital_a": "demo_ct", "hospital_b": "demo_mri", "hospital_c": "demo_us"}  # key name -> site
RUN_CONFIG = {
    **TINY, "num-server-rounds": 2, "rounds-per-stage": 1, "local-steps": 1, "lr": 0.002,
    "min-available-sites": 3, "cross-site-eval": False, "round-timeout": 300.0,
}  # fmt: skip
SETTINGS = FederationSettings.from_run_config(RUN_CONFIG)


def _toml(value) -> str:
    return str(value).lower() if isinstance(value, bool) else f"'{value}'" if isinstance(value, str) else str(value)


class Deployment:
    """The module's coordinator and hospitals on this machine; remembers every PID it started."""

    def __init__(self, root: Path, data: Path):
        self.root, self.data = root, data
        self.port = free_port()
        self.env = {
            **os.environ,
            "FLWR_HOME": str(root / "flwr-home"),
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        }
        self.runtime_ports = {name: free_port() for name in HOSPITALS}
        self.node_ids: dict[str, int] = {}
        self.pids: list[int] = []

    @cached_property
    def sites(self) -> dict[str, Path]:
        return dict(zip(HOSPITALS, make_demo_sites(self.data, num_cases=4)))

    @property
    def superlink(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def ca(self) -> Path:
        return self.root / "certs" / "ca.crt"

    def command(self, *args: str | Path, timeout: float = 300) -> str:
        """``python -m ARGS`` from the project root; its output, or a failed test showing it."""
        done = subprocess.run(
            [sys.executable, "-m", *map(str, args)],
            cwd=ROOT,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    def flwr(self, *args: str | Path) -> dict:
        done = subprocess.run(
            ["flwr", *map(str, args), "--format", "json"], env=self.env, capture_output=True, text=True, timeout=120
        )
        return json.loads(done.stdout[done.stdout.index("{") :])

    def _started(self, pid_file: Path) -> int:
        pid = int(pid_file.read_text())
        self.pids.append(pid)
        return pid

    def start_coordinator(self) -> None:
        """The coordinator's first commands: its CA and certificates, then its SuperLink."""
        self.command("server", "make-ca", "--out", self.root / "certs")
        self.start_superlink()

    def start_superlink(self) -> None:
        self.command(
            "server", "start", "--certs", self.root / "certs", "--state", self.root / "coordinator", "--port", self.port
        )
        self._started(self.root / "coordinator" / "superlink.pid")

    def superlink_pid(self) -> int:
        return int((self.root / "coordinator" / "superlink.pid").read_text())

    def superlink_log(self) -> str:
        return (self.root / "coordinator" / "superlink.log").read_text()

    def register(self, key: str) -> int:
        return int(self.flwr("supernode", "register", self.root / "keys" / f"{key}.pub", CONNECTION)["node-id"])

    def start_hospital(self, name: str) -> None:
        self.command(
            "client", "start", "--site-config", self.sites[name], "--key", self.root / "keys" / name, "--ca", self.ca,
            "--superlink", self.superlink, "--port", self.runtime_ports[name], "--state", self.root / "supernodes",
            "--audit-log", self.audit_log(name),
        )  # fmt: skip
        self._started(self.root / "supernodes" / f"supernode-{name}.pid")

    def hospital_pid(self, name: str) -> int:
        return int((self.root / "supernodes" / f"supernode-{name}.pid").read_text())

    def hospital_log(self, name: str) -> Path:
        return self.root / "supernodes" / f"supernode-{name}.log"

    def audit_log(self, name: str) -> Path:
        return self.root / "audit" / f"{name}.jsonl"

    def start_stranger(self, key: str, site_config: Path, ca: Path) -> Background:
        """A SuperNode outside the federation's rules, started without waiting for it to join."""
        process = start_supernode(
            site_config,
            self.root / "keys" / key,
            ca,
            self.superlink,
            self.root / "strangers",
            free_port(),
            env=self.env,
        )
        self.pids.append(process.pid)
        return process

    def start_run(self, out: Path, *options: str, **overrides) -> subprocess.Popen:
        """``python -m server run [OPTIONS]`` in the background: it returns when the run is over."""
        config = " ".join(f"{k}={_toml(v)}" for k, v in {**RUN_CONFIG, "output-dir": str(out), **overrides}.items())
        command = [
            sys.executable,
            "-m",
            "server",
            "run",
            str(ROOT),
            "--superlink",
            self.superlink,
            "--ca",
            str(self.ca),
            *options,
            "--run-config",
            config,
        ]
        run = subprocess.Popen(
            command, cwd=ROOT, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        self.pids.append(run.pid)
        return run

    def run(self, out: Path, **overrides) -> str:
        output, _ = self.start_run(out, **overrides).communicate(timeout=900)
        return output

    def stop_all(self) -> None:
        for pid in reversed(self.pids):
            if is_running(pid):
                stop(pid)


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    """CA, SuperLink, three registered hospitals with their SuperNodes running: the set-up of the README."""
    d = Deployment(tmp_path_factory.mktemp("deployment"), tmp_path_factory.mktemp("hospital-data"))
    try:
        d.start_coordinator()
        for name in HOSPITALS:
            d.command("client", "make-key", "--site", name, "--out", d.root / "keys")
            d.node_ids[name] = d.register(name)
        for name in HOSPITALS:
            d.start_hospital(name)
        yield d
    finally:
        d.stop_all()


def _wait_until(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


def _rounds(out: Path) -> list[dict]:
    path = out / "metrics.json"
    return json.loads(path.read_text())["rounds"] if path.is_file() else []


def _payload_bytes(modality: str) -> int:
    """What a site of ``modality`` receives when it gets the whole model: shared weights and its encoder."""
    return sum(
        t.nbytes for t in select(build_model(SETTINGS.model_config).state_dict(), modalities=[modality]).values()
    )


# ------------------------------------------------------------------------------------------- the run
RUN = {"num-server-rounds": 3, "min-train-sites": 2, "eval-interval": 3}


@pytest.fixture(scope="module")
def run(deployment, tmp_path_factory):
    """The module's one federated run, with what goes wrong in a real one (a single run: every Flower
    message starts a ClientApp process, so each round costs tens of seconds on a CPU):

    - a node with an unregistered key and a registered node holding another CA's certificate try to join;
    - hospital_a's SuperNode is killed mid-way through round 1 and restarted once round 1 is over;
    - the coordinator's SuperLink is killed once round 2 is recorded, restarted, and the run resumed."""
    d, out = deployment, tmp_path_factory.mktemp("run")
    d.command("client", "make-key", "--site", "intruder", "--out", d.root / "keys")  # never registered
    d.command("client", "make-key", "--site", "lost_ca", "--out", d.root / "keys")
    lost_ca_node = d.register("lost_ca")
    d.command("server", "make-ca", "--out", d.root / "other-certs")
    intruder_site = d.sites["hospital_a"].with_name("intruder_site.yaml")
    intruder_site.write_text(d.sites["hospital_a"].read_text().replace("site: demo_ct", "site: intruder_site"))
    intruder = d.start_stranger("intruder", intruder_site, d.ca)
    lost_ca = d.start_stranger("lost_ca", d.sites["hospital_b"], d.root / "other-certs" / "ca.crt")

    received = d.hospital_log("hospital_a").read_text().count("Receiving: train message")
    interrupted_run = d.start_run(out, **RUN)
    _wait_until(
        lambda: d.hospital_log("hospital_a").read_text().count("Receiving: train message") > received,
        600,
        "hospital_a's train message",
    )
    stop(d.hospital_pid("hospital_a"), signals=(signal.SIGKILL,))  # a crash: no goodbye to the SuperLink
    _wait_until(lambda: len(_rounds(out)) == 1, 600, "round 1 without hospital_a")
    d.start_hospital("hospital_a")
    _wait_until(lambda: len(_rounds(out)) == 2, 600, "round 2")
    before = _rounds(out)
    stop(d.superlink_pid(), signals=(signal.SIGKILL,))  # the coordinator's machine fails
    interrupted, _ = interrupted_run.communicate(timeout=300)
    d.start_superlink()  # same certificates and database
    resumed = d.run(out, resume=True, **RUN)
    started = re.search(r"Run (\d+) started", resumed)
    assert started, resumed[-3000:]
    return {
        "out": out,
        "before": before,
        "after": _rounds(out),
        "interrupted": interrupted,
        "resumed": resumed,
        "resumed_run_id": int(started.group(1)),
        "intruder": intruder,
        "lost_ca": lost_ca,
        "lost_ca_node": lost_ca_node,
    }


@pytest.mark.slow
def test_three_hospitals_train_and_evaluate_over_tls(run):
    final = json.loads((run["out"] / "metrics.json").read_text())["final_evaluation"]["global"]["sites"]
    evaluated = run["after"][2]["sites"]
    for sites in (evaluated, final):
        assert {site: s["modality"] for site, s in sites.items()} == {
            "demo_ct": "ct",
            "demo_mri": "mri",
            "demo_us": "us",
        }
        for site in sites.values():
            assert "errors" not in site
            assert set(site["dice"]) == {"organ", "lesion"} and 0.0 <= site["dice_mean"] <= 1.0
    assert all(s["num_examples"] > 0 for s in evaluated.values())


@pytest.mark.slow
def test_a_node_whose_key_is_not_registered_is_refused(deployment, run):
    intruder = run["intruder"]
    assert not wait_for_output(intruder, JOINED, timeout=60)  # it exited without joining
    assert REFUSED in intruder.output()
    public = serialization.load_ssh_public_key((deployment.root / "keys" / "intruder.pub").read_bytes())
    pem_line = (
        public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
        .splitlines()[1]
    )
    refusals = [
        line
        for line in deployment.superlink_log().splitlines()
        if "No SuperNode found with the given public key" in line
    ]
    assert any(pem_line in line for line in refusals)
    assert all("intruder_site" not in rnd["sites"] for rnd in run["after"])


@pytest.mark.slow
def test_a_node_without_the_coordinators_ca_cannot_connect(deployment, run):
    lost_ca = run["lost_ca"]
    assert not wait_for_output(lost_ca, JOINED, timeout=60)
    assert "CERTIFICATE_VERIFY_FAILED" in lost_ca.output()
    status = {int(n["node-id"]): n for n in deployment.flwr("supernode", "list", CONNECTION)["nodes"]}
    assert status[run["lost_ca_node"]]["status"] == "registered"  # registered, yet never online
    assert status[run["lost_ca_node"]]["online-at"] == "N/A"
    assert all(status[deployment.node_ids[name]]["status"] == "online" for name in HOSPITALS)


@pytest.mark.slow
def test_only_weights_and_scalars_leave_a_site(deployment, run):
    """Every reply a hospital's audit log holds, in both runs (the interrupted one's too); the resumed run,
    which nothing interrupts, replies exactly once per message it is sent."""
    parameter_names = set(build_model(SETTINGS.model_config).state_dict())
    evaluations = 2  # round 3's and the final model's (round 3, the one round evaluated, is the best)
    for name, site in HOSPITALS.items():
        replies = [json.loads(line) for line in deployment.audit_log(name).read_text().splitlines()]
        resumed = [r for r in replies if r["run_id"] == run["resumed_run_id"]]
        # the coordinator's first question: who is this node (before any weights are sent)
        assert sorted(r["message_type"] for r in resumed) == [MessageType.EVALUATE] * evaluations + [
            MessageType.QUERY
        ] + [MessageType.TRAIN]
        interrupted = {r["message_type"] for r in replies if r["run_id"] != run["resumed_run_id"]}
        assert interrupted == {MessageType.QUERY, MessageType.TRAIN}  # audited too (that run evaluated nothing)
        identity = {"site": site, "modality": site.removeprefix("demo_")}
        for reply in replies:
            if reply["message_type"] == MessageType.QUERY:
                assert reply["content"] == {"site": {"type": "ConfigRecord", "values": identity}}
            else:
                assert_only_weights_and_scalars(reply["content"], parameter_names, identity)


@pytest.mark.slow
def test_the_coordinators_outputs_never_name_a_sites_files(deployment, run):
    out = run["out"]
    outputs = {
        "superlink log": deployment.superlink_log(), "run output": run["interrupted"] + run["resumed"],
        "metrics.json": (out / "metrics.json").read_text(), "report.html": (out / "report.html").read_text(),
    }  # fmt: skip
    site_files = [str(deployment.data), *map(str, deployment.sites.values()), "case_0", ".nii"]
    for name, text in outputs.items():
        assert not [f for f in site_files if f in text], name


@pytest.mark.slow
def test_a_hospital_killed_mid_round_rejoins_and_trains_on_the_whole_model(deployment, run):
    """Round 1 ends with the two others; in round 2 the restarted site gets every weight and trains."""
    first, second = run["before"]
    crashed = "demo_ct"  # it answered the coordinator's identity query before it was killed mid-training
    assert set(first["sites"]) == {crashed, "demo_mri", "demo_us"}
    assert [e.split(":")[0] for e in first["sites"][crashed]["errors"]] == ["train"]
    assert all(first["sites"][s]["num_examples"] > 0 for s in ("demo_mri", "demo_us"))
    assert "fewer than min-train-sites" not in run["interrupted"]  # two of the two required: aggregated
    assert second["stage"] == 1 and set(second["sites"]) == set(HOSPITALS.values())
    assert all("errors" not in s and s["num_examples"] > 0 for s in second["sites"].values())
    assert second["sites"]["demo_ct"]["bytes_down"] >= _payload_bytes("ct")  # everything again
    assert second["sites"]["demo_mri"]["bytes_down"] < _payload_bytes("mri")  # only what changed


@pytest.mark.slow
def test_the_coordinator_killed_after_a_round_resumes_at_the_next(run):
    assert "finished:completed" not in run["interrupted"]
    assert f"Run {run['resumed_run_id']}: finished:completed" in run["resumed"], run["resumed"][-3000:]
    assert "round 2 done, stage 1" in run["resumed"]
    after = run["after"]
    assert [(r["round"], r["stage"]) for r in after] == [(1, 0), (2, 1), (3, 2)]
    assert after[:2] == run["before"]  # the history survived
    assert set(after[2]["sites"]) == set(HOSPITALS.values())  # the SuperNodes came back by themselves
    assert all("errors" not in s and s["num_examples"] > 0 and "dice" in s for s in after[2]["sites"].values())


# ------------------------------------------------------------------------------ the database's write lock
@pytest.fixture(scope="module")
def lone_superlink(tmp_path_factory):
    """A SuperLink started by ``server start``, with no hospitals: its database and its SuperExec."""
    root = tmp_path_factory.mktemp("lone-superlink")
    d = Deployment(root, root / "no-hospital-data")
    try:
        d.start_coordinator()
        _wait_until(lambda: "Starting Flower SuperExec" in d.superlink_log(), 120, "the SuperLink's SuperExec")
        time.sleep(2)  # it polls for tasks every second from now on
        yield d
    finally:
        d.stop_all()


@pytest.mark.slow
def test_requests_wait_out_a_write_lock_longer_than_flowers_busy_timeout(lone_superlink):
    """A transaction holds the database's write lock for 12 s, as a full-size message's does under load
    (Flower's own busy timeout: 5 s): a Control API request waits for it, and the SuperExec, which polls
    for tasks every second, is still there afterwards."""
    d = lone_superlink
    (superexec,) = superexec_pids(d.superlink_pid())
    database = sqlite3.connect(d.root / "coordinator" / "superlink.db", isolation_level=None)
    try:
        database.execute("BEGIN IMMEDIATE")
        listing = subprocess.Popen(
            ["flwr", "ls", CONNECTION, "--format", "json"], env=d.env, stdout=subprocess.PIPE, text=True
        )
        time.sleep(12)
        database.execute("COMMIT")
    finally:
        database.close()
    output, _ = listing.communicate(timeout=120)
    assert json.loads(output[output.index("{") :])["success"], output
    time.sleep(3)
    assert is_running(superexec) and "database is locked" not in d.superlink_log()


@pytest.mark.slow
def test_a_run_that_no_superexec_starts_is_reported_and_stopped(lone_superlink, tmp_path):
    """Without its SuperExec (Flower 1.42's exits after a failed request) a SuperLink leaves new runs
    pending: ``server run`` says so after its start timeout, and stops the run."""
    d = lone_superlink
    for superexec in superexec_pids(d.superlink_pid()):
        stop(superexec)
    output, _ = d.start_run(tmp_path, "--start-timeout", "10").communicate(timeout=300)
    run_id = int(re.search(r"Run (\d+) started", output).group(1))
    assert f"run {run_id} is still pending after 10 s: the SuperLink's SuperExec" in output
    assert f"Run {run_id} was stopped" in output
    assert d.flwr("ls", CONNECTION, "--run-id", str(run_id))["runs"][0]["status"] == "finished:stopped"


# ------------------------------------------------------------------------------------------ joining
def _scripted_starts(tmp_path: Path, scripts: list[str], started: list[int]):
    """A ``start`` for start_and_join whose successive processes run ``scripts`` (sh) instead of a SuperNode."""
    remaining = iter(scripts)

    def start() -> Background:
        process = start_background(["sh", "-c", next(remaining)], tmp_path, "supernode")
        started.append(process.pid)
        return process

    return start


def test_a_refused_supernode_is_started_again_until_it_joins(tmp_path):
    """Right after a crash the SuperLink refuses the restarted node for a while: start_and_join retries."""
    started: list[int] = []
    start = _scripted_starts(
        tmp_path, [f"echo '{REFUSED}'; exit 1", f"echo '{REFUSED}'; exit 1", f"echo '{JOINED} 7'; sleep 60"], started
    )
    try:
        process, joined = start_and_join(start, timeout=60, pause=0.1)
        assert joined and len(started) == 3 and REFUSED not in process.output()
    finally:
        for pid in started:
            stop(pid)


def test_a_supernode_that_exits_for_another_reason_is_not_started_again(tmp_path):
    started: list[int] = []
    start = _scripted_starts(tmp_path, ["echo 'CERTIFICATE_VERIFY_FAILED'; exit 1", f"echo '{JOINED} 7'"], started)
    with pytest.raises(SuperNodeRefused, match="CERTIFICATE_VERIFY_FAILED"):
        start_and_join(start, timeout=60, pause=0.1)
    assert len(started) == 1


# ------------------------------------------------------------------------------------------------ audit
def test_a_site_that_cannot_write_its_audit_log_withholds_its_reply(tmp_path, task_identity):
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("")
    msg = Message(RecordDict(), dst_node_id=11, message_type=MessageType.EVALUATE)
    context = Context(
        run_id=1, node_id=11, node_config={"audit-log": str(blocked / "audit.jsonl")}, state=RecordDict(), run_config={}
    )
    reply = audit_replies(
        msg, context, lambda m, c: Message(RecordDict({"metrics": MetricRecord({"dice-mean": 0.5})}), reply_to=m)
    )
    assert reply.has_error() and not reply.has_content()
    assert str(tmp_path) not in reply.error.reason


# ------------------------------------------------------------------------------- k of n, in one process
def test_a_round_with_fewer_replies_than_min_train_sites_keeps_the_global_model(tmp_path, task_identity, caplog):
    """3 of 3 must train; site_c's node goes offline: the model stays as it was, the round is still
    evaluated everywhere, and the error is recorded for that node (not for the SuperLink that sent it)."""
    config = {
        **RUN_CONFIG,
        "num-server-rounds": 1,
        "min-train-sites": 3,
        "min-available-sites": 1,
        "output-dir": str(tmp_path),
    }
    grid = ScriptedGrid({"site_a": 0.01, "site_b": 0.02, "site_c": 0.03}, offline=("site_c",))
    federation = Federation(grid, FederationSettings.from_run_config(config))
    initial = {k: v.copy() for k, v in federation.state.items()}
    (only,) = federation.run()

    assert only["sites"]["site_c"]["errors"][0].startswith("train: Error: Node Unavailable")  # known by its query reply
    assert "round 1: 2 sites trained, fewer than min-train-sites=3; global model unchanged" in caplog.text
    assert all(np.array_equal(federation.state[k], v) for k, v in initial.items())
    evaluations = {
        m.metadata.dst_node_id: Instructions.from_config(m.content[CONFIG])
        for m in grid.sent
        if m.metadata.message_type == MessageType.EVALUATE
        and not Instructions.from_config(m.content[CONFIG]).final_evaluation  # the round's, not the end's
    }
    assert {node: e.version for node, e in evaluations.items()} == {1: 0, 2: 0, 3: 0}  # the initial model
    assert {node: e.base_version for node, e in evaluations.items()} == {
        1: 0,
        2: 0,
        3: FULL_SYNC,
    }  # the offline node's copy is unknown
    assert all("dice" in only["sites"][s] for s in ("site_a", "site_b", "site_c"))
