"""The anchor term (Training/learning/anchor.py): which slices it holds, that it pairs each sample with the reference's
sample for the same noise (so at the reference's own weights it costs nothing and pulls nowhere), that it
grows and pulls once the model leaves the reference, and that training refuses a reference it cannot use."""
import pytest
import torch

from ProbSAMLib import ProbSAMConfig, build_probsam
from ProbSAMLib.errors import SettingsError
from ProbSAMLib.weights.checkpoints import save_probsam
from Training.config import TrainConfig, load_config
from Training.learning.anchor import anchor_loss, anchored_slices
from Training.learning.learners import build_learner
from Training.learning.loss import LossConfig

torch.set_num_threads(1)


def _tiny(refine_channels=0):
    model = build_probsam(ProbSAMConfig.preset("tiny", refine_channels=refine_channels), seed=0).eval()
    torch.manual_seed(1)  # z must change the masks: the projection's last layer starts at zero
    torch.nn.init.normal_(model.latent_projection.mlp[-1].weight, std=0.5)
    return model


def _slots(marked_by, annotated_by, size=16):
    """(1, 4, size, size) reader masks and (1, 4) voters: slots in `marked_by` drew a square on this slice."""
    readers = torch.zeros(1, 4, size, size)
    for slot in marked_by:
        readers[0, slot, 4:9, 5:11] = 1.0
    voters = torch.zeros(1, 4, dtype=torch.bool)
    voters[0, list(annotated_by)] = True
    return readers, voters


@pytest.mark.parametrize("marked_by, annotated_by, min_readers, expected", [
    ((0, 1, 2, 3), (0, 1, 2, 3), 3, True),  # a core all four marked
    ((0, 1, 2), (0, 1, 2, 3), 3, False),  # an edge slice in z: one of the nodule's four readers left it out
    ((0, 2, 3), (0, 2, 3), 3, True),  # a three-reader nodule's core (the fourth slot never annotated it)
    ((1, 3), (1, 3), 3, False),  # a two-reader nodule's overlap stays free...
    ((1, 3), (1, 3), 2, True),  # ...unless asked for
    ((), (0, 1, 2, 3), 1, False),  # nobody marked it
])
def test_anchored_slices_are_those_every_reader_of_the_nodule_marked(marked_by, annotated_by, min_readers, expected):
    readers, voters = _slots(marked_by, annotated_by)
    assert bool(anchored_slices(readers, voters, min_readers)[0]) == expected


def test_anchor_loss_is_zero_at_the_reference_and_only_on_anchored_slices():
    torch.manual_seed(0)
    reference = torch.randn(2, 3, 8, 8) * 3
    anchored = torch.tensor([True, False])
    torch.testing.assert_close(anchor_loss(reference, reference, anchored), torch.zeros(2), atol=1e-4, rtol=0)
    moved = anchor_loss(reference + torch.randn(2, 3, 8, 8), reference, anchored, pixel_weight=0.25)
    assert float(moved[0]) > 0 and float(moved[1]) == 0.0
    full = anchor_loss(reference + 1.0, reference, anchored, pixel_weight=1.0)
    torch.testing.assert_close(anchor_loss(reference + 1.0, reference, anchored, pixel_weight=0.25), full * 0.25)


def _loss_and_grads(learner, batch, weight):
    learner.loss_config.anchor_weight = weight
    learner.zero_grad()
    torch.manual_seed(7)  # the posterior's and the prior's draws are the same in both passes
    parts = learner(*batch[:3], step=5, readers=batch[3], present=torch.ones(2, 4, dtype=torch.bool), voters=batch[4])
    parts["loss"].backward()
    grads = {n: p.grad.clone() for n, p in learner.model.named_parameters() if p.grad is not None}
    return parts, grads


def _batch():
    torch.manual_seed(3)
    images = torch.rand(2, 128, 128)
    boxes = torch.tensor([[30.0, 30.0, 90.0, 96.0], [20.0, 40.0, 70.0, 100.0]])
    readers = torch.zeros(2, 4, 128, 128)
    readers[:, :3, 45:80, 40:75] = 1.0  # three readers annotated both nodules and marked both slices
    voters = torch.tensor([[True, True, True, False]] * 2)
    return images, boxes, readers[:, 0], readers, voters


def test_the_model_is_paired_with_the_references_sample_for_the_same_noise(tmp_path):
    """At init the model is its reference: with the samples paired by their noise the anchor costs 0 and adds
    no gradient (unpaired draws would cost and pull); once the decoder has moved, it costs and pulls."""
    save_probsam(_tiny(), tmp_path / "ref.safetensors")
    cfg = TrainConfig(preset="tiny", init=str(tmp_path / "ref.safetensors"), freeze_encoder=False,
                      loss=LossConfig(anchor_weight=1.0, loss_resolution="image", set_samples=3))
    learner = build_learner(cfg, intensity="unit")
    assert learner.anchor is not None and not learner.loss_config.needs_prior_samples  # the anchor alone
    batch = _batch()
    parts_off, grads_off = _loss_and_grads(learner, batch, 0.0)
    parts_on, grads_on = _loss_and_grads(learner, batch, 1.0)
    assert abs(float(parts_on["anchor"])) < 1e-3
    torch.testing.assert_close(parts_on["loss"], parts_off["loss"], atol=1e-3, rtol=0)
    for name, grad in grads_off.items():
        torch.testing.assert_close(grads_on[name], grad, atol=1e-4, rtol=1e-4, msg=name)

    with torch.no_grad():  # the model leaves the reference: its masks grow
        learner.model.sam.mask_decoder.output_upscaling[-2].bias.add_(0.5)
    parts_off, grads_off = _loss_and_grads(learner, batch, 0.0)
    parts_on, grads_on = _loss_and_grads(learner, batch, 1.0)
    assert float(parts_on["anchor"]) > 1.0
    assert max(float((grads_on[n] - g).abs().max()) for n, g in grads_off.items()) > 1e-2
    assert all(not p.requires_grad for p in learner.anchor.model.parameters())
    assert not any(name.startswith("anchor") for name in learner.state_dict())  # never saved with the model


def test_training_refuses_a_reference_it_cannot_use(tmp_path):
    save_probsam(_tiny(), tmp_path / "plain.safetensors")
    save_probsam(_tiny(refine_channels=4), tmp_path / "refining.safetensors")  # decodes on a finer grid
    with pytest.raises(SettingsError, match="mask_size"):
        build_learner(TrainConfig(preset="tiny", init=str(tmp_path / "plain.safetensors"),
                                  anchor=str(tmp_path / "refining.safetensors"), loss=LossConfig(anchor_weight=1.0)),
                      intensity="unit")
    for settings in (["anchor_weight=1"], ["model=prob_unet", f"init={tmp_path / 'plain.safetensors'}",
                                            "loss.anchor_weight=1"]):
        with pytest.raises(SettingsError, match="anchor_weight"):
            load_config(None, settings)
    with pytest.raises(SettingsError, match="anchor= names a reference model but anchor_weight is 0"):
        load_config(None, [f"init={tmp_path / 'plain.safetensors'}", f"anchor={tmp_path / 'plain.safetensors'}"])
    with pytest.raises(SettingsError, match="anchor_weight must be at least 0"):
        load_config(None, ["anchor_weight=-1"])


def test_the_reference_reads_only_the_anchored_slices(tmp_path, monkeypatch):
    """The reference's forward pass (an encoder: the costly part) runs on the anchored slices alone, and not at
    all on a batch without one; the term still averages over the whole batch."""
    save_probsam(_tiny(), tmp_path / "ref.safetensors")
    cfg = TrainConfig(preset="tiny", init=str(tmp_path / "ref.safetensors"), freeze_encoder=False,
                      loss=LossConfig(anchor_weight=1.0, loss_resolution="image", set_samples=3))
    learner = build_learner(cfg, intensity="unit")
    with torch.no_grad():
        learner.model.sam.mask_decoder.output_upscaling[-2].bias.add_(0.5)
    read = []
    original = learner.anchor.sample_logits
    monkeypatch.setattr(learner.anchor, "sample_logits",
                        lambda images, boxes, noise: read.append(len(images)) or original(images, boxes, noise))
    images, boxes, target, readers, voters = _batch()
    both, _ = _loss_and_grads(learner, (images, boxes, target, readers, voters), 1.0)
    readers_one = readers.clone()
    readers_one[1, 2] = 0  # slice 1: one of its nodule's three readers left it out, so it is not anchored
    one, _ = _loss_and_grads(learner, (images, boxes, target, readers_one, voters), 1.0)
    readers_none = readers.clone()
    readers_none[:, 2] = 0
    none, _ = _loss_and_grads(learner, (images, boxes, target, readers_none, voters), 1.0)
    assert read == [2, 1]
    assert float(none["anchor"]) == 0.0
    # slice 0 alone carries the term, averaged over both slices: about half of what both slices cost
    assert 0.2 * float(both["anchor"]) < float(one["anchor"]) < 0.8 * float(both["anchor"])
