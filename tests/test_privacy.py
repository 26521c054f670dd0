"""Differential privacy at a site: per-patient clipping, noise, accounting across rounds and stages, budget."""

import pytest
import torch
from conftest import TINY, private_site, tiny_model
from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict
from opacus.accountants import RDPAccountant
from opacus.optimizers import DPOptimizer

from client.site import SiteRound
from fed_swinumamba.data import load_site_config
from fed_swinumamba.data.site_config import PrivacySpec
from fed_swinumamba.dp_options import RunDPOptions
from fed_swinumamba.model import ModelConfig, build_model
from fed_swinumamba.privacy import DPConfig, PrivacyLedger, per_case_gradients, privacy_spec, resolve, train_private
from fed_swinumamba.protocol import ARRAYS, CONFIG, FULL_SYNC, METRICS, Instructions
from fed_swinumamba.run_config import resolve_run_config
from fed_swinumamba.schedule import UnfreezingSchedule
from fed_swinumamba.secure_random import KeyStream, reproducible_key
from fed_swinumamba.training import segmentation_loss, set_trainable
from simulation.runner import run_federated_simulation

TINY_CONFIG = tiny_model("ct")
ALL_GROUPS = ("stem", "stage1", "stage2", "stage3", "stage4", "decoder", "heads")


class RandomCases(torch.utils.data.Dataset):
    """Cases of 2 random 32x32 slices, fixed per index."""

    def __len__(self):
        return 6

    def __getitem__(self, c):
        g = torch.Generator().manual_seed(c)
        return {
            "image": torch.randn(2, 1, 32, 32, generator=g),
            "label": torch.randint(0, 3, (2, 1, 32, 32), generator=g),
        }


def _one_hot(labels):
    from monai.networks.utils import one_hot

    return one_hot(labels.flatten(0, 1), 3).view(*labels.shape[:2], 3, *labels.shape[3:])


def _tiny_model(seed=0):
    torch.manual_seed(seed)
    return build_model(TINY_CONFIG)


def test_per_case_gradient_is_the_gradient_of_the_case_slices_together_with_ss2d_trainable():
    model = _tiny_model()
    set_trainable(model, ALL_GROUPS)  # SS2D (the selective scan) included
    cases = [RandomCases()[i] for i in range(3)]
    images, labels = torch.stack([c["image"] for c in cases]), _one_hot(torch.stack([c["label"] for c in cases]))
    loss_fn = segmentation_loss(model, one_hot_labels=True)
    grads, losses = per_case_gradients(model, "ct", loss_fn, images, labels)
    for i in range(3):
        model.zero_grad()
        loss = loss_fn(model(images[i], "ct"), labels[i])
        loss.backward()
        assert losses[i].item() == pytest.approx(loss.item(), rel=1e-5)
        scan_params = [n for n in grads if n.endswith(("self_attention.Ds", "self_attention.x_proj_weight"))]
        assert len(scan_params) == 8 and all(grads[n][i].abs().sum() > 0 for n in scan_params)  # through the scan
        for name, p in model.named_parameters():
            expected = p.grad if p.grad is not None else torch.zeros_like(p)
            assert torch.allclose(grads[name][i], expected, rtol=1e-3, atol=1e-6), name


def test_each_case_is_clipped_to_max_grad_norm_before_noise():
    """The optimiser clips one gradient per case (not per slice): the sum equals sum_i g_i * min(1, C/|g_i|)."""
    model = _tiny_model()
    params = set_trainable(model, ALL_GROUPS)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    cases = [RandomCases()[i] for i in range(4)]
    images, labels = torch.stack([c["image"] for c in cases]), _one_hot(torch.stack([c["label"] for c in cases]))
    grads, _ = per_case_gradients(model, "ct", segmentation_loss(model, one_hot_labels=True), images, labels)
    norms = torch.stack([torch.cat([grads[n][i].flatten() for n, _ in named]).norm() for i in range(4)])
    max_grad_norm = float(norms.median())  # some cases clipped, some not
    optimizer = DPOptimizer(
        torch.optim.SGD(params, lr=0.1), noise_multiplier=0.0, max_grad_norm=max_grad_norm, expected_batch_size=4
    )
    for n, p in named:
        p.grad_sample = grads[n]
    optimizer.pre_step()
    factors = (max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
    assert (norms * factors <= max_grad_norm * (1 + 1e-5)).all() and (factors < 1).any() and (factors == 1).any()
    for n, p in named:
        expected = (grads[n] * factors.view(-1, *[1] * (grads[n].dim() - 1))).sum(0) / 4
        assert torch.allclose(p.grad, expected, rtol=1e-4, atol=1e-7), n


def _dp(noise=1.0, budget=None, sample_rate=0.5):
    return DPConfig(noise, 1.0, 1e-5, sample_rate, 3, 2, budget)


def _stream(seed=0):
    return KeyStream(reproducible_key(seed))


def test_epsilon_matches_an_independent_accountant():
    ledger = PrivacyLedger()
    train_private(
        _tiny_model(),
        "ct",
        RandomCases(),
        groups=ALL_GROUPS,
        lr=1e-3,
        steps=4,
        dp=_dp(),
        ledger=ledger,
        stream=_stream(),
    )
    independent = RDPAccountant()
    for _ in range(4):
        independent.step(noise_multiplier=1.0, sample_rate=0.5)
    assert ledger.epsilon(1e-5) == pytest.approx(independent.get_epsilon(1e-5), rel=1e-12)
    assert PrivacyLedger.from_json(ledger.to_json()).epsilon(1e-5) == ledger.epsilon(1e-5)


def test_noise_for_a_target_epsilon_spends_it_over_the_planned_steps():
    spec = PrivacySpec(enabled=True, target_epsilon=4.0, max_grad_norm=0.5)
    dp = resolve(spec, num_cases=20, batch_size=8, planned_steps=lambda q: 30)
    assert dp.sample_rate == pytest.approx(4 / 20) and dp.delta == 1e-5 and dp.budget == 4.0
    ledger = PrivacyLedger()
    ledger.record(dp.noise_multiplier, dp.sample_rate, 30)
    assert 3.9 < ledger.epsilon(dp.delta) <= 4.0


def _run_dp(run_config: dict) -> RunDPOptions:
    """The DP request a coordinator with this run config sends its sites."""
    return RunDPOptions.from_run_config(resolve_run_config(run_config))


def test_run_config_switches_dp_on_for_sites_without_their_own_section():
    off = PrivacySpec()
    assert not privacy_spec(off, _run_dp({"dp-epsilon": 0.0})).enabled
    spec = privacy_spec(off, _run_dp({"dp-epsilon": 8.0, "dp-max-grad-norm": 2.0, "dp-delta": 0.0}))
    assert spec.enabled and spec.target_epsilon == 8.0 and spec.max_grad_norm == 2.0 and spec.delta is None
    own = PrivacySpec(enabled=True, noise_multiplier=1.5)
    assert privacy_spec(own, _run_dp({"dp-epsilon": 8.0})) is own
    tuned = privacy_spec(off, _run_dp({"dp-epsilon": 8.0, "dp-local-steps": 10, "dp-frozen": "stage4, up_blocks.0."}))
    assert tuned.local_steps == 10 and tuned.frozen == ("stage4", "up_blocks.0.")
    assert privacy_spec(off, _run_dp({"dp-epsilon": 8.0, "dp-local-steps": 0, "dp-frozen": ""})).local_steps is None


def _train_tiny(dp, steps):
    """The tiny network after ``steps`` DP steps on RandomCases under the fixed key: (its weights, flat; the result)."""
    model = _tiny_model()
    result = train_private(
        model,
        "ct",
        RandomCases(),
        groups=ALL_GROUPS,
        lr=1e-3,
        steps=steps,
        dp=dp,
        ledger=PrivacyLedger(),
        stream=_stream(),
    )
    return torch.cat([p.detach().flatten() for p in model.parameters()]), result


def test_dp_lr_scale_multiplies_the_step_and_comes_from_the_run_config_or_the_site():
    def first_step(lr_scale):
        before = torch.cat([p.detach().flatten() for p in _tiny_model().parameters()])
        after, _ = _train_tiny(DPConfig(1.0, 1.0, 1e-5, 0.5, 3, 2, None, lr_scale=lr_scale), steps=1)
        return after - before

    # Same key: same batch, same noise. AdamW's step (and its decoupled weight decay) is linear in the rate.
    plain, scaled = first_step(1.0), first_step(2.5)
    assert plain.abs().max() > 0
    torch.testing.assert_close(scaled, 2.5 * plain, rtol=1e-4, atol=1e-9)

    off = PrivacySpec()
    assert privacy_spec(off, _run_dp({"dp-epsilon": 8.0, "dp-lr-scale": 3.0})).lr_scale == 3.0
    assert privacy_spec(off, _run_dp({"dp-epsilon": 8.0})).lr_scale == 1.0
    assert resolve(PrivacySpec(True, 8.0, lr_scale=2.0), 100, 8, lambda q: 10).lr_scale == 2.0
    for bad in (-1.0, 0.0):  # 0 once became 1 silently
        with pytest.raises(ValueError, match="run config dp-lr-scale must be > 0"):
            _run_dp({"dp-epsilon": 8.0, "dp-lr-scale": bad})


def test_a_batch_processed_in_passes_trains_exactly_as_in_one_and_the_pass_size_stays_the_site_s():
    """Passes bound memory only: clipping is per case, so summing passes before the one noise draw
    gives the same step for any pass size (same key: same Poisson batches, same noise)."""

    def trained(cases_per_pass):
        return _train_tiny(DPConfig(1.0, 1.0, 1e-5, 0.7, 4, 2, None, cases_per_pass=cases_per_pass), steps=3)

    whole, whole_result = trained(0)
    assert whole_result.num_examples > 3  # some step's batch really is split into passes below
    for size in (1, 2):
        weights, result = trained(size)
        assert result.num_examples == whole_result.num_examples
        assert result.loss == pytest.approx(whole_result.loss, rel=1e-5)
        # float summation order only: far below one step (lr 1e-3), which a dropped or re-noised pass would move
        torch.testing.assert_close(weights, whole, rtol=0, atol=1e-5)

    site = PrivacySpec(cases_per_pass=4)
    assert privacy_spec(site, _run_dp({"dp-epsilon": 8.0})).cases_per_pass == 4
    assert resolve(PrivacySpec(True, 8.0, cases_per_pass=4), 100, 8, lambda q: 10).cases_per_pass == 4


def test_frozen_groups_and_prefixes_are_not_trained_under_dp():
    model = _tiny_model()
    frozen = ("stage4", "up_blocks.0.")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    dp = DPConfig(
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        delta=1e-5,
        sample_rate=0.5,
        cases_per_batch=3,
        slices_per_case=2,
        budget=None,
        frozen=frozen,
    )
    train_private(
        model, "ct", RandomCases(), groups=ALL_GROUPS, lr=1e-2, steps=2, dp=dp, ledger=PrivacyLedger(), stream=_stream()
    )
    for name, p in model.named_parameters():
        held = _group(name) == "stage4" or name.startswith("up_blocks.0.")
        assert torch.equal(p, before[name]) == held, name
    with pytest.raises(ValueError, match="up_block.0"):  # a typo would silently train everything
        set_trainable(model, ALL_GROUPS, ("up_block.0.",))


# ---------------------------------------------------------------- a site over several rounds


def _private_site(three_sites, tmp_path, **privacy):
    """The CT demo site with its own DP section."""
    return private_site(three_sites[0], tmp_path, **privacy)


def _round(context, server_round, stage, model_config, state):
    ins = Instructions(
        server_round,
        stage,
        model_config,
        ("organ", "lesion"),
        version=server_round - 1,
        base_version=FULL_SYNC,
        local_steps=2,
        seed=0,
    )
    content = RecordDict({ARRAYS: ArrayRecord(state), CONFIG: ConfigRecord(ins.to_config())})
    return SiteRound(content, context).train()


def test_epsilon_grows_across_rounds_and_a_stage_change_and_the_budget_stops_training(three_sites, tmp_path):
    """Noise 1.5, budget 4: the site trains while the next round fits the budget, then only says so."""
    path = _private_site(three_sites, tmp_path, noise_multiplier=1.5, target_epsilon=4.0, cases_per_batch=1)
    model_config = ModelConfig.from_dict({**TINY_CONFIG.to_dict(), "modalities": ["ct"]})
    torch.manual_seed(0)
    state = {k: v.clone() for k, v in build_model(model_config).state_dict().items()}
    schedule = UnfreezingSchedule(rounds_per_stage=2)
    context = Context(run_id=1, node_id=1, node_config={"site-config": str(path)}, state=RecordDict(), run_config={})
    num_cases = 3  # 4 phantom cases, 20 % held out
    sample_rate, delta = 1 / num_cases, min(1e-5, 1 / num_cases)

    # When must it stop? After round r the ledger holds 2r steps at (1.5, 1/3).
    def epsilon(steps):
        accountant = RDPAccountant()
        for _ in range(steps):
            accountant.step(noise_multiplier=1.5, sample_rate=sample_rate)
        return accountant.get_epsilon(delta)

    last_round = max(r for r in range(1, 9) if epsilon(2 * r) <= 4.0)
    assert 1 < last_round < 8

    epsilons = []
    for r in range(1, last_round + 2):
        stage = schedule.stage_for_round(r)
        reply = _round(context, r, stage, model_config, state)
        m = reply[METRICS]
        if r <= last_round:
            assert m["dp-budget-exhausted"] == 0 and ARRAYS in reply
            sent = set(reply[ARRAYS].keys())
            assert sent == {k for k in state if _group(k) in stage.trainable_groups}  # the stage's groups only
            for k in sent:  # apply the update, as the server would with one site
                state[k] = torch.from_numpy(reply[ARRAYS][k].numpy().copy())
            epsilons.append(m["epsilon"])
            assert m["epsilon"] == pytest.approx(epsilon(2 * r), rel=1e-9)
        else:
            assert m["dp-budget-exhausted"] == 1 and ARRAYS not in reply and m["num-examples"] == 0
            assert m["epsilon"] == pytest.approx(epsilons[-1])
    assert all(b > a for a, b in zip(epsilons, epsilons[1:]))
    # A restarted SuperNode (empty state) in another run finds the study's ledger on the site's disk: the budget stays spent.
    restarted = Context(run_id=2, node_id=1, node_config={"site-config": str(path)}, state=RecordDict(), run_config={})
    again = _round(restarted, last_round + 2, schedule.stage_for_round(last_round + 2), model_config, state)[METRICS]
    assert again["dp-budget-exhausted"] == 1 and again["epsilon"] == pytest.approx(epsilons[-1])
    assert schedule.stage_for_round(1).index != schedule.stage_for_round(3).index  # a stage change was crossed


def test_a_site_s_dp_local_steps_replace_the_run_s_and_its_frozen_layers_stay_as_sent(three_sites, tmp_path):
    path = _private_site(
        three_sites, tmp_path, noise_multiplier=1.0, cases_per_batch=1, local_steps=3, frozen="[stage4, up_blocks.0.]"
    )
    assert load_site_config(path).privacy.frozen == ("stage4", "up_blocks.0.")
    model_config = ModelConfig.from_dict({**TINY_CONFIG.to_dict(), "modalities": ["ct"]})
    torch.manual_seed(0)
    state = {k: v.clone() for k, v in build_model(model_config).state_dict().items()}
    context = Context(run_id=1, node_id=1, node_config={"site-config": str(path)}, state=RecordDict(), run_config={})
    reply = _round(
        context, 1, UnfreezingSchedule().stage_for_round(1), model_config, state
    )  # the run says 2 local steps
    assert reply[METRICS]["steps"] == 3 == reply[METRICS]["dp-steps"]
    params = dict(build_model(model_config).named_parameters())
    for k, v in reply[ARRAYS].items():
        if k not in params:
            continue
        held = _group(k) == "stage4" or k.startswith("up_blocks.0.")
        assert torch.equal(torch.from_numpy(v.numpy()), state[k]) == held, k


def _group(name):
    from fed_swinumamba.params import group_of

    return group_of(name)


@pytest.mark.slow
def test_simulation_with_dp_epsilon_reports_epsilon_per_site_per_round(three_sites, tmp_path):
    overrides = {**TINY, "num-server-rounds": 2, "rounds-per-stage": 1, "local-steps": 2, "lr": 1e-3, "dp-epsilon": 8.0}
    metrics = run_federated_simulation(three_sites, tmp_path / "run", overrides)
    previous = {}
    for rnd in metrics["rounds"]:
        assert len(rnd["sites"]) == 3
        for name, site in rnd["sites"].items():
            assert 0 < site["epsilon"] <= 8.0 and site["epsilon"] > previous.get(name, 0.0)
            # the phantom sites map no patients: each file is a patient, and the record says so
            assert (
                site["privacy"]["unit"] == "patient = one image file (the site maps no patients)"
                and site["privacy"]["budget"] == 8.0
                and site["num_examples"] == 3
            )
            assert site["privacy"]["noise_multiplier"] > 0 and "train_loss" not in site and "dice" in site
            previous[name] = site["epsilon"]
    # The noise was derived from the budget for the planned rounds: running the plan spends it.
    assert all(7.9 < epsilon <= 8.0 for epsilon in previous.values())
