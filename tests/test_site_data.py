"""Site configuration, demo phantoms and the MONAI data pipeline: what a hospital engineer relies on."""

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from fed_swinumamba.data import SiteConfigError, SiteData, SiteDataError, load_site_config, split_cases
from fed_swinumamba.simulated import generate_phantoms, partition_cases, split_dataset

CLASSES = ["organ", "lesion"]


def _yaml(tmp_path: Path, config: dict, name: str = "hospital_a.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(config))
    return path


def _valid(root: str = "data") -> dict:
    return {"site": "hospital_a", "modality": "ct", "data": {"root": root}, "labels": {1: "organ", 2: "lesion"}}


@pytest.mark.parametrize(
    "change, field, problem",
    [
        (lambda c: c.update(color="red"), "color", "unknown field"),
        (lambda c: c["data"].update(fromat="msd"), "data.fromat", "unknown field"),
        (lambda c: c.pop("labels"), "labels", "required field is missing"),
        (lambda c: c.update(modality="pet"), "modality", "must be one of ct, mri, us"),
        (lambda c: c["data"].update(slice_axis="z"), "data.slice_axis", "must be 0, 1 or 2"),
        (lambda c: c.update(training={"batch_size": 2.5}), "training.batch_size", "positive integer"),
        (lambda c: c.update(training={"local_epochs": 1, "local_steps": 5}), "training.local_steps", "not both"),
        (lambda c: c.update(preprocessing={"window": [300, -200]}), "preprocessing.window", "low < high"),
        (
            lambda c: c.update(privacy={"enabled": True, "target_epsilon": 8, "lr_scale": 0}),
            "privacy.lr_scale",
            "positive number",
        ),
    ],
)
def test_config_errors_name_the_file_and_the_field(tmp_path, change, field, problem):
    config = _valid()
    change(config)
    with pytest.raises(SiteConfigError) as err:
        load_site_config(_yaml(tmp_path, config))
    assert str(err.value).startswith(f"{tmp_path / 'hospital_a.yaml'}: {field}: ")
    assert problem in str(err.value)


def test_malformed_yaml_names_the_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("site: a\nmodality: [ct\n")
    with pytest.raises(SiteConfigError, match=r"broken\.yaml: line \d+: malformed YAML"):
        load_site_config(path)


def test_privacy_section_reads_the_dp_learning_rate_scale(tmp_path):
    config = {**_valid(), "privacy": {"enabled": True, "target_epsilon": 8, "lr_scale": 2}}
    assert load_site_config(_yaml(tmp_path, config)).privacy.lr_scale == 2.0
    assert load_site_config(_yaml(tmp_path, _valid())).privacy.lr_scale == 1.0


def test_relative_root_resolves_against_the_yaml_folder_and_classes_map(tmp_path):
    config = load_site_config(_yaml(tmp_path, _valid("../images")))
    assert config.data.root == (tmp_path / "../images").resolve()
    assert config.preprocessing == {"window": [-200.0, 300.0]}
    assert config.class_mapping_for(CLASSES) == {0: 0, 1: 1, 2: 2}
    with pytest.raises(SiteConfigError, match=r"labels\.2: class 'lesion' is not one of"):
        config.class_mapping_for(["organ"])


def test_phantoms_are_real_formats_with_exact_labels_and_deterministic(tmp_path):
    ct = generate_phantoms(tmp_path / "ct", "ct", num_cases=3, seed=4, size=32, num_slices=4)
    img = nib.load(ct / "imagesTr" / "case_000.nii.gz").get_fdata()
    lab = nib.load(ct / "labelsTr" / "case_000.nii.gz").get_fdata()
    assert img.shape == lab.shape == (32, 32, 4)
    assert set(np.unique(lab)) <= {0, 1, 2} and (lab == 1).any()
    assert -1100 < img.min() < -900 and 0 < img[lab == 1].mean() < 120  # air and liver-like HU
    us = generate_phantoms(tmp_path / "us", "us", num_cases=2, seed=0, size=32)
    assert set(np.unique(np.array(Image.open(us / "masks" / "case_000.png")))) <= {0, 128, 255}
    again = generate_phantoms(tmp_path / "ct2", "ct", num_cases=3, seed=4, size=32, num_slices=4)
    assert np.array_equal(
        nib.load(again / "imagesTr" / "case_002.nii.gz").get_fdata(),
        nib.load(ct / "imagesTr" / "case_002.nii.gz").get_fdata(),
    )


def test_split_is_by_case_and_seed_stable():
    cases = [f"c{i}" for i in range(10)]
    train, val, _ = split_cases(cases, 0.3, seed=1)
    assert not set(train) & set(val) and set(train) | set(val) == set(cases) and len(val) == 3
    assert split_cases(cases, 0.3, seed=1) == (train, val, [])


def test_a_test_split_takes_whole_patients_from_training_and_leaves_validation_as_it_was():
    cases = [f"p{i}-{k}" for i in range(10) for k in range(2)]  # 10 patients of 2 files each

    def patient(c):
        return c.split("-")[0]

    train0, val0, none = split_cases(cases, 0.2, seed=4, patient_of=patient)
    train, val, test = split_cases(cases, 0.2, seed=4, patient_of=patient, test_fraction=0.3)
    assert none == [] and val == val0 and len(test) == 6 and set(train) == set(train0) - set(test)
    sides = [{patient(c) for c in part} for part in (train, val, test)]
    assert not (sides[0] & sides[1] or sides[0] & sides[2] or sides[1] & sides[2])  # a patient on one side
    assert split_cases(cases[:6], 0.2, seed=4, patient_of=patient, test_fraction=0.01)[2]  # at least one patient


@pytest.mark.parametrize("scheme", ["iid", "quantity", "dirichlet"])
def test_partition_gives_every_case_to_exactly_one_site(scheme):
    cases = [f"c{i}" for i in range(13)]
    parts = partition_cases(cases, 4, scheme, seed=3)
    assert sorted(c for p in parts for c in p) == sorted(cases) and all(parts)


@pytest.fixture
def ct_site(tmp_path):
    data = generate_phantoms(tmp_path / "ct", "ct", num_cases=4, seed=0, size=32, num_slices=3)
    (yaml_path,) = split_dataset(data, "ct", 1, "iid", 0, tmp_path / "sites")
    return yaml_path, tmp_path / "sites" / "ct_site"


def test_site_data_items_and_on_disk_cache(ct_site, monkeypatch):
    yaml_path, _ = ct_site
    config = load_site_config(yaml_path)
    data = SiteData.from_config(config, CLASSES)
    assert data.num_train_cases == 3 and len(data.val_cases) == 1 and data.num_train_slices == 9
    batch = next(iter(data.training_batches(4, np.random.default_rng(0))))
    assert batch["image"].shape == (4, 1, 64, 64) and batch["label"].dtype == torch.int64  # padded to the patch
    assert set(batch["label"].unique().tolist()) <= {0, 1, 2}
    held_out = data.val_cases[0]
    assert held_out.image_slices().shape == (3, 32, 32) and 0.0 <= held_out.image_slices().min()
    assert held_out.spacing == (1.5, 1.5, 3.0)  # the phantoms' voxel size, in the (H, W, S) order of the arrays
    import monai.transforms

    def no_reading(*args, **kwargs):
        raise AssertionError("a cached case was read again")

    monkeypatch.setattr(monai.transforms.LoadImaged, "__call__", no_reading)
    assert SiteData.from_config(config, CLASSES).num_train_cases == 3  # served from the site's cache, not read again


def _rewrite(path: Path, fn) -> None:
    img = nib.load(path)
    array, affine = np.asarray(img.get_fdata()), img.affine
    path.unlink()  # hard-linked from the source dataset: write a new file
    nib.save(nib.Nifti1Image(fn(array), affine), path)


def _corrupt_label(root: Path, fn) -> None:
    _rewrite(root / "labelsTr" / "case_001.nii.gz", fn)


def test_unknown_label_values_name_site_file_and_values(ct_site):
    yaml_path, root = ct_site
    _corrupt_label(root, lambda a: np.where(a == 2, 7, a).astype(np.uint8))
    with pytest.raises(SiteDataError, match=r"site ct_site: .*case_001\.nii\.gz: label values \[7\] are not in"):
        SiteData.from_config(load_site_config(yaml_path), CLASSES)


def test_shape_mismatch_is_a_clear_error(ct_site):
    yaml_path, root = ct_site
    _corrupt_label(root, lambda a: a[:16].astype(np.uint8))
    with pytest.raises(
        SiteDataError,
        match=r"site ct_site: .*case_001\.nii\.gz: image shape \(32, 32, 3\) differs from label shape \(16, 32, 3\)",
    ):
        SiteData.from_config(load_site_config(yaml_path), CLASSES)


def test_nan_intensities_are_a_clear_error(ct_site):
    yaml_path, root = ct_site

    def with_nan(a):
        a = a.astype(np.float32)
        a[0, 0, 0] = np.nan
        return a

    _rewrite(root / "imagesTr" / "case_002.nii.gz", with_nan)
    with pytest.raises(SiteDataError, match=r"site ct_site: .*case_002\.nii\.gz: image has NaN"):
        SiteData.from_config(load_site_config(yaml_path), CLASSES)


def test_corrupted_nifti_names_site_and_file(ct_site):
    yaml_path, root = ct_site
    image = root / "imagesTr" / "case_002.nii.gz"
    data = image.read_bytes()
    image.unlink()  # hard-linked from the source dataset: write a new file
    image.write_bytes(data[: len(data) // 2])  # a transfer cut short
    with pytest.raises(SiteDataError, match=r"site ct_site: .*case_002\.nii\.gz: cannot be loaded"):
        SiteData.from_config(load_site_config(yaml_path), CLASSES)


def test_missing_folder_and_unmatched_names(ct_site):
    yaml_path, root = ct_site
    (root / "labelsTr" / "case_000.nii.gz").unlink()
    with pytest.raises(SiteDataError, match=r"site ct_site: .*case_000: no matching file"):
        SiteData.from_config(load_site_config(yaml_path), CLASSES)
    import shutil

    shutil.rmtree(root)
    with pytest.raises(SiteDataError, match=r"site ct_site: data folder .* does not exist"):
        SiteData.from_config(load_site_config(yaml_path), CLASSES)


def test_check_site_reports_every_broken_case_and_passes_a_good_site(ct_site):
    from fed_swinumamba.data.check import check_site

    yaml_path, root = ct_site
    good = check_site(yaml_path, CLASSES)
    assert (
        good.ok
        and good.num_train + good.num_val == 4
        and all(c["classes"] == [0, 1, 2] or c["classes"] == [0, 1] for c in good.cases)
    )
    _corrupt_label(root, lambda a: np.where(a == 2, 9, a).astype(np.uint8))
    (root / "imagesTr" / "case_003.nii.gz").write_bytes(b"not a nifti")
    bad = check_site(yaml_path, CLASSES)
    assert not bad.ok and len(bad.problems) == 2
    assert any("case_001" in p and "[9]" in p for p in bad.problems) and any(
        "case_003" in p and "cannot be loaded" in p for p in bad.problems
    )
    assert "PROBLEM" in bad.format()


def test_orientation_and_spacing_are_applied_as_configured(ct_site):
    yaml_path, root = ct_site
    plain = SiteData.from_config(load_site_config(yaml_path), CLASSES)
    config = yaml.safe_load(yaml_path.read_text())
    config["data"].update(orientation="LPS", spacing=[3.0, 3.0, 0])  # phantoms are stored RAS at 1.5 x 1.5 x 3 mm
    yaml_path.write_text(yaml.safe_dump(config))
    resampled = SiteData.from_config(load_site_config(yaml_path), CLASSES)
    a, b = plain.val_cases[0].label_slices(), resampled.val_cases[0].label_slices()
    assert b.shape == (3, 16, 16) and resampled.val_cases[0].spacing == (
        3.0,
        3.0,
        3.0,
    )  # half the in-plane size, slices kept
    assert np.array_equal(b, a[:, ::-1, ::-1][:, ::2, ::2])  # R->L and A->P flip, then nearest 2x
    config["data"]["orientation"] = "XYZ"
    yaml_path.write_text(yaml.safe_dump(config))
    with pytest.raises(SiteConfigError, match=r"data\.orientation: must be 3 axis codes"):
        load_site_config(yaml_path)


def test_a_dicom_site_loads_like_the_same_phantoms_in_nifti(tmp_path):
    """DICOM series (LPS, stored with a rescale intercept) reach the network on the NIfTI grid, in HU."""
    sites = {}
    for fmt in ("msd", "dicom"):
        data = generate_phantoms(tmp_path / fmt, "ct", num_cases=3, seed=5, size=32, num_slices=4, dicom=fmt == "dicom")
        (yaml_path,) = split_dataset(data, "ct", 1, "iid", 0, tmp_path / f"sites_{fmt}")
        assert yaml.safe_load(yaml_path.read_text())["data"]["format"] == fmt
        sites[fmt] = SiteData.from_config(load_site_config(yaml_path), CLASSES)
    nifti, dicom = sites["msd"], sites["dicom"]
    assert dicom.num_train_cases == nifti.num_train_cases == 2
    for a, b in zip(nifti.val_cases, dicom.val_cases, strict=True):
        assert b.image_slices().shape == a.image_slices().shape == (4, 32, 32)
        assert np.array_equal(b.label_slices(), a.label_slices())
        # HU stored as integers: after the CT window (500 HU -> [0, 1]) within half a HU, plus float16 rounding
        np.testing.assert_allclose(
            b.image_slices().astype(np.float32), a.image_slices().astype(np.float32), atol=0.5 / 500 + 5e-4
        )
