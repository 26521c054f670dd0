"""Compressed model changes: the int8 error bound, top-k, error feedback, packets that do not fit, the site's
residual on disk, and the coordinator's side (aggregation of what it decodes, drift of the nodes' copies,
full resyncs, bytes, site-level DP's clip)."""

import math

import numpy as np
import pytest
from conftest import TINY, ScriptedGrid, private_site

from fed_swinumamba.checkpoint import residual_file
from fed_swinumamba.compression import (
    CompressionError,
    CompressionOptions,
    Packet,
    compress,
    decompress,
    load_residual,
    save_residual,
    with_error_feedback,
)
from fed_swinumamba.data import load_site_config
from fed_swinumamba.params import group_of, select, site_view
from fed_swinumamba.protocol import ARRAYS, COMPRESSED, CONFIG, FULL_SYNC, Instructions
from server.federation import Federation
from server.settings import FederationSettings
from simulation.runner import run_federated_simulation

INT8 = CompressionOptions("int8", block=64)
TOPK = CompressionOptions("int8+topk", block=64, topk=0.1)


def _of_modality(state, modality):
    """What a site of ``modality`` holds of the coordinator's weights."""
    return site_view(select(state, modalities=[modality]), modality)


def _shapes(changes):
    return {k: v.shape for k, v in changes.items()}


def test_int8_error_is_at_most_half_the_scale_of_the_tensors_own_block():
    rng = np.random.default_rng(0)
    # A tiny-valued tensor beside a large one: blocks never span tensors, so the small one keeps its precision.
    changes = {
        "big": rng.normal(0, 10, (7, 30)).astype(np.float32),
        "small": rng.normal(0, 1e-4, 100).astype(np.float32),
    }
    packet = compress(changes, INT8)
    decoded = decompress(packet, _shapes(changes), INT8.block)
    for name, x in changes.items():
        flat = x.reshape(-1)
        bound = np.repeat([np.abs(flat[i : i + 64]).max() / 127 / 2 for i in range(0, flat.size, 64)], 64)[: flat.size]
        error = np.abs(decoded[name].reshape(-1) - flat)
        assert np.all(error <= bound * (1 + 1e-5) + 1e-12), name
        assert error.max() < 1e-2 * np.abs(flat).max()  # 8 bits: a few parts in a thousand of the block's largest
    assert packet.values.dtype == np.int8 and packet.values.size == 210 + 100
    assert packet.scales.size == math.ceil(210 / 64) + math.ceil(100 / 64)


def test_top_k_sends_exactly_the_largest_elements_of_each_tensor():
    rng = np.random.default_rng(1)
    changes = {"a": rng.normal(size=(20, 10)).astype(np.float32), "b": rng.normal(size=37).astype(np.float32)}
    packet = compress(changes, TOPK)
    decoded = decompress(packet, _shapes(changes), TOPK.block)
    for name, x in changes.items():
        k = math.ceil(0.1 * x.size)
        largest = set(np.argsort(-np.abs(x.reshape(-1)))[:k])
        assert set(np.flatnonzero(decoded[name])) == largest, name
    assert packet.values.size == 20 + 4
    assert packet.mask.size == math.ceil((200 + 37) / 8)  # one bit per element


def test_error_feedback_makes_the_sum_sent_track_the_sum_of_true_changes():
    """Over 40 rounds of drifting changes: what was sent plus the last residual is what should have been
    sent, so the tracking error is one residual; without feedback top-k's error grows with the rounds."""
    rng = np.random.default_rng(2)
    for options in (INT8, TOPK):
        residual, sent_sum, true_sum, plain_sum = {}, 0.0, 0.0, 0.0
        for _ in range(40):
            changes = {"w": rng.normal(0.1, 1.0, (32, 50)).astype(np.float32)}
            packet, residual = with_error_feedback(changes, residual, options)
            sent_sum = sent_sum + decompress(packet, _shapes(changes), options.block)["w"]
            plain_sum = plain_sum + decompress(compress(changes, options), _shapes(changes), options.block)["w"]
            true_sum = true_sum + changes["w"]
        np.testing.assert_allclose(sent_sum + residual["w"], true_sum, atol=1e-3)
        one_change = np.linalg.norm(changes["w"])
        assert np.linalg.norm(sent_sum - true_sum) < 2 * one_change, options.method
        if options.sparse:
            assert np.linalg.norm(plain_sum - true_sum) > 3 * one_change  # what error feedback prevents
        else:
            assert np.abs(residual["w"]).max() <= np.abs(changes["w"]).max() / 127  # one quantisation step


def test_a_residual_for_another_tensor_shape_or_a_new_tensor_is_zero():
    changes = {"old": np.ones(10, np.float32), "new": np.ones(5, np.float32)}
    packet, residual = with_error_feedback(changes, {"old": np.full(10, 0.5, np.float32), "gone": np.ones(3)}, INT8)
    decoded = decompress(packet, _shapes(changes), INT8.block)
    np.testing.assert_allclose(decoded["old"], 1.5, rtol=1e-2)
    np.testing.assert_allclose(decoded["new"], 1.0, rtol=1e-2)
    assert set(residual) == {"old", "new"}


@pytest.mark.parametrize(
    "break_it, message",
    [
        (lambda p: Packet(p.names, p.values[:-1], p.scales, p.mask), "does not fit"),
        (lambda p: Packet(p.names, p.values, p.scales, p.mask[:-1]), "mask"),
        (lambda p: Packet(("a", "unknown"), p.values, p.scales, p.mask), "does not hold"),
    ],
)
def test_a_packet_that_does_not_fit_the_receivers_tensors_is_refused(break_it, message):
    changes = {"a": np.ones((9, 9), np.float32)}
    with pytest.raises(CompressionError, match=message):
        decompress(break_it(compress(changes, TOPK)), _shapes(changes), TOPK.block)
    with pytest.raises(CompressionError, match="does not fit"):
        decompress(compress(changes, INT8), {"a": (9, 10)}, INT8.block)  # another shape


def test_a_site_keeps_its_residual_across_restarts_for_the_run_going_on_only(tmp_path, caplog):
    path = tmp_path / "compression" / "study" / "site.safetensors"
    residual = {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}
    save_residual(path, residual, server_round=3)
    np.testing.assert_array_equal(load_residual(path, 4)["w"], residual["w"])  # the next round, a new process
    assert load_residual(path, 3) == {}  # not from its own round or a later one
    assert load_residual(path, 1) == {}  # a new run starts from zero
    path.with_suffix(".safetensors.tmp").write_bytes(b"killed mid-write")
    np.testing.assert_array_equal(load_residual(path, 4)["w"], residual["w"])  # the last complete one
    path.write_bytes(b"not a safetensors file")
    assert load_residual(path, 4) == {}
    assert "unreadable" in caplog.text


# ------------------------------------------------------------------------------------------ the coordinator
STEPS = {"ct_a": 0.01, "ct_b": 0.02, "mri_a": 0.03}
MODALITIES = {"ct_a": "ct", "ct_b": "ct", "mri_a": "mri"}
PATIENTS = {"ct_a": 10, "ct_b": 30, "mri_a": 20}


def _federation(tmp_path, rounds, grid=None, **overrides):
    config = {
        **TINY,
        "output-dir": str(tmp_path),
        "cross-site-eval": False,
        "max-update-norm-ratio": 0,
        "modalities": "ct,mri",
        "num-server-rounds": rounds,
        "compression": "int8",
        "compression-block": 64,
        "seed": 5,
        **overrides,
    }
    grid = grid or ScriptedGrid(STEPS, num_examples=PATIENTS, modalities=MODALITIES)
    return Federation(grid, FederationSettings.from_run_config(config)), grid


pytestmark = pytest.mark.usefixtures("task_identity")


def test_the_coordinator_aggregates_the_changes_it_decodes(tmp_path):
    federation, grid = _federation(tmp_path / "run", 1)
    initial = {k: v.copy() for k, v in federation.state.items()}
    federation.run()
    decoded = {}
    for reply in grid.replies:
        site = grid.nodes[reply.metadata.src_node_id]
        packet = Packet.from_arrays(
            reply.content[COMPRESSED]["names"], {k: a.numpy() for k, a in reply.content[ARRAYS].items()}
        )
        decoded[site] = decompress(packet, {k: v.shape for k, v in initial.items()}, 64)
    name = next(k for k in decoded["ct_a"] if group_of(k) == "decoder")
    expected = sum(PATIENTS[s] * decoded[s][name] for s in decoded) / sum(PATIENTS.values())
    np.testing.assert_allclose(federation.state[name] - initial[name], expected, atol=1e-7)
    # and that is the patient-weighted mean step, within the int8 error of each site's step
    np.testing.assert_allclose(expected, (10 * 0.01 + 30 * 0.02 + 20 * 0.03) / 60, atol=0.03 / 254)


@pytest.mark.parametrize("strategy", ["fedmedian", "fedadam"])
def test_every_rule_aggregates_decoded_changes_as_it_would_plain_weights(tmp_path, strategy):
    plain, _ = _federation(tmp_path / "plain", 2, compression="none", strategy=strategy)
    packed, _ = _federation(tmp_path / "packed", 2, compression="int8", strategy=strategy)
    plain.run()
    packed.run()
    for name in plain.state:  # a site's step is the same for every weight: int8 holds it to float rounding
        np.testing.assert_allclose(packed.state[name], plain.state[name], atol=1e-5, err_msg=name)
    assert any(not np.array_equal(packed.state[k], plain.state[k]) for k in plain.state)


def test_nodes_copies_drift_by_at_most_a_quantisation_step_and_the_final_evaluation_resyncs(tmp_path):
    federation, grid = _federation(tmp_path / "run", 3, **{"rounds-per-stage": 1, "compression-resync": 0})
    federation.run()
    for r in (2, 3):  # the copy a site trains from in round r, against the global model after round r - 1
        before, _ = _federation(tmp_path / f"to{r - 1}", r - 1, **{"rounds-per-stage": 1, "compression-resync": 0})
        before.run()
        for site, modality in MODALITIES.items():
            exact = _of_modality(before.state, modality)
            held = grid.held_at_train[(r, site)]
            drift = max(float(np.abs(held[k] - exact[k]).max()) for k in held)
            assert 0 < drift <= 2 * 0.03 / 254, (r, site, drift)  # changes of two rounds at most 0.06 apart
    # The final evaluation brings every node the exact global model, and the coordinator knows what it holds.
    for node, site in grid.nodes.items():
        exact = _of_modality(federation.state, MODALITIES[site])
        assert all(np.array_equal(grid.held[site][k], exact[k]) for k in grid.held[site])
        assert all(np.array_equal(federation.strategy.held[node][k], exact[k]) for k in exact)


def test_a_node_that_failed_or_is_due_a_resync_gets_the_exact_model(tmp_path):
    federation, grid = _federation(tmp_path / "run", 3, **{"compression-resync": 2})
    federation.run()
    train = [m for m in grid.sent if m.metadata.message_type == "train"]
    by_round = {(Instructions.from_config(m.content[CONFIG]).server_round, m.metadata.dst_node_id): m for m in train}
    assert COMPRESSED not in by_round[(1, 1)].content  # first contact: everything, exact
    assert COMPRESSED in by_round[(2, 1)].content
    assert Instructions.from_config(by_round[(3, 1)].content[CONFIG]).base_version == FULL_SYNC  # resync due
    strategy = federation.strategy
    strategy._failed(1, 3, "train", "gone")  # a node that failed: whatever it holds is unknown
    assert 1 not in strategy.held
    strategy.links[1].modality = "ct"  # it answers the query again
    payload = strategy._payload(1, 4)
    assert payload.base_version == FULL_SYNC and payload.names is None
    assert set(payload.arrays) == set(_of_modality(federation.state, "ct"))
    other = strategy._payload(2, 4)  # a node in sync gets a packet (nothing changed since: empty)
    assert other.names == () and other.base_version == strategy.links[2].version


def test_a_resumed_run_resyncs_every_node_first(tmp_path):
    """The resumed coordinator knows no node's copy (a new run's nodes hold none): exact copies first,
    then the run goes on as the uninterrupted one (the sites keep their residuals on their disks)."""
    whole, _ = _federation(tmp_path / "whole", 3)
    whole.run()
    grid = ScriptedGrid(STEPS, num_examples=PATIENTS, modalities=MODALITIES)
    _federation(tmp_path / "cut", 2, grid)[0].run()
    grid.sent.clear()
    resumed, _ = _federation(tmp_path / "cut", 3, grid, resume=True)
    resumed.run()
    first = [m for m in grid.sent if m.metadata.message_type == "train"]
    assert len(first) == 3 and all(COMPRESSED not in m.content for m in first)
    assert all(Instructions.from_config(m.content[CONFIG]).base_version == FULL_SYNC for m in first)
    later = [m for m in grid.sent if m.metadata.message_type == "evaluate" and ARRAYS in m.content]
    assert any(COMPRESSED in m.content for m in later)  # the round's evaluation: a packet again
    for name in whole.state:
        np.testing.assert_allclose(resumed.state[name], whole.state[name], atol=1e-5, err_msg=name)


def test_bytes_recorded_are_the_bytes_of_the_arrays_sent_and_about_a_quarter_of_float32(tmp_path):
    federation, grid = _federation(tmp_path / "run", 3)
    federation.run()
    nbytes = lambda record: sum(len(a.data) for a in record.values())  # noqa: E731
    round2 = federation.history[1]["sites"]
    for node, site in grid.nodes.items():
        down = [
            m
            for m in grid.sent
            if m.metadata.dst_node_id == node
            and ARRAYS in m.content
            and Instructions.from_config(m.content[CONFIG]).server_round == 2
        ]
        assert round2[site]["bytes_down"] == sum(nbytes(m.content[ARRAYS]) for m in down)
        up = [r for r in grid.replies if r.metadata.src_node_id == node][1]
        assert round2[site]["bytes_up"] == nbytes(up.content[ARRAYS])
        trained = grid.held_at_train[(2, site)]
        fp32 = sum(
            4 * v.size
            for k, v in trained.items()
            if group_of(k) in federation.s.schedule.stage_for_round(2).trainable_groups
        )
        assert round2[site]["bytes_up_uncompressed"] == fp32
        assert round2[site]["bytes_up"] < 0.27 * fp32


def test_under_site_level_dp_the_coordinator_clips_the_changes_it_decodes(tmp_path):
    """Error feedback may push what a site sends past the clip norm: the coordinator clips again."""
    grid = ScriptedGrid({"a": 1.0, "b": 1.0}, modalities={"a": "ct", "b": "ct"})
    federation, _ = _federation(
        tmp_path / "run",
        1,
        grid,
        modalities="ct",
        **{"site-dp-noise-multiplier": 1e-9, "site-dp-clipping-norm": 0.5},
    )
    initial = {k: v.copy() for k, v in federation.state.items()}
    federation.run()
    moved = np.sqrt(sum(float(np.square(federation.state[k] - initial[k]).sum()) for k in initial))
    assert 0.49 < moved <= 0.5 * (1 + 1e-4)  # each site's step of 1.0 per weight, clipped to 0.5, averaged


@pytest.mark.slow
def test_real_sites_send_and_apply_packets_and_keep_their_residual_on_disk(three_sites, tmp_path):
    """Through the simulation, one site under DP-SGD: sites decode the coordinator's packets (int8, dense) and
    send theirs (about 6 % of the float32 update with top-k 0.1), the run trains as usual, and each site's
    residual is on its disk."""
    sites = [private_site(three_sites[0], tmp_path / "dp", noise_multiplier=1.0, cases_per_batch=1), *three_sites[1:]]
    overrides = {**TINY, "num-server-rounds": 2, "rounds-per-stage": 1, "local-steps": 2, "lr": 1e-3}
    overrides |= {"compression": "int8+topk", "compression-topk": 0.1, "cross-site-eval": False, "study": "packets"}
    metrics = run_federated_simulation(sites, tmp_path / "run", overrides)
    for rnd in metrics["rounds"]:
        for site, entry in rnd["sites"].items():
            assert "errors" not in entry and 0.0 <= entry["dice_mean"] <= 1.0, site
            assert entry["bytes_up"] < 0.07 * entry["bytes_up_uncompressed"]
        assert rnd["sites"]["ct_site"]["epsilon"] > 0  # the DP site trained under its guarantee
    second = metrics["rounds"][1]["sites"]
    assert all(s["bytes_down"] < 0.27 * s["bytes_down_uncompressed"] for s in second.values())  # int8, dense
    for yaml_path in sites:
        config = load_site_config(yaml_path)
        path = residual_file(config.state_dir, "packets", config.site)
        residual = load_residual(path, 3)  # kept at round 2, for a round 3 that would follow
        assert residual and all(np.isfinite(v).all() for v in residual.values())
        assert any(np.abs(v).max() > 0 for v in residual.values())  # what top-k left out
