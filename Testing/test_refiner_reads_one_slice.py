"""The mask refiner reads the segmented slice alone: given slices k - 1, k, k + 1 it refines with slice k, and
the volume sampler does not fetch neighbours for it. Weights files from versions that had the refiner read the
neighbours (the removed setting refine_neighbours) load when it is off and are refused, naming it, when on."""
import json

import numpy as np
import pytest
import torch

from ProbSAMLib import ProbSAMConfig, build_probsam
from ProbSAMLib.errors import CheckpointError
from ProbSAMLib.geometry import VolumeGeometry, voxel_box_from_ijk
from ProbSAMLib.inference.volume import input_region, sample_volume
from ProbSAMLib.modeling.config import REMOVED_FIELDS
from ProbSAMLib.modeling.refine import MaskRefiner
from ProbSAMLib.weights.build import load_probsam
from ProbSAMLib.weights.checkpoints import FORMAT, save_safetensors

torch.set_num_threads(1)


def _refining_model():
    """A tiny model whose refiner does something (a fresh one is a zero residual)."""
    model = build_probsam(ProbSAMConfig.preset("tiny", refine_channels=4), seed=0).eval()
    torch.manual_seed(1)
    with torch.no_grad():
        model.refiner.net[-1].weight.normal_(std=0.3)
        torch.nn.init.normal_(model.latent_projection.mlp[-1].weight, std=0.5)
    return model


def _decode(model, images, seed=3):
    boxes = torch.tensor([[30.0, 30.0, 90.0, 96.0], [20.0, 40.0, 70.0, 100.0]])
    z = torch.randn(2, 3, model.config.latent_dim, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model.decode(model.encode(images), boxes, z, images)


def test_the_refiner_reads_slice_k_alone():
    model = _refining_model()
    stacks = torch.rand(2, 3, 128, 128)
    torch.testing.assert_close(_decode(model, stacks[:, 1]), _decode(model, stacks))
    with pytest.raises(ValueError, match="one slice"):
        MaskRefiner(4)(torch.zeros(1, 2, 8, 8), torch.zeros(1, 3, 32, 32))


def test_the_volume_sampler_reads_no_neighbours_for_the_refiner():
    rng = np.random.default_rng(0)
    volume = rng.normal(-700, 150, (5, 128, 128)).astype(np.float32)
    volume[1:4, 50:80, 50:80] = 20.0
    geometry = VolumeGeometry((128, 128, 5), (0.0, 0.0, 0.0), (0.8, 0.8, 2.5), np.eye(3))
    box = voxel_box_from_ijk([40, 42, 2], [84, 86, 2], geometry)  # one slice, k = 2
    model = _refining_model()
    assert input_region(model, box, volume.shape)[:2] == (2, 3)
    changed = volume.copy()
    changed[1] = -1000.0  # only the slice below the box
    first = sample_volume(model, volume, geometry, box, n_samples=3, seed=5)
    second = sample_volume(model, changed, geometry, box, n_samples=3, seed=5)
    assert np.array_equal(first.mean_probability, second.mean_probability)


def _stored_with(path, model, **fields):
    """``model`` saved with extra fields in its stored config, as an earlier version wrote them."""
    config = json.loads(model.config.to_json())
    config.update(fields)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_safetensors(state, path, {"format": FORMAT, "config": json.dumps(config), "contents": "full",
                                   "extra": "{}"})
    return path


def test_a_removed_setting_left_off_loads_and_one_switched_on_is_refused(tmp_path):
    assert REMOVED_FIELDS == {"refine_neighbours": False}
    model = _refining_model()
    loaded = load_probsam(_stored_with(tmp_path / "off.safetensors", model, refine_neighbours=False)).eval()
    assert not hasattr(loaded.config, "refine_neighbours")
    stacks = torch.rand(2, 3, 128, 128)
    torch.testing.assert_close(_decode(loaded, stacks), _decode(model, stacks))
    for value in (True, 1, "false"):
        path = _stored_with(tmp_path / "on.safetensors", model, refine_neighbours=value)
        with pytest.raises(CheckpointError, match="refine_neighbours") as info:
            load_probsam(path)
        assert "\n" not in str(info.value) and str(path) in str(info.value)
    with pytest.raises(CheckpointError, match="refine_neighbours = true"):
        ProbSAMConfig.from_json(json.dumps(dict(json.loads(model.config.to_json()), refine_neighbours=True)))
