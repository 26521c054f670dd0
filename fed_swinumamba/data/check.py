"""Check a site before it joins: the same loading code as training, every case, every problem."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .datasets import SiteDataError, list_cases, preprocessing, site_data_error, split_cases
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

    @property
    def ok(self) -> bool:
        return not self.problems

    def format(self) -> str:
        lines = [f"site {self.site} ({self.modality}) from {self.config_path}", f"cases: {self.num_train} train, {self.num_val} held out"]
        for c in self.cases:
            lines.append(f"  {c['case']:<24} shape {c['shape']}  slices {c['slices']:>3}  classes {c['classes']}  intensity [{c['min']:.2f}, {c['max']:.2f}] after preprocessing")
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
    except (SiteDataError, SiteConfigError) as err:
        report.problems.append(str(err))
        return report
    train, val = split_cases(cases, config.split.val_fraction, config.split.seed)
    report.num_train, report.num_val = len(train), len(val)
    for case in cases:
        try:
            item = transform({"image": str(case.image), "label": str(case.label), "source_image": str(case.image), "source_label": str(case.label)})
        except Exception as err:  # report every case, not only the first broken one
            report.problems.append(str(site_data_error(err, config.site, case.image)))
            continue
        image, label = np.asarray(item["image"]), np.asarray(item["label"])
        report.cases.append({"case": case.case_id, "shape": tuple(image.shape[1:3]), "slices": image.shape[-1], "classes": sorted(np.unique(label).tolist()), "min": float(image.min()), "max": float(image.max())})
    return report
