"""A real hospital's dataset: the preprocessed-case cache, geometry checks, patients, foreground oversampling."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml

from fed_swinumamba.data import SiteData, SiteDataError, load_site_config
from fed_swinumamba.data.check import check_site
from fed_swinumamba.simulated import split_dataset

CLASSES = ["organ", "lesion"]
AFFINE = np.diag([0.8, 0.8, 2.5, 1.0])


def write_case(root: Path, name: str, image: np.ndarray, label: np.ndarray, affine=AFFINE, label_affine=None) -> None:
    for folder, array, a in (
        ("imagesTr", image, affine),
        ("labelsTr", label, affine if label_affine is None else label_affine),
    ):
        (root / folder).mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(array, a), root / folder / f"{name}.nii.gz")


def ct_volume(rng, shape=(48, 40, 12), lesion_slices=(), organ=True) -> tuple[np.ndarray, np.ndarray]:
    """int16 HU with an organ block, and a lesion in the given slices only."""
    image = rng.normal(-50, 30, shape).astype(np.int16)
    label = np.zeros(shape, np.uint8)
    if organ:
        label[10:30, 10:30, :] = 1
    for s in lesion_slices:
        label[16:20, 16:20, s] = 2
    image[label == 1] += 100
    image[label == 2] += 200
    return image, label


def site_yaml(tmp_path: Path, root: Path, **sections) -> Path:
    config = {
        "site": "hospital_a",
        "modality": "ct",
        "data": {"root": str(root)},
        "labels": {1: "organ", 2: "lesion"},
        **sections,
    }
    path = tmp_path / "hospital_a.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture
def ct_dataset(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "data"
    for i in range(5):
        write_case(root, f"case_{i}", *ct_volume(rng, lesion_slices=(3, 4)))
    return root


def test_cache_lives_outside_the_data_folder_and_serves_a_read_only_site(tmp_path, ct_dataset, user_folders):
    yaml_path = site_yaml(tmp_path, ct_dataset)
    for p in [ct_dataset, *ct_dataset.rglob("*")]:
        p.chmod(0o555 if p.is_dir() else 0o444)
    try:
        data = SiteData.from_config(load_site_config(yaml_path), CLASSES)
    finally:
        for p in [ct_dataset, *ct_dataset.rglob("*")]:
            p.chmod(0o755 if p.is_dir() else 0o644)
    assert data.num_train_cases == 4 and not any(p.name.startswith(".") for p in ct_dataset.iterdir())
    entry = data.train_cases[0].folder
    assert entry.is_relative_to(user_folders / "cache" / "fed_swinumamba" / "sites" / "hospital_a")
    # compact: float16 intensities and uint8 labels, (S, H, W)
    assert (
        np.load(entry / "image.npy", mmap_mode="r").dtype == np.float16
        and np.load(entry / "label.npy", mmap_mode="r").dtype == np.uint8
    )
    assert np.load(entry / "image.npy", mmap_mode="r").shape == (12, 48, 40)


def test_a_replaced_file_is_preprocessed_again(tmp_path, ct_dataset):
    yaml_path = site_yaml(
        tmp_path, ct_dataset, split={"val_fraction": 0.2, "seed": 0}, training={"cache_dir": str(tmp_path / "cache")}
    )
    first = SiteData.from_config(load_site_config(yaml_path), CLASSES)
    case = first.val_cases[0]
    image, label = ct_volume(np.random.default_rng(1), lesion_slices=(7,))
    label[:] = np.where(label == 1, 0, label)  # the organ annotation removed in the new version of the file
    os.unlink(ct_dataset / "labelsTr" / f"{case.case_id}.nii.gz")
    write_case(ct_dataset, case.case_id, image, label)
    again = SiteData.from_config(load_site_config(yaml_path), CLASSES).val_cases[0]
    assert again.case_id == case.case_id and again.folder != case.folder
    assert set(again.slices_with) == {2} and again.slices_with[2] == (7,)
    assert np.array_equal(again.label_slices()[7], label[:, :, 7])


def test_a_changed_preprocessing_setting_is_a_new_entry(tmp_path, ct_dataset):
    yaml_path = site_yaml(tmp_path, ct_dataset, training={"cache_dir": str(tmp_path / "cache")})
    narrow = SiteData.from_config(load_site_config(yaml_path), CLASSES).val_cases[0]
    config = yaml.safe_load(yaml_path.read_text())
    config["preprocessing"] = {"window": [-1000, 1000]}
    yaml_path.write_text(yaml.safe_dump(config))
    wide = SiteData.from_config(load_site_config(yaml_path), CLASSES).val_cases[0]
    assert wide.folder != narrow.folder and wide.image_slices().max() < narrow.image_slices().max()


def test_a_cache_write_killed_midway_is_not_read_back(tmp_path, ct_dataset):
    cache = tmp_path / "cache"
    yaml_path = site_yaml(tmp_path, ct_dataset, training={"cache_dir": str(cache)})
    # A process that dies (SIGKILL, no clean-up) while writing the labels of the first case.
    script = textwrap.dedent(f"""
        import os, signal, numpy as np
        from fed_swinumamba.data import SiteData, load_site_config
        real_save = np.save
        def dying_save(path, array, *a, **k):
            if str(path).endswith("label.npy"):
                with open(path, "wb") as f:
                    f.write(b"\\x93NUMPY")  # a few bytes of a file, then the process is killed
                os.kill(os.getpid(), signal.SIGKILL)
            real_save(path, array, *a, **k)
        np.save = dying_save
        SiteData.from_config(load_site_config({str(yaml_path)!r}), ["organ", "lesion"])
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True)
    assert done.returncode == -9
    assert list(cache.rglob("label.npy")) and not list(cache.rglob("meta.json"))  # it died mid-entry
    data = SiteData.from_config(load_site_config(yaml_path), CLASSES)
    for case in data.train_cases + data.val_cases:
        assert case.label_slices().shape == (12, 48, 40) and 2 in case.slices_with


def test_mirrored_label_affine_is_an_error_naming_both_files(tmp_path, ct_dataset):
    image, label = ct_volume(np.random.default_rng(2))
    mirrored = AFFINE.copy()
    mirrored[0, 0], mirrored[0, 3] = -0.8, 47 * 0.8  # same shape, x axis flipped: a common export mistake
    write_case(ct_dataset, "case_9", image, label, label_affine=mirrored)
    yaml_path = site_yaml(tmp_path, ct_dataset)
    with pytest.raises(SiteDataError) as err:
        SiteData.from_config(load_site_config(yaml_path), CLASSES)
    message = str(err.value)
    assert (
        "site hospital_a" in message
        and "imagesTr/case_9.nii.gz" in message
        and "labelsTr/case_9.nii.gz" in message
        and "affines differ" in message
    )
    report = check_site(yaml_path, CLASSES)
    assert not report.ok and any("case_9" in p and "affines differ" in p for p in report.problems)


def test_multi_channel_volumes_need_the_channel_to_use(tmp_path, ct_dataset):
    image, label = ct_volume(np.random.default_rng(3))
    echoes = np.stack([image, image + 500], axis=-1)  # (X, Y, Z, 2): two echoes
    write_case(ct_dataset, "case_9", echoes, label)
    yaml_path = site_yaml(tmp_path, ct_dataset)
    with pytest.raises(
        SiteDataError, match=r"site hospital_a: .*case_9\.nii\.gz: image has 2 channels; set data\.channel"
    ):
        SiteData.from_config(load_site_config(yaml_path), CLASSES)
    config = yaml.safe_load(yaml_path.read_text())
    config["data"]["channel"] = 1
    config["preprocessing"] = {"window": [-1000, 2000]}
    yaml_path.write_text(yaml.safe_dump(config))
    data = SiteData.from_config(load_site_config(yaml_path), CLASSES)
    case = next(c for c in data.train_cases + data.val_cases if c.case_id == "case_9")
    expected = (np.clip(echoes[..., 1].astype(np.float32), -1000, 2000) + 1000) / 3000
    np.testing.assert_allclose(case.image_slices().astype(np.float32), np.moveaxis(expected, -1, 0), atol=1e-3)


def test_check_site_reports_a_blank_image_and_a_site_without_held_out_cases(tmp_path):
    root = tmp_path / "data"
    image, label = ct_volume(np.random.default_rng(4))
    write_case(root, "only_case", np.full_like(image, -1024), label)
    report = check_site(site_yaml(tmp_path, root), CLASSES)
    assert any("only_case" in p and "constant" in p for p in report.problems)
    assert any("no held-out case" in p for p in report.problems)
    assert "each case counts as one patient" in report.format()


def _patient_site(tmp_path, mapping_file: str) -> tuple[Path, dict[str, str]]:
    """Twelve studies of five patients (1-4 studies each), mapped by cases.csv or dataset.json."""
    root = tmp_path / "data"
    rng = np.random.default_rng(5)
    patients = {f"study_{i:02d}": f"P{i % 5}" for i in range(12)}
    for case in patients:
        write_case(root, case, *ct_volume(rng, shape=(32, 32, 4), lesion_slices=(1,)))
    if mapping_file == "cases.csv":
        (root / "cases.csv").write_text("case,patient\n" + "".join(f"{c},{p}\n" for c, p in patients.items()))
    else:
        entries = [
            {"image": f"./imagesTr/{c}.nii.gz", "label": f"./labelsTr/{c}.nii.gz", "patient": p}
            for c, p in patients.items()
        ]
        (root / "dataset.json").write_text(json.dumps({"name": "test", "training": entries}))
    return site_yaml(tmp_path, root, split={"val_fraction": 0.4, "seed": 3}), patients


@pytest.mark.parametrize("mapping_file", ["cases.csv", "dataset.json"])
def test_a_patients_studies_stay_on_one_side_of_the_split_and_dp_samples_patients(tmp_path, mapping_file):
    yaml_path, patients = _patient_site(tmp_path, mapping_file)
    data = SiteData.from_config(load_site_config(yaml_path), CLASSES)
    train = {patients[c.case_id] for c in data.train_cases}
    held_out = {patients[c.case_id] for c in data.val_cases}
    assert not train & held_out and train | held_out == set(patients.values()) and len(held_out) == 2
    assert (
        data.patients_mapped
        and data.num_train_patients == 3
        and data.num_train_cases == sum(p in train for p in patients.values())
    )
    # DP-SGD's unit: one item per training patient, built only from that patient's studies
    crops = data.patient_crops(slices_per_patient=6, rng=np.random.default_rng(0))
    assert len(crops) == 3
    for p, own in enumerate(crops.patients):
        assert len({data.train_cases[c].patient for c in own}) == 1
        assert crops[p]["image"].shape == (6, 1, 64, 64)
    assert sorted(len(own) for own in crops.patients) == sorted(sum(v == p for v in patients.values()) for p in train)


def test_an_unmapped_case_is_an_error_naming_the_mapping_file(tmp_path):
    yaml_path, patients = _patient_site(tmp_path, "cases.csv")
    table = load_site_config(yaml_path).data.root / "cases.csv"
    table.write_text("\n".join(table.read_text().splitlines()[:-1]) + "\n")  # the last study loses its row
    with pytest.raises(SiteDataError, match=r"site hospital_a: .*cases\.csv: case study_11 has no patient"):
        SiteData.from_config(load_site_config(yaml_path), CLASSES)


def test_foreground_oversampling_finds_a_lesion_in_3_of_48_slices(tmp_path):
    """pos_fraction of the crops are centred on foreground chosen over the whole case, each present class
    equally often; a slice drawn first would show the lesion in only 3 / 48 of the crops."""
    root = tmp_path / "data"
    rng = np.random.default_rng(6)
    for i in range(3):
        image, label = ct_volume(rng, shape=(96, 96, 48), lesion_slices=(20, 21, 22), organ=False)
        label[60:80, 60:80, 10:40] = 1  # an organ in 30 of the 48 slices, away from the lesion
        write_case(root, f"case_{i}", image, label)
    yaml_path = site_yaml(
        tmp_path, root, training={"patch_size": [32, 32], "pos_fraction": 0.6, "augment": False, "loader_workers": 0}
    )
    data = SiteData.from_config(load_site_config(yaml_path), CLASSES)
    batches = data.training_batches(48, np.random.default_rng(0))
    assert len(batches.sampler) == data.num_train_slices == 96  # a pass: as many crops as training slices
    labels = np.concatenate([b["label"].numpy() for _ in range(6) for b in batches])
    lesion = np.mean([(x == 2).any() for x in labels])
    organ = np.mean([(x == 1).any() for x in labels])
    # forced crops: 0.6 / 2 per class; uniform ones (0.4) add 0.4 * 30/48 * 0.31 for the organ, 0.4 * 3/48 * 0.09
    # for the lesion (a 32-pixel crop of 96 overlaps a 20- or 4-pixel square with probability 0.55^2, 0.31^2)
    assert 0.25 < lesion < 0.36 and 0.31 < organ < 0.44
    assert np.mean([(x > 0).any() for x in labels]) > 0.6


def test_split_dataset_reads_msd_labels_and_patients(tmp_path):
    yaml_path, patients = _patient_site(tmp_path, "dataset.json")
    source = load_site_config(yaml_path).data.root
    meta = json.loads((source / "dataset.json").read_text())
    meta["labels"] = {"0": "background", "1": "liver", "2": "tumour"}
    (source / "dataset.json").write_text(json.dumps(meta))
    yamls = split_dataset(source, "ct", 2, "iid", 0, tmp_path / "split")
    by_site = []
    for y in yamls:
        config = load_site_config(y)
        assert config.labels == {1: "liver", 2: "tumour"}
        data = SiteData.from_config(config, ["liver", "tumour"])
        by_site.append({c.patient for c in data.train_cases + data.val_cases})
    assert not by_site[0] & by_site[1] and by_site[0] | by_site[1] == set(
        patients.values()
    )  # a patient at one site only


_PEAK_RSS = """
import resource, sys
import numpy as np
from fed_swinumamba.data import SiteData, load_site_config
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
data = SiteData.from_config(load_site_config(sys.argv[1]), ["organ", "lesion"])
for batch in data.training_batches(16, np.random.default_rng(0)):  # a whole pass over the training slices
    pass
for case in data.val_cases:  # as evaluation reads them: one at a time
    image, label = case.image_slices(), case.label_slices()
print(len(data.train_cases), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
"""


@pytest.mark.slow
def test_memory_of_a_message_does_not_grow_with_the_number_of_cases(tmp_path):
    """Open the site, one training pass, read every held-out case: the same peak for N and 4N cases (held in
    memory as float32 they would take 2 MB each, 60 MB more at 4N)."""
    rng = np.random.default_rng(7)
    peaks = {}
    for n in (10, 40):
        root = tmp_path / f"data{n}"
        for i in range(n):
            write_case(root, f"case_{i}", *ct_volume(rng, shape=(128, 128, 32), lesion_slices=(5,)))
        (tmp_path / f"site{n}").mkdir()
        yaml_path = site_yaml(tmp_path / f"site{n}", root, training={"loader_workers": 0})
        SiteData.from_config(load_site_config(yaml_path), CLASSES)  # preprocessing: once, before the messages
        out = subprocess.run(
            [sys.executable, "-c", _PEAK_RSS, str(yaml_path)], capture_output=True, text=True, check=True
        ).stdout.split()
        assert int(out[0]) == round(n * 0.8)
        peaks[n] = int(out[1]) / 1024  # MB (ru_maxrss is in kB on Linux)
    assert abs(peaks[40] - peaks[10]) < 15, peaks
