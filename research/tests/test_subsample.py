"""research/subsample.py: a data set's seeded subset of whole patients."""
import numpy as np
import pytest


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    from Training.data.make_phantom import make_phantom
    out = tmp_path_factory.mktemp("subsample") / "phantom"
    make_phantom(out, scans=4, progress=False)
    return out


def test_subsample_keeps_whole_patients_in_their_splits(phantom, tmp_path):
    """research/subsample.py (the search runs' data): whole patients, same split, never over the source."""
    from Training.data.dataset_format import load_dataset
    from research.subsample import main

    assert main([str(phantom), "--fraction", "0.5", "--out", str(tmp_path / "sub")]) == 0
    full, sub = load_dataset(phantom), load_dataset(tmp_path / "sub")
    kept = set(sub.table["patient_id"].tolist())
    for split in ("train", "val", "test"):
        assert set(sub.splits[split]) <= set(full.splits[split])  # nobody changes split
        assert len(sub.splits[split]) == max(1, round(0.5 * len(full.splits[split])))
    for patient in kept:  # every slice of a kept patient, images and masks unchanged
        a, b = (np.flatnonzero(d.table["patient_id"] == patient) for d in (full, sub))
        assert len(a) == len(b) and np.array_equal(full.masks[a], sub.masks[b])
        assert np.array_equal(full.images[a], sub.images[b]) and list(full.table["case"][a]) == list(sub.table["case"][b])
    assert main([str(phantom), "--fraction", "0.5", "--out", str(phantom), "--force"]) == 2  # the source
    assert load_dataset(phantom).images.shape == full.images.shape
    assert main([str(phantom), "--fraction", "0", "--out", str(tmp_path / "none")]) == 2
    assert not (tmp_path / "none").exists()


def test_subsample_keeps_the_slices_below_and_above(phantom, tmp_path):
    """A patient subsample carries neighbours.npy along, row for row."""
    from Training.data.dataset_format import load_dataset
    from research.subsample import subsample

    subsample(phantom, tmp_path / "all", 1.0)
    full, sub = load_dataset(phantom), load_dataset(tmp_path / "all")
    assert full.neighbours is not None
    np.testing.assert_array_equal(sub.neighbours, full.neighbours)
