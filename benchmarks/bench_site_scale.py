"""A site's memory and start-up at real scale: 10, 50 and 200 real-size CT cases (512 x 512 x 48-61 int16 NIfTI).

For each site size: preprocess once into the site's cache (time, cache size against the source files), the
loader's throughput (foreground-oversampled slices per second, one loader worker), then one round of train
+ evaluate through ``python -m simulation run`` with the demo-size network, while the whole process tree is
watched: the peak resident memory (VmHWM) of the largest process, the site's seconds from message to first
training batch, the training message's wall time and the evaluation's seconds per held-out case (the
round's subset, then the full held-out split at the end). Prints a Markdown table; raw numbers in
``OUT/results.json``.

    python benchmarks/bench_site_scale.py --sizes 10,50,200 --out runs/bench_site_scale
    python benchmarks/bench_site_scale.py --sizes 10,50,200 --spacing 1.5,1.5,0  # sites resampling in-plane

``--spacing`` gives the sites a ``data.spacing`` (mm per axis, 0 keeps an axis): they train and evaluate at
that resolution (the cases' grid after preprocessing), in their own caches and runs (``..._sp<spacing>``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
SPACING = (0.75, 0.75, 5.0)  # mm: a typical chest CT reconstruction


def make_case(rng: np.random.Generator, num_slices: int) -> tuple[np.ndarray, np.ndarray]:
    """512 x 512 x S int16 HU (air, a body with noise, an organ) and uint8 labels with a small tumour in 3 slices."""
    y, x = np.mgrid[:512, :512]
    body = ((x - 256) / 220.0) ** 2 + ((y - 256) / 160.0) ** 2 < 1
    organ2d = ((x - 300) / 60.0) ** 2 + ((y - 240) / 45.0) ** 2 < 1
    image = np.full((512, 512, num_slices), -1000, np.int16)
    label = np.zeros((512, 512, num_slices), np.uint8)
    first = int(rng.integers(5, num_slices // 3))
    organ_slices = range(first, min(num_slices, first + num_slices // 2))
    tumour = int(rng.integers(first, max(first + 1, organ_slices[-1] - 2)))
    for s in range(num_slices):
        hu = np.where(body, 40, -1000).astype(np.int16)
        if s in organ_slices:
            hu[organ2d] = 90
            label[..., s][organ2d] = 1
        if tumour <= s < tumour + 3:
            lesion = ((x - 310) / 8.0) ** 2 + ((y - 235) / 8.0) ** 2 < 1
            hu[lesion] = 20
            label[..., s][lesion] = 2
        image[..., s] = hu + rng.normal(0, 15, hu.shape).astype(np.int16) * body
    return image, label


def generate(source: Path, n: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    affine = np.diag([*SPACING, 1.0])
    for folder in ("imagesTr", "labelsTr"):
        (source / folder).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        name = f"chest_{i:03d}.nii.gz"
        if (source / "labelsTr" / name).is_file():
            continue
        image, label = make_case(rng, int(rng.integers(48, 62)))
        nib.save(nib.Nifti1Image(image, affine), source / "imagesTr" / name)
        nib.save(nib.Nifti1Image(label, affine), source / "labelsTr" / name)
        print(f"generated {i + 1}/{n}", flush=True)


def make_site(out: Path, source: Path, n: int, spacing: list[float] | None, tag: str) -> Path:
    """A site of the first n cases (hard links), its YAML and its own cache folder."""
    root = out / f"site{n}"
    for folder in ("imagesTr", "labelsTr"):
        (root / folder).mkdir(parents=True, exist_ok=True)
        for f in sorted((source / folder).iterdir())[:n]:
            if not (root / folder / f.name).exists():
                os.link(f, root / folder / f.name)
    config = {
        "site": f"chest_ct_{n}",
        "modality": "ct",
        "data": {"root": str(root)} | ({"spacing": spacing} if spacing else {}),
        "labels": {1: "organ", 2: "lesion"},
        "split": {"val_fraction": 0.1, "seed": 0},
        "training": {"cache_dir": str(out / f"cache{n}{tag}"), "loader_workers": 1},
    }
    path = out / f"site{n}{tag}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


class PeakMemory:
    """The peak RSS (VmHWM) of every process below ``root_pid``, by process name, sampled until stopped.

    Ray's own processes map its shared-memory object store, so the site's process (``ray::ClientAppActor``)
    and the run's driver are reported apart from them."""

    def __init__(self, root_pid: int):
        self.root, self.peaks, self.stop = root_pid, {}, threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()

    def _tree(self) -> set[int]:
        parents = {}
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
        tree, grew = {self.root}, True
        while grew:
            more = {pid for pid, ppid in parents.items() if ppid in tree} - tree
            tree |= more
            grew = bool(more)
        return tree

    def _watch(self) -> None:
        while not self.stop.is_set():
            for pid in self._tree():
                try:
                    name = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")[:60]
                    hwm = next(
                        int(line.split()[1]) * 1024
                        for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                        if line.startswith("VmHWM:")
                    )
                except (OSError, StopIteration):
                    continue
                self.peaks[name] = max(self.peaks.get(name, 0), hwm)
            time.sleep(0.2)

    def done(self) -> dict[str, int]:
        self.stop.set()
        self.thread.join()
        return self.peaks


def loader_rate(site_yaml: Path, batches: int = 60) -> tuple[float, float, float]:
    """In a fresh process: slices per second of the training loader (batches of 8), seconds to open the site,
    and the data pipeline's own peak memory (after the imports: opening, the batches, every held-out case read
    as evaluation reads them)."""
    code = (
        "import resource, sys, time, numpy as np\n"
        "from fed_swinumamba.data import SiteData, load_site_config\n"
        "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "t0 = time.perf_counter(); data = SiteData.from_config(load_site_config(sys.argv[1]), ['organ', 'lesion']); opened = time.perf_counter() - t0\n"
        "it = iter(data.training_batches(8, np.random.default_rng(0))); next(it); t = time.perf_counter()\n"
        f"for _ in range({batches}): next(it)\n"
        f"rate = 8 * {batches} / (time.perf_counter() - t)\n"
        "for case in data.val_cases: image, label = case.image_slices(), case.label_slices()\n"
        "print(rate, opened, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(site_yaml)], capture_output=True, text=True, check=True, cwd=ROOT
    ).stdout.split()
    return float(out[0]), float(out[1]), float(out[2])


def import_seconds() -> float:
    """A SuperNode starts a fresh ClientApp process per message: the time to import it, before any site work."""
    code = "import time; t = time.perf_counter(); import client.client_app; print(time.perf_counter() - t)"
    return float(
        subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
        ).stdout.split()[-1]
    )


def run_round(site_yaml: Path, out: Path, local_steps: int, eval_cases: int) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "simulation",
        "run",
        "--sites",
        str(site_yaml),
        "--rounds",
        "1",
        "--out",
        str(out),
        "--set",
        f"local-steps={local_steps}",
        "--set",
        f"eval-cases={eval_cases}",
        "--set",
        "cross-site-eval=false",
        "--set",
        "round-timeout=7200",
        "--set",
        "lr=0.002",
    ]
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=open(out.parent / f"{out.name}.log", "w"))
    memory = PeakMemory(proc.pid)
    if proc.wait() != 0:
        raise SystemExit(f"{' '.join(cmd)} failed: see {out.parent / f'{out.name}.log'}")
    peaks = memory.done()
    metrics = json.loads((out / "metrics.json").read_text())
    site = next(iter(metrics["rounds"][0]["sites"].values()))
    site_process = max(v for k, v in peaks.items() if "ClientAppActor" in k)
    driver = peaks.get(sys.executable, 0)
    return {
        "peak_rss_site": site_process,
        "peak_rss_driver": driver,
        "peaks": peaks,
        "wall": time.perf_counter() - started,
        "site": site,
        "final": metrics.get("final_evaluation"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10,50,200")
    parser.add_argument("--local-steps", type=int, default=20)
    parser.add_argument(
        "--eval-cases", type=int, default=2, help="held-out cases scored in the round (all of them at the end)"
    )
    parser.add_argument("--spacing", default="", help="the sites' data.spacing in mm, e.g. 1.5,1.5,0 (default: none)")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench_site_scale")
    args = parser.parse_args()
    spacing = [float(v) for v in args.spacing.split(",")] if args.spacing else None
    tag = f"_sp{args.spacing.replace(',', 'x')}" if spacing else ""
    sizes = [int(s) for s in args.sizes.split(",")]
    out = args.out.resolve()
    source = out / "source"
    generate(source, max(sizes))
    results = []
    for n in sizes:
        site_yaml = make_site(out, source, n, spacing, tag)
        t = time.perf_counter()
        subprocess.run(
            [
                sys.executable,
                "-c",
                "import sys; from fed_swinumamba.data import SiteData, load_site_config; SiteData.from_config(load_site_config(sys.argv[1]), ['organ', 'lesion'])",
                str(site_yaml),
            ],
            check=True,
            cwd=ROOT,
        )
        preprocess = time.perf_counter() - t
        rate, opened, pipeline_mb = loader_rate(site_yaml)
        run = run_round(site_yaml, out / f"run{n}{tag}", args.local_steps, args.eval_cases)
        row = {
            "cases": n,
            "preprocess_s": preprocess,
            "source_bytes": folder_bytes(out / f"site{n}"),
            "cache_bytes": folder_bytes(out / f"cache{n}{tag}"),
            "open_s": opened,
            "loader_slices_per_s": rate,
            "pipeline_mb": pipeline_mb,
            "import_s": import_seconds(),
            **run,
            "load_average": os.getloadavg(),
        }
        results.append(row)
        print(json.dumps(row, default=str), flush=True)
        (out / f"results{tag}.json").write_text(json.dumps(results, indent=1, default=str))
    print(
        "| cases | peak RSS: site process / run driver | ClientApp import + site opened | message to first batch | train message | eval per case (round / final) | loader slices/s | steps consume slices/s | data pipeline memory | cache / source size |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        s, final = r["site"], r["final"] or {}
        timing = s.get("timing", {})
        consume = (
            8 * args.local_steps / max(timing.get("train_s", float("nan")) - timing.get("first_batch_s", 0.0), 1e-9)
        )
        final_site = next(iter(final.get("global", {}).get("sites", {}).values()), {})
        print(
            f"| {r['cases']} | {r['peak_rss_site'] / 2**30:.2f} / {r['peak_rss_driver'] / 2**30:.2f} GiB | {r['import_s']:.1f} s + {r['open_s']:.2f} s | {timing.get('first_batch_s', float('nan')):.1f} s | {timing.get('train_s', float('nan')):.0f} s "
            f"| {s.get('eval_s_per_case', float('nan')):.1f} s / {final_site.get('eval_s_per_case', float('nan')):.1f} s ({final_site.get('num_val_cases', '?')} cases) "
            f"| {r['loader_slices_per_s']:.0f} | {consume:.0f} | {r['pipeline_mb']:.0f} MB | {r['cache_bytes'] / r['source_bytes']:.2f} |"
        )


if __name__ == "__main__":
    main()
