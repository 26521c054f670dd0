"""Cheap proxy of the DP demo: the phantom sites trained and averaged in one process, without Flower.

Trains what the federation would over all its rounds (same unfreezing stages, learning rates, local
steps, seeds, DP accountant) and averages as the server does (shared weights over all sites, a
modality's encoder over that modality's sites; every site weighs the same, as the demo's sites report
equal example counts), but in one process, so that DP configurations can be compared before a full
``bench_dp_demo.py`` run. With one modality it is that site alone (no averaging). Prints the held-out
Dice of the final global model at every site as JSON. Phantoms are generated once under ``--data``.

    python benchmarks/dp_proxy.py --modality mri --cases 2000                                   # one site, no DP
    python benchmarks/dp_proxy.py --modality ct,mri,us --cases 4000 --epsilon 8 --cases-per-batch 256 \
        --slices-per-case 1 --local-steps 10 --frozen stage4,up_blocks.0.,skips.3. --lr-scale 2      # three sites, DP
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import torch

from fed_swinumamba.data import SiteData, load_site_config
from fed_swinumamba.data.site_config import PrivacySpec
from fed_swinumamba.model import ModelConfig, build_model
from fed_swinumamba.params import partition_of
from fed_swinumamba.privacy import PrivacyLedger, resolve, steps_per_round, train_private
from fed_swinumamba.schedule import UnfreezingSchedule
from fed_swinumamba.secure_random import KeyStream, secure_key
from fed_swinumamba.simulated import make_demo_sites
from fed_swinumamba.training import evaluate_cases, train_local


def average(states: list[dict[str, torch.Tensor]], partitions: list[str]) -> dict[str, torch.Tensor]:
    """The server's aggregation with equal weights: each tensor averaged over the sites that hold it."""
    out: dict[str, torch.Tensor] = {}
    for name in {n for state in states for n in state}:
        holders = [
            state[name]
            for state, own in zip(states, partitions)
            if name in state and partition_of(name) in ("shared", own)
        ]
        out[name] = torch.stack(holders).mean(dim=0)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--modality", default="ct", help="one modality, or several (comma-separated) averaged as the federation does"
    )
    p.add_argument("--cases", type=int, default=400)
    p.add_argument("--data", type=Path, default=Path("runs/dp_proxy"))
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--rounds-per-stage", type=int, default=2)
    p.add_argument("--local-steps", type=int, default=20)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--lr-decay", type=float, default=0.8)
    p.add_argument("--variant", default="swin_umamba")
    p.add_argument("--dims", default="16,32,64,128")
    p.add_argument("--stem-width", type=int, default=16)
    p.add_argument("--epsilon", type=float, default=0.0, help="0: no DP")
    p.add_argument("--cases-per-batch", type=int, default=32)
    p.add_argument("--slices-per-case", type=int, default=2)
    p.add_argument("--clip", type=float, default=1.0)
    p.add_argument("--lr-scale", type=float, default=1.0, help="under DP: the learning rate times this")
    p.add_argument(
        "--frozen", default="", help="under DP: layer groups or parameter-name prefixes never trained (comma-separated)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    modalities = args.modality.split(",")

    root = args.data / f"{args.cases}"
    if not (root / ".complete").is_file():
        make_demo_sites(root, num_cases=args.cases)
    sites = [load_site_config(root / "sites" / m / f"demo_{m}.yaml") for m in modalities]
    data = [SiteData.from_config(site, ["organ", "lesion"]) for site in sites]
    dims = tuple(int(d) for d in args.dims.split(","))

    def config(mods) -> ModelConfig:
        return ModelConfig(
            variant=args.variant, modalities=tuple(mods), dims=dims, depths=(1, 1, 2, 1), stem_width=args.stem_width
        )

    torch.manual_seed(args.seed)
    global_state = build_model(config(modalities)).state_dict()
    models = [build_model(config([m])).to(args.device) for m in modalities]  # each site builds only its own encoder
    schedule = UnfreezingSchedule(rounds_per_stage=args.rounds_per_stage, base_lr=args.lr, lr_decay=args.lr_decay)
    frozen = tuple(filter(None, args.frozen.split(",")))
    spec = PrivacySpec(
        True,
        args.epsilon,
        None,
        args.clip,
        None,
        args.slices_per_case,
        args.cases_per_batch,
        frozen=frozen,
        lr_scale=args.lr_scale,
    )
    dps = [
        resolve(spec, d.num_train_patients, 8, lambda q: args.rounds * steps_per_round(q, args.local_steps, 1))
        if args.epsilon > 0
        else None
        for d in data
    ]
    ledgers = [PrivacyLedger() for _ in modalities]
    start = time.perf_counter()

    def progress(step: int, loss: float) -> None:
        if step % 10 == 0:
            print(f"{time.perf_counter() - start:.0f} s: step {step} loss {loss:.3f}", file=sys.stderr, flush=True)

    for rnd in range(1, args.rounds + 1):
        stage = schedule.stage_for_round(rnd)
        for model, site, d, dp, ledger in zip(models, sites, data, dps, ledgers):
            model.load_state_dict({k: global_state[k] for k in model.state_dict()})
            seed = (args.seed * 1_000_003 + rnd * 7919 + zlib.crc32(site.site.encode())) % 2**31
            torch.manual_seed(seed)
            if dp:
                cases = d.patient_crops(dp.slices_per_case, np.random.default_rng(seed))
                train_private(
                    model,
                    site.modality,
                    cases,
                    groups=stage.trainable_groups,
                    lr=stage.lr,
                    steps=args.local_steps,
                    dp=dp,
                    ledger=ledger,
                    stream=KeyStream(secure_key()),
                    on_step=progress,
                )
            else:
                train_local(
                    model,
                    site.modality,
                    d.training_batches(8, np.random.default_rng(seed)),
                    groups=stage.trainable_groups,
                    lr=stage.lr,
                    max_steps=args.local_steps,
                )
        global_state = average([{k: v.detach().cpu() for k, v in m.state_dict().items()} for m in models], modalities)
    train_s = time.perf_counter() - start

    out = {k: v for k, v in vars(args).items() if k != "data"}
    out.update(train_s=round(train_s), sites={})
    for model, site, d, dp, ledger in zip(models, sites, data, dps, ledgers):
        model.load_state_dict({k: global_state[k] for k in model.state_dict()})
        result = evaluate_cases(model, site.modality, d.val_cases, ["organ", "lesion"], site.training.patch_size)
        row = {"dice": round(result.dice_mean, 3), "per_class": {k: round(v, 3) for k, v in result.dice.items()}}
        if dp:
            row.update(
                noise=round(dp.noise_multiplier, 3),
                epsilon_spent=round(ledger.epsilon(dp.delta), 3),
                train_patients=d.num_train_patients,
            )
        out["sites"][site.modality] = row
    print(json.dumps(out))


if __name__ == "__main__":
    main()
