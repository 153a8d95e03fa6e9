"""Where the loss scores the masks (LossConfig.loss_resolution).

"decoder" (the default, and every run before demo_v4) scores the decoder-grid logits against area-averaged
targets; "image" upsamples the logits to the image, as evaluation and the Slicer module do, and scores
them against the readers' masks at full resolution, each pixel weighing its share of a decoder cell so
the other terms' weights keep their meaning.
"""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ProbSAMLib.errors import SettingsError
from ProbSAMLib.modeling import preprocess
from ProbSAMLib.modeling.probsam import TrainingOutput
from Training.config import TrainConfig, load_config
from Training.learning.learners import build_learner
from Training.learning.loss import LossConfig, probsam_loss


def _normal(batch):
    return torch.distributions.Independent(torch.distributions.Normal(torch.zeros(batch, 2), torch.ones(batch, 2)), 1)


def test_the_pixel_weight_keeps_the_bce_on_the_decoder_grids_scale():
    # Logits of 0 everywhere cost log 2 a pixel: S^2 log 2 on the S x S grid, and the same on the 2S x 2S
    # image once each image pixel weighs (S / 2S)^2.
    s = 16
    out = TrainingOutput(logits=torch.zeros(1, 1, s, s), prior=_normal(1), posterior=_normal(1))
    on_grid = probsam_loss(out, torch.zeros(1, s, s), 0, LossConfig())
    on_image = probsam_loss(out, torch.zeros(1, 2 * s, 2 * s), 0, LossConfig(loss_resolution="image"),
                            logits=torch.zeros(1, 1, 2 * s, 2 * s), pixel_weight=0.25)
    assert float(on_grid["bce"]) == pytest.approx(s * s * math.log(2), rel=1e-6)
    assert float(on_image["bce"]) == pytest.approx(float(on_grid["bce"]), rel=1e-6)


def _disc_batch(size):
    yy, xx = np.mgrid[:size, :size]
    r2 = (yy - size / 2) ** 2 + (xx - size / 2 + 0.5) ** 2  # an edge that falls inside decoder cells
    images = torch.from_numpy(np.clip(0.2 + 0.6 * (r2 < 49), 0, 1).astype(np.float32))[None].repeat(2, 1, 1)
    readers = torch.from_numpy(np.stack([np.stack([r2 < 25, r2 < 49, r2 < 36, r2 < 36])] * 2))
    c = size / 2
    boxes = torch.tensor([[c - 10, c - 10, c + 10, c + 10]] * 2, dtype=torch.float32)
    return images, readers, boxes


@pytest.mark.parametrize("size, weight", [(128, 0.25), (64, 1.0)])
def test_image_resolution_scores_upsampled_logits_against_full_resolution_masks(size, weight):
    images, readers, boxes = _disc_batch(size)
    cfg = TrainConfig(preset="tiny", freeze_encoder=True, seed=0,
                      loss=LossConfig(beta=0.0, anneal_steps=0, set_weight=1.0, set_samples=2, loss_resolution="image"))
    learner = build_learner(cfg, intensity="unit")
    model = learner.model
    with torch.no_grad():  # logits far from 0, so the two resolutions' BCEs differ clearly
        for mlp in model.sam.mask_decoder.output_hypernetworks_mlps:
            mlp.layers[-1].weight.mul_(200.0)
    torch.manual_seed(0)
    parts = learner(images, boxes, readers[:, 1], 0, readers=readers, present=torch.ones(2, 4, dtype=torch.bool))

    # The same draw by hand: the posterior reads the decoder-grid target, the BCE sees the image.
    torch.manual_seed(0)
    embeddings = model.encode(images)
    boxes_model = preprocess.boxes_to_model_frame(boxes, images.shape[-2:], model.config.img_size)
    low = preprocess.masks_to_low_res(readers[:, 1].float(), images.shape[-2:], model.config.img_size,
                                      model.config.low_res_size)
    out = model(embeddings, boxes_model, low)
    up = preprocess.logits_to_image(out.logits, images.shape[-2:], model.config.img_size)
    assert up.shape[-2:] == (size, size)
    target = readers[:, 1].float()[:, None].expand_as(up)
    bce = F.binary_cross_entropy_with_logits(up, target, reduction="none").sum((-2, -1)) * weight
    assert float(parts["bce"]) == pytest.approx(float(bce.detach().mean()), rel=1e-5)

    # "decoder" scores the grid against the area-averaged target: a different number from the same draw.
    learner.loss_config.loss_resolution = "decoder"
    torch.manual_seed(0)
    on_grid = learner(images, boxes, readers[:, 1], 0, readers=readers, present=torch.ones(2, 4, dtype=torch.bool))
    grid_bce = F.binary_cross_entropy_with_logits(out.logits, low[:, None].expand_as(out.logits),
                                                  reduction="none").sum((-2, -1))
    assert float(on_grid["bce"]) == pytest.approx(float(grid_bce.detach().mean()), rel=1e-5)
    assert float(on_grid["bce"]) != pytest.approx(float(parts["bce"]), rel=1e-2)


def test_the_image_loss_reaches_the_decoder_and_the_prior():
    images, readers, boxes = _disc_batch(128)
    loss = LossConfig(beta=0.0, anneal_steps=0, consensus_weight=10.0, set_samples=4, loss_resolution="image")
    learner = build_learner(TrainConfig(preset="tiny", freeze_encoder=True, seed=0, loss=loss), intensity="unit")
    torch.nn.init.normal_(learner.model.latent_projection.mlp[-1].weight, std=0.1)
    torch.manual_seed(0)
    parts = learner(images, boxes, readers[:, 0], 0, readers=readers, present=torch.ones(2, 4, dtype=torch.bool))
    parts["loss"].backward()

    def grad_norm(module):
        return sum(float(p.grad.abs().sum()) for p in module.parameters() if p.grad is not None)

    assert grad_norm(learner.model.sam.mask_decoder) > 0.0
    assert grad_norm(learner.model.prior) > 0.0  # beta 0: only the consensus term reaches the prior


def test_bad_resolution_settings_are_refused():
    with pytest.raises(SettingsError, match="setting loss_resolution must be one of decoder, image, got 'full'"):
        LossConfig(loss_resolution="full")
    with pytest.raises(SettingsError, match="loss_resolution"):
        load_config(None, ["loss_resolution=full"])
