"""Uncertainty maps and sample areas against hand-computed values (entropies in nats)."""

import math

import numpy as np
import pytest

from ProbSAMLib.inference.uncertainty import UncertaintyMaps, sample_areas, uncertainty_maps

LN2 = math.log(2)


def h(p):
    """Bernoulli entropy in nats, written out independently of the module."""
    return 0.0 if p in (0.0, 1.0) else -p * math.log(p) - (1 - p) * math.log(1 - p)


def test_all_samples_equal_no_disagreement():
    base = np.array([[0.0, 0.2], [0.5, 1.0]], np.float32)
    u = uncertainty_maps(np.stack([base] * 3))
    # identical samples: mean = base, variance 0, MI 0; H[E p] = E[H p] = h(base)
    # h(0.2) = −0.2 ln 0.2 − 0.8 ln 0.8 ≈ 0.5004, h(0.5) = ln 2, h(0) = h(1) = 0
    np.testing.assert_allclose(u.mean_probability, base, atol=1e-7)
    np.testing.assert_allclose(u.variance, 0, atol=1e-12)
    assert (u.mutual_information == 0).all()
    expected = [[0, h(0.2)], [LN2, 0]]
    np.testing.assert_allclose(u.entropy, expected, rtol=1e-6)
    np.testing.assert_allclose(u.expected_entropy, expected, rtol=1e-6)


def test_round_off_never_shows_as_disagreement():
    # Identical samples: H[E p] − E[H p] is 0 in exact arithmetic, but the mean of 7 copies of p is not
    # always p in floating point, leaving ±1e-16; the map must be exactly 0 (never negative).
    base = np.random.default_rng(3).random((8, 8)).astype(np.float32)
    for n in (3, 7):
        mi = uncertainty_maps(np.stack([base] * n)).mutual_information
        assert (mi == 0).all()


def test_zero_and_one_samples_are_pure_disagreement():
    u = uncertainty_maps(np.array([[[0.0]], [[1.0]]]))
    # mean 0.5, variance ((0−.5)² + (1−.5)²)/2 = 0.25, H[E p] = h(.5) = ln 2, E[H p] = 0, MI = ln 2
    assert u.mean_probability[0, 0] == pytest.approx(0.5)
    assert u.variance[0, 0] == pytest.approx(0.25)
    assert u.entropy[0, 0] == pytest.approx(LN2, rel=1e-6)
    assert u.expected_entropy[0, 0] == 0.0
    assert u.mutual_information[0, 0] == pytest.approx(LN2, rel=1e-6)


def test_two_half_samples_are_pure_aleatoric():
    u = uncertainty_maps(np.full((2, 1, 1), 0.5))
    # both samples unsure: H[E p] = E[H p] = ln 2, MI = 0, variance 0
    assert u.entropy[0, 0] == pytest.approx(LN2, rel=1e-6)
    assert u.expected_entropy[0, 0] == pytest.approx(LN2, rel=1e-6)
    assert u.mutual_information[0, 0] == 0.0
    assert u.variance[0, 0] == 0.0


def test_mixed_probabilities():
    u = uncertainty_maps(np.array([0.2, 0.6]).reshape(2, 1, 1))
    # mean 0.4; variance ((0.2−0.4)² + (0.6−0.4)²)/2 = 0.04
    # H = h(0.4) ≈ 0.6730; E[H] = (h(0.2) + h(0.6))/2 ≈ (0.5004 + 0.6730)/2 ≈ 0.5867; MI ≈ 0.0863
    assert u.mean_probability[0, 0] == pytest.approx(0.4)
    assert u.variance[0, 0] == pytest.approx(0.04, rel=1e-6)
    assert u.entropy[0, 0] == pytest.approx(h(0.4), rel=1e-6)
    assert u.expected_entropy[0, 0] == pytest.approx((h(0.2) + h(0.6)) / 2, rel=1e-6)
    assert u.mutual_information[0, 0] == pytest.approx(h(0.4) - (h(0.2) + h(0.6)) / 2, rel=1e-5)
    assert u.mutual_information[0, 0] == pytest.approx(0.0863, abs=1e-4)


def test_boolean_masks_3d_float32():
    masks = np.zeros((4, 2, 3, 3), bool)
    masks[:3, 1, 1, 1] = True                         # voxel on in 3 of 4 samples
    u = uncertainty_maps(masks)
    assert u.entropy.shape == (2, 3, 3)
    for m in u.as_dict().values():
        assert m.dtype == np.float32 and m.shape == (2, 3, 3)
    # mean 0.75, variance 0.75·0.25 = 0.1875, binary samples -> E[H] = 0, MI = H = h(0.75) ≈ 0.5623
    assert u.mean_probability[1, 1, 1] == pytest.approx(0.75)
    assert u.variance[1, 1, 1] == pytest.approx(0.1875)
    assert u.mutual_information[1, 1, 1] == pytest.approx(h(0.75), rel=1e-6)
    assert (u.expected_entropy == 0).all()
    assert u.entropy.sum() == pytest.approx(h(0.75), rel=1e-6)   # all other voxels agree


def test_uncertainty_input_errors():
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        uncertainty_maps(np.full((2, 2, 2), 1.5))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        uncertainty_maps(np.full((2, 2, 2), np.nan))
    with pytest.raises(ValueError, match="stack"):
        uncertainty_maps(np.zeros(4))
    with pytest.raises(ValueError, match="empty stack"):
        uncertainty_maps(np.zeros((0, 3, 3)))
    assert isinstance(uncertainty_maps(np.zeros((1, 2, 2))), UncertaintyMaps)


def test_sample_areas():
    masks = np.zeros((3, 4, 4), bool)
    masks[0, :1, :3] = True                           # 3 px
    masks[2] = True                                   # 16 px
    # pixel 0.5 mm × 0.8 mm = 0.4 mm² -> [1.2, 0, 6.4]
    np.testing.assert_allclose(sample_areas(masks, pixel_area=0.5 * 0.8), [1.2, 0.0, 6.4])
    np.testing.assert_array_equal(sample_areas(masks), [3, 0, 16])


def test_sample_volumes_3d():
    masks = np.zeros((2, 3, 4, 4), bool)
    masks[1, :2, :2, :2] = True                       # 8 voxels of 0.7·0.7·2.5 = 1.225 mm³ -> 9.8 mm³
    np.testing.assert_allclose(sample_areas(masks, pixel_area=0.7 * 0.7 * 2.5), [0.0, 9.8])


def test_sample_areas_errors():
    with pytest.raises(ValueError, match="pixel_area"):
        sample_areas(np.zeros((1, 2, 2), bool), pixel_area=0)
    with pytest.raises(ValueError, match="0/1"):
        sample_areas(np.full((1, 2, 2), 0.5))


def test_informative_is_where_not_every_sample_is_confident():
    """Transparent overlay rule: a voxel is shown unless every sample is below 0.1 or every one above 0.9."""
    from ProbSAMLib.inference.uncertainty import informative_mask

    probs = np.array([[0.05, 0.95, 0.05, 0.5, 0.09, 0.91],
                      [0.02, 0.99, 0.95, 0.5, 0.11, 0.89]], np.float32)
    assert informative_mask(probs).tolist() == [False, False, True, True, True, True]
