"""Time and memory of one DP-SGD local step beside one ordinary step on the same batch (CPU).

The batch is ``cases`` cases x ``slices`` slices. Ordinary step: forward + backward of the batch +
AdamW. DP step (fed_swinumamba.privacy): per-case gradients (vmap over cases), per-case clipping,
Gaussian noise (Opacus DPOptimizer) + AdamW. All groups trainable (the last unfreezing stage, the
costliest case). Each measurement runs in a fresh process so peak RSS is its own.

    python benchmarks/bench_dp_step.py --size demo     # the demo's network, 64x64 slices
    python benchmarks/bench_dp_step.py --size full     # full-size Swin-UMamba, 224x224 slices
    python benchmarks/bench_dp_step.py --size demo --cases 256 --slices 1 --cases-per-pass 32
                                                       # a large Poisson batch, in passes of 32 patients
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

SIZES = {
    "demo": {"dims": (16, 32, 64, 128), "depths": (1, 1, 2, 1), "stem_width": 16, "image": 64, "cases": 4, "slices": 2},
    "full": {
        "dims": (96, 192, 384, 768),
        "depths": (2, 2, 9, 2),
        "stem_width": 48,
        "image": 224,
        "cases": 2,
        "slices": 1,
    },
}


def measure(size: str, mode: str, repeats: int, cases_per_pass: int) -> dict:
    from fed_swinumamba.model import ModelConfig, build_model
    from fed_swinumamba.params import LAYER_GROUPS
    from fed_swinumamba.privacy import DPConfig, PrivacyLedger, train_private
    from fed_swinumamba.secure_random import KeyStream, secure_key
    from fed_swinumamba.training import segmentation_loss, set_trainable

    s = SIZES[size]
    torch.manual_seed(0)
    model = build_model(ModelConfig(modalities=("ct",), dims=s["dims"], depths=s["depths"], stem_width=s["stem_width"]))
    n, k, hw = s["cases"], s["slices"], s["image"]
    images, labels = torch.randn(n, k, 1, hw, hw), torch.randint(0, 3, (n, k, 1, hw, hw))

    class Cases(torch.utils.data.Dataset):
        def __len__(self):
            return n

        def __getitem__(self, i):
            return {"image": images[i], "label": labels[i]}

    times = []
    if mode == "plain":
        params = set_trainable(model, LAYER_GROUPS)
        optimizer, loss_fn = torch.optim.AdamW(params, lr=1e-4), segmentation_loss(model)
        x, y = images.flatten(0, 1), labels.flatten(0, 1)
        for _ in range(repeats + 1):
            start = time.perf_counter()
            optimizer.zero_grad()
            loss_fn(model(x, "ct"), y).backward()
            optimizer.step()
            times.append(time.perf_counter() - start)
    else:
        # Sample rate 1: every case in every batch, so both modes see exactly the same slices.
        dp = DPConfig(
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            delta=1e-5,
            sample_rate=1.0,
            cases_per_batch=n,
            slices_per_case=k,
            budget=None,
            cases_per_pass=cases_per_pass,
        )
        for _ in range(repeats + 1):
            start = time.perf_counter()
            train_private(
                model,
                "ct",
                Cases(),
                groups=LAYER_GROUPS,
                lr=1e-4,
                steps=1,
                dp=dp,
                ledger=PrivacyLedger(),
                stream=KeyStream(secure_key()),
            )
            times.append(time.perf_counter() - start)
    return {
        "seconds": statistics.median(times[1:]),
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=SIZES, default="demo")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cases", type=int, help="cases per batch (default: the size's)")
    parser.add_argument("--slices", type=int, help="slices per case (default: the size's)")
    parser.add_argument("--cases-per-pass", type=int, default=0, help="DP: cases per vmap pass (0: all at once)")
    parser.add_argument("--child", choices=("plain", "dp"))
    args = parser.parse_args()
    s = SIZES[args.size]
    s["cases"], s["slices"] = args.cases or s["cases"], args.slices or s["slices"]
    if args.child:
        print(json.dumps(measure(args.size, args.child, args.repeats, args.cases_per_pass)))
        return
    results = {}
    for mode in ("plain", "dp"):
        out = subprocess.run(
            [sys.executable, __file__, *sys.argv[1:], "--child", mode],
            check=True,
            capture_output=True,
            text=True,
        )
        results[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    load = f"{os.getloadavg()[0]:.2f}"
    print(
        f"| {args.size} ({s['image']}x{s['image']}, {s['cases']} cases x {s['slices']} slices, passes of {args.cases_per_pass or s['cases']}) | {results['plain']['seconds']:.3f} s | "
        f"{results['dp']['seconds']:.3f} s | {results['dp']['seconds'] / results['plain']['seconds']:.2f}x | "
        f"{results['plain']['peak_rss_gib']:.2f} GiB | {results['dp']['peak_rss_gib']:.2f} GiB | {load} |"
    )


if __name__ == "__main__":
    main()
