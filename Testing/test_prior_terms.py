"""The two terms on the set term's K prior samples that shape the consensus (Training.learning.loss).

consensus_loss (the samples' mean prediction against the readers' majority) must be 0 when the mean
prediction is the majority with the margin, charge the knife-edge of a calibrated two-reader slice and
empty samples on a slice every reader marked, leave a one-reader slice's calibrated set alone, ignore
absent reader slots, agree with the evaluation's majority rule, vote over the nodule's own readers when
asked (consensus_voters="readers"), and reach the prior net through the ProbSAM learner. empty_share_loss
(how many samples come out empty) must ask for round(f K) drawn samples where a fraction f of the readers drew, pick the samples closest to being drawn, pull saturated empty
samples with a constant slope on their peak logit, and ignore absent slots.
"""
import numpy as np
import pytest
import torch

from Training.learning.loss import LossConfig, consensus_loss, empty_share_loss, probsam_loss, set_loss
from ProbSAMLib.modeling.probsam import TrainingOutput
from ProbSAMLib.metrics import mean_prediction_scores
from Training.config import TrainConfig, load_config
from ProbSAMLib.errors import SettingsError
from Training.learning.learners import build_learner

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


def test_multi_voters_score_the_slot_majority_on_shared_nodules_only():
    # consensus_voters="multi": the slot majority, as evaluation counts it, but only on nodules at least two
    # radiologists annotated. A two-reader nodule where both drew different discs: its slot majority is
    # their overlap (2 of 4), its readers' majority their union; a one-reader nodule is not scored at all.
    left, right = torch.roll(DISC, -3, 1), torch.roll(DISC, 3, 1)
    overlap, union = left * right, torch.clamp(left + right, max=1)
    two = _stack(left, right, EMPTY, EMPTY)
    voters = torch.tensor([[True, True, False, False], [True, False, False, False]])
    readers = torch.cat([two, _stack(DISC, EMPTY, EMPTY, EMPTY)])
    present = torch.tensor([[True] * 4] * 2)

    def consensus(samples, who):
        cfg = LossConfig(consensus_weight=1.0, consensus_voters=who)
        out = probsam_loss(_training_output(2), torch.stack([DISC, DISC]), 0, cfg, samples, readers, present,
                           voters)
        return float(out["consensus"])

    def samples(first, second):
        return torch.cat([_logits(_stack(*[first] * 8)), _logits(_stack(*[second] * 8))])

    # The one-reader nodule (second slice) costs nothing under "multi" whether it is drawn or left empty.
    assert consensus(samples(overlap, DISC), "multi") == pytest.approx(0.0, abs=1e-6)
    assert consensus(samples(overlap, EMPTY), "multi") == pytest.approx(0.0, abs=1e-6)
    # On the two-reader nodule "multi" asks for the overlap (as "slots"), "readers" for the union.
    assert consensus(samples(union, EMPTY), "multi") > 0.1
    assert consensus(samples(union, EMPTY), "readers") > consensus(samples(union, DISC), "readers")
    per_slice = consensus_loss(_logits(_stack(*[union] * 8)), two, present[:1])
    assert consensus(samples(union, EMPTY), "multi") == pytest.approx(float(per_slice[0]) / 2, rel=1e-6)
    assert consensus(samples(overlap, EMPTY), "slots") == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="needs voters"):
        probsam_loss(_training_output(2), torch.stack([DISC, DISC]), 0,
                     LossConfig(consensus_weight=1.0, consensus_voters="multi"), samples(overlap, DISC), readers,
                     present)
    with pytest.raises(ValueError, match="set_voters"):
        LossConfig(set_voters="multi")  # a set-term electorate has no "multi"
    assert load_config(None, ["consensus_voters=multi"]).consensus_voters == "multi"


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
    assert load_config(None, ["consensus_voters=two"]).consensus_voters == "two"


def test_the_set_term_can_score_the_nodules_own_readers_only():
    # set_voters="readers": a nodule one radiologist annotated is scored against that reader alone, so a
    # set that always draws the disc costs nothing; over the four slots it must also be empty 3 times in 4.
    readers = _stack(DISC, EMPTY, EMPTY, EMPTY)
    voters = torch.tensor([[True, False, False, False]])
    drawn = _logits(_stack(*[DISC] * 8))

    def set_term(who):
        cfg = LossConfig(set_weight=1.0, set_voters=who)
        return float(probsam_loss(_training_output(), DISC[None], 0, cfg, drawn, readers, ALL, voters)["set"])

    assert set_term("readers") == pytest.approx(float(set_loss(drawn, readers, voters).mean()), rel=1e-6)
    assert set_term("readers") < 0.01 < set_term("slots")
    with pytest.raises(ValueError, match="needs voters"):
        probsam_loss(_training_output(), DISC[None], 0, LossConfig(set_weight=1.0, set_voters="readers"), drawn,
                     readers, ALL)
    with pytest.raises(ValueError, match="set_voters"):
        LossConfig(set_voters="everyone")
    with pytest.raises(SettingsError, match="set_voters"):
        load_config(None, ["set_voters=all"])


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


def test_the_learner_trains_the_prior_through_the_consensus_term():
    size = 64
    yy, xx = np.mgrid[:size, :size]
    r2 = (yy - 32) ** 2 + (xx - 32) ** 2
    images = torch.from_numpy(np.clip(0.2 + 0.6 * (r2 < 100), 0, 1).astype(np.float32))[None].repeat(2, 1, 1)
    readers = torch.from_numpy(np.stack([np.stack([r2 < 36, r2 < 100, r2 < 64, r2 < 64])] * 2))
    present = torch.ones(2, 4, dtype=torch.bool)
    boxes = torch.tensor([[20.0, 20.0, 44.0, 44.0]] * 2)
    learner = build_learner(TrainConfig(preset="tiny", freeze_encoder=True, seed=0, beta=0.0, anneal_steps=0,
                                        consensus_weight=10.0, set_samples=4), intensity="unit")
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


def _peaked(peaks):
    """(1, K, S, S) logits: -40 everywhere, each sample's peak logit at the disc's centre."""
    logits = torch.full((1, len(peaks), S, S), -40.0)
    logits[0, :, 16, 16] = torch.tensor(peaks, dtype=torch.float32)
    return logits


def test_empty_share_asks_for_the_readers_share_of_drawn_samples():
    two_of_four = _stack(DISC, DISC, EMPTY, EMPTY)
    # n = round(0.5 * 4) = 2 drawn: the two highest peaks (3, 0.5) must exceed +1, the others stay below -1.
    value = empty_share_loss(_peaked([0.5, -5.0, 3.0, -0.2]), two_of_four, ALL, margin=1.0)
    assert float(value) == pytest.approx((0.5 + 0.8) / 4)
    assert float(empty_share_loss(_peaked([4.0, -3.0, 2.0, -9.0]), two_of_four, ALL)) == 0.0
    one_of_four = _stack(DISC, EMPTY, EMPTY, EMPTY)
    all_drawn = _peaked([5.0] * 8)  # 2 of 8 should be drawn: the other six cost 5 + 1 each
    assert float(empty_share_loss(all_drawn, one_of_four, ALL)) == pytest.approx(6 * 6.0 / 8)


def test_empty_samples_where_every_reader_drew_are_pulled_with_a_constant_slope():
    four = _stack(DISC, DISC, DISC, DISC)
    logits = _peaked([6.0, 6.0, -12.0, -30.0]).requires_grad_(True)
    loss = empty_share_loss(logits, four, ALL)
    assert float(loss.detach()) == pytest.approx((13.0 + 31.0) / 4)
    loss.sum().backward()
    grad = logits.grad[0, :, 16, 16]
    # Saturated as they are (sigmoid(-30) ~ 1e-13), both empty samples get the full slope, -1/K.
    assert torch.allclose(grad, torch.tensor([0.0, 0.0, -0.25, -0.25]))


def test_empty_share_ignores_absent_slots():
    readers = _stack(DISC, EMPTY, EMPTY, DISC)
    present = torch.tensor([[True, True, False, False]])  # 1 of 2 present readers drew: 2 of 4 samples
    logits = _peaked([3.0, 3.0, -3.0, -3.0])
    assert float(empty_share_loss(logits, readers, present)) == 0.0
    assert float(empty_share_loss(logits, readers, ALL)) == 0.0  # 2 of 4 slots too
    assert float(empty_share_loss(logits, _stack(DISC, EMPTY, EMPTY, EMPTY), ALL)) > 0.0  # 1 of 4: 1 sample


def test_empty_share_settings_and_the_learner():
    with pytest.raises(ValueError, match="empty_margin"):
        LossConfig(empty_margin=-1.0)
    with pytest.raises(SettingsError, match="empty_weight"):
        load_config(None, ["empty_weight=-2"])
    images = torch.rand(2, 64, 64)
    readers = torch.zeros(2, 4, 64, 64, dtype=torch.bool)
    readers[:, :2, 24:40, 24:40] = True
    learner = build_learner(TrainConfig(preset="tiny", freeze_encoder=True, seed=0, beta=0.0, anneal_steps=0,
                                        empty_weight=1.0, set_samples=4), intensity="unit")
    torch.nn.init.normal_(learner.model.latent_projection.mlp[-1].weight, std=0.1)
    torch.manual_seed(0)
    parts = learner(images, torch.tensor([[20.0, 20.0, 44.0, 44.0]] * 2), readers[:, 0], 0, readers=readers,
                    present=torch.ones(2, 4, dtype=torch.bool))
    parts["loss"].backward()
    norm = sum(float(p.grad.abs().sum()) for p in learner.model.prior.parameters() if p.grad is not None)
    assert "empty" in parts and "set" not in parts and "consensus" not in parts and float(parts["empty"]) > 0
    assert norm > 0.0


def modules_one_step_changes(learner, images: torch.Tensor) -> set:
    """The model's top-level modules whose weights one AdamW step on `images` (2, 64, 64) changes (three of
    four readers drew the same square; the trainable parameters are whatever the learner left trainable)."""
    before = {name: p.detach().clone() for name, p in learner.model.named_parameters()}
    optimiser = torch.optim.AdamW([p for p in learner.parameters() if p.requires_grad], lr=1e-3)
    readers = torch.zeros(2, 4, 64, 64, dtype=torch.bool)
    readers[:, :3, 24:40, 24:40] = True
    torch.manual_seed(0)
    parts = learner(images, torch.tensor([[20.0, 20.0, 44.0, 44.0]] * 2), readers[:, 0], 0, readers=readers,
                    present=torch.ones(2, 4, dtype=torch.bool))
    parts["loss"].backward()
    optimiser.step()
    return {name.split(".")[0] for name, p in learner.model.named_parameters() if not torch.equal(p, before[name])}


def test_train_latent_only_keeps_the_decoder_and_trains_the_prior(tmp_path):
    """From the bundled demo weights: one AdamW step changes the prior and posterior nets only."""
    from ProbSAMLib.weights import checkpoints

    init = str(checkpoints.entry_path(checkpoints.MANIFEST["demo_v3"]))
    with pytest.raises(SettingsError, match="train_latent_only"):
        load_config(None, ["train_latent_only=true"])  # no init: nothing to keep fixed
    with pytest.raises(SettingsError, match="train_latent_only"):
        load_config(None, ["train_latent_only=true", f"init={init}", "freeze_encoder=false"])
    cfg = load_config(None, ["train_latent_only=true", f"init={init}", "beta=1.0", "anneal_steps=0",
                             "set_weight=10", "empty_weight=1", "set_samples=4"])
    learner = build_learner(cfg, intensity="hu", context_size=64)
    assert modules_one_step_changes(learner, torch.rand(2, 64, 64)) == {"prior", "posterior"}


def test_train_refiner_only_changes_the_refiner_and_nothing_else():
    """From demo_v5 (which has a refiner): one AdamW step moves the refiner's weights only; settings that
    cannot work are refused (no init; with train_latent_only; weights without a refiner)."""
    from ProbSAMLib.weights import checkpoints

    init = str(checkpoints.entry_path(checkpoints.MANIFEST["demo_v5"]))
    with pytest.raises(SettingsError, match="train_refiner_only"):
        load_config(None, ["train_refiner_only=true"])
    with pytest.raises(SettingsError, match="train_refiner_only"):
        load_config(None, ["train_refiner_only=true", f"init={init}", "train_latent_only=true"])
    plain = str(checkpoints.entry_path(checkpoints.MANIFEST["demo_v4"]))
    with pytest.raises(SettingsError, match="no mask refiner"):
        build_learner(load_config(None, ["train_refiner_only=true", f"init={plain}"]), context_size=64)
    cfg = load_config(None, ["train_refiner_only=true", f"init={init}", "beta=1.0", "anneal_steps=0",
                             "set_weight=10", "consensus_weight=10", "set_samples=4"])
    learner = build_learner(cfg, intensity="hu", context_size=64)
    assert modules_one_step_changes(learner, torch.rand(2, 64, 64) * 1000 - 800) == {"refiner"}


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
