"""Compressed updates (run config ``compression``): bytes on the wire and the Dice they cost.

``--bytes``: one CT site of the full-size network (ModelConfig defaults) and of the demo network, over the
default schedule (run config defaults: 6 rounds, a stage every 2 rounds, stage1-3 frozen at the start).
Each round a site uploads the groups it trains and, from round 2, downloads the change of the groups
trained the round before (round 1: everything, exact). Packets are built from random changes of those
tensors (their size does not depend on the values) and measured as Flower serialises them (``len(Array.data)``,
headers included); also the seconds to compress and decompress one full-size upload.

``--dice``: the demo's three sites (``--cases`` phantoms each, a test split kept apart), ``--seeds`` seeds,
a run per method (``--methods``, default ``none``, ``int8``, ``int8+topk``; ``--block`` and ``--topk`` as the run config's
``compression-block`` and ``compression-topk``) through ``python -m simulation run``; per site the final
global model's Dice on the test cases, and the bytes per site per round from metrics.json. Finished runs
are kept under ``OUT/seed<s>/<method>`` (``int8+topk-<topk>``).

    python benchmarks/bench_compression.py --bytes
    python benchmarks/bench_compression.py --dice --seeds 0,1,2 --out runs/bench_compression
"""

from __future__ import annotations

import argparse
import statistics
import time
import tomllib
from pathlib import Path

import numpy as np
from federation_runs import ROOT, make_sites, run_once
from flwr.app import Array

from fed_swinumamba.compression import CompressionOptions, compress, decompress
from fed_swinumamba.model import ModelConfig, build_model
from fed_swinumamba.params import select
from fed_swinumamba.run_config import defaults
from fed_swinumamba.schedule import UnfreezingSchedule
from server.settings import FederationSettings

METHODS = ("none", "int8", "int8+topk")
DEMO_RUN_CONFIG = tomllib.loads((ROOT / "simulation" / "demo.toml").read_text())
DEMO_MODEL = FederationSettings.from_run_config(DEMO_RUN_CONFIG).model_config


def _wire_bytes(arrays: dict[str, np.ndarray]) -> int:
    return sum(len(Array(np.ascontiguousarray(v)).data) for v in arrays.values())


def _sent(changes: dict[str, np.ndarray], method: str, block: int, topk: float) -> int:
    if method == "none":
        return _wire_bytes(changes)
    return _wire_bytes(compress(changes, CompressionOptions(method, block, topk)).arrays())


def schedule_bytes(model_config: ModelConfig, block: int, topk: float) -> list[dict]:
    """Per round of the default schedule: bytes up and down for one CT site, per method."""
    c = defaults()
    schedule = UnfreezingSchedule(
        tuple(g for g in str(c["frozen-at-start"]).split(",") if g), c["rounds-per-stage"], c["lr"], c["lr-decay"]
    )
    rng = np.random.default_rng(0)
    site = {k: rng.standard_normal(v.shape, dtype=np.float32) for k, v in _site_model(model_config, "ct").items()}
    rows = []
    for server_round in range(1, c["num-server-rounds"] + 1):
        up = select(site, groups=schedule.stage_for_round(server_round).trainable_groups)
        down = (
            site
            if server_round == 1
            else select(site, groups=schedule.stage_for_round(server_round - 1).trainable_groups)
        )
        row = {"round": server_round, "model": _wire_bytes(site)}
        for method in METHODS:
            row[f"up {method}"] = _sent(up, method, block, topk)
            row[f"down {method}"] = _wire_bytes(down) if server_round == 1 else _sent(down, method, block, topk)
        rows.append(row)
    return rows


def _site_model(config: ModelConfig, modality: str) -> dict[str, np.ndarray]:
    """A site's part of the network (the shared weights and its modality's encoder)."""
    return {k: v.numpy() for k, v in select(build_model(config).state_dict(), modalities=[modality]).items()}


def print_bytes(block: int, topk: float) -> None:
    for label, config in (("full-size", ModelConfig()), ("demo", DEMO_MODEL)):
        rows = schedule_bytes(config, block, topk)
        model = rows[0]["model"]
        print(f"\n### {label} network, one CT site: {model / 2**20:.1f} MiB as float32 (block {block}, top-k {topk})\n")
        print(
            "| round | "
            + " | ".join(f"up {m}" for m in METHODS)
            + " | "
            + " | ".join(f"down {m}" for m in METHODS)
            + " |"
        )
        print("|---" * (1 + 2 * len(METHODS)) + "|")
        for r in rows:
            cells = [f"{r[f'{d} {m}'] / model:.1%}" for d in ("up", "down") for m in METHODS]
            print(f"| {r['round']} | " + " | ".join(cells) + " |")
        total = {k: sum(r[k] for r in rows) for k in rows[0] if k not in ("round", "model")}
        for method in METHODS[1:]:
            print(
                f"- {method}: over the {len(rows)} rounds, up {total[f'up {method}'] / total['up none']:.1%} and down "
                f"{total[f'down {method}'] / total['down none']:.1%} of the uncompressed messages "
                f"(down after round 1: {sum(r[f'down {method}'] for r in rows[1:]) / sum(r['down none'] for r in rows[1:]):.1%})"
            )
    state = select(build_model(ModelConfig(modalities=("ct",))).state_dict(), groups=("stage4", "decoder", "heads"))
    changes = {k: np.random.default_rng(1).standard_normal(v.shape, dtype=np.float32) for k, v in state.items()}
    shapes = {k: v.shape for k, v in changes.items()}
    for method in METHODS[1:]:
        options = CompressionOptions(method, block, topk)
        started = time.perf_counter()
        packet = compress(changes, options)
        middle = time.perf_counter()
        decompress(packet, shapes, block)
        print(
            f"- full-size upload of round 1 ({sum(v.size for v in changes.values()) / 1e6:.1f} M values), {method}: "
            f"compress {middle - started:.2f} s, decompress {time.perf_counter() - middle:.2f} s"
        )


DEMO_MODEL_BYTES = {m: _wire_bytes(_site_model(DEMO_MODEL, m)) for m in DEMO_MODEL.modalities}


def dice(seeds: list[int], cases: int, out: Path, block: int, topk: float, methods: tuple[str, ...]) -> None:
    scores = {m: {} for m in methods}  # method -> site -> [Dice per seed]
    shares = {m: {"up": [], "down": []} for m in methods}  # per site and round, of the site's float32 model
    for seed in seeds:
        sites = make_sites("demo", out / f"seed{seed}" / "sites", cases, seed, 0.2)
        for method in methods:
            config = {**DEMO_RUN_CONFIG, "seed": seed, "cross-site-eval": False, "compression": method}
            config |= {"compression-block": block, "compression-topk": topk}
            folder = f"{method}-{topk}" if method == "int8+topk" else method
            metrics = run_once(out / f"seed{seed}" / folder, sites, config)
            for site, v in metrics["final_evaluation"]["global"]["sites"].items():
                if v["split"] != "test":
                    raise SystemExit(f"{site} kept no test case: give more --cases")
                scores[method].setdefault(site, []).append(v["dice_mean"])
            for r in metrics["rounds"]:
                for entry in r["sites"].values():
                    model = DEMO_MODEL_BYTES[entry["modality"]]
                    shares[method]["up"].append(entry["bytes_up"] / model)
                    shares[method]["down"].append(entry["bytes_down"] / model)
    sites = sorted(scores[methods[0]])
    print(f"\n### demo, {len(seeds)} seeds: final global model, mean Dice on each site's test cases (range)\n")
    print("| method | " + " | ".join(sites) + " | mean over sites | up, per site and round | down |")
    print("|---" * (len(sites) + 4) + "|")
    for method in methods:
        cells = [f"{statistics.mean(v):.3f} ({min(v):.3f}–{max(v):.3f})" for v in (scores[method][s] for s in sites)]
        overall = statistics.mean(statistics.mean(scores[method][s]) for s in sites)
        up, down = (statistics.mean(shares[method][d]) for d in ("up", "down"))
        print(f"| {method} | " + " | ".join(cells) + f" | {overall:.3f} | {up:.1%} | {down:.1%} |")
    print("\n(up and down: mean bytes per site and round, as a share of the site's float32 model, rounds 1-6)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bytes", action="store_true")
    parser.add_argument("--dice", action="store_true")
    parser.add_argument("--block", type=int, default=defaults()["compression-block"])
    parser.add_argument("--topk", type=float, default=defaults()["compression-topk"])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--cases", type=int, default=16)
    parser.add_argument("--methods", default=",".join(METHODS), help="with --dice: the methods to run")
    parser.add_argument("--out", type=Path, default=Path("runs/bench_compression"))
    args = parser.parse_args()
    if args.bytes:
        print_bytes(args.block, args.topk)
    if args.dice:
        dice(
            [int(s) for s in args.seeds.split(",")],
            args.cases,
            args.out,
            args.block,
            args.topk,
            tuple(args.methods.split(",")),
        )


if __name__ == "__main__":
    main()
