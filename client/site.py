"""A hospital's side of a round: sync the global model, train the stage's groups, evaluate.

The ClientApp process is short-lived (Flower starts one per message), so everything that must
outlive a message sits in ``context.state``: the site's copy of the global model and its version.
What must outlive the run sits in the site's ``state_dir``: the privacy ledger of each study, the
site's personal model of each study (run config ``personalization``), which never leaves it, and what
its compressed updates left out (run config ``compression``).
Patient data stays here; what goes back is weights and scalar metrics only.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, MetricRecord, RecordDict

from fed_swinumamba.checkpoint import Checkpoint, personal_model_file, residual_file
from fed_swinumamba.compression import (
    CompressionError,
    Packet,
    decompress,
    load_residual,
    save_residual,
    with_error_feedback,
)
from fed_swinumamba.data import SiteData, load_site_config
from fed_swinumamba.data.site_config import PrivacySpec, SiteConfig
from fed_swinumamba.flower_internals import compute_clip_model_update
from fed_swinumamba.logs import NOT_PRIVATE, prefixed
from fed_swinumamba.metrics import PairedGain, paired_gain
from fed_swinumamba.model import build_model
from fed_swinumamba.params import select
from fed_swinumamba.privacy import (
    dp_record,
    ledger_file,
    privacy_spec,
    resolve,
    steps_per_round,
    study_ledger,
    train_private,
)
from fed_swinumamba.protocol import (
    ARRAYS,
    COMPRESSED,
    CONFIG,
    FULL_SYNC,
    METRICS,
    SITE,
    TEST,
    Instructions,
    TrainReply,
)
from fed_swinumamba.secure_random import KeyStream, reproducible_key, secure_key
from fed_swinumamba.training import EvalResult, TrainResult, evaluate_cases, round_seed, train_local

log = logging.getLogger("fed_swinumamba.client")

GLOBAL_WEIGHTS, GLOBAL_VERSION = "global-weights", "global-version"


def clip_update(trained: ArrayRecord, start: ArrayRecord, clipping_norm: float) -> ArrayRecord:
    """``trained`` moved back towards ``start`` so that the update's L2 norm is at most ``clipping_norm``.

    Site-level DP (server/site_dp.py): what Flower's ``fixedclipping_mod`` does, on the weights the
    site trained (the mod needs the reply to carry exactly the weights the message brought).
    """
    names = list(trained.keys())
    weights = [trained[k].numpy() for k in names]
    compute_clip_model_update(weights, [start[k].numpy() for k in names], clipping_norm)
    return ArrayRecord({k: Array(np.ascontiguousarray(w)) for k, w in zip(names, weights, strict=True)})


class SiteError(RuntimeError):
    """A failure at a site, worded for the coordinator's log (site and file, never patient data)."""


def site_config_path(context: Context) -> Path:
    """The site's YAML, from the SuperNode's node config ``site-config``.

    A virtual node of Flower's simulation engine (``flwr run .``) has none; it plays the built-in demo
    site of its partition id, generated once in the user's data folder (a site's own setting, never
    the coordinator's).
    """
    if "site-config" in context.node_config:
        return Path(str(context.node_config["site-config"])).expanduser()
    if "partition-id" in context.node_config:
        from fed_swinumamba.simulated.demo import default_demo_root, demo_site  # only a simulated node gets here

        return demo_site(default_demo_root(), int(context.node_config["partition-id"]))
    raise SiteError(
        "this node has no site config: start the SuperNode with --node-config \"site-config='/path/to/site.yaml'\""
    )


def with_node_cache_dir(config: SiteConfig, context: Context) -> SiteConfig:
    """The site config, its cache folder overridden by the SuperNode's node config ``cache-dir`` if given."""
    if "cache-dir" not in context.node_config:
        return config
    cache_dir = Path(str(context.node_config["cache-dir"])).expanduser()
    return dataclasses.replace(config, training=dataclasses.replace(config.training, cache_dir=cache_dir))


def site_identity(config: SiteConfig) -> ConfigRecord:
    return ConfigRecord({"site": config.site, "modality": config.modality})


def identify(context: Context) -> RecordDict:
    """The answer to the coordinator's query: which site and modality this node is, and nothing else."""
    return RecordDict({SITE: site_identity(load_site_config(site_config_path(context)))})


class SiteRound:
    """One message's worth of work at a site."""

    def __init__(self, content: RecordDict, context: Context):
        self.started = time.perf_counter()
        self.first_batch_s = float("nan")
        self.context = context
        self.config = with_node_cache_dir(load_site_config(site_config_path(context)), context)
        self.instructions = Instructions.from_config(content[CONFIG])
        model_config = self.instructions.model_config
        if self.config.modality not in model_config.modalities:
            raise SiteError(
                f"site {self.config.site}: modality {self.config.modality!r} is not in this federation's {list(model_config.modalities)}"
            )
        # The site builds only its own modality's encoder.
        self.model_config = type(model_config).from_dict(
            {**model_config.to_dict(), "modalities": [self.config.modality]}
        )
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = build_model(self.model_config).to(self.device)
        self._sync(content)

    def _sync(self, content: RecordDict) -> None:
        """Bring the cached global model to the message's version and load it into the network."""
        ins, state, arrays = self.instructions, self.context.state, content[ARRAYS]
        own = {k: v for k, v in arrays.items() if k in self.model.state_dict()}
        if ins.foreign_model:  # another site's model, to evaluate only
            self.model.load_state_dict(ArrayRecord(own).to_torch_state_dict(), strict=True)
            return
        if ins.base_version == FULL_SYNC:
            weights = ArrayRecord(own)
        else:
            held = int(state[CONFIG][GLOBAL_VERSION]) if CONFIG in state.config_records else None
            if held != ins.base_version or GLOBAL_WEIGHTS not in state.array_records:
                raise SiteError(
                    f"site {self.config.site}: holds global version {held}, the update is for version {ins.base_version}; a full resend is needed"
                )
            weights = state[GLOBAL_WEIGHTS]
            if COMPRESSED in content:
                self._apply_change(weights, content)
            for k, v in own.items():
                weights[k] = v
        expected = self.model.state_dict()
        missing = set(expected) - set(weights.keys())
        if missing:
            raise SiteError(
                f"site {self.config.site}: the coordinator's model lacks {len(missing)} tensors of this site's network, e.g. {sorted(missing)[:3]}; model configs differ"
            )
        for name, tensor in expected.items():
            if tuple(weights[name].shape) != tuple(tensor.shape):
                raise SiteError(
                    f"site {self.config.site}: the coordinator's {name} has shape {tuple(weights[name].shape)}, this site's network {tuple(tensor.shape)}; model configs differ"
                )
        self.model.load_state_dict(weights.to_torch_state_dict(), strict=True)
        state[GLOBAL_WEIGHTS] = weights
        state[CONFIG] = ConfigRecord({GLOBAL_VERSION: ins.version})

    def _apply_change(self, weights: ArrayRecord, content: RecordDict) -> None:
        """Add the compressed change a message brings to the copy of the global model ``weights``."""
        arrays = {k: a.numpy() for k, a in content[ARRAYS].items()}
        try:
            packet = Packet.from_arrays(content[COMPRESSED]["names"], arrays)
            shapes = {k: tuple(a.shape) for k, a in weights.items()}
            changes = decompress(packet, shapes, self.instructions.compression.block)
        except CompressionError as err:
            raise SiteError(
                f"site {self.config.site}: the coordinator's compressed change does not fit: {err}"
            ) from err
        for k, change in changes.items():
            weights[k] = Array(weights[k].numpy() + change)

    def _compressed_update(self, trained: ArrayRecord) -> RecordDict:
        """The change of the trained weights from the copy they started from, compressed with the
        residual earlier rounds left out (kept on the site's disk, so a restarted SuperNode keeps it).

        Under DP-SGD the change and the residual are functions of the DP-trained weights only, so the
        site's guarantee holds for them as for the weights (post-processing); under site-level DP the
        coordinator clips what it receives again (server.site_dp)."""
        ins, start = self.instructions, self.context.state[GLOBAL_WEIGHTS]
        changes = {k: a.numpy() - start[k].numpy() for k, a in trained.items()}
        path = residual_file(self.config.state_dir, ins.study, self.config.site)
        packet, residual = with_error_feedback(changes, load_residual(path, ins.server_round), ins.compression)
        save_residual(path, residual, ins.server_round)
        return RecordDict(
            {
                ARRAYS: ArrayRecord({k: Array(v) for k, v in packet.arrays().items()}),
                COMPRESSED: ConfigRecord({"names": list(packet.names)}),
            }
        )

    def _identity(self) -> ConfigRecord:
        return site_identity(self.config)

    def _data(self) -> SiteData:
        return SiteData.from_config(self.config, list(self.instructions.class_names))

    def _run_seed(self) -> int:
        """A seed from the run's seed, the round and the site: what the coordinator knows, so only
        for what may be reproducible (training without DP, and DP runs that are marked not private)."""
        return round_seed(self.instructions.seed, self.instructions.server_round, self.config.site)

    def _progress(self, step: int, loss: float) -> None:
        if step == 1:
            self.first_batch_s = time.perf_counter() - self.started
            log.info(
                "site %s round %d: first training step done %.1f s after the message arrived",
                self.config.site,
                self.instructions.server_round,
                self.first_batch_s,
            )
        if step % 10 == 0:
            log.info(
                "site %s round %d: step %d loss %.4f", self.config.site, self.instructions.server_round, step, loss
            )

    def _local_budget(self) -> tuple[int | None, int]:
        """(max steps, epochs) of a round's local training: the instructions', else the site's own."""
        training = self.config.training
        return self.instructions.local_steps or training.local_steps or None, training.local_epochs or 1

    def train(self) -> RecordDict:
        data = self._data()
        reply = self._train_global(data)
        if self.instructions.personal.method == "ditto":
            # Ditto: the personal model's step of this round, pulled towards the global model the round began from.
            anchor = self.context.state[GLOBAL_WEIGHTS].to_torch_state_dict()
            held, server_round = self._personal_checkpoint(), self.instructions.server_round
            # A run's first round starts the personal model afresh; a resumed run continues the one it left.
            start = held.state if held and server_round > 1 and held.server_round < server_round else anchor
            self._train_personal(data, start, *self._local_budget(), anchor, self.instructions.personal.ditto_lambda)
        return reply

    def _train_seeded(
        self,
        model: nn.Module,
        data: SiteData,
        seed: int,
        max_steps: int | None,
        epochs: int,
        proximal_mu: float,
        anchor: dict[str, torch.Tensor] | None = None,
        on_step=None,
    ) -> TrainResult:
        """Non-DP local training of ``model`` on the stage's groups, its batches and augmentations from ``seed``."""
        ins = self.instructions
        torch.manual_seed(seed)
        return train_local(
            model,
            self.config.modality,
            data.training_batches(self.config.training.batch_size, np.random.default_rng(seed)),
            groups=ins.stage.trainable_groups,
            lr=ins.stage.lr,
            max_steps=max_steps,
            epochs=epochs,
            proximal_mu=proximal_mu,
            proximal_anchor=anchor,
            on_step=on_step,
        )

    def _train_global(self, data: SiteData) -> RecordDict:
        ins = self.instructions
        max_steps, epochs = self._local_budget()
        privacy = privacy_spec(self.config.privacy, ins.dp)
        if privacy.enabled:
            return self._train_private(privacy, data, max_steps, epochs)
        # Same run seed, round and site -> same batches and augmentations: reruns reproduce.
        result = self._train_seeded(
            self.model, data, self._run_seed(), max_steps, epochs, ins.proximal_mu, on_step=self._progress
        )
        log.info(
            "site %s round %d: trained %d steps on %d examples, loss %.4f",
            self.config.site,
            ins.server_round,
            result.steps,
            result.num_examples,
            result.loss,
        )
        # Timings only without DP: under DP they would tell the sizes of the private batches.
        return self._trained_reply(
            TrainReply(
                data.num_train_patients,
                result.steps,
                result.loss,
                self.first_batch_s,
                time.perf_counter() - self.started,
            )
        )

    def _dp_stream(self, reproducible: bool) -> KeyStream:
        """The keystream of this message's DP randomness: keyed from OS entropy, or from the run seed
        when the run asks for reproducible DP and this site allows it."""
        if not reproducible:
            return KeyStream(secure_key())
        if not self.config.privacy.allow_insecure_reproducible:
            raise SiteError(
                f"site {self.config.site}: the run asks for reproducible DP noise (dp-insecure-reproducible), which the coordinator could predict; "
                "this site does not allow it (privacy.allow_insecure_reproducible in its YAML)"
            )
        return KeyStream(reproducible_key(self._run_seed()))

    def _train_private(self, privacy: PrivacySpec, data: SiteData, max_steps: int | None, epochs: int) -> RecordDict:
        """DP-SGD with the patient as unit, spending from the study's ledger; no more training once the
        next round would pass the budget. Every random draw comes from the DP keystream."""
        reproducible = self.instructions.dp.insecure_reproducible
        stream = self._dp_stream(reproducible)
        with prefixed(NOT_PRIVATE, log.name) if reproducible else nullcontext():
            return self._spend(privacy, data, max_steps, epochs, stream, reproducible)

    def _spend(
        self,
        privacy: PrivacySpec,
        data: SiteData,
        max_steps: int | None,
        epochs: int,
        stream: KeyStream,
        reproducible: bool,
    ) -> RecordDict:
        ins, site = self.instructions, self.config.site
        seed = stream.seed()  # slice choice, augmentation, PyTorch's generator: from the keystream too
        torch.manual_seed(seed)
        planned_rounds = max(ins.planned_rounds, ins.server_round)
        max_steps = privacy.local_steps or max_steps
        dp = resolve(
            privacy,
            data.num_train_patients,
            self.config.training.batch_size,
            lambda q: planned_rounds * steps_per_round(q, max_steps, epochs),
        )
        steps = steps_per_round(dp.sample_rate, max_steps, epochs)
        with study_ledger(ledger_file(self.config.state_dir, ins.study)) as ledger:
            if (
                dp.budget is not None
                and ledger.epsilon_after(dp.noise_multiplier, dp.sample_rate, steps, dp.delta) > dp.budget
            ):
                log.warning(
                    "site %s round %d: privacy budget %g of study %s would be exceeded (spent %.3f); no more training, evaluation goes on",
                    site,
                    ins.server_round,
                    dp.budget,
                    ins.study,
                    ledger.epsilon(dp.delta),
                )
                spent = TrainReply(0, 0, dp=dp_record(dp, ledger, True, reproducible, data.patients_mapped))
                return RecordDict({METRICS: MetricRecord(spent.to_metrics()), SITE: self._identity()})
            cases = data.patient_crops(dp.slices_per_case, np.random.default_rng(seed))
            result = train_private(
                self.model,
                self.config.modality,
                cases,
                groups=ins.stage.trainable_groups,
                lr=ins.stage.lr,
                steps=steps,
                dp=dp,
                ledger=ledger,
                stream=stream,
                proximal_mu=ins.proximal_mu,
                on_step=self._progress,
            )
        # The training loss is a function of the private batch: it stays in the site's log.
        log.info(
            "site %s round %d: DP-SGD %d steps (%s), loss %.4f, epsilon of study %s spent %.3f",
            site,
            ins.server_round,
            steps,
            dp.describe(),
            result.loss,
            ins.study,
            ledger.epsilon(dp.delta),
        )
        return self._trained_reply(
            TrainReply(
                dp.disclosed_patients, steps, dp=dp_record(dp, ledger, False, reproducible, data.patients_mapped)
            )
        )

    def _trained_reply(self, reply: TrainReply) -> RecordDict:
        trained = select(self.model.state_dict(), groups=self.instructions.stage.trainable_groups)
        arrays = ArrayRecord({k: v.detach().cpu() for k, v in trained.items()})
        if self.instructions.clipping_norm > 0:
            arrays = clip_update(arrays, self.context.state[GLOBAL_WEIGHTS], self.instructions.clipping_norm)
        sent = (
            self._compressed_update(arrays) if self.instructions.compression.enabled else RecordDict({ARRAYS: arrays})
        )
        sent[METRICS], sent[SITE] = MetricRecord(reply.to_metrics()), self._identity()
        return sent

    # ------------------------------------------------------------------ the personal model
    def _personal_file(self) -> Path:
        return personal_model_file(self.config.state_dir, self.instructions.study, self.config.site)

    def _personal_checkpoint(self) -> Checkpoint | None:
        """The site's personal model of this study, if it has one of this network."""
        path = self._personal_file()
        if not path.is_file():
            return None
        held = Checkpoint.load(path)
        return held if held.model_config == self.model_config else None

    def _train_personal(
        self,
        data: SiteData,
        start: dict[str, torch.Tensor],
        max_steps: int | None,
        epochs: int,
        anchor: dict[str, torch.Tensor] | None = None,
        pull: float = 0.0,
    ) -> nn.Module:
        """Train the personal model from ``start`` on the stage's groups (``pull`` > 0: towards ``anchor``)
        and keep it on the site's disk as a checkpoint ``predict`` can use. It never leaves the site."""
        model = self._start_personal(start)
        result = self._train_seeded(model, data, self._personal_seed(), max_steps, epochs, pull, anchor)
        self._save_personal(model.state_dict(), {})
        log.info(
            "site %s round %d: personal model (%s) trained %d steps, loss %.4f, kept at the site",
            self.config.site,
            self.instructions.server_round,
            self.instructions.personal.method,
            result.steps,
            result.loss,
        )
        return model

    def _start_personal(self, start: dict[str, torch.Tensor]) -> nn.Module:
        model = build_model(self.model_config).to(self.device)
        model.load_state_dict(start, strict=True)
        return model

    def _personal_seed(self) -> int:
        return round_seed(self.instructions.seed, self.instructions.server_round, f"{self.config.site}/personal")

    def _save_personal(self, state: dict[str, torch.Tensor], extra: dict, path: Path | None = None) -> None:
        ins = self.instructions
        extra = {"personalization": ins.personal.method, "study": ins.study, "site": self.config.site} | extra
        Checkpoint(state, self.model_config, ins.class_names, ins.server_round, ins.stage.index, extra).save(
            path or self._personal_file()
        )

    def _personal_model(self, data: SiteData, choose: bool) -> tuple[nn.Module, bool] | None:
        """The personal model to score beside the global one, and whether it is the global model kept:
        Ditto's, or at the final evaluation the global model fine-tuned (``finetune``); None otherwise.
        With ``choose`` (the final evaluation of a site that keeps test cases apart) the model its
        validation cases prefer (``_finetune_on_validation``, ``_keep_better``)."""
        ins = self.instructions
        if ins.foreign_model or ins.personal.method == "none":
            return None
        if ins.personal.method == "finetune":
            if not ins.final_evaluation:
                return None
            if choose:
                return self._finetune_on_validation(data)
            return self._train_personal(data, self.model.state_dict(), ins.personal.finetune_steps, 1), False
        held = self._personal_checkpoint()
        if held is None or held.server_round != ins.server_round:
            return None  # no Ditto step this round yet (e.g. the site did not train)
        ditto = held.build_model().to(self.device)
        return ditto, choose and self._keep_better(ditto, data)

    def _score(self, model: nn.Module, cases: list) -> EvalResult:
        ins = self.instructions
        patch = self.config.training.patch_size
        return evaluate_cases(model, self.config.modality, cases, ins.class_names, patch, ins.nsd_tolerance_mm)

    def _finetune_on_validation(self, data: SiteData) -> tuple[nn.Module, bool]:
        """Fine-tune the global model for up to ``finetune_steps`` steps, scoring it on the validation cases
        before and after each of ``finetune_checks`` equal parts, and keep the check with the largest gain
        over the global model among those whose gain exceeds ``choice_margin`` standard errors (on disk
        too; the global model when none does). Fine-tuning on a few cases is noisy and can move away from
        a global model that the other sites' data had already made better for this one; a margin guards
        against keeping the luckiest of near-equal checks, at the price of gains that few validation cases
        cannot certify (benchmarks/RESULTS.md). The choice is made on cases the reported test scores never
        see. True with the model when the global model was kept."""
        personal = self.instructions.personal
        # The best so far waits beside the personal model (not in memory: a full-size network's weights are
        # 228 MiB), which is replaced only once the choice is made: a fine-tuning that fails midway leaves it.
        candidate = self._personal_file().with_suffix(".candidate.safetensors")
        model = self._start_personal(self.model.state_dict())
        common = self._score(self.model, data.val_cases)
        scores, gains, best = {0: common.dice_mean}, {}, 0

        def check(step: int, _loss: float) -> None:
            nonlocal best
            if step in personal.check_steps:
                scored = self._score(model, data.val_cases)
                model.train()  # scoring left it in eval mode
                scores[step], gains[step] = scored.dice_mean, paired_gain(scored.case_dice, common.case_dice)
                if gains[step].exceeds(personal.choice_margin) and (best == 0 or gains[step].mean > gains[best].mean):
                    best = step
                    self._save_personal(model.state_dict(), {"finetune_steps": step}, candidate)

        self._train_seeded(model, data, self._personal_seed(), personal.finetune_steps, 1, 0.0, on_step=check)
        extra = {
            "finetune_steps": best,
            "validation_dice": {str(k): _finite(v) for k, v in scores.items()},
            "validation_gain": {str(k): _gain_record(g) for k, g in gains.items()},
        }
        log.info(
            "site %s: fine-tuning scored on its %d validation cases, Dice by step %s, gain over the global model "
            "by step %s: keeping %s (a gain must exceed %g standard errors)",
            self.config.site,
            len(data.val_cases),
            {k: round(v, 3) for k, v in scores.items()},
            {k: f"{g.mean:+.3f}±{g.standard_error:.3f}" for k, g in gains.items()},
            f"the model after {best} steps" if best else "the global model",
            personal.choice_margin,
        )
        if best == 0:
            self._save_personal(self.model.state_dict(), extra | {"kept": "global"})
            candidate.unlink(missing_ok=True)  # one a failed attempt left
            return self.model, True
        if best != personal.finetune_steps:
            model.load_state_dict(Checkpoint.load(candidate).state)
        self._save_personal(model.state_dict(), extra)
        candidate.unlink()
        return model, False

    def _keep_better(self, personal: nn.Module, data: SiteData) -> bool:
        """At the final evaluation of a site that keeps a test split apart: score Ditto's personal model and
        the global one on the validation cases, and unless the personal model's gain exceeds
        ``choice_margin`` standard errors, keep the global model as the personal model (on disk too), as
        ``_finetune_on_validation`` does. True when the global model was kept."""
        ins = self.instructions
        held = Checkpoint.read_meta(self._personal_file())  # the personal model just loaded
        if held["round"] == ins.server_round and held.get("extra", {}).get("kept") == "global":
            return True  # this final evaluation again (a resumed coordinator): Ditto's model was already replaced
        own, common = (self._score(m, data.val_cases) for m in (personal, self.model))
        gain = paired_gain(own.case_dice, common.case_dice)
        kept_global = not gain.exceeds(ins.personal.choice_margin)
        log.info(
            "site %s: on its %d validation cases the personal model (%s) scores Dice %.3f, the global model %.3f "
            "(gain %+.3f ± %.3f; it must exceed %g standard errors): keeping the %s model as its personal model",
            self.config.site,
            len(data.val_cases),
            ins.personal.method,
            own.dice_mean,
            common.dice_mean,
            gain.mean,
            gain.standard_error,
            ins.personal.choice_margin,
            "global" if kept_global else "personal",
        )
        if kept_global:
            validation = {"personal": _finite(own.dice_mean), "global": _finite(common.dice_mean)}
            extra = held.get("extra", {}) | {
                "kept": "global",
                "validation_dice": validation,
                "validation_gain": _gain_record(gain),
            }
            self._save_personal(self.model.state_dict(), extra)
        return kept_global

    def evaluate(self) -> RecordDict:
        """Scores of the model on the held-out split the instructions name (the test cases if the site keeps
        them apart, else the validation cases): its first ``eval_cases`` (a fixed subset, the same every
        round), or all of them; and of the site's personal model, if it has one (at the final evaluation of a
        site with test cases apart: the one its validation cases prefer, see ``_personal_model``).

        A DP site keeps its personal model's scores to itself: that model is trained on its private
        patients without DP noise, so even its Dice is not covered by the site's guarantee."""
        ins, data = self.instructions, self._data()
        split, held = data.held_out(ins.eval_split)
        cases = held[: ins.eval_cases] if ins.eval_cases else held
        full_split_cases = len(data.held_out(TEST)[1])  # the final evaluation scores these: it is waited for
        selection_cases = len(data.val_cases) * ins.personal.candidates if data.test_cases else 0
        result = self._score(self.model, cases)
        reply = result.reply(len(held), split, full_split_cases, selection_cases)
        chosen = self._personal_model(data, choose=ins.final_evaluation and selection_cases > 0)
        if chosen is not None:
            personal, kept_global = chosen
            own = result if kept_global else self._score(personal, cases)
            own_reply = dataclasses.replace(
                own.reply(len(held), split, full_split_cases, selection_cases), kept_global=kept_global
            )
            private = privacy_spec(self.config.privacy, ins.dp).enabled
            log.info(
                "site %s round %d: personal model on %d held-out cases: Dice %s%s",
                self.config.site,
                ins.server_round,
                own.num_cases,
                _rounded(own.dice),
                " (kept at this DP site)" if private else "",
            )
            if not private:
                reply = dataclasses.replace(reply, personal=own_reply)
        model = f"model {ins.foreign_model}" if ins.foreign_model else "global model"
        log.info(
            "site %s round %d: %s on %d of %d %s cases (%.1f s per case): Dice %s, HD95 %s, NSD %s",
            self.config.site,
            ins.server_round,
            model,
            result.num_cases,
            len(held),
            split,
            result.seconds_per_case,
            _rounded(result.dice),
            _rounded(result.hd95),
            _rounded(result.nsd),
        )
        return RecordDict({METRICS: MetricRecord(reply.to_metrics()), SITE: self._identity()})


def _finite(score: float) -> float | None:
    """A validation score as a checkpoint's metadata holds it: None for none (JSON has no NaN or infinities)."""
    return score if math.isfinite(score) else None


def _gain_record(gain: PairedGain) -> dict:
    return {"mean": _finite(gain.mean), "standard_error": _finite(gain.standard_error), "cases": gain.cases}


def _rounded(scores: dict[str, float]) -> dict[str, float]:
    return {k: round(v, 3) for k, v in scores.items()}
