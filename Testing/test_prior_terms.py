"""The terms on the set term's K prior samples that shape the consensus (Training.learning.loss).

consensus_loss (the samples' mean prediction against the readers' majority) must be 0 when the mean
prediction is the majority with the margin, charge the knife-edge of a calibrated two-reader slice and
empty samples on a slice every reader marked, leave a one-reader slice's calibrated set alone, ignore
absent reader slots, agree with the evaluation's majority rule, vote over the nodule's own readers when
asked (consensus_voters="readers", "two"), and reach the prior net through the ProbSAM learner. The set
term's set_above_half scores only what a sample shows once cut.
"""
import numpy as np
import pytest
import torch

from ProbSAMLib.errors import SettingsError
from ProbSAMLib.metrics import mean_prediction_scores
from ProbSAMLib.modeling.probsam import TrainingOutput
from Training.config import TrainConfig, load_config
from Training.learning.learners import build_learner
from Training.learning.loss import LossConfig, consensus_loss, probsam_loss, set_loss

torch.set_num_threads(1)
S = 32
YY, XX = np.mgrid[:S, :S]
DISC = torch.from_numpy(((YY - 16) ** 2 + (XX - 16) ** 2) < 8 ** 2).float()
EMPTY = torch.zeros(S, S)


def _stack(*masks):
    return torch.stack(masks)[None]  # (1, n, S, S)


def _logits(masks):
    return 30.0 * (2 * masks - 1)  # sharp: sigmoid reproduces the binary masks


ALL = torch.tensor([[True] * 4])


def test_zero_when_the_mean_prediction_is_the_majority():
    readers = _stack(DISC, DISC, DISC, EMPTY)
    samples = _stack(*[DISC] * 8)
    assert float(consensus_loss(_logits(samples), readers, ALL)) == pytest.approx(0.0, abs=1e-6)


def test_two_readers_of_four_the_calibrated_set_sits_on_the_knife_edge():
    # Majority = at least 2 of 4 slots, so the two readers' disc is "in"; a set that copies the readers
    # (half discs, half empty) has mean 0.5 there, which "mean > 0.5" reads as out.
    readers = _stack(DISC, DISC, EMPTY, EMPTY)
    calibrated = _stack(*[DISC] * 4, *[EMPTY] * 4)
    leaning_in = _stack(*[DISC] * 6, *[EMPTY] * 2)
    knife_edge = float(consensus_loss(_logits(calibrated), readers, ALL))
    assert knife_edge == pytest.approx(0.1 * float(DISC.sum()) / float(DISC.sum() + 1), rel=1e-4)  # margin a pixel
    assert float(consensus_loss(_logits(leaning_in), readers, ALL)) == pytest.approx(0.0, abs=1e-6)
    # The evaluation agrees: the calibrated mean scores Dice 0 against the majority, the other one 1.
    probs = lambda s: s[0].numpy()  # the samples' probabilities, exactly 0 or 1
    majority_readers = readers[0].numpy().astype(bool)
    assert mean_prediction_scores(probs(calibrated), majority_readers)["dice_majority"] == 0.0
    assert mean_prediction_scores(probs(leaning_in), majority_readers)["dice_majority"] == 1.0


def test_empty_samples_on_a_slice_every_reader_marked_cost_and_the_gradient_fills_them():
    readers = _stack(DISC, DISC, DISC, DISC)
    half_empty = _logits(_stack(*[DISC] * 4, *[EMPTY] * 4)).requires_grad_(True)
    loss = consensus_loss(half_empty, readers, ALL)
    assert float(loss.detach()) > 0.05
    loss.sum().backward()
    grad = half_empty.grad[0]
    inside = DISC.bool()
    # Descending the gradient raises the empty samples' logits inside the disc (their sigmoid is not
    # saturated at -30 in float32, so the gradient is small but of the right sign) and nothing outside.
    assert (grad[4:, inside] < 0).all() and (grad[:, ~inside] == 0).all()


def test_a_one_reader_slice_calibrated_set_costs_nothing():
    readers = _stack(DISC, EMPTY, EMPTY, EMPTY)  # majority empty; a calibrated mean is 0.25 on the disc
    calibrated = _stack(*[DISC] * 2, *[EMPTY] * 6)
    always_drawn = _stack(*[DISC] * 8)
    assert float(consensus_loss(_logits(calibrated), readers, ALL)) == pytest.approx(0.0, abs=1e-6)
    assert float(consensus_loss(_logits(always_drawn), readers, ALL)) > 0.4  # mean 1 where none is due


def test_absent_slots_do_not_vote():
    readers = _stack(DISC, DISC, EMPTY, EMPTY)
    present = torch.tensor([[True, True, True, False]])  # 2 of 3 present readers drew the disc: in
    samples = _logits(_stack(*[DISC] * 4, *[EMPTY] * 4))
    with_absent = consensus_loss(samples, readers, present)
    changed = readers.clone()
    changed[:, 3] = DISC  # the absent slot's mask must not matter
    assert torch.allclose(with_absent, consensus_loss(samples, changed, present))
    assert float(with_absent) > 0.05  # mean 0.5 on a 2-of-3 majority


def _training_output(batch: int = 1):
    normal = torch.distributions.Independent(torch.distributions.Normal(torch.zeros(batch, 2), torch.ones(batch, 2)), 1)
    return TrainingOutput(logits=torch.zeros(batch, 1, S, S), prior=normal, posterior=normal)


def test_the_readers_majority_of_a_one_reader_nodule_is_its_reader():
    # One radiologist of four annotated the nodule (slot 0). Over the 4 slots its majority is empty, over
    # the nodule's readers it is the disc: a set that always draws the disc costs under "slots" and not
    # under "readers", and an always-empty set the other way round.
    readers = _stack(DISC, EMPTY, EMPTY, EMPTY)
    voters = torch.tensor([[True, False, False, False]])
    drawn, empty = _logits(_stack(*[DISC] * 8)), _logits(_stack(*[EMPTY] * 8))

    def consensus(samples, who):
        cfg = LossConfig(consensus_weight=1.0, consensus_voters=who)
        return float(probsam_loss(_training_output(), DISC[None], 0, cfg, samples, readers, ALL, voters)["consensus"])

    assert consensus(drawn, "readers") == pytest.approx(0.0, abs=1e-6)
    assert consensus(empty, "readers") > 0.5
    assert consensus(drawn, "slots") > 0.5
    assert consensus(empty, "slots") == pytest.approx(0.0, abs=1e-6)
    # The set term still scores all four slots (an absent reader is an empty mask), whatever the voters.
    cfg = LossConfig(set_weight=1.0, consensus_weight=1.0, consensus_voters="readers")
    both = probsam_loss(_training_output(), DISC[None], 0, cfg, drawn, readers, ALL, voters)
    assert float(both["set"]) == pytest.approx(float(set_loss(drawn, readers, ALL).mean()), rel=1e-6)
    with pytest.raises(ValueError, match="needs voters"):
        probsam_loss(_training_output(), DISC[None], 0, cfg, drawn, readers, ALL)


def test_two_voters_ask_for_what_at_least_two_readers_drew_or_a_sole_readers_mask():
    # consensus_voters="two": the pixels at least two of the nodule's readers drew -- the slot majority of a
    # nodule two, three or four radiologists annotated -- and, for a one-reader nodule, its reader's mask.
    left, right = torch.roll(DISC, -3, 1), torch.roll(DISC, 3, 1)
    overlap, union = left * right, torch.clamp(left + right, max=1)
    readers = torch.cat([_stack(left, right, EMPTY, EMPTY), _stack(DISC, EMPTY, EMPTY, EMPTY),
                         _stack(left, right, EMPTY, EMPTY)])
    voters = torch.tensor([[True, True, False, False], [True, False, False, False], [True, True, True, False]])
    present = torch.tensor([[True] * 4] * 3)

    def per_slice(first, second, third, who="two"):
        samples = torch.cat([_logits(_stack(*[m] * 8)) for m in (first, second, third)])
        cfg = LossConfig(consensus_weight=1.0, consensus_voters=who)
        out = probsam_loss(_training_output(3), torch.stack([DISC] * 3), 0, cfg, samples, readers, present, voters)
        return float(out["consensus"]) * 3

    # Two readers: the overlap (as the slot majority), not the union (the readers' majority).
    assert per_slice(overlap, DISC, overlap) == pytest.approx(0.0, abs=1e-6)
    assert per_slice(union, DISC, overlap) > 0.1
    assert per_slice(union, DISC, overlap, "readers") < per_slice(overlap, DISC, overlap, "readers")
    # One reader: its mask (as the readers' majority), so leaving it empty costs.
    assert per_slice(overlap, EMPTY, overlap) > 0.5
    # Three readers, two of whom drew: 2 of 3 is the majority under every rule.
    assert per_slice(overlap, DISC, union) > 0.1
    level = torch.tensor([1.0, 1.0, 2 / 3])
    expected = consensus_loss(_logits(torch.stack([_stack(*[m] * 8)[0] for m in (union, DISC, overlap)])),
                              readers, voters, vote_level=level).sum()
    assert per_slice(union, DISC, overlap) == pytest.approx(float(expected), rel=1e-5)
    assert load_config(None, ["consensus_voters=two"]).loss.consensus_voters == "two"


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="consensus_voters"):
        LossConfig(consensus_voters="everyone")
    with pytest.raises(SettingsError, match="consensus_voters"):
        load_config(None, ["consensus_voters=all"])
    with pytest.raises(ValueError, match="consensus_margin"):
        LossConfig(consensus_margin=0.5)
    with pytest.raises(ValueError, match="consensus_weight"):
        LossConfig(consensus_weight=-1.0)
    with pytest.raises(SettingsError, match="consensus_margin"):
        load_config(None, ["consensus_margin=0.7"])
    # "multi" (the slot majority on nodules two or more readers annotated) was removed with its code path
    with pytest.raises(SettingsError, match="setting consensus_voters must be one of slots, readers, two, got 'multi'"):
        load_config(None, ["consensus_voters=multi"])


def test_the_learner_trains_the_prior_through_the_consensus_term():
    size = 64
    yy, xx = np.mgrid[:size, :size]
    r2 = (yy - 32) ** 2 + (xx - 32) ** 2
    images = torch.from_numpy(np.clip(0.2 + 0.6 * (r2 < 100), 0, 1).astype(np.float32))[None].repeat(2, 1, 1)
    readers = torch.from_numpy(np.stack([np.stack([r2 < 36, r2 < 100, r2 < 64, r2 < 64])] * 2))
    present = torch.ones(2, 4, dtype=torch.bool)
    boxes = torch.tensor([[20.0, 20.0, 44.0, 44.0]] * 2)
    learner = build_learner(TrainConfig(preset="tiny", freeze_encoder=True, seed=0,
                                        loss=LossConfig(beta=0.0, anneal_steps=0, consensus_weight=10.0, set_samples=4)),
                            intensity="unit")
    torch.nn.init.normal_(learner.model.latent_projection.mlp[-1].weight, std=0.1)
    torch.manual_seed(0)
    parts = learner(images, boxes, readers[:, 0], 0, readers=readers, present=present)
    parts["loss"].backward()
    norm = sum(float(p.grad.abs().sum()) for p in learner.model.prior.parameters() if p.grad is not None)
    assert "consensus" in parts and "set" not in parts and 0.0 < float(parts["consensus"]) <= 1.0
    assert norm > 0.0  # beta 0 and no set term: only the consensus term reaches the prior
    with pytest.raises(ValueError, match="every reader's mask"):
        learner(images, boxes, readers[:, 0], 0)
    # Voting over the nodule's readers: the learner hands `voters` on to the term.
    learner.loss_config.consensus_voters = "readers"
    one_reader = torch.tensor([[True, False, False, False]] * 2)
    by_readers = learner(images, boxes, readers[:, 0], 0, readers=readers, present=present, voters=one_reader)
    assert float(by_readers["consensus"]) != pytest.approx(float(parts["consensus"]), abs=1e-4)
    with pytest.raises(ValueError, match="needs voters"):
        learner(images, boxes, readers[:, 0], 0, readers=readers, present=present)


def test_set_term_above_half_ignores_probability_below_the_cut_and_scores_what_is_shown():
    """set_above_half: samples at 0.45 everywhere against empty readers cost nothing and get no gradient (cut at
    0.5 they are empty, as GED sees them); the soft set term charges them. Above 0.5 a pixel still counts."""
    from Training.learning.loss import set_loss

    readers = torch.zeros(1, 4, 16, 16)
    present = torch.ones(1, 4, dtype=torch.bool)
    faint = torch.full((1, 4, 16, 16), float(torch.logit(torch.tensor(0.45))), requires_grad=True)
    assert float(set_loss(faint, readers, present).detach()) > 0.5
    cost = set_loss(faint, readers, present, above_half=True)
    cost.backward()
    assert float(cost.detach()) == pytest.approx(0.0, abs=1e-6) and float(faint.grad.abs().sum()) == 0.0
    shown = torch.full((1, 4, 16, 16), -8.0)
    shown[:, :, 4:12, 4:12] = 3.0  # p = 0.95 in a square no reader drew
    assert float(set_loss(shown, readers, present, above_half=True)) > 0.5
