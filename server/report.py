"""The run report: ``OUT/report.html`` (self-contained) and its PNG plots, from ``OUT/metrics.json``.

Written at the end of every run and on demand (``python -m server report OUT``). Everything shown
comes from metrics.json, Dice with three decimals as stored there.
"""

from __future__ import annotations

import base64
import html
import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on a coordinator
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402


def _fmt(x) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"


def _sites(rounds: list[dict]) -> list[str]:
    return sorted({name for r in rounds for name in r["sites"]})


def _stage_changes(rounds: list[dict]) -> list[tuple[int, int]]:
    """(round, stage) where a new stage starts."""
    return [
        (r["round"], r["stage"])
        for prev, r in zip([None, *rounds], rounds)
        if prev is None or prev["stage"] != r["stage"]
    ]


def _series(rounds: list[dict], site: str, key: str) -> tuple[list[int], list[float]]:
    points = [(r["round"], r["sites"][site][key]) for r in rounds if key in r["sites"].get(site, {})]
    return [p[0] for p in points], [p[1] for p in points]


def plot_dice(metrics: dict, path: Path) -> Path:
    rounds, fig = metrics["rounds"], plt.figure(figsize=(8, 4.5))
    ax = fig.gca()
    colors = {}
    for site in _sites(rounds):
        line = ax.plot(*_series(rounds, site, "dice_mean"), marker="o", label=f"{site} (federated)")[0]
        colors[site] = line.get_color()
    for site in _sites(rounds):
        points = [
            (r["round"], r["sites"][site]["personal"]["dice_mean"])
            for r in rounds
            if "personal" in r["sites"].get(site, {})
        ]
        if points:
            ax.plot(*zip(*points, strict=True), linestyle="-.", color=colors[site], label=f"{site} (personalised)")
    for kind, style in (("centralized", "--"), ("local_only", ":")):
        for site in _sites(metrics.get(kind) or []):
            ax.plot(
                *_series(metrics[kind], site, "dice_mean"),
                linestyle=style,
                color=colors.get(site),
                label=f"{site} ({kind.replace('_', '-')})",
            )
    for r, stage in _stage_changes(rounds)[1:]:
        ax.axvline(r - 0.5, color="grey", linestyle=":", linewidth=1)
        ax.text(r - 0.45, 0.02, f"stage {stage}", rotation=90, color="grey", fontsize=8, va="bottom")
    ax.set(xlabel="round", ylabel="mean foreground Dice (global model)", ylim=(0, 1), title="Dice per site over rounds")
    ax.legend(fontsize=8, loc="lower right")
    return _save(fig, path)


def plot_epsilon(metrics: dict, path: Path) -> Path:
    rounds, fig = metrics["rounds"], plt.figure(figsize=(8, 4))
    ax = fig.gca()
    for site in _sites(rounds):
        xs, ys = _series(rounds, site, "epsilon")
        if xs:
            ax.plot(xs, ys, marker="o", label=f"{site} (unit: patient)")
    federation = [(r["round"], r["site_dp"]["epsilon"]) for r in rounds if "site_dp" in r]
    if federation:
        ax.plot(
            *zip(*federation, strict=True), marker="s", color="black", label="federation (site-level DP, unit: site)"
        )
    ax.set(xlabel="round", ylabel="epsilon spent (RDP accountant)", title="Privacy spent")
    ax.legend(fontsize=8)
    return _save(fig, path)


def compression_shares(metrics: dict) -> dict[str, float]:
    """Bytes sent over what the same tensors cost as float32, up and down over every site and round
    (empty without compression)."""
    entries = [s for r in metrics["rounds"] for s in r["sites"].values() if "bytes_up_uncompressed" in s]
    if not entries:
        return {}
    return {
        d: sum(s[f"bytes_{d}"] for s in entries) / max(1, sum(s[f"bytes_{d}_uncompressed"] for s in entries))
        for d in ("up", "down")
    }


def plot_bytes(metrics: dict, path: Path) -> Path:
    rounds, fig = metrics["rounds"], plt.figure(figsize=(8, 4))
    ax = fig.gca()
    xs = [r["round"] for r in rounds]
    compressed = any("bytes_up_uncompressed" in s for r in rounds for s in r["sites"].values())
    for key, offset in (("bytes_down", -0.2), ("bytes_up", 0.2)):
        ys = [sum(s.get(key, 0) for s in r["sites"].values()) / 2**20 for r in rounds]
        bars = ax.bar([x + offset for x in xs], ys, width=0.4, label=key.replace("_", " ") + " (all sites)")
        if compressed:  # outlined: what the same tensors would have cost as float32
            full = [sum(s.get(f"{key}_uncompressed", 0) for s in r["sites"].values()) / 2**20 for r in rounds]
            ax.bar(
                [x + offset for x in xs],
                full,
                width=0.4,
                fill=False,
                edgecolor=bars.patches[0].get_facecolor(),
                linestyle="--",
                label=key.replace("_", " ") + " as float32",
            )
    ax.set(
        xlabel="round",
        ylabel="MiB",
        title="Communication per round" + (" (compressed; dashed: as float32)" if compressed else ""),
    )
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_cross_site(cross: dict, path: Path) -> Path:
    models, sites = cross["models"], cross["sites"]
    values = [[cross["dice_mean"].get(m, {}).get(s, math.nan) for s in sites] for m in models]
    fig = plt.figure(figsize=(1.6 * len(sites) + 3, 0.6 * len(models) + 2))
    ax = fig.gca()
    image = ax.imshow(values, vmin=0, vmax=1, cmap="viridis")
    ax.set_xticks(range(len(sites)), sites, rotation=30, ha="right")
    ax.set_yticks(range(len(models)), [f"{m} model" for m in models])
    for i, row in enumerate(values):
        for j, v in enumerate(row):
            ax.text(
                j,
                i,
                _fmt(v),
                ha="center",
                va="center",
                color="white" if not math.isnan(v) and v < 0.6 else "black",
                fontsize=9,
            )
    ax.set(xlabel="evaluated at site (held-out data)", title=f"Cross-site mean Dice (round {cross['round']})")
    fig.colorbar(image, ax=ax, fraction=0.04)
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    for ax in fig.axes:
        if ax.get_xlabel() == "round":  # rounds are whole numbers
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _img(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def score_rows(sites: dict, classes: list[str]) -> tuple[list[str], list[list[str]]]:
    """The per-site table of a round, as the report and the console both show it: Dice per class and its mean,
    HD95 (mm) and NSD per class, held-out cases scored and seconds per case; DP figures and notes."""
    private = any("epsilon" in s for s in sites.values())
    header = [
        "site",
        "modality",
        *(f"Dice {c}" for c in classes),
        "mean Dice",
        *(f"HD95 {c} (mm)" for c in classes),
        *(f"NSD {c}" for c in classes),
        "cases scored",
        "s per case",
    ]
    header += (["epsilon", "delta", "noise multiplier"] if private else []) + ["notes"]
    rows = []
    for name, s in sorted(sites.items()):
        row = [
            name,
            s.get("modality") or "?",
            *(_fmt(s.get("dice", {}).get(c)) for c in classes),
            _fmt(s.get("dice_mean")),
        ]
        row += [*(_fmt(s.get("hd95", {}).get(c)) for c in classes), *(_fmt(s.get("nsd", {}).get(c)) for c in classes)]
        row += [
            f"{s['num_val_cases']} of {s['held_out_cases']}" if "held_out_cases" in s else "–",
            _fmt(s.get("eval_s_per_case")),
        ]
        if private:
            p = s.get("privacy", {})
            row += [
                _fmt(s.get("epsilon")),
                f"{p['delta']:.1e}" if "delta" in p else "–",
                _fmt(p.get("noise_multiplier")),
            ]
        notes = list(s.get("errors", [])) + (
            ["privacy budget spent: no longer trains"] if s.get("privacy_budget_exhausted") else []
        )
        notes += [f"update rejected: {s['rejected']}"] if "rejected" in s else []
        if "personal" in s:
            kept = (
                " (the global model, which scored better on its validation cases)"
                if s["personal"].get("kept_global")
                else ""
            )
            notes.append(f"personal model{kept}: mean Dice {_fmt(s['personal']['dice_mean'])}")
        rows.append(row + ["; ".join(notes)])
    return header, rows


def _scores_table(sites: dict, classes: list[str]) -> str:
    return _table(*score_rows(sites, classes))


def _class_mean(scores: dict) -> float:
    valid = [v for v in scores.values() if v is not None and not math.isnan(v)]
    return sum(valid) / len(valid) if valid else math.nan


def _final_scores(metrics: dict) -> dict[str, dict]:
    """Model -> site -> its final scores on every test case: the global model's (and the best checkpoint's),
    the sites' personal models', and each baseline's last round."""
    final = metrics.get("final_evaluation")
    models = {"global": final["global"]["sites"] if final else metrics["rounds"][-1]["sites"]}
    if final and "best" in final:
        models[f"best checkpoint (round {final['best']['round']})"] = final["best"]["sites"]
    personal = {site: s["personal"] for site, s in models["global"].items() if "personal" in s}
    if personal:
        models["personalised"] = personal
    for kind in ("local_only", "centralized"):
        if metrics.get(kind):
            models[kind.replace("_", "-")] = metrics[kind][-1]["sites"]
    return models


def gain_rows(metrics: dict) -> tuple[list[str], list[list[str]]]:
    """What the federation gives each site: every model's final mean Dice, HD95 and NSD over the site's
    held-out cases (global, best checkpoint, the site's personalised model, the baselines that were run),
    and the gain in Dice over training alone (local-only), when that baseline was run."""
    models = _final_scores(metrics)
    header = ["site", "model", "mean Dice", "mean HD95 (mm)", "mean NSD", "Dice gain over local-only"]
    rows = []
    for site in sorted(models["global"]):
        alone = models.get("local-only", {}).get(site, {}).get("dice_mean")
        for model, sites in models.items():
            s = sites.get(site)
            if s is None:
                continue
            gain = "–" if alone is None or model == "local-only" else f"{s['dice_mean'] - alone:+.3f}"
            rows.append(
                [
                    site,
                    model,
                    _fmt(s["dice_mean"]),
                    _fmt(_class_mean(s.get("hd95", {}))),
                    _fmt(_class_mean(s.get("nsd", {}))),
                    gain,
                ]
            )
    return header, rows


def aligned_text(header: list[str], rows: list[list[str]]) -> str:
    """A table as aligned text, for the coordinator's log and the console."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *rows])


def score_text(sites: dict, classes: list[str]) -> str:
    """:func:`score_rows` as aligned text, for the coordinator's log."""
    return aligned_text(*score_rows(sites, classes))


# What a site's DP-SGD guarantee covers and what it does not (README, "Differential privacy").
DP_COVERAGE = (
    "What DP-SGD at a site covers: the unit is one training patient, adjacency is adding or removing one patient "
    "(with all their images), at the delta in the table above, for the study named above over all its runs. Released "
    "each round and covered: the site's trained weights and the DP scalars (epsilon, delta, noise multiplier, clip norm, "
    "sample rate, steps). Not covered: the held-out patients' Dice and their count (evaluation replies), the disclosed "
    "training-patient count (rounded down to two significant digits; it sets the sample rate and the aggregation weight), "
    "the choice of the run's and the site's settings, and floating-point effects of the noise's representation."
)


def _not_private(metrics: dict) -> str | None:
    """The warning of a run whose DP noise was reproducible (hence known to the coordinator), if any."""
    marks = [metrics.get("not_private")] + [r.get("not_private") for r in metrics["rounds"]]
    marks += [s.get("not_private") for r in metrics["rounds"] for s in r["sites"].values()]
    return next((m for m in marks if m), None)


def _site_dp_note(last_round: dict) -> str:
    p = last_round.get("site_dp")
    if not p:
        return ""
    budget = (
        "no limit"
        if p["budget"] is None
        else f"budget {p['budget']:.3f}" + (", spent: training stopped" if p["budget_exhausted"] else "")
    )
    return (
        f"<p>Site-level DP (unit: a whole site): epsilon {p['epsilon']:.3f} at delta {p['delta']:.1e} after {p['releases']} rounds, "
        f"noise multiplier {p['noise_multiplier']:.3f}, clipping norm {p['clipping_norm']:.3g}, {budget}.</p>"
    )


def _rounds_table(metrics: dict) -> str:
    sites = _sites(metrics["rounds"])
    rows = [
        [str(r["round"]), str(r["stage"]), *(_fmt(r["sites"].get(s, {}).get("dice_mean")) for s in sites)]
        for r in metrics["rounds"]
    ]
    return _table(["round", "stage", *sites], rows)


def _cross_table(cross: dict) -> str:
    rows = [
        [f"{m} model", *(_fmt(cross["dice_mean"].get(m, {}).get(s)) for s in cross["sites"])] for m in cross["models"]
    ]
    return _table(["model \\ evaluated at", *cross["sites"]], rows)


STYLE = """body{font-family:sans-serif;max-width:1000px;margin:2em auto;color:#222}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 10px;text-align:right}
td:first-child,th:first-child{text-align:left}th{background:#f0f0f0}img{max-width:100%}
.meta{color:#555}.warning{color:#b00}"""


def write_report(out: str | Path) -> Path:
    """Write ``out/report.html`` and the PNG plots beside it from ``out/metrics.json``."""
    out = Path(out)
    metrics = json.loads((out / "metrics.json").read_text())
    if not metrics.get("rounds"):
        raise ValueError(f"{out / 'metrics.json'} holds no round yet")
    config = metrics.get("config", {})
    classes = [c.strip() for c in str(config.get("class-names", "organ,lesion")).split(",") if c.strip()]
    sections = [
        "<h2>Dice per site over rounds</h2>",
        _img(plot_dice(metrics, out / "dice_per_site.png"), "Dice per site over rounds"),
        f"<h2>Final round ({metrics['rounds'][-1]['round']}): scores per class, global model</h2>",
        _scores_table(metrics["rounds"][-1]["sites"], classes),
        "<h2>Mean Dice per round</h2>",
        _rounds_table(metrics),
    ]
    final = metrics.get("final_evaluation")
    if final:
        sections += [
            f"<h2>Final global model (round {final['global']['round']}) on every test case (a site without a test split: its validation cases)</h2>",
            _scores_table(final["global"]["sites"], classes),
        ]
        if "best" in final:
            sections += [
                f"<h2>Best checkpoint (round {final['best']['round']}) on every test case (a site without a test split: its validation cases)</h2>",
                _scores_table(final["best"]["sites"], classes),
            ]
    if len(_final_scores(metrics)) > 1:
        sections += [
            "<h2>What the federation gives each site (final models, every test case)</h2>",
            _table(*gain_rows(metrics)),
        ]
    if any("site_dp" in r or any("epsilon" in s for s in r["sites"].values()) for r in metrics["rounds"]):
        sections += [
            "<h2>Differential privacy</h2>",
            _site_dp_note(metrics["rounds"][-1]),
            _img(plot_epsilon(metrics, out / "epsilon_per_site.png"), "epsilon spent"),
        ]
        if any("epsilon" in s for r in metrics["rounds"] for s in r["sites"].values()):
            sections.append(f"<p>{html.escape(DP_COVERAGE)}</p>")
    if metrics.get("cross_site"):
        cross = metrics["cross_site"]
        sections += [
            "<h2>Cross-site evaluation</h2>",
            _img(plot_cross_site(cross, out / "cross_site.png"), "cross-site Dice"),
            _cross_table(cross),
        ]
    sections += ["<h2>Communication</h2>", _img(plot_bytes(metrics, out / "bytes_per_round.png"), "bytes per round")]
    shares = compression_shares(metrics)
    if shares:
        sections.append(
            f"<p>Compression {html.escape(str(config.get('compression', '?')))}: the sites sent "
            f"{shares['up']:.1%} of their updates' float32 bytes, and received {shares['down']:.1%} of what the "
            "same tensors cost as float32 (exact resyncs included).</p>"
        )
    meta = (
        f"{len(metrics['rounds'])} rounds, strategy {html.escape(str(config.get('strategy', '?')))}, model "
        f"{html.escape(str(config.get('model-variant', '?')))}, best mean Dice {_fmt(metrics.get('best_mean_dice'))}"
        f", study {html.escape(str(metrics.get('study', '?')))}; aggregation weights: {html.escape(str(metrics.get('weighting', '?')))}"
    )
    warning = _not_private(metrics)
    if warning:
        meta = (
            f"<strong class='warning'>{html.escape(warning)}: the DP noise could be predicted from the run's seed; no epsilon of this run protects anyone.</strong><br>"
            + meta
        )
    page = (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>fed-swinumamba run report</title><style>{STYLE}</style></head>"
        f"<body><h1>fed-swinumamba run report</h1><p class='meta'>{meta}</p>{''.join(sections)}</body></html>"
    )
    path = out / "report.html"
    path.write_text(page)
    return path
