"""The run report: every number it shows comes from metrics.json, with three decimals."""

import json
import math
import re

from PIL import Image

from server.__main__ import main
from server.report import score_rows


def _metrics():
    def site(modality, organ, lesion, epsilon=None, **extra):
        entry = {
            "modality": modality,
            "dice": {"organ": organ, "lesion": lesion},
            "dice_mean": organ if math.isnan(lesion) else (organ + lesion) / 2,
            "bytes_up": 2**20,
            "bytes_down": 3 * 2**20,
            **extra,
        }
        if epsilon is not None:
            entry.update(epsilon=epsilon, privacy={"delta": 1e-5, "noise_multiplier": 1.234, "unit": "patient"})
        return entry

    rounds = [
        {
            "round": 1,
            "stage": 0,
            "sites": {"a_ct": site("ct", 0.4111, 0.2222, 1.5), "b_us": site("us", 0.3333, 0.1444)},
        },
        {
            "round": 2,
            "stage": 1,
            "sites": {
                "a_ct": site("ct", 0.8123, 0.6789, 2.25, privacy_budget_exhausted=True),
                "b_us": site("us", 0.7654, float("nan")),
            },
        },
    ]
    cross = {
        "round": 2,
        "models": ["global", "a_ct", "b_us"],
        "sites": ["a_ct", "b_us"],
        "dice_mean": {
            "global": {"a_ct": 0.7456, "b_us": 0.7654},
            "a_ct": {"a_ct": 0.7011, "b_us": 0.5922},
            "b_us": {"a_ct": 0.4833, "b_us": 0.7744},
        },
    }
    centralized = [{"round": 2, "stage": 1, "sites": {"a_ct": {"dice_mean": 0.9087}, "b_us": {"dice_mean": 0.8876}}}]
    alone = {"dice_mean": 0.7000, "hd95": {"organ": 3.0, "lesion": 5.5}, "nsd": {"organ": 0.9, "lesion": float("nan")}}
    local_only = [{"round": 2, "stage": 1, "sites": {"a_ct": alone, "b_us": {"dice_mean": 0.8000}}}]
    return {
        "rounds": rounds,
        "config": {"class-names": "organ,lesion", "strategy": "fedavg"},
        "best_mean_dice": 0.7555,
        "cross_site": cross,
        "centralized": centralized,
        "local_only": local_only,
    }


def test_report_shows_the_numbers_of_metrics_json(tmp_path):
    metrics = _metrics()
    (tmp_path / "metrics.json").write_text(json.dumps(metrics))
    assert main(["report", str(tmp_path)]) == 0
    page = (tmp_path / "report.html").read_text()
    cells = re.findall(r"<td>([^<]*)</td>", page)
    last = metrics["rounds"][-1]["sites"]
    for name, s in last.items():
        for value in (s["dice"]["organ"], s["dice_mean"]):
            assert f"{value:.3f}" in cells, (name, value)
    assert "0.679" in cells and "–" in cells  # a NaN Dice (class absent) shows as a dash
    assert "2.250" in cells and "1.234" in cells and "1.0e-05" in cells  # epsilon, noise, delta of the DP site
    assert any("privacy budget spent" in c for c in cells)
    for row in metrics["cross_site"]["dice_mean"].values():
        assert all(f"{v:.3f}" in cells for v in row.values())
    assert "0.909" in cells and "0.888" in cells  # centralized baseline
    # What the federation gives each site: final global 0.7456 / 0.7654 against 0.7000 / 0.8000 alone.
    rows = re.findall(r"<tr><td>(\w+)</td><td>([\w-]+)</td>((?:<td>[^<]*</td>)+)</tr>", page)
    gains = {(site, model): re.findall(r"<td>([^<]*)</td>", rest) for site, model, rest in rows}
    assert gains[("a_ct", "global")] == ["0.746", "–", "–", "+0.046"]
    assert gains[("a_ct", "local-only")] == ["0.700", "4.250", "0.900", "–"]  # HD95 and NSD: means over classes
    assert gains[("a_ct", "centralized")][-1] == "+0.209" and gains[("b_us", "global")][-1] == "-0.035"
    assert all(f"{s['dice_mean']:.3f}" in cells for s in metrics["rounds"][0]["sites"].values())  # per-round table
    # Plots: written beside the page and embedded in it, so the page is self-contained.
    for name in ("dice_per_site", "epsilon_per_site", "cross_site", "bytes_per_round"):
        png = tmp_path / f"{name}.png"
        assert Image.open(png).size[0] > 300
    assert page.count("data:image/png;base64,") == 4 and 'src="http' not in page


def test_report_without_dp_or_cross_site_leaves_those_sections_out(tmp_path):
    metrics = _metrics()
    for r in metrics["rounds"]:
        for s in r["sites"].values():
            s.pop("epsilon", None)
    del metrics["cross_site"], metrics["centralized"], metrics["local_only"]
    (tmp_path / "metrics.json").write_text(json.dumps(metrics))
    assert main(["report", str(tmp_path)]) == 0
    page = (tmp_path / "report.html").read_text()
    assert "Differential privacy" not in page and "Cross-site" not in page and page.count("data:image/png") == 2
    assert "What the federation gives" not in page  # no baseline was run
    assert not (tmp_path / "epsilon_per_site.png").exists()


def test_report_of_a_folder_without_metrics_is_a_clear_error(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "metrics.json" in capsys.readouterr().err


def test_report_shows_site_level_privacy(tmp_path):
    metrics = _metrics()
    for r, epsilon in zip(metrics["rounds"], (0.8765, 1.4321), strict=True):
        r["site_dp"] = {
            "epsilon": epsilon,
            "delta": 1e-5,
            "noise_multiplier": 1.5,
            "clipping_norm": 0.1,
            "releases": r["round"],
            "budget": 1.5,
            "budget_exhausted": True,
            "unit": "site",
        }
    (tmp_path / "metrics.json").write_text(json.dumps(metrics))
    assert main(["report", str(tmp_path)]) == 0
    page = (tmp_path / "report.html").read_text()
    assert "epsilon 1.432 at delta 1.0e-05 after 2 rounds" in page and "training stopped" in page
    assert Image.open(tmp_path / "epsilon_per_site.png").size[0] > 300


def test_report_of_a_reproducible_dp_run_says_not_private_and_what_dp_covers(tmp_path):
    metrics = _metrics()
    metrics.update(
        not_private="NOT PRIVATE (dp-insecure-reproducible)",
        study="liver",
        weighting="each site's number of training patients",
    )
    (tmp_path / "metrics.json").write_text(json.dumps(metrics))
    assert main(["report", str(tmp_path)]) == 0
    page = (tmp_path / "report.html").read_text()
    assert "NOT PRIVATE (dp-insecure-reproducible): the DP noise could be predicted" in page
    assert "study liver; aggregation weights: each site&#x27;s number of training patients" in page
    assert (
        "the unit is one training patient, adjacency is adding or removing one patient" in page
        and "Not covered: the held-out" in page
    )
    del metrics["not_private"]
    (tmp_path / "metrics.json").write_text(json.dumps(metrics))
    main(["report", str(tmp_path)])
    assert "NOT PRIVATE" not in (tmp_path / "report.html").read_text()


def test_report_of_a_compressed_run_gives_the_share_of_float32_bytes(tmp_path):
    metrics = _metrics()
    metrics["config"]["compression"] = "int8"
    for r in metrics["rounds"]:  # 1 MiB up of 4 MiB, 3 MiB down of 6 MiB, at each site and round
        for s in r["sites"].values():
            s.update(bytes_up_uncompressed=4 * 2**20, bytes_down_uncompressed=6 * 2**20)
    (tmp_path / "metrics.json").write_text(json.dumps(metrics))
    assert main(["report", str(tmp_path)]) == 0
    page = (tmp_path / "report.html").read_text()
    assert "Compression int8: the sites sent 25.0% of their updates' float32 bytes" in page
    assert "received 50.0%" in page
    uncompressed = tmp_path / "plain"
    uncompressed.mkdir()
    (uncompressed / "metrics.json").write_text(json.dumps(_metrics()))
    assert main(["report", str(uncompressed)]) == 0
    assert "Compression" not in (uncompressed / "report.html").read_text()


def test_a_site_that_kept_the_global_model_as_its_personal_one_is_told_apart():
    sites = {
        "ct": {"dice_mean": 0.8, "personal": {"dice_mean": 0.8, "kept_global": True}},
        "mri": {"dice_mean": 0.7, "personal": {"dice_mean": 0.9}},
    }
    _, rows = score_rows(sites, ["organ"])
    notes = {row[0]: row[-1] for row in rows}
    assert (
        notes["ct"] == "personal model (the global model, which scored better on its validation cases): mean Dice 0.800"
    )
    assert notes["mri"] == "personal model: mean Dice 0.900"
