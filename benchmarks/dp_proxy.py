"""Cheap proxy of the DP demo: one phantom site, local training only, the demo's schedule, held-out Dice.

Trains what the federation would at one site over all its rounds (same unfreezing stages, learning
rates, local steps, seeds, DP accountant), without Flower and without averaging, so that DP
configurations can be compared one site at a time (2-12 min on a shared 2-core CPU) before a full
``bench_dp_demo.py`` run. Phantoms are generated once per case count under ``--data``.

    python benchmarks/dp_proxy.py --cases 2000                                         # without DP
    python benchmarks/dp_proxy.py --cases 2000 --epsilon 8 --cases-per-batch 128 --slices-per-case 1 \
        --local-steps 10 --frozen stage4,up_blocks.0.,skips.3.                        # DP
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from fed_swinumamba.data import CaseCrops, SiteData, load_site_config, make_demo_sites
from fed_swinumamba.data.site_config import PrivacySpec
from fed_swinumamba.model import ModelConfig, build_model
from fed_swinumamba.privacy import PrivacyLedger, resolve, steps_per_round, train_private
from fed_swinumamba.schedule import UnfreezingSchedule
from fed_swinumamba.training import evaluate_cases, train_local


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--modality", choices=("ct", "mri", "us"), default="ct")
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
    p.add_argument("--frozen", default="", help="under DP: layer groups or parameter-name prefixes never trained (comma-separated)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(1)

    root = args.data / f"{args.cases}"
    if not (root / ".complete").is_file():
        make_demo_sites(root, num_cases=args.cases)
    site = load_site_config(root / "sites" / args.modality / f"demo_{args.modality}.yaml")
    data = SiteData.from_config(site, ["organ", "lesion"])
    dims = tuple(int(d) for d in args.dims.split(","))
    model = build_model(ModelConfig(variant=args.variant, modalities=(args.modality,), dims=dims, depths=(1, 1, 2, 1), stem_width=args.stem_width))
    schedule = UnfreezingSchedule(rounds_per_stage=args.rounds_per_stage, base_lr=args.lr, lr_decay=args.lr_decay)
    frozen = tuple(filter(None, args.frozen.split(",")))
    spec = PrivacySpec(True, args.epsilon, None, args.clip, None, args.slices_per_case, args.cases_per_batch, frozen=frozen)
    dp = resolve(spec, data.num_train_cases, 8, lambda q: args.rounds * steps_per_round(q, args.local_steps, 1)) if args.epsilon > 0 else None
    ledger = PrivacyLedger()
    start = time.perf_counter()

    def progress(step: int, loss: float) -> None:
        if step % 10 == 0:
            print(f"{time.perf_counter() - start:.0f} s: step {step} loss {loss:.3f}", file=sys.stderr, flush=True)

    for rnd in range(1, args.rounds + 1):
        stage = schedule.stage_for_round(rnd)
        seed = (args.seed * 1_000_003 + rnd * 7919) % 2**31
        data.train_dataset.transform.set_random_state(seed)
        torch.manual_seed(seed)
        if dp:
            cases = CaseCrops(data.train_dataset, dp.slices_per_case, seed)
            train_private(model, args.modality, cases, groups=stage.trainable_groups, lr=stage.lr, steps=args.local_steps, dp=dp, ledger=ledger, seed=seed, on_step=progress)
        else:
            loader = DataLoader(data.train_dataset, batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(seed))
            train_local(model, args.modality, loader, groups=stage.trainable_groups, lr=stage.lr, max_steps=args.local_steps)
    train_s = time.perf_counter() - start
    result = evaluate_cases(model, args.modality, data.val_cases, ["organ", "lesion"], site.training.patch_size)
    out = {k: v for k, v in vars(args).items() if k != "data"}
    out.update(dice=round(result.dice_mean, 3), per_class={k: round(v, 3) for k, v in result.dice.items()}, train_s=round(train_s))
    if dp:
        out.update(noise=round(dp.noise_multiplier, 3), epsilon_spent=round(ledger.epsilon(dp.delta), 3), train_cases=data.num_train_cases)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
