"""The set term (Training.learning.loss.set_loss): K prior samples against all readers' masks of a slice.

It must be ~0 when the samples are the readers' set (empty readers included), grow when the samples
collapse onto one reader or never come out empty, ignore absent reader slots, pass its gradient to
the prior net, and train deterministically through the ProbSAM learner when switched on.
"""
import numpy as np
import pytest
import torch

from ProbSAMLib.errors import SettingsError
from Training.config import TrainConfig
from Training.learning.learners import build_learner
from Training.learning.loss import LossConfig, set_loss, soft_iou_distance

torch.set_num_threads(1)
S = 32


def _readers():
    """(1, 4, S, S): two different discs, one present reader with an empty mask, one absent slot."""
    yy, xx = np.mgrid[:S, :S]
    r2 = (yy - 16) ** 2 + (xx - 16) ** 2
    masks = np.stack([r2 < 5 ** 2, r2 < 9 ** 2, np.zeros((S, S), bool), r2 < 12 ** 2])
    present = torch.tensor([[True, True, True, False]])
    return torch.from_numpy(masks)[None].float(), present


def _logits(masks):
    """Sharp logits that reproduce binary masks (B, K, S, S)."""
    return 30.0 * (2 * masks - 1)


def test_zero_for_the_readers_set_larger_for_collapse_or_no_empty_samples():
    readers, present = _readers()
    set_of_readers = readers[:, [0, 1, 2, 0, 1, 2]]  # K = 6: each present reader twice
    matched = set_loss(_logits(set_of_readers), readers, present)
    collapsed = set_loss(_logits(readers[:, [1] * 6]), readers, present)
    never_empty = set_loss(_logits(readers[:, [0, 1, 0, 1, 0, 1]]), readers, present)
    assert matched.shape == (1,) and abs(float(matched)) < 1e-4
    assert float(collapsed) > 0.2
    assert float(never_empty) > 0.1  # ignoring the reader who saw nothing costs
    assert float(never_empty) > float(matched) + 0.1 and float(collapsed) > float(matched) + 0.2


def test_absent_readers_do_not_count_and_k_need_not_divide_m():
    readers, present = _readers()
    samples = _logits(readers[:, [0, 1, 2, 1]])  # K = 4, M = 3 present
    value = set_loss(samples, readers, present)
    other = readers.clone()
    other[:, 3] = 1.0  # change only the absent slot
    assert torch.allclose(value, set_loss(samples, other, present))
    all_present = torch.ones_like(present)
    assert not torch.allclose(value, set_loss(samples, other, all_present))


def test_soft_iou_distance_conventions():
    readers, _ = _readers()
    d = soft_iou_distance(readers[:, :3], readers[:, :3])
    assert torch.allclose(torch.diagonal(d[0]), torch.zeros(3))  # identical masks, empty vs empty: 0
    assert float(d[0, 0, 2]) > 0.95  # a mask vs an empty one: ~1
    inner, outer = readers[0, 0].sum(), readers[0, 1].sum()
    assert float(d[0, 0, 1]) == pytest.approx(1 - (inner + 1) / (outer + 1))


def test_bad_settings_are_refused():
    with pytest.raises(SettingsError, match="setting set_samples must be at least 1, got 0"):
        LossConfig(set_samples=0)
    with pytest.raises(SettingsError, match="setting set_weight must be a number"):
        LossConfig(set_weight="much")


def _batch(seed=0, size=64):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    r2 = (yy - 32) ** 2 + (xx - 32) ** 2
    images = torch.from_numpy(np.clip(0.2 + 0.6 * (r2 < 100) + 0.05 * rng.standard_normal((2, size, size)),
                                      0, 1).astype(np.float32))
    readers = torch.from_numpy(np.stack([np.stack([r2 < 36, r2 < 100, np.zeros_like(r2, bool), r2 < 64])] * 2))
    present = torch.tensor([[True, True, True, False], [True, True, True, True]])
    boxes = torch.tensor([[20.0, 20.0, 44.0, 44.0]] * 2)
    return images, boxes, readers, present


def _learner(**loss):
    return build_learner(TrainConfig(preset="tiny", freeze_encoder=True, seed=0, loss=LossConfig(**loss)),
                         intensity="unit")


def test_set_term_gradient_reaches_the_prior_net():
    images, boxes, readers, present = _batch()
    for weight in (0.0, 1.0):
        learner = _learner(beta=0.0, anneal_steps=0, set_weight=weight)  # beta 0: no KL path to the prior
        # z's projection starts at zero (an untrained model ignores z); give it weights, as training would.
        torch.nn.init.normal_(learner.model.latent_projection.mlp[-1].weight, std=0.1)
        torch.manual_seed(0)
        parts = learner(images, boxes, readers[:, 0], 0, readers=readers, present=present)
        parts["loss"].backward()
        grads = [p.grad for p in learner.model.prior.parameters()]
        norm = sum(float(g.abs().sum()) for g in grads if g is not None)
        if weight == 0:
            assert norm == 0.0 and "set" not in parts
        else:
            assert norm > 0.0 and 0.0 < float(parts["set"]) < 2.0


def _train(steps=3, **settings):
    learner = _learner(anneal_steps=0, **settings)
    params = [p for p in learner.parameters() if p.requires_grad]
    optimiser = torch.optim.AdamW(params, lr=1e-3)
    images, boxes, readers, present = _batch()
    with torch.no_grad():
        embeddings = learner.model.encode(images)
    losses = []
    for step in range(steps):
        torch.manual_seed(step)
        parts = learner(images, boxes, readers[:, step % 2], step, embeddings=embeddings, readers=readers,
                        present=present)
        optimiser.zero_grad()
        parts["loss"].backward()
        optimiser.step()
        losses.append((float(parts["loss"].detach()), float(parts.get("set", torch.tensor(-1.0)))))
    return losses, params


def test_training_with_the_set_term_runs_and_is_deterministic():
    first, params_a = _train(set_weight=5.0, set_samples=4)
    again, params_b = _train(set_weight=5.0, set_samples=4)
    assert first == again and all(np.isfinite(v) for pair in first for v in pair)
    assert all(torch.equal(a, b) for a, b in zip(params_a, params_b))
    assert all(0.0 < s < 2.0 for _, s in first)
    # Off by default: the same run without the term is the old objective (no 'set' part)...
    off, _ = _train(steps=1)
    assert off[0][1] == -1.0 and off[0][0] != first[0][0]
    # ...and switching it on without the readers' masks is a clear error.
    learner = _learner(set_weight=1.0)
    images, boxes, readers, _ = _batch()
    with pytest.raises(ValueError, match="every reader's mask"):
        learner(images, boxes, readers[:, 0], 0)
