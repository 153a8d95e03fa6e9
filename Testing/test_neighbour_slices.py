"""Models that read the slices below and above (ProbSAMConfig.neighbour_slices): the conversion from a one-slice
model is exact, the data sets store the neighbours, batches flip them with the slice, training and evaluation
show them to the model, and the volume sampler (CLI and Slicer module) reads them from the volume."""
import json

import numpy as np
import pytest
import torch

from ProbSAMLib import ProbSAMConfig, build_probsam
from ProbSAMLib.weights.build import load_probsam
from ProbSAMLib.weights.checkpoints import save_probsam
from ProbSAMLib.errors import InputError, SettingsError
from ProbSAMLib.geometry import VolumeGeometry, voxel_box_from_ijk
from ProbSAMLib.inference.sampling import sample_masks
from ProbSAMLib.inference.volume import input_region, sample_volume
from Training.data.batches import SliceBatches, flip_images
from Training.config import TrainConfig, load_config
from Training.data.dataset_format import Chunk, load_dataset, slices_from_volume, write_dataset
from Training.data.embedding_cache import encoder_fingerprint
from Training.learning.learners import build_learner

torch.set_num_threads(1)
BOX = np.array([40.0, 42.0, 84.0, 86.0])


def _tiny(neighbour_slices=False):
    m = build_probsam(ProbSAMConfig.preset("tiny", neighbour_slices=neighbour_slices), seed=0).eval()
    torch.manual_seed(1)  # z must change the masks: the projection's last layer starts at zero
    torch.nn.init.normal_(m.latent_projection.mlp[-1].weight, std=0.5)
    return m


def _learnt_neighbours(model, seed=0):
    """Give a converted model's neighbour weights values (training would; they start at zero)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        conv = model.sam.image_encoder.patch_embed.proj
        conv.weight[:, 0].normal_(std=0.05)
        conv.weight[:, 2].normal_(std=0.05)
    return model


def _volume(depth=5, size=128):
    rng = np.random.default_rng(0)
    return rng.normal(-700, 150, (depth, size, size)).astype(np.float32)


def test_reading_neighbours_starts_as_the_one_slice_model_and_then_sees_them():
    model = _tiny()
    slices = torch.rand(2, 128, 128)
    stacks = torch.rand(2, 3, 128, 128)
    stacks[:, 1] = slices
    with torch.no_grad():
        before = model.encode(slices)
        # a one-slice model given neighbours reads the slice itself only
        torch.testing.assert_close(model.encode(stacks), before)
        model.read_neighbour_slices()
        assert model.config.neighbour_slices
        # exact conversion: whatever the neighbours hold, the embedding is the one-slice model's
        torch.testing.assert_close(model.encode(stacks), before, atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(model.encode(slices), before, atol=2e-5, rtol=1e-5)
        _learnt_neighbours(model)
        other = stacks.clone()
        other[:, 2] = 1.0 - other[:, 2]
        assert (model.encode(other) - model.encode(stacks)).abs().max() > 1e-3
    with pytest.raises(ValueError, match="slices below"):
        model.encode(torch.rand(1, 2, 128, 128))


def test_weights_files_keep_the_setting_and_old_configs_read_as_one_slice(tmp_path):
    model = _learnt_neighbours(_tiny(neighbour_slices=True))
    save_probsam(model, tmp_path / "nb.safetensors")
    loaded = load_probsam(tmp_path / "nb.safetensors").eval()
    assert loaded.config.neighbour_slices
    stacks = torch.rand(1, 3, 128, 128)
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode(stacks), model.encode(stacks))
    old = json.loads(ProbSAMConfig.preset("tiny").to_json())
    del old["neighbour_slices"]
    assert ProbSAMConfig.from_json(json.dumps(old)).neighbour_slices is False
    with pytest.raises(ValueError, match="neighbour_slices"):
        ProbSAMConfig.preset("tiny", neighbour_slices="yes")


def test_data_sets_store_the_slices_below_and_above(tmp_path):
    volume = _volume(depth=5, size=16).astype(np.int16)
    masks = np.zeros((2, 5, 16, 16), bool)
    masks[0, 0:3, 4:9, 4:9] = True  # slice 0 is the volume's first: its "below" is itself
    masks[1, 4, 5:8, 5:8] = True  # slice 4 is the last: its "above" is itself
    chunk = slices_from_volume(volume, masks, {"patient_id": "P1", "series_uid": "S1", "nodule_id": "n0"})
    ks = [row["k"] for row in chunk.rows]
    assert ks == [0, 1, 2, 4]
    for i, k in enumerate(ks):
        np.testing.assert_array_equal(chunk.neighbours[i, 0], volume[max(k - 1, 0)])
        np.testing.assert_array_equal(chunk.neighbours[i, 1], volume[min(k + 1, 4)])
    write_dataset(tmp_path / "ds", [chunk], {"source": "test", "intensity": "hu"})
    data = load_dataset(tmp_path / "ds")
    np.testing.assert_array_equal(data.neighbours, chunk.neighbours)
    # a damaged neighbours.npy (here: one row short) is named, not read past
    np.save(tmp_path / "ds" / "neighbours.npy", chunk.neighbours[:-1])
    with pytest.raises(InputError, match="neighbours.npy"):
        load_dataset(tmp_path / "ds")
    # a data set written without them (the pickle importer) has none
    bare = Chunk(chunk.images, chunk.masks, chunk.present, chunk.rows)
    write_dataset(tmp_path / "bare", [bare], {"source": "test", "intensity": "hu"})
    assert load_dataset(tmp_path / "bare").neighbours is None
    assert not (tmp_path / "bare" / "neighbours.npy").exists()


def test_batches_flip_the_neighbours_with_the_slice_and_stack_them_in_order(tmp_path):
    volume = _volume(depth=6, size=32).astype(np.int16)
    masks = np.zeros((1, 6, 32, 32), bool)
    masks[0, 1:5, 8:20, 10:24] = True
    rows = {"patient_id": "P1", "series_uid": "S1", "nodule_id": "n0"}
    write_dataset(tmp_path / "ds", [slices_from_volume(volume, masks, rows)], {"source": "test", "intensity": "hu"})
    batches = SliceBatches(load_dataset(tmp_path / "ds"))
    plain = batches.read(np.arange(4))
    stacked = plain.model_images(True)
    assert stacked.shape == (4, 3, 32, 32)
    torch.testing.assert_close(stacked[:, 1], plain.images)
    torch.testing.assert_close(stacked[1:, 0], plain.images[:-1])  # slice k - 1 is the previous row's slice
    assert plain.model_images(False) is plain.images
    flipped = batches.read(np.arange(4), np.random.default_rng(3), flip=True)
    assert flipped.flips.any()
    for i, code in enumerate(flipped.flips):
        torch.testing.assert_close(flipped.neighbours[i], flip_images(plain.neighbours[i], int(code)))
        torch.testing.assert_close(flipped.images[i], flip_images(plain.images[i], int(code)))


def test_the_volume_sampler_reads_the_neighbours_from_the_volume():
    volume = _volume(depth=5)
    volume[2, 50:80, 50:80] = 20.0
    geometry = VolumeGeometry((128, 128, 5), (0.0, 0.0, 0.0), (0.8, 0.8, 2.5), np.eye(3))
    box = voxel_box_from_ijk([40, 42, 2], [84, 86, 2], geometry)  # one slice, k = 2 (corners inclusive)
    one_slice, reader = _tiny(), _learnt_neighbours(_tiny(neighbour_slices=True))
    assert input_region(one_slice, box, volume.shape)[:2] == (2, 3)
    assert input_region(reader, box, volume.shape)[:2] == (1, 4)
    edge = voxel_box_from_ijk([40, 42, 0], [84, 86, 4], geometry)
    assert input_region(reader, edge, volume.shape)[:2] == (0, 5)  # clamped to the volume

    changed = volume.copy()
    changed[3] = -1000.0  # only the slice above the box
    for model, should_change in ((one_slice, False), (reader, True)):
        first = sample_volume(model, volume, geometry, box, n_samples=3, seed=5)
        a, b = first.mean_probability, sample_volume(model, changed, geometry, box, n_samples=3, seed=5).mean_probability
        assert (np.abs(a - b).max() > 1e-4) == should_change
        assert first.summary["settings"]["neighbour_slices"] == should_change  # the summary says what it read

    # The 2D sampler given (B, 3, H, W) shows the reader the same slices as the volume sampler does
    stack = np.stack([volume[1], volume[2], volume[3]])[None]
    direct = sample_masks(reader, stack, BOX, n_samples=3, seed=7).probabilities
    again = sample_masks(reader, stack, BOX, n_samples=3, seed=7).probabilities
    np.testing.assert_array_equal(direct, again)
    alone = sample_masks(reader, volume[2], BOX, n_samples=3, seed=7).probabilities
    assert np.abs(direct - alone).max() > 1e-4


def test_training_converts_init_weights_and_refuses_what_cannot_learn_the_neighbours(tmp_path):
    save_probsam(_tiny(), tmp_path / "plain.safetensors")
    init = str(tmp_path / "plain.safetensors")
    learner = build_learner(TrainConfig(preset="tiny", init=init, neighbour_slices=True, freeze_encoder=False),
                            intensity="unit")
    assert learner.reads_neighbours and learner.model.config.neighbour_slices
    assert float(learner.model.sam.image_encoder.patch_embed.proj.weight[:, 0].detach().abs().max()) == 0.0
    assert encoder_fingerprint(learner.model) != encoder_fingerprint(load_probsam(tmp_path / "plain.safetensors"))
    with pytest.raises(SettingsError, match="neighbour_slices"):  # an init model's frozen encoder cannot learn them
        load_config(None, [f"init={init}", "neighbour_slices=true", "freeze_encoder=true"])
    with pytest.raises(SettingsError, match="neighbour_slices"):
        load_config(None, ["model=prob_unet", "neighbour_slices=true"])
