"""Personalised site models: kept at the site, trained by Ditto or fine-tuned at the end, scored beside the global one."""

import dataclasses

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import private_site, tiny_model, with_test_split
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict

from client import client_app
from fed_swinumamba.__main__ import main as predict_main
from fed_swinumamba.checkpoint import Checkpoint, personal_model_file
from fed_swinumamba.data import SiteData, load_site_config
from fed_swinumamba.inference import Segmenter
from fed_swinumamba.model import build_model
from fed_swinumamba.protocol import (
    ARRAYS,
    CONFIG,
    FULL_SYNC,
    METRICS,
    TEST,
    VALIDATION,
    EvalReply,
    Instructions,
    PersonalOptions,
)
from fed_swinumamba.schedule import Stage
from fed_swinumamba.training import evaluate_cases, set_trainable, train_local

CLASSES = ("organ", "lesion")
STAGE = Stage(0, ("stem", "stage4", "decoder", "heads"), 1e-3)


def _message(kind, server_round, state, personal, final=False, study="trial", eval_split=VALIDATION):
    ins = Instructions(
        server_round,
        STAGE,
        tiny_model(),
        CLASSES,
        version=server_round - 1,
        base_version=FULL_SYNC,
        local_steps=2,
        seed=3,
        study=study,
        personal=personal,
        final_evaluation=final,
        eval_split=eval_split,
    )
    content = RecordDict({ARRAYS: ArrayRecord(state), CONFIG: ConfigRecord(ins.to_config())})
    return Message(content=content, dst_node_id=1, message_type=kind)


def _global_state(seed=0):
    torch.manual_seed(seed)
    return build_model(tiny_model()).state_dict()


def _context(site_yaml):
    return Context(run_id=1, node_id=1, node_config={"site-config": str(site_yaml)}, state=RecordDict(), run_config={})


@pytest.fixture
def replies(monkeypatch, task_identity):
    """Replies outside a running Flower node: give them the message's identity (as test_federation_e2e does)."""
    from test_federation_e2e import _reply_without_task_identity

    monkeypatch.setattr(Message, "__init__", _reply_without_task_identity(Message.__init__))


def _arrays(reply):
    return {k: a.numpy() for k, a in reply.content[ARRAYS].items()}


def test_ditto_s_pull_draws_the_trained_weights_towards_the_anchor(three_sites):
    """With a strong pull the weights end nearer the anchor than without; the anchor, not the start, is the target."""
    site = load_site_config(three_sites[0])
    data = SiteData.from_config(site, list(CLASSES))

    def distance_to_anchor(pull):
        torch.manual_seed(0)
        model = build_model(tiny_model())
        params = dict(model.named_parameters())
        anchor = {n: p.detach() + 0.05 for n, p in params.items()}  # a global model elsewhere than the start
        torch.manual_seed(1)
        train_local(
            model,
            "ct",
            data.training_batches(4, np.random.default_rng(0)),
            groups=STAGE.trainable_groups,
            lr=1e-2,
            max_steps=6,
            proximal_mu=pull,
            proximal_anchor=anchor,
        )
        trained = set_trainable(model, STAGE.trainable_groups)
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        return sum((p.detach() - anchor[n]).pow(2).sum() for n, p in zip(names, trained, strict=True)).sqrt().item()

    free, pulled = distance_to_anchor(0.0), distance_to_anchor(100.0)
    assert pulled < 0.7 * free


def sent_state(arrays):
    return {k: torch.from_numpy(v) for k, v in arrays.items()}


def test_a_ditto_site_keeps_its_personal_model_and_sends_the_same_update_as_without(three_sites, tmp_path, replies):
    ditto, none = PersonalOptions("ditto", ditto_lambda=0.5), PersonalOptions()
    state = _global_state()
    context = _context(three_sites[0])
    with_ditto = client_app.train(_message(MessageType.TRAIN, 1, state, ditto), context)
    without = client_app.train(_message(MessageType.TRAIN, 1, state, none), _context(three_sites[0]))
    sent, plain = _arrays(with_ditto), _arrays(without)
    assert set(sent) == set(plain) and all(np.array_equal(sent[k], plain[k]) for k in sent)  # global update as before

    site = load_site_config(three_sites[0])
    path = personal_model_file(site.state_dir, "trial", site.site)
    first = Checkpoint.load(path)
    assert (
        first.server_round == 1
        and first.extra["personalization"] == "ditto"
        and first.model_config.modalities == ("ct",)
    )
    moved = [k for k in sent if not np.array_equal(first.state[k].numpy(), state[k].numpy())]
    assert moved and any(not np.array_equal(first.state[k].numpy(), sent[k]) for k in moved)  # its own weights

    scores = client_app.evaluate(_message(MessageType.EVALUATE, 1, {**state, **sent_state(sent)}, ditto), context)
    reply = EvalReply.from_metrics(scores.content[METRICS], CLASSES)
    data = SiteData.from_config(site, list(CLASSES))
    own = evaluate_cases(first.build_model(), "ct", data.val_cases, CLASSES, site.training.patch_size)
    assert reply.personal is not None and reply.personal.cases_scored == reply.cases_scored == own.num_cases
    assert reply.personal.dice == pytest.approx(own.dice, nan_ok=True)  # the scores are of the kept model

    # Round 2 continues round 1's personal model (another ClientApp process: only the disk carries it).
    client_app.train(_message(MessageType.TRAIN, 2, state, ditto), _context(three_sites[0]))
    continued = Checkpoint.load(path).state
    path.unlink()
    client_app.train(_message(MessageType.TRAIN, 2, state, ditto), _context(three_sites[0]))
    afresh = Checkpoint.load(path).state  # no round-1 model on disk: started from the global one
    assert any(not torch.equal(continued[k], afresh[k]) for k in continued)

    # The personal checkpoint is self-describing: predict uses it (its weights) as it uses the federation's.
    image = next(p for p in sorted((site.data.root / "imagesTr").iterdir()) if p.name.endswith(".nii.gz"))
    out = tmp_path / "mask.nii.gz"
    args = ["predict", "--checkpoint", str(path), "--modality", "ct", "--input", str(image), "--output", str(out)]
    assert predict_main([*args, "--site-config", str(three_sites[0])]) == 0
    assert nib.load(out).shape == nib.load(image).shape
    segmenter = Segmenter.from_files(path, "ct", three_sites[0])
    assert all(torch.equal(v, afresh[k]) for k, v in segmenter.network.state_dict().items())


def test_finetune_personalises_at_the_final_evaluation_only(three_sites, replies):
    finetune = PersonalOptions("finetune", finetune_steps=3)
    state = _global_state()
    site = load_site_config(three_sites[1])
    path = personal_model_file(site.state_dir, "trial", site.site)
    early = client_app.evaluate(_message(MessageType.EVALUATE, 1, state, finetune), _context(three_sites[1]))
    assert EvalReply.from_metrics(early.content[METRICS], CLASSES).personal is None and not path.exists()
    final = client_app.evaluate(
        _message(MessageType.EVALUATE, 2, state, finetune, final=True), _context(three_sites[1])
    )
    reply = EvalReply.from_metrics(final.content[METRICS], CLASSES)
    assert reply.personal is not None
    tuned = Checkpoint.load(path)
    assert tuned.extra["personalization"] == "finetune" and tuned.server_round == 2
    assert any(not torch.equal(tuned.state[k], state[k]) for k in state if k in tuned.state)


@pytest.mark.parametrize("method", ["finetune", "ditto"])
@pytest.mark.parametrize("validation_prefers", ["global", "personal"])
def test_at_the_end_a_site_keeps_whichever_model_scores_better_on_its_validation_cases(
    three_sites, tmp_path, replies, monkeypatch, validation_prefers, method
):
    """The choice is made on the validation cases only: here the test cases would always prefer the
    personal model, yet a site whose validation cases prefer the global model keeps that one (on disk
    too) and reports its test scores as those of its personal model; asked again for the same final
    evaluation (a resumed coordinator), it reports the same."""
    import client.site

    site_yaml = with_test_split(three_sites[0], tmp_path)
    site = load_site_config(site_yaml)
    validation = {c.case_id for c in SiteData.from_config(site, list(CLASSES)).val_cases}
    state = _global_state()
    scripted_dice = {
        ("global", "validation"): 0.9 if validation_prefers == "global" else 0.5,
        ("personal", "validation"): 0.5 if validation_prefers == "global" else 0.9,
        ("global", "test"): 0.3,
        ("personal", "test"): 0.8,
    }
    real = client.site.evaluate_cases

    def scripted(model, modality, cases, class_names, *args):
        result = real(model, modality, cases, class_names, *args)
        which = "global" if all(torch.equal(v, state[k]) for k, v in model.state_dict().items()) else "personal"
        split = "validation" if {c.case_id for c in cases} <= validation else "test"
        return _scripted(result, scripted_dice[which, split])

    monkeypatch.setattr(client.site, "evaluate_cases", scripted)
    # two candidates, as Ditto has; any gain counts (the margin has a test of its own)
    personal = PersonalOptions(method, finetune_steps=3, finetune_checks=1, choice_margin=0)
    if method == "ditto":  # its personal model of round 2
        client_app.train(_message(MessageType.TRAIN, 2, state, personal), _context(site_yaml))
    message = _message(MessageType.EVALUATE, 2, state, personal, final=True, eval_split=TEST)
    reply = EvalReply.from_metrics(client_app.evaluate(message, _context(site_yaml)).content[METRICS], CLASSES)
    again = EvalReply.from_metrics(client_app.evaluate(message, _context(site_yaml)).content[METRICS], CLASSES)
    assert (again.personal.kept_global, again.personal.dice) == (reply.personal.kept_global, reply.personal.dice)
    assert reply.split == TEST and reply.selection_cases == 2 and reply.dice_mean == pytest.approx(0.3)  # 2 models
    kept = Checkpoint.load(personal_model_file(site.state_dir, "trial", site.site))
    kept_global = all(torch.equal(v, state[k]) for k, v in kept.state.items())
    assert reply.personal.kept_global == kept_global == (validation_prefers == "global")
    assert reply.personal.dice_mean == pytest.approx(0.3 if kept_global else 0.8)  # the kept model's test scores
    assert kept.extra.get("kept") == ("global" if kept_global else None)


def _scripted(result, dice, case_dice=None):
    """``result`` with every class scoring ``dice``, and its cases ``case_dice`` (each ``dice`` when None)."""
    case_dice = (dice,) * result.num_cases if case_dice is None else tuple(case_dice)
    return dataclasses.replace(result, dice=dict.fromkeys(result.dice, dice), case_dice=case_dice)


@pytest.fixture
def fine_tuned_with(three_sites, tmp_path, replies, monkeypatch):
    """Fine-tunes the global model at the final evaluation of a site with a test split, its validation scores
    scripted: each model's per-case Dice in the order the site asks for them (the global model's first).
    Gives the reply and the personal checkpoint the site keeps."""
    import client.site

    site_yaml = with_test_split(three_sites[0], tmp_path)
    site = load_site_config(site_yaml)
    validation = {c.case_id for c in SiteData.from_config(site, list(CLASSES)).val_cases}
    real = client.site.evaluate_cases

    def kept_after(personal, validation_case_dice):
        scripted = iter(validation_case_dice)

        def evaluate(model, modality, cases, class_names, *args):
            result = real(model, modality, cases, class_names, *args)
            if {c.case_id for c in cases} <= validation:
                per_case = next(scripted)
                result = _scripted(result, sum(per_case) / len(per_case), per_case)
            return result

        monkeypatch.setattr(client.site, "evaluate_cases", evaluate)
        message = _message(MessageType.EVALUATE, 2, _global_state(), personal, final=True, eval_split=TEST)
        reply = EvalReply.from_metrics(client_app.evaluate(message, _context(site_yaml)).content[METRICS], CLASSES)
        return reply, Checkpoint.load(personal_model_file(site.state_dir, "trial", site.site))

    kept_after.personal_dir = personal_model_file(site.state_dir, "trial", site.site).parent
    kept_after.site = site.site
    return kept_after


def test_fine_tuning_keeps_the_check_its_validation_cases_prefer(fine_tuned_with):
    """Scored on the validation cases before fine-tuning and after each of 3 parts of 6 steps, the site keeps
    the model its validation cases prefer (after 4 steps here): the same weights as 4 steps of that
    fine-tuning, its step and the scores in the checkpoint; 1 validation case x 4 models to choose."""
    any_gain = PersonalOptions("finetune", finetune_steps=6, finetune_checks=3, choice_margin=0)
    reply, kept = fine_tuned_with(any_gain, [[0.5], [0.6], [0.9], [0.7]])
    assert kept.extra["finetune_steps"] == 4 and "kept" not in kept.extra
    assert kept.extra["validation_dice"] == {"0": 0.5, "2": 0.6, "4": 0.9, "6": 0.7}
    assert reply.selection_cases == 4 and not reply.personal.kept_global
    four = PersonalOptions("finetune", finetune_steps=4, finetune_checks=1, choice_margin=0)
    _, four_steps = fine_tuned_with(four, [[0.5], [0.9]])
    assert all(torch.equal(v, four_steps.state[k]) for k, v in kept.state.items())
    state = _global_state()
    assert any(not torch.equal(v, state[k]) for k, v in kept.state.items())

    reply, kept = fine_tuned_with(any_gain, [[0.9], [0.6], [0.8], [0.7]])
    assert kept.extra["kept"] == "global" and kept.extra["finetune_steps"] == 0 and reply.personal.kept_global
    assert all(torch.equal(v, state[k]) for k, v in kept.state.items())
    # no candidate left behind
    assert [p.name for p in fine_tuned_with.personal_dir.iterdir()] == [f"{fine_tuned_with.site}.safetensors"]


def test_a_fine_tuned_model_is_kept_only_for_a_gain_beyond_the_noise_of_the_validation_cases(fine_tuned_with):
    """Four validation cases, the global model's scores, then the checks after 2, 4 and 6 steps. Per-case
    gains over the global model, by hand: after 2 steps (+0.1, -0.1, +0.1, 0): mean 0.025, standard error
    0.048; after 4 (+0.02 each): 0.02, 0; after 6 (+0.2, 0, 0, 0): 0.05, 0.05. Any gain at all keeps the
    largest (6 steps); two standard errors keep the one every case agrees on (4 steps); when no check's
    gain is beyond two standard errors, the global model stays."""
    common = [0.80, 0.90, 0.70, 0.85]
    noisy, steady, lucky = [0.90, 0.80, 0.80, 0.85], [0.82, 0.92, 0.72, 0.87], [1.0, 0.90, 0.70, 0.85]
    options = PersonalOptions("finetune", finetune_steps=6, finetune_checks=3, choice_margin=2)

    _, kept = fine_tuned_with(dataclasses.replace(options, choice_margin=0), [common, noisy, steady, lucky])
    assert kept.extra["finetune_steps"] == 6
    reply, kept = fine_tuned_with(options, [common, noisy, steady, lucky])
    assert kept.extra["finetune_steps"] == 4 and not reply.personal.kept_global
    gains = kept.extra["validation_gain"]
    assert gains["4"]["mean"] == pytest.approx(0.02) and gains["4"]["standard_error"] == pytest.approx(0, abs=1e-9)
    assert gains["2"]["standard_error"] == pytest.approx(0.0479, abs=1e-4) and gains["6"]["cases"] == 4
    reply, kept = fine_tuned_with(options, [common, noisy, common, lucky])
    assert kept.extra["kept"] == "global" and reply.personal.kept_global


def test_fewer_fine_tuning_steps_than_checks_score_each_step_once():
    few = PersonalOptions("finetune", finetune_steps=3, finetune_checks=8)
    assert few.check_steps == (1, 2, 3) and few.candidates == 4  # the global model and three checks
    default = PersonalOptions("finetune")
    assert default.check_steps == (10, 20, 30, 40, 50, 60, 70, 80) and default.candidates == 9
    assert PersonalOptions("ditto").candidates == 2 and PersonalOptions().candidates == 0


def test_a_dp_site_keeps_its_personal_model_s_scores_to_itself(three_sites, tmp_path, replies):
    """Its personal model is trained on private patients without noise: not even its Dice leaves."""
    dp_yaml = private_site(three_sites[2], tmp_path / "dp", noise_multiplier=1.0, slices_per_case=1)
    ditto = PersonalOptions("ditto")
    state = _global_state()
    context = _context(dp_yaml)
    trained = client_app.train(_message(MessageType.TRAIN, 1, state, ditto), context)
    assert "epsilon" in trained.content[METRICS]
    scores = client_app.evaluate(_message(MessageType.EVALUATE, 1, state, ditto), context)
    assert not any(k.startswith("personal-") for k in scores.content[METRICS].keys())
    site = load_site_config(dp_yaml)
    assert personal_model_file(site.state_dir, "trial", site.site).is_file()  # it has one, kept at home


def test_ditto_s_update_is_the_hand_computed_proximal_step():
    """One AdamW step (its first: m/sqrt(v) = g/|g|) on loss + lambda/2 ||v - w||^2: the gradient is the
    loss's plus lambda (v - w), computed here from the loss's own gradient and the anchor."""
    from fed_swinumamba.training import segmentation_loss

    torch.manual_seed(0)
    model = build_model(tiny_model())
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    anchor = {n: v + torch.randn_like(v) * 0.01 for n, v in start.items()}
    batch = {"image": torch.randn(2, 1, 32, 32), "label": torch.randint(0, 3, (2, 1, 32, 32))}
    lr, pull, wd, eps = 1e-3, 3.0, 1e-5, 1e-8

    reference = build_model(tiny_model())
    reference.load_state_dict(model.state_dict())
    set_trainable(reference, ("heads",))
    trained = {n for n, p in reference.named_parameters() if p.requires_grad}
    segmentation_loss(reference)(reference(batch["image"], "ct"), batch["label"]).backward()
    train_local(model, "ct", [batch], groups=("heads",), lr=lr, max_steps=1, proximal_mu=pull, proximal_anchor=anchor)

    for name, p in model.named_parameters():
        if name not in trained:
            assert torch.equal(p.detach(), start[name]), name  # outside the stage: untouched
            continue
        loss_grad = dict(reference.named_parameters())[name].grad  # None: a head the loss does not use
        g = (0 if loss_grad is None else loss_grad) + pull * (start[name] - anchor[name])
        expected = start[name] * (1 - lr * wd) - lr * g / (g.abs() + eps)
        torch.testing.assert_close(p.detach(), expected, rtol=1e-5, atol=1e-7)


def test_no_reply_of_a_ditto_site_carries_its_personal_model(three_sites, replies):
    """Audit of every reply of two rounds: weights named after the network and scalars only, and none of
    the personal model's tensors among the weights."""
    from conftest import assert_only_weights_and_scalars

    from client.audit import describe

    ditto = PersonalOptions("ditto", ditto_lambda=0.5)
    site = load_site_config(three_sites[0])
    path = personal_model_file(site.state_dir, "trial", site.site)
    state, context = _global_state(), _context(three_sites[0])
    for server_round in (1, 2):
        for kind in (MessageType.TRAIN, MessageType.EVALUATE):
            msg = _message(kind, server_round, state, ditto)
            content = (client_app.train if kind == MessageType.TRAIN else client_app.evaluate)(msg, context).content
            assert_only_weights_and_scalars(describe(content), set(state), {"site": site.site, "modality": "ct"})
            personal = Checkpoint.load(path).state
            own = {k for k in personal if not torch.equal(personal[k], state[k])}
            assert own  # the personal model has weights of its own...
            sent = content["arrays"] if "arrays" in content else {}
            assert not any(
                np.array_equal(sent[k].numpy(), personal[k].numpy()) for k in own if k in sent
            )  # ...never sent
