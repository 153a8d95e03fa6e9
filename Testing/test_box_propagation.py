"""Box propagation in 3D (sample_volume box_mode="propagate"): from the middle slice outwards, each sample's
box is its own mask's box on the slice before, inside the ROI (LiteMedSAM's own 3D recipe). Tiny models."""
import numpy as np
import pytest
import torch

from ProbSAMLib.geometry import VolumeGeometry, voxel_box_from_ijk
from ProbSAMLib.inference.volume import propagated_boxes, propagation_order, sample_volume
from ProbSAMLib.modeling.config import ProbSAMConfig
from ProbSAMLib.weights.build import build_probsam

from helpers import diverse_tiny_model


def test_the_order_runs_from_the_middle_outwards():
    assert propagation_order(5) == [(2, None), (3, 2), (4, 3), (1, 2), (0, 1)]
    assert propagation_order(1) == [(0, None)]
    order = propagation_order(8)
    assert sorted(k for k, _ in order) == list(range(8))  # every slice once, each after its neighbour
    seen = set()
    for k, previous in order:
        assert previous is None or previous in seen
        seen.add(k)


def test_a_propagated_box_is_the_masks_box_widened_and_cut_to_the_roi():
    masks = np.zeros((3, 20, 30), bool)
    masks[0, 5:9, 10:16] = True  # rows 5..8, cols 10..15
    masks[2, 0:3, 27:30] = True  # at the ROI's corner: the margin is cut off
    boxes = propagated_boxes(masks, (0, 0, 30, 20), margin=2)
    assert boxes[0].tolist() == [8, 3, 18, 11]
    assert np.isnan(boxes[1]).all()  # an empty mask ends that sample's outline
    assert boxes[2].tolist() == [25, 0, 30, 5]


def _volume():
    geometry = VolumeGeometry((48, 48, 9), np.zeros(3), np.array([0.8, 0.8, 2.0]), np.eye(3))
    zz, yy, xx = np.mgrid[:9, :48, :48]
    ball = (xx - 24) ** 2 + (yy - 24) ** 2 + ((zz - 4) * 2.5) ** 2 < 10 ** 2
    return np.where(ball, 40.0, -850.0).astype(np.float32), geometry


def test_propagation_is_deterministic_and_stays_in_the_roi():
    model = diverse_tiny_model(0).eval()
    volume, geometry = _volume()
    box = voxel_box_from_ijk([12, 12, 0], [36, 36, 8], geometry)
    first = sample_volume(model, volume, geometry, box, n_samples=4, seed=3, box_mode="propagate")
    again = sample_volume(model, volume, geometry, box, n_samples=4, seed=3, box_mode="propagate")
    assert np.array_equal(first.masks, again.masks) and np.array_equal(first.z, again.z)
    assert first.summary["settings"]["box_mode"] == "propagate"
    fixed = sample_volume(model, volume, geometry, box, n_samples=4, seed=3, box_mode="fixed")
    # the middle slice is prompted with the ROI's box either way: the same masks there
    middle = first.masks.shape[1] // 2
    assert np.array_equal(first.masks[:, middle], fixed.masks[:, middle])
    with pytest.raises(ValueError, match="box_mode must be one of"):
        sample_volume(model, volume, geometry, box, n_samples=2, seed=3, box_mode="sideways")


def test_a_sample_whose_outline_ended_stays_empty_further_out():
    """A decoder whose logits are all 0 (probability 0.5: not above the 0.5 cut) outlines nothing on the
    middle slice; every other slice of those samples is then left undecoded (probability 0), not prompted
    with the ROI's box again."""

    class Zeros(torch.nn.Module):  # replaces the decoder's upscaling: every logit becomes 0
        def forward(self, x):
            return torch.zeros(x.shape[0], x.shape[1] // 8, 4 * x.shape[2], 4 * x.shape[3])

    model = build_probsam(ProbSAMConfig.preset("tiny"), seed=0).eval()
    model.sam.mask_decoder.output_upscaling = Zeros()
    volume, geometry = _volume()
    box = voxel_box_from_ijk([12, 12, 0], [36, 36, 8], geometry)
    result = sample_volume(model, volume, geometry, box, n_samples=2, seed=0, box_mode="propagate")
    middle = result.masks.shape[1] // 2
    assert not result.masks.any()
    assert np.allclose(result.mean_probability[middle], 0.5)
    others = np.delete(result.mean_probability, middle, axis=0)
    assert float(np.abs(others).max()) == 0.0
