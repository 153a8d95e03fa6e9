"""The mask refiner (ProbSAMLib/modeling/refine.py): a no-op when attached, it reads the image, it learns an edge the
decoder grid cannot draw, and every entry point (2D sampler, volume sampler, weights files, training) carries
the image to it."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ProbSAMLib import ProbSAMConfig, build_probsam
from ProbSAMLib.modeling import preprocess
from ProbSAMLib.weights.build import load_probsam
from ProbSAMLib.weights.checkpoints import save_probsam
from ProbSAMLib.errors import SettingsError
from ProbSAMLib.geometry import VolumeGeometry, voxel_box_from_ijk
from ProbSAMLib.modeling.refine import MaskRefiner
from ProbSAMLib.inference.sampling import sample_masks
from ProbSAMLib.inference.volume import sample_volume
from Training.config import TrainConfig, load_config
from Training.learning.learners import build_learner
from Training.learning.loss import LossConfig

torch.set_num_threads(1)
BOX = torch.tensor([[40.0, 42.0, 84.0, 86.0]])


def _tiny(refine_channels=0):
    m = build_probsam(ProbSAMConfig.preset("tiny", refine_channels=refine_channels), seed=0).eval()
    torch.manual_seed(1)  # z must change the masks: the projection's last layer starts at zero
    torch.nn.init.normal_(m.latent_projection.mlp[-1].weight, std=0.5)
    return m


def _disc(size=128, radius=13.3, centre=(63.4, 61.7)):
    yy, xx = np.mgrid[:size, :size]
    return ((yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 < radius ** 2)


def _wake(refiner, seed=0):
    """A refiner whose last layer is not zero (a trained one's never is)."""
    torch.manual_seed(seed)
    torch.nn.init.normal_(refiner.net[-1].weight, std=0.5)
    return refiner


def test_an_attached_refiner_leaves_the_masks_as_decoded_until_trained():
    model = _tiny()
    images = torch.rand(2, 128, 128)
    with torch.no_grad():
        embeddings = model.encode(images)
        z = torch.randn(2, 3, model.config.latent_dim)
        before = preprocess.logits_to_image(model.decode(embeddings, BOX.expand(2, 4), z), (128, 128), 128)
        model.attach_refiner(4)
        after = model.decode(embeddings, BOX.expand(2, 4), z, images)
    assert model.config.refine_channels == 4 and model.config.mask_size == 128
    assert after.shape == (2, 3, 128, 128)
    torch.testing.assert_close(after, before, rtol=0, atol=0)
    with pytest.raises(ValueError, match="already has a refiner"):
        model.attach_refiner(4)


def test_a_refining_model_needs_the_image_and_each_slice_reads_its_own():
    model = _tiny(refine_channels=4)
    _wake(model.refiner)
    images = torch.rand(2, 128, 128)
    with torch.no_grad():
        embeddings = model.encode(images)
        z = torch.randn(2, 3, model.config.latent_dim)
        with pytest.raises(ValueError, match="images01"):
            model.decode(embeddings, BOX.expand(2, 4), z)
        both = model.decode(embeddings, BOX.expand(2, 4), z, images)
        swapped = images.clone()
        swapped[1] = torch.rand(128, 128)  # only slice 1's image changes
        again = model.decode(embeddings, BOX.expand(2, 4), z, swapped)
    torch.testing.assert_close(again[0], both[0], rtol=0, atol=0)
    assert float((again[1] - both[1]).abs().max()) > 1e-3


def _edge_fit(image_visible: bool) -> tuple:
    """Three discs (radius 8.5, 10.5, 12.5 on a 64-pixel image) that a decoder 8 x coarser drew alike, as
    one confident disc of radius 10.5 on an 8-cell grid; a refiner fitted to the three from those logits and
    the image -> (Dice of the bilinearly upsampled logits, Dice after the refiner), averaged."""
    yy, xx = np.mgrid[:64, :64]
    discs = np.stack([(yy - 31.4) ** 2 + (xx - 30.7) ** 2 < r ** 2 for r in (8.5, 10.5, 12.5, 10.5)])
    target = torch.from_numpy(discs[:3, None].astype(np.float32))
    image = torch.where(target > 0.5, 0.8, 0.15) if image_visible else torch.full_like(target, 0.5)
    coarse = F.adaptive_avg_pool2d(torch.from_numpy(discs[3:, None].astype(np.float32)), 8).clamp(1e-3, 1 - 1e-3)
    logits = (torch.log(coarse / (1 - coarse)) * 3.0).expand(3, 1, 8, 8)

    def dice(x):
        pred, truth = x > 0, target > 0.5
        return float((2 * (pred & truth).sum((1, 2, 3)) / (pred.sum((1, 2, 3)) + truth.sum((1, 2, 3)))).mean())

    torch.manual_seed(0)
    refiner = MaskRefiner(8)
    optimiser = torch.optim.Adam(refiner.parameters(), lr=1e-2)
    for _ in range(120):
        optimiser.zero_grad()
        F.binary_cross_entropy_with_logits(refiner(logits, image), target).backward()
        optimiser.step()
    with torch.no_grad():
        return dice(F.interpolate(logits, (64, 64), mode="bilinear", align_corners=False)), dice(refiner(logits, image))


def test_the_refiner_draws_the_edge_the_image_shows_not_the_one_the_grid_guessed():
    """The edge is in the image, not in the logits: with the image the refiner recovers all three discs;
    shown a blank image (the control) it cannot do better than the one disc the grid drew."""
    upsampled, refined = _edge_fit(image_visible=True)
    assert upsampled < 0.9 and refined > 0.98
    upsampled_blind, refined_blind = _edge_fit(image_visible=False)
    assert refined_blind < upsampled_blind + 0.02


def test_weights_files_keep_the_refiner_and_old_files_load_without_one(tmp_path):
    model = _tiny(refine_channels=4)
    _wake(model.refiner)
    save_probsam(model, tmp_path / "refined.safetensors")
    loaded = load_probsam(tmp_path / "refined.safetensors").eval()
    assert loaded.config.refine_channels == 4
    images = torch.rand(1, 128, 128)
    with torch.no_grad():
        embeddings = model.encode(images)
        z = torch.randn(1, 2, model.config.latent_dim)
        torch.testing.assert_close(loaded.decode(embeddings, BOX, z, images), model.decode(embeddings, BOX, z, images))
    # A config written before refiners existed has no refine_channels: it reads as 0.
    old = json.loads(ProbSAMConfig.preset("tiny").to_json())
    del old["refine_channels"]
    assert ProbSAMConfig.from_json(json.dumps(old)).refine_channels == 0
    with pytest.raises(ValueError, match="refine_channels"):
        ProbSAMConfig.preset("tiny", refine_channels=-1)


def test_the_2d_and_volume_samplers_pass_the_image_and_stay_seeded():
    model = _tiny(refine_channels=4)
    _wake(model.refiner)
    hu = np.where(_disc(), 30.0, -800.0).astype(np.float32)
    a = sample_masks(model, hu, BOX[0].numpy(), n_samples=3, seed=5)
    b = sample_masks(model, hu, BOX[0].numpy(), n_samples=3, seed=5)
    np.testing.assert_array_equal(a.probabilities, b.probabilities)
    assert a.probabilities.shape == (1, 3, 128, 128)

    volume = np.repeat(hu[None], 3, axis=0)
    geometry = VolumeGeometry((128, 128, 3), (0.0, 0.0, 0.0), (0.8, 0.8, 2.5), np.eye(3))
    box = voxel_box_from_ijk([40, 42, 0], [84, 86, 3], geometry)
    result = sample_volume(model, volume, geometry, box, n_samples=3, seed=5)
    # Without the image the refining model refuses to decode, so getting here means the volume sampler
    # passed it; every slice is the same image and shares its sample's z, so the slices must agree.
    assert result.masks.shape[:2] == (3, 3)
    np.testing.assert_array_equal(result.masks[:, 0], result.masks[:, 2])


def test_training_attaches_a_refiner_to_init_weights_and_refuses_a_mismatch(tmp_path):
    save_probsam(_tiny(), tmp_path / "plain.safetensors")
    learner = build_learner(TrainConfig(preset="tiny", init=str(tmp_path / "plain.safetensors"), refine_channels=4,
                                        freeze_encoder=True), intensity="unit")
    assert learner.model.config.refine_channels == 4
    save_probsam(learner.model, tmp_path / "refined.safetensors")
    kept = build_learner(TrainConfig(preset="tiny", init=str(tmp_path / "refined.safetensors")), intensity="unit")
    assert kept.model.config.refine_channels == 4  # refine_channels=0 keeps init's refiner
    with pytest.raises(SettingsError, match="already has a 4-channel refiner"):
        build_learner(TrainConfig(preset="tiny", init=str(tmp_path / "refined.safetensors"), refine_channels=8),
                      intensity="unit")
    with pytest.raises(SettingsError, match="refine_channels"):
        load_config(None, ["refine_channels=-2"])


def test_the_training_loss_reaches_the_refiner_at_both_resolutions():
    disc = torch.from_numpy(_disc().astype(np.float32))
    images, boxes = disc[None].repeat(2, 1, 1) * 0.6 + 0.2, BOX.expand(2, 4)
    readers = disc[None, None].repeat(2, 4, 1, 1)
    for resolution in ("decoder", "image"):
        loss = LossConfig(set_weight=1.0, set_samples=2, loss_resolution=resolution)
        learner = build_learner(TrainConfig(preset="tiny", freeze_encoder=True, seed=0, refine_channels=4, loss=loss),
                                intensity="unit")
        parts = learner(images, boxes, readers[:, 0], 0, readers=readers, present=torch.ones(2, 4, dtype=torch.bool))
        parts["loss"].backward()
        assert float(learner.model.refiner.net[-1].weight.grad.abs().sum()) > 0.0, resolution


def test_a_fresh_refiner_learns_at_its_own_rate_and_plain_models_keep_two_groups(tmp_path):
    from Training.learning.learners import parameter_groups

    plain = build_learner(TrainConfig(preset="tiny", freeze_encoder=True), intensity="unit")
    groups = parameter_groups(plain, TrainConfig(refine_lr_scale=10.0))
    assert [g["lr_scale"] for g in groups] == [1.0, 1.0]  # the two groups of every earlier checkpoint
    cfg = TrainConfig(preset="tiny", freeze_encoder=True, refine_channels=4, refine_lr_scale=10.0)
    learner = build_learner(cfg, intensity="unit")
    groups = parameter_groups(learner, cfg)
    refiner_ids = {id(p) for p in learner.model.refiner.parameters()}
    fast = [p for g in groups if g["lr_scale"] == 10.0 for p in g["params"]]
    assert {id(p) for p in fast} == refiner_ids
    assert sum(len(g["params"]) for g in groups) == sum(1 for p in learner.parameters() if p.requires_grad)
    with pytest.raises(SettingsError, match="refine_lr_scale"):
        load_config(None, ["refine_lr_scale=0"])


def test_the_memory_estimate_counts_the_refiners_full_resolution_maps():
    """A refiner holds N maps of img_size² per hidden layer; the volume sampler's memory check must see them
    (for SAM's 1024² input, 16 samples and 8 channels they are ~1.2 GB)."""
    from ProbSAMLib.inference.memory import bytes_per_slice

    model = _tiny()
    plain = bytes_per_slice(model, 16, half=False)
    model.attach_refiner(8)
    refined = bytes_per_slice(model, 16, half=False)
    assert refined - plain >= 16 * model.config.img_size ** 2 * 2 * 8 * 4
