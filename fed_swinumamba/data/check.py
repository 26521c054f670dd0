"""Check a site before it joins: the same loading code as training, every case, every problem."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .datasets import SiteDataError, list_cases, preprocess, preprocessing, read_patient_mapping, split_cases
from .site_config import SiteConfigError, load_site_config


@dataclass
class SiteReport:
    config_path: Path
    site: str = "?"
    modality: str = "?"
    cases: list[dict] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    num_train: int = 0
    num_val: int = 0
    num_test: int = 0
    patients: str = ""  # how many patients, and where the mapping came from

    @property
    def ok(self) -> bool:
        return not self.problems

    def format(self) -> str:
        lines = [
            f"site {self.site} ({self.modality}) from {self.config_path}",
            f"cases: {self.num_train} train, {self.num_val} held out for validation"
            + (f", {self.num_test} for the final test" if self.num_test else " (and the final scores)"),
            f"patients: {self.patients}",
        ]
        for c in self.cases:
            spacing = "x".join(f"{s:g}" for s in c["spacing"])
            lines.append(
                f"  {c['case']:<24} patient {c['patient']:<12} shape {c['shape']}  slices {c['slices']:>3}  spacing {spacing} mm  "
                f"classes {c['classes']}  intensity [{c['min']:.2f}, {c['max']:.2f}] after preprocessing"
            )
        lines += [f"PROBLEM: {p}" for p in self.problems] or ["no problems found"]
        return "\n".join(lines)


def check_site(config_path: str | Path, class_names: list[str] | None = None) -> SiteReport:
    report = SiteReport(Path(config_path))
    try:
        config = load_site_config(config_path)
    except SiteConfigError as err:
        report.problems.append(str(err))
        return report
    report.site, report.modality = config.site, config.modality
    class_names = class_names or sorted(set(config.labels.values()))
    try:
        cases = list_cases(config)
        transform = preprocessing(config, class_names)
        mapping = read_patient_mapping(config.data.root, config.site)
    except (SiteDataError, SiteConfigError) as err:
        report.problems.append(str(err))
        return report
    split = config.split
    train, val, test = split_cases(cases, split.val_fraction, split.seed, test_fraction=split.test_fraction)
    report.num_train, report.num_val, report.num_test = len(train), len(val), len(test)
    num_patients = len({c.patient for c in cases})
    report.patients = (
        f"{num_patients} (from {mapping[1].name})"
        if mapping
        else f"{num_patients}: no cases.csv or dataset.json patients, so each case counts as one patient"
    )
    if not val:
        report.problems.append(
            f"site {config.site}: no held-out case ({num_patients} patient(s)): the site cannot be evaluated; add cases or lower split.val_fraction"
        )
    for case in cases:
        try:
            image, label, spacing = preprocess(config, transform, case)
        except SiteDataError as err:  # report every case, not only the first broken one
            report.problems.append(str(err))
            continue
        if image.min() == image.max():
            report.problems.append(
                f"site {config.site}: {case.image}: the image is constant (every voxel {float(image.min()):g} after preprocessing): a blank export?"
            )
        report.cases.append(
            {
                "case": case.case_id,
                "patient": case.patient,
                "shape": tuple(image.shape[1:]),
                "slices": image.shape[0],
                "spacing": spacing,
                "classes": sorted(np.unique(label).tolist()),
                "min": float(image.min()),
                "max": float(image.max()),
            }
        )
    return report
