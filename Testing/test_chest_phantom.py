"""Phantom generator v3: real reader outlines inside a whole synthetic chest slice (ProbSAMLib/demo/chest.py,
Training/data/chest_phantom.py, make_phantom.py --generator 3, demo_volume(field="chest"))."""
import numpy as np
import pytest
from scipy import ndimage

from ProbSAMLib.demo.chest import (ChestAnatomy, render_chest_volume, render_segments, render_slice,
                                   vessel_tree)

SIZE, SPACING = 256, (1.4, 1.4, 2.5)  # a 358 mm field on a small grid keeps the tests fast


def _nodule(centre=(110, 80), radii=(5, 6, 7), depth=7, size=SIZE):
    """(R, K, H, W) nested discs (3 readers) at `centre` (row, col) of the whole slice."""
    k, j, i = np.ogrid[:depth, :size, :size]
    r2 = (j - centre[0]) ** 2 + (i - centre[1]) ** 2 + (3 * (k - depth // 2)) ** 2
    masks = np.stack([r2 <= r * r for r in radii])
    masks[:, [0, -1]] = False  # a slice of margin above and below
    return masks


def _ratings(texture=5, margin=4, n=3):
    return [{"texture": texture, "margin": margin}] * n


def _render(masks=None, seed=0, **kw):
    masks = _nodule() if masks is None else masks
    return render_chest_volume(masks, SPACING, _ratings(n=masks.shape[0]), seed=seed, scan_size=SIZE, **kw)


def _ring(union, inner_mm, outer_mm, spacing=SPACING[0]):
    """In-plane ring between inner_mm and outer_mm around each slice's union."""
    d = np.stack([ndimage.distance_transform_edt(~s, sampling=spacing) if s.any() else np.full(s.shape, 1e9)
                  for s in union])
    return (d > inner_mm) & (d <= outer_mm)


def test_geometry_and_masks_unchanged():
    masks = _nodule()
    vol = _render(masks, origin=(-100.0, -50.0, 20.0))
    assert vol.array.shape == (7, SIZE, SIZE) and vol.array.dtype == np.int16
    assert vol.image.GetSpacing() == pytest.approx(SPACING)
    assert vol.image.GetOrigin() == pytest.approx((-100.0, -50.0, 20.0))
    assert np.array_equal(vol.reader_masks, masks)  # the readers' outlines never move
    assert vol.info["fitted"] and vol.info["placement"] == "lung"


def test_window_of_the_same_chest():
    """A window rendered at grid_offset holds the same masks; its anatomy is the whole slice's window."""
    full = _nodule()
    window = full[:, :, 50:178, 20:148]
    vol = render_chest_volume(window, SPACING, _ratings(), seed=3, scan_size=SIZE, grid_offset=(50, 20))
    assert vol.array.shape == (7, 128, 128) and np.array_equal(vol.reader_masks, window)
    with pytest.raises(ValueError, match="does not fit"):
        render_chest_volume(window, SPACING, _ratings(), seed=3, scan_size=SIZE, grid_offset=(200, 20))


def test_deterministic_by_seed():
    a, b, c = _render(seed=5).array, _render(seed=5).array, _render(seed=6).array
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_structures_have_their_hu():
    rng = np.random.default_rng(0)
    anat = ChestAnatomy.draw(rng, 360.0, level0=0.3)
    x = (np.arange(512, dtype=np.float32) + 0.5) * (360.0 / 512)
    u, v = (x - anat.centre[0])[None, :], (x - anat.centre[1])[:, None]
    image, lung_w = render_slice(anat, u, v, 0.0, 0.35)
    g = anat.geometry(u, v, anat.level(0.0))
    air = g["body"] > 15
    air &= v < anat.half_depth * 0.9  # above the back: not the table
    assert np.abs(image[air] + 1000).max() < 1.0
    lung = g["lung"] < -3
    assert lung.mean() > 0.15 and lung_w[lung].min() > 0.9
    assert -900 < np.median(image[lung]) < -780
    fat = (g["body"] < -3) & (g["body"] > -g["fat_depth"] + 2)
    assert -115 < np.median(image[fat]) < -85
    heart = g["organs"]["heart"][0] < -3
    assert heart.sum() > 1000 and 25 < np.median(image[heart]) < 55
    spine = g["vertebra"] < 0
    assert image[spine].max() > 600 and np.median(image[spine]) > 200  # cortex around marrow
    wall = (g["cavity"] > 1) & (g["body"] < -g["muscle_depth"] - 1)  # between muscle and pleura: ribs
    assert (image[wall] > 500).sum() > 50
    assert image.max() < 1100 and image.min() >= -1000


def test_nodule_in_the_lung_where_the_masks_are():
    vol = _render(noise_hu=10.0)
    hu, masks = vol.array.astype(float), vol.reader_masks
    everyone = masks.all(axis=0)
    union = masks.any(axis=0)
    ring = _ring(union, 3.0, 8.0)
    assert hu[everyone].mean() > -100  # a solid nodule (texture 5)
    assert np.median(hu[ring]) < -700  # in aerated lung, clear of the pleura
    assert (hu[ring] > -300).mean() < 0.15  # vessels fade out near it
    # The image outside the masks' slices has no nodule: its region there is lung.
    assert np.median(hu[0][union[3]]) < -600


def test_juxta_pleural_placement_touches_the_wall():
    for placement in ("wall", "mediastinum"):
        touching = []
        for seed in range(3):
            vol = _render(seed=seed, placement=placement, noise_hu=10.0)
            assert vol.info["fitted"] and vol.info["placement"] == placement
            hu = vol.array.astype(float)
            ring = _ring(vol.reader_masks.any(axis=0), 0.0, 3.0)
            touching.append((hu[ring] > -250).mean())
        assert np.mean(touching) > 0.05, (placement, touching)  # soft tissue right beside it
    lung = [(_render(seed=s, noise_hu=10.0).array[_ring(_nodule().any(axis=0), 0.0, 3.0)] > -250).mean()
            for s in range(3)]
    assert np.mean(lung) < 0.05


class _Case:
    """A stand-in hard case (the NoduleCase interface) drawing a bright line across the whole grid."""

    name, variant = "fissure", "base"

    def rendering_ratings(self, ratings):
        return list(ratings)

    def apply(self, image, masks, spacing_zyx):
        out = image.copy()
        out[:, :, ::7] = 500.0
        return out


def test_case_structures_stay_in_the_lungs_near_the_nodule():
    plain, with_case = _render(seed=2, noise_hu=0.0), _render(seed=2, noise_hu=0.0, case=_Case())
    changed = np.abs(with_case.array.astype(int) - plain.array.astype(int)) > 50
    assert changed.any()
    corners = np.zeros(changed.shape[1:], bool)
    corners[:20, :20] = corners[-20:, -20:] = True
    assert not changed[:, corners].any()  # never outside the body
    far = ~ndimage.binary_dilation(_nodule().any(axis=(0, 1)), iterations=int(45 / SPACING[0]))
    assert not changed[:, far].any()


def test_vessel_tree_tapers_and_renders():
    rng = np.random.default_rng(1)
    anat = ChestAnatomy.draw(rng, 360.0, level0=0.5)
    segs = vessel_tree(rng, anat, lambda p: np.ones(len(p), bool), (-20.0, 20.0))
    assert len(segs) > 1000 and segs[:, 6].max() >= 4.0 and segs[:, 7].min() < 0.35
    assert (segs[:, 7] <= segs[:, 6]).all()
    one = np.array([[0.0, 10.0, 5.0, 0.0, 10.0, 25.0, 1.0, 1.0]])  # in-plane tube along x, r 1 mm
    w = render_segments(one, (3, 30, 80), (2.0, 0.5, 0.5), (-2.0, 0.0, 0.0), 0.25)
    assert w[1, 20, 30] > 0.95 and w[1, 20, 12] > 0.95  # on the axis
    assert w[1, 20 + 6, 30] < 0.05 and w[1, 20, 60] < 0.05  # 3 mm beside it, 5 mm past its end
    assert w[0, 20, 30] < 0.05 and w[2, 20, 30] < 0.05  # 2 mm above / below: outside a 1 mm tube


def test_demo_volume_chest_field():
    from ProbSAMLib.demo.phantom import demo_volume, load_demo_nodule
    vol = demo_volume(0, field="chest")
    nodule = load_demo_nodule(0)
    assert vol.array.shape[1:] == (512, 512) and vol.info["field"] == "chest"
    k0, row, col = vol.offset
    assert (row, col) == tuple(nodule.info["grid_index"][1:])
    k, j, i = nodule.reader_masks.shape[1:]
    assert np.array_equal(vol.reader_masks[:, k0:k0 + k, row:row + j, col:col + i], nodule.reader_masks)
    assert vol.reader_masks.sum() == nodule.reader_masks.sum()
    spacing = np.array(nodule.spacing)
    assert np.allclose(np.array(vol.image.GetOrigin()) + np.array([col, row, k0]) * spacing,
                       nodule.info["origin"])
    with pytest.raises(ValueError, match="field"):
        demo_volume(0, field="wide")


def test_make_phantom_generator_3(tmp_path):
    """v3 data set: whole 512 x 512 slices, the same reader masks as v2 (on v2's crop window), recorded."""
    pytest.importorskip("pylidc")
    from Training.data.dataset_format import load_dataset
    from Training.data.make_phantom import main, make_phantom
    v3, v2 = tmp_path / "v3", tmp_path / "v2"
    assert main(["--out", str(v3), "--patients", "LIDC-IDRI-0001", "--pad-slices", "1"]) == 0
    make_phantom(v2, patients=["LIDC-IDRI-0001"], pad_slices=1, progress=False, generator=2)
    new, old = load_dataset(v3), load_dataset(v2)
    assert new.meta["generator_version"] == 3 and new.meta["params"]["generator"] == 3
    assert new.meta["field"] == "chest" and new.meta["params"]["crop"] == 512
    assert np.asarray(new.images).shape[1:] == (512, 512)
    assert list(new.table["case"]) == list(old.table["case"])
    row0, col0 = int(old.table["crop_row0"][0]), int(old.table["crop_col0"][0])
    assert int(new.table["crop_row0"][0]) == 0
    crop = np.asarray(new.masks)[:, :, row0:row0 + 128, col0:col0 + 128]
    assert np.array_equal(crop, np.asarray(old.masks)) and np.asarray(new.masks).sum() == crop.sum()
    images = np.asarray(new.images)
    assert (images[:, :8, :8] < -900).all()  # air in the corners: a whole chest slice
