"""Volume sampling on the tiny model: geometry end to end, coherent samples, determinism, chunking, summary.

Expected voxel boxes are computed with SimpleITK's own physical -> index mapping, independently of
ProbSAMLib.geometry. An "always on" model (logits + 30) makes every sample fill its box exactly, so
where the masks land is a direct check of the box placement.
"""

import itertools

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from ProbSAMLib import ProbSAMConfig, build_probsam
from ProbSAMLib.modeling import preprocess
from ProbSAMLib.geometry import Box3D, VolumeGeometry, voxel_box_from_ijk, voxel_box_from_physical
from ProbSAMLib.inference.memory import choose_batch
from ProbSAMLib.modeling.probsam import ProbSAM
from ProbSAMLib.inference.summary import longest_axial_diameter_mm
from ProbSAMLib.inference.sampling import images_to_unit, sample_from_embeddings
from ProbSAMLib.inference.volume import Cancelled, context_window, min_context_size, sample_volume
from Testing.helpers import rotation

torch.set_num_threads(1)





LPS = np.eye(3)
RAS_STORED = np.diag([-1.0, -1.0, 1.0])  # a volume stored in RAS order (i towards Right, j Anterior)
OBLIQUE = rotation(2, 30) @ rotation(0, 12)


@pytest.fixture(scope="module")
def model():
    m = build_probsam(ProbSAMConfig.preset("tiny"), seed=0).eval()
    torch.manual_seed(1)  # z must change the masks: the projection's last layer starts at zero
    torch.nn.init.normal_(m.latent_projection.mlp[-1].weight, std=0.5)
    return m


@pytest.fixture(scope="module")
def always_on():
    m = build_probsam(ProbSAMConfig.preset("tiny"), seed=0).eval()
    m.decode = lambda *args, **kwargs: ProbSAM.decode(m, *args, **kwargs) + 30.0  # every pixel of every sample on
    return m


def make_volume(direction=LPS, size=(48, 48, 12), spacing=(0.8, 0.7, 2.5), origin=(-20.0, 15.0, -40.0), seed=0):
    """(K, J, I) HU array with a bright blob, and its geometry."""
    geometry = VolumeGeometry(size, origin, spacing, direction)
    rng = np.random.default_rng(seed)
    volume = rng.normal(-800, 40, geometry.shape).astype(np.float32)
    k, j, i = np.ogrid[:size[2], :size[1], :size[0]]
    volume[((k - 6) * 2.5) ** 2 + ((j - 24) * 0.7) ** 2 + ((i - 22) * 0.8) ** 2 < 6 ** 2] = 30.0
    return volume, geometry


def sitk_voxel_range(geometry, box):
    """Voxel range (lo, hi exclusive) of a Box3D from SimpleITK's mapping of its 8 corners."""
    image = geometry.to_sitk_reference()
    index = np.array([image.TransformPhysicalPointToContinuousIndex(tuple(map(float, p)))
                      for p in box.corners()])
    lo = np.maximum(np.ceil(index.min(0) - 1e-9).astype(int), 0)
    hi = np.minimum(np.floor(index.max(0) + 1e-9).astype(int) + 1, geometry.size)
    return tuple(lo), tuple(hi)


def block(geometry, lo, hi):
    mask = np.zeros(geometry.shape, bool)
    mask[lo[2]:hi[2], lo[1]:hi[1], lo[0]:hi[0]] = True
    return mask


# --- geometry end to end -------------------------------------------------------------------------------
@pytest.mark.parametrize("direction,space", [(LPS, "lps"), (LPS, "ras"), (RAS_STORED, "ras"),
                                             (RAS_STORED, "lps"), (OBLIQUE, "ras")])
def test_masks_fill_exactly_the_voxel_box_of_a_physical_box(always_on, direction, space):
    volume, geometry = make_volume(direction)
    centre = geometry.index_to_physical([22, 24, 6])          # LPS
    centre_in_space = centre * ([-1, -1, 1] if space == "ras" else 1)
    box = Box3D.from_corners(centre_in_space - [6, 5, 5], centre_in_space + [6, 5, 5], space=space)
    voxel_box = voxel_box_from_physical(box, geometry)
    assert (voxel_box.lo, voxel_box.hi) == sitk_voxel_range(geometry, box)
    result = sample_volume(always_on, volume, geometry, voxel_box, n_samples=3, seed=0)
    expected = block(geometry, voxel_box.lo, voxel_box.hi)
    kb, jb, ib = voxel_box.size[::-1]
    assert result.masks.shape == (3, kb, jb, ib) and result.entropy.shape == (kb, jb, ib)  # cut to the box
    for mask in result.on_full_grid("masks"):
        np.testing.assert_array_equal(mask, expected)
    assert result.geometry is geometry
    full_probability, full_entropy = result.on_full_grid("mean_probability"), result.on_full_grid("entropy")
    assert full_probability.shape == geometry.shape and full_probability.dtype == np.float32
    assert not full_probability[~expected].any() and not full_entropy[~expected].any()


def test_rotated_box_on_oblique_volume_lands_in_its_voxel_box(model):
    volume, geometry = make_volume(OBLIQUE)
    axes = rotation(2, 40) @ rotation(1, 15)
    box = Box3D.from_center_size(geometry.index_to_physical([22, 24, 6]), [14, 10, 9], axes=axes)
    voxel_box = voxel_box_from_physical(box, geometry)
    assert (voxel_box.lo, voxel_box.hi) == sitk_voxel_range(geometry, box)
    result = sample_volume(model, volume, geometry, voxel_box, n_samples=4, seed=0)
    inside = block(geometry, voxel_box.lo, voxel_box.hi)
    masks = result.on_full_grid("masks")
    assert masks.any() and not masks[:, ~inside].any()
    assert not (result.on_full_grid("variance")[~inside].any() or result.on_full_grid("mutual_information")[~inside].any())


def test_clamped_box_is_reported_in_the_summary(always_on):
    volume, geometry = make_volume()
    voxel_box = voxel_box_from_ijk([40, 20, 8], [60, 30, 20], geometry)
    result = sample_volume(always_on, volume, geometry, voxel_box, n_samples=2, seed=0)
    box = result.summary["box"]
    assert box["clamped"] and "clamped" in box["warning"]
    assert box["ijk_first"] == [40, 20, 8] and box["ijk_last"] == [47, 30, 11]
    assert result.on_full_grid("masks")[:, 8:12, 20:31, 40:48].all()


# --- the context window ----------------------------------------------------------------------------------
def test_context_window_rule():
    assert context_window((250, 300, 270, 318), (512, 512), 128) == (245, 373, 196, 324)   # 128² around
    assert context_window((0, 500, 10, 510), (512, 512), 128) == (384, 512, 0, 128)        # kept inside
    assert context_window((10, 10, 30, 30), (48, 40), 128) == (0, 48, 0, 40)               # whole slice
    r0, r1, c0, c1 = context_window((100, 100, 300, 220), (512, 512), 128)                  # big box
    assert r1 - r0 == c1 - c0 == 232 and r0 <= 100 and r1 >= 220 and c0 <= 100 and c1 >= 300


def test_slices_match_the_2d_sampler_on_the_same_window(model):
    """Each slice of the volume result is the 2D path (crop -> encode -> decode with that slice's z)."""
    volume, geometry = make_volume(size=(160, 150, 6))
    voxel_box = voxel_box_from_ijk([60, 50, 1], [84, 71, 4], geometry)
    result = sample_volume(model, volume, geometry, voxel_box, n_samples=5, seed=3)
    x1, y1, x2, y2 = 60, 50, 85, 72
    r0, r1, c0, c1 = context_window((x1, y1, x2, y2), (150, 160), min_context_size(model))
    assert (r1 - r0, c1 - c0) == (128, 128)
    for k in (1, 3):
        images = images_to_unit(model, volume[k, r0:r1, c0:c1])
        with torch.no_grad():
            embeddings = model.encode(images)
        boxes = torch.tensor([[x1 - c0, y1 - r0, x2 - c0, y2 - r0]], dtype=torch.float32)
        probs, _ = sample_from_embeddings(model, embeddings, boxes, (128, 128), 5,
                                          z=torch.from_numpy(result.z[k - 1][None]))
        expected = probs[0, :, y1 - r0:y2 - r0, x1 - c0:x2 - c0].numpy() > 0.5
        np.testing.assert_array_equal(result.masks[:, k - 1], expected)  # box-sized: slice k is k - lo


# --- coherence -------------------------------------------------------------------------------------------
def prior_of_slice(model, window_hu, box_in_window):
    images = images_to_unit(model, window_hu)
    with torch.no_grad():
        embeddings = model.encode(images)
        boxes = preprocess.boxes_to_model_frame(torch.tensor([box_in_window], dtype=torch.float32),
                                                images.shape[-2:], model.config.img_size)
        prior = model.prior_distribution(embeddings, boxes)
    return prior.base_dist.loc[0].numpy(), prior.base_dist.scale[0].numpy()


def test_one_draw_per_sample_across_slices(model):
    volume, geometry = make_volume()
    voxel_box = voxel_box_from_ijk([12, 14, 2], [33, 35, 9], geometry)
    coherent = sample_volume(model, volume, geometry, voxel_box, n_samples=6, seed=5, z_mode="per_sample")
    eps, z = coherent.eps, coherent.z
    assert eps.shape == z.shape == (8, 6, model.config.latent_dim)
    for k in range(1, 8):
        np.testing.assert_array_equal(eps[k], eps[0])          # the same draw on every slice
    assert not np.allclose(eps[0, 0], eps[0, 1])               # different samples, different draws
    # z of slice k is that draw placed in slice k's own prior: mu_k + sigma_k * eps
    box_in_window = (12, 14, 34, 36)  # whole 48x48 slice is the window
    for k in (0, 5):
        mu, sigma = prior_of_slice(model, volume[2 + k], box_in_window)
        np.testing.assert_allclose(z[k], mu + sigma * eps[k], rtol=1e-5, atol=1e-6)
    noise = [s["latent_noise"] for s in coherent.summary["samples"]]
    np.testing.assert_allclose(noise, eps[0], rtol=1e-6)

    independent = sample_volume(model, volume, geometry, voxel_box, n_samples=6, seed=5, z_mode="per_slice")
    assert not np.allclose(independent.eps[1], independent.eps[0])
    assert not np.array_equal(independent.masks, coherent.masks)
    assert "latent_noise" not in independent.summary["samples"][0]


def test_same_seed_same_result_whatever_the_chunking(model):
    volume, geometry = make_volume()
    voxel_box = voxel_box_from_ijk([10, 10, 0], [36, 38, 11], geometry)
    a = sample_volume(model, volume, geometry, voxel_box, n_samples=4, seed=11, slice_batch=12)
    b = sample_volume(model, volume, geometry, voxel_box, n_samples=4, seed=11, slice_batch=5)
    c = sample_volume(model, volume, geometry, voxel_box, n_samples=4, seed=12, slice_batch=12)
    np.testing.assert_array_equal(a.masks, b.masks)
    np.testing.assert_allclose(a.mean_probability, b.mean_probability, atol=1e-6)
    np.testing.assert_array_equal(a.eps, b.eps)
    assert not np.array_equal(a.eps, c.eps)
    assert a.summary["settings"]["slice_batch"] == 12 and b.summary["settings"]["slice_batch"] == 5


def test_no_seed_draws_one_and_records_it(model):
    volume, geometry = make_volume()
    voxel_box = voxel_box_from_ijk([10, 10, 3], [30, 30, 5], geometry)
    first = sample_volume(model, volume, geometry, voxel_box, n_samples=3)
    settings = first.summary["settings"]
    assert settings["seed_given"] is False and isinstance(settings["seed"], int)
    again = sample_volume(model, volume, geometry, voxel_box, n_samples=3, seed=settings["seed"])
    np.testing.assert_array_equal(first.masks, again.masks)


# --- progress, cancel, memory ----------------------------------------------------------------------------
def test_progress_and_cancel(model):
    volume, geometry = make_volume()
    voxel_box = voxel_box_from_ijk([10, 10, 0], [30, 30, 11], geometry)
    calls = []
    sample_volume(model, volume, geometry, voxel_box, n_samples=2, seed=0, slice_batch=4,
                  progress=lambda fraction, message: calls.append((fraction, message)))
    fractions = [f for f, _ in calls]
    assert fractions[0] == 0.0 and fractions[-1] == 1.0 and fractions == sorted(fractions)
    assert any("slices 4/12" in m for _, m in calls)

    checks = []

    def cancel():
        checks.append(1)
        return len(checks) > 1  # let the first chunk run, then cancel

    with pytest.raises(Cancelled):
        sample_volume(model, volume, geometry, voxel_box, n_samples=2, seed=0, slice_batch=4, cancel=cancel)


def test_out_of_memory_halves_the_chunk_and_gives_the_same_result(model, monkeypatch):
    volume, geometry = make_volume()
    voxel_box = voxel_box_from_ijk([10, 10, 0], [30, 30, 11], geometry)
    reference = sample_volume(model, volume, geometry, voxel_box, n_samples=3, seed=2, slice_batch=3)
    from ProbSAMLib.inference import volume as volume_module
    sample_chunk = volume_module._sample_chunk

    def tight_chunk(model, images, *args):  # a chunk of more than 3 slices does not fit (simulated)
        if images.shape[0] > 3:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return sample_chunk(model, images, *args)

    monkeypatch.setattr(volume_module, "_sample_chunk", tight_chunk)
    result = sample_volume(model, volume, geometry, voxel_box, n_samples=3, seed=2, slice_batch=12)
    monkeypatch.setattr(volume_module, "_sample_chunk", sample_chunk)
    assert result.summary["settings"]["oom_retries"] == 2 and result.summary["settings"]["slice_batch"] == 3
    np.testing.assert_array_equal(result.masks, reference.masks)
    np.testing.assert_array_equal(result.mean_probability, reference.mean_probability)  # byte-identical

    monkeypatch.setattr(model, "encode", lambda images: (_ for _ in ()).throw(
        torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")))
    with pytest.raises(RuntimeError, match="single slice"):
        sample_volume(model, volume, geometry, voxel_box, n_samples=3, seed=2, slice_batch=2)


def test_automatic_slice_batch_is_within_limits(model):
    assert 1 <= choose_batch(model, 16, 40) <= 8
    assert choose_batch(model, 16, 3) <= 3


# --- bad input -------------------------------------------------------------------------------------------
def test_bad_input_is_refused_with_a_clear_message(model):
    volume, geometry = make_volume()
    good = voxel_box_from_ijk([10, 10, 2], [30, 30, 5], geometry)
    with pytest.raises(ValueError, match="does not match the geometry"):
        sample_volume(model, volume[:, :, :40], geometry, good)
    with pytest.raises(ValueError, match="n_samples"):
        sample_volume(model, volume, geometry, good, n_samples=0)
    with pytest.raises(ValueError, match="z_mode"):
        sample_volume(model, volume, geometry, good, z_mode="per_voxel")
    with pytest.raises(ValueError, match="1 x 21 voxels"):
        sample_volume(model, volume, geometry, voxel_box_from_ijk([10, 10, 2], [10, 30, 5], geometry))
    broken = volume.copy()
    broken[3, 20, 20] = np.nan
    with pytest.raises(ValueError, match="NaN or infinite"):
        sample_volume(model, broken, geometry, good)


# --- summary ---------------------------------------------------------------------------------------------
def test_axial_diameter_is_edge_to_edge_and_follows_the_geometry():
    mask = np.zeros((3, 10, 10), bool)
    mask[1, 2:5, 3:8] = True  # 5 columns (i) x 3 rows (j)
    for direction in (LPS, OBLIQUE):
        geometry = VolumeGeometry((10, 10, 3), (5.0, -3.0, 1.0), (0.5, 2.0, 3.0), direction)
        assert longest_axial_diameter_mm(mask, geometry) == pytest.approx(np.hypot(5 * 0.5, 3 * 2.0))
    assert longest_axial_diameter_mm(np.zeros((2, 4, 4), bool), geometry) == 0.0


def test_summary_sizes_and_spread(always_on):
    volume, geometry = make_volume()
    voxel_box = voxel_box_from_ijk([10, 12, 3], [19, 15, 4], geometry)  # 10 x 4 x 2 voxels
    summary = sample_volume(always_on, volume, geometry, voxel_box, n_samples=4, seed=0).summary
    voxel_mm3 = 0.8 * 0.7 * 2.5
    for sample in summary["samples"]:
        assert sample["voxels"] == 80 and sample["volume_mm3"] == pytest.approx(80 * voxel_mm3)
        assert sample["longest_axial_diameter_mm"] == pytest.approx(np.hypot(10 * 0.8, 4 * 0.7))
    spread = summary["spread"]
    assert spread["volume_mm3"]["sd"] == 0.0 and spread["pairwise_dice"]["mean"] == 1.0
    assert spread["sample_diversity"] == 0.0 and spread["disagreement_volume_mm3"] == 0.0
    assert "not for clinical use" in summary["disclaimer"]
    assert summary["settings"]["z_mode"] == "per_sample" and summary["settings"]["device"] == "cpu"
    assert set(summary["timings_s"]) == {"encode_s", "decode_s", "total_s"}
    corners = list(itertools.product(*[(lo - 0.5, hi - 0.5) for lo, hi in zip(voxel_box.lo, voxel_box.hi)]))
    physical = geometry.index_to_physical(np.array(corners))
    np.testing.assert_allclose(summary["box"]["lps_bounds_mm"], [physical.min(0), physical.max(0)])


def test_sitk_view_volumes_are_accepted(model):
    """The CLI passes SimpleITK's read-only array view; nothing may write to it."""
    volume, geometry = make_volume()
    image = geometry.apply_to(sitk.GetImageFromArray(volume))
    view = sitk.GetArrayViewFromImage(image)
    voxel_box = voxel_box_from_ijk([10, 10, 2], [30, 30, 5], geometry)
    result = sample_volume(model, view, geometry, voxel_box, n_samples=2, seed=0)
    reference = sample_volume(model, volume, geometry, voxel_box, n_samples=2, seed=0)
    np.testing.assert_array_equal(result.masks, reference.masks)
