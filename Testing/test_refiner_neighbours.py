"""A mask refiner that reads the slices below and above (ProbSAMConfig.refine_neighbours) while the encoder
reads slice k alone: the conversion from a one-slice refiner is exact, the setting survives a weights file,
the volume sampler supplies k - 1 and k + 1, and training converts `init` and refuses what cannot learn."""
import json

import numpy as np
import pytest
import torch

from ProbSAMLib import ProbSAMConfig, build_probsam
from ProbSAMLib.weights.build import load_probsam
from ProbSAMLib.weights.checkpoints import save_probsam
from ProbSAMLib.errors import SettingsError
from ProbSAMLib.geometry import VolumeGeometry, voxel_box_from_ijk
from ProbSAMLib.modeling.refine import MaskRefiner
from ProbSAMLib.inference.volume import input_region, sample_volume
from Training.config import TrainConfig, load_config
from Training.learning.learners import build_learner

torch.set_num_threads(1)


def _refining_model(refine_neighbours=False):
    """A tiny model whose refiner does something (a fresh one is a zero residual)."""
    config = ProbSAMConfig.preset("tiny", refine_channels=4, refine_neighbours=refine_neighbours)
    model = build_probsam(config, seed=0).eval()
    torch.manual_seed(1)
    with torch.no_grad():
        model.refiner.net[-1].weight.normal_(std=0.3)
        torch.nn.init.normal_(model.latent_projection.mlp[-1].weight, std=0.5)
    return model


def _learnt_neighbours(model, seed=0):
    """Give the refiner's neighbour weights values (training would; they start at zero)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        model.refiner.net[0].weight[:, 1].normal_(std=0.5)  # inputs: probability, k - 1, k, k + 1
        model.refiner.net[0].weight[:, 3].normal_(std=0.5)
    return model


def _decode(model, images, seed=3):
    boxes = torch.tensor([[30.0, 30.0, 90.0, 96.0], [20.0, 40.0, 70.0, 100.0]])
    z = torch.randn(2, 3, model.config.latent_dim, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model.decode(model.encode(images), boxes, z, images)


def test_the_refiner_starts_as_the_one_slice_refiner_and_then_reads_the_neighbours():
    model = _refining_model()
    stacks = torch.rand(2, 3, 128, 128)
    before = _decode(model, stacks)
    torch.testing.assert_close(_decode(model, stacks[:, 1]), before)  # a one-slice model reads slice k only
    model.refine_with_neighbour_slices()
    assert model.config.refine_neighbours and model.config.reads_neighbours and not model.config.neighbour_slices
    assert model.refiner.image_slices == 3
    torch.testing.assert_close(_decode(model, stacks), before)  # exact, whatever the neighbours hold
    _learnt_neighbours(model)
    other = stacks.clone()
    other[:, 0] = 1.0 - other[:, 0]
    changed = _decode(model, other)
    assert (changed - _decode(model, stacks)).abs().max() > 1e-2
    with torch.no_grad():  # the encoder still reads slice k alone: only the refiner sees the change
        torch.testing.assert_close(model.encode(other), model.encode(stacks))
    # a lone slice is read as a stack of copies, as at a scan's ends
    lone = stacks[:, 1]
    torch.testing.assert_close(_decode(model, lone), _decode(model, lone.unsqueeze(1).expand(-1, 3, -1, -1)))
    with pytest.raises(ValueError, match="slices below"):
        _decode(model, torch.rand(2, 2, 128, 128))


def test_refiner_inputs_are_checked_and_the_setting_survives_a_weights_file(tmp_path):
    with pytest.raises(ValueError, match="1 slice or 3"):
        MaskRefiner(4, image_slices=2)
    with pytest.raises(ValueError, match="reads 3 slice"):
        MaskRefiner(4, image_slices=3)(torch.zeros(1, 2, 8, 8), torch.zeros(1, 1, 32, 32))
    with pytest.raises(ValueError, match="refine_channels"):
        ProbSAMConfig.preset("tiny", refine_neighbours=True)
    with pytest.raises(ValueError, match="no mask refiner"):
        build_probsam(ProbSAMConfig.preset("tiny"), seed=0).refine_with_neighbour_slices()
    model = _learnt_neighbours(_refining_model(refine_neighbours=True))
    save_probsam(model, tmp_path / "rn.safetensors")
    loaded = load_probsam(tmp_path / "rn.safetensors").eval()
    assert loaded.config.refine_neighbours and loaded.refiner.image_slices == 3
    stacks = torch.rand(2, 3, 128, 128)
    torch.testing.assert_close(_decode(loaded, stacks), _decode(model, stacks))
    old = json.loads(ProbSAMConfig.preset("tiny", refine_channels=4).to_json())
    del old["refine_neighbours"]  # weights written before the setting existed read as one slice
    assert ProbSAMConfig.from_json(json.dumps(old)).refine_neighbours is False


def test_the_volume_sampler_gives_the_refiner_the_neighbours():
    rng = np.random.default_rng(0)
    volume = rng.normal(-700, 150, (5, 128, 128)).astype(np.float32)
    volume[1:4, 50:80, 50:80] = 20.0
    geometry = VolumeGeometry((128, 128, 5), (0.0, 0.0, 0.0), (0.8, 0.8, 2.5), np.eye(3))
    box = voxel_box_from_ijk([40, 42, 2], [84, 86, 2], geometry)  # one slice, k = 2
    one_slice, reader = _refining_model(), _learnt_neighbours(_refining_model(refine_neighbours=True))
    assert input_region(one_slice, box, volume.shape)[:2] == (2, 3)
    assert input_region(reader, box, volume.shape)[:2] == (1, 4)
    changed = volume.copy()
    changed[1] = -1000.0  # only the slice below the box
    for model, should_change in ((one_slice, False), (reader, True)):
        first = sample_volume(model, volume, geometry, box, n_samples=3, seed=5)
        second = sample_volume(model, changed, geometry, box, n_samples=3, seed=5)
        assert (np.abs(first.mean_probability - second.mean_probability).max() > 1e-4) == should_change
        assert first.summary["settings"]["refine_neighbours"] == should_change


def test_training_converts_the_init_refiner_and_refuses_what_cannot_learn_the_neighbours(tmp_path):
    save_probsam(_refining_model(), tmp_path / "refiner.safetensors")
    init = str(tmp_path / "refiner.safetensors")
    learner = build_learner(TrainConfig(preset="tiny", init=init, train_refiner_only=True, refine_neighbours=True),
                            intensity="unit")
    model = learner.model
    assert learner.reads_neighbours and model.config.refine_neighbours and not model.config.neighbour_slices
    assert float(model.refiner.net[0].weight[:, [1, 3]].detach().abs().max()) == 0.0  # the neighbours start at zero
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(name.startswith("refiner.") for name in trainable)  # only the refiner learns

    save_probsam(build_probsam(ProbSAMConfig.preset("tiny"), seed=0), tmp_path / "bare.safetensors")
    with pytest.raises(SettingsError, match="no mask refiner"):
        build_learner(TrainConfig(preset="tiny", init=str(tmp_path / "bare.safetensors"), refine_neighbours=True),
                      intensity="unit")
    for settings in (["model=prob_unet"], ["model=probsam"], [f"init={init}", "train_latent_only=true"]):
        with pytest.raises(SettingsError, match="refine_neighbours"):
            load_config(None, settings + ["refine_neighbours=true"])
