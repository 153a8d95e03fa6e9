"""Set metrics against hand-computed values (the arithmetic is in the comments).

Masks are built from pixel index lists on small grids so that every IoU can be counted by hand.
"""

import itertools

import numpy as np
import pytest

from ProbSAMLib import metrics
from ProbSAMLib.metrics import (dice, dmax, ged, hm_iou, iou, mean_prediction_scores, ncc, pairwise_dice,
                                pairwise_iou, sample_diversity)


def row_mask(pixels, width=20):
    """A (1, width) mask on at `pixels`: a 2D mask whose IoUs are 1D interval arithmetic."""
    m = np.zeros((1, width), bool)
    m[0, list(pixels)] = True
    return m


def stack(*masks):
    return np.stack(masks)


A = row_mask(range(0, 10))    # 10 px
B = row_mask(range(10, 20))   # 10 px, disjoint from A
EMPTY = row_mask([])


# --- two masks -------------------------------------------------------------------------------------------

def test_iou_dice_hand_values():
    a, b = row_mask([0, 1, 2, 3]), row_mask([2, 3, 4, 5, 6, 7])
    # intersection {2, 3} = 2, union {0..7} = 8 -> IoU 2/8; Dice 2·2/(4 + 6) = 0.4
    assert iou(a, b) == pytest.approx(0.25)
    assert dice(a, b) == pytest.approx(0.4)


def test_empty_masks():
    assert iou(EMPTY, EMPTY) == 1.0 and dice(EMPTY, EMPTY) == 1.0
    assert iou(EMPTY, A) == 0.0 and dice(A, EMPTY) == 0.0


def test_pairwise_hand_matrix_with_empties():
    x = stack(EMPTY, A, row_mask(range(5, 15)))
    y = stack(EMPTY, A)
    # row 2 vs A: intersection {5..9} = 5, union {0..14} = 15 -> 1/3; Dice 10/20 = 0.5
    np.testing.assert_allclose(pairwise_iou(x, y), [[1, 0], [0, 1], [0, 1 / 3]])
    np.testing.assert_allclose(pairwise_dice(x, y), [[1, 0], [0, 1], [0, 0.5]])


def test_pairwise_float64_path_matches(monkeypatch):
    rng = np.random.default_rng(0)
    x, y = rng.random((5, 8, 9)) > 0.5, rng.random((3, 8, 9)) > 0.6
    expected = [[iou(a, b) for b in y] for a in x]
    np.testing.assert_allclose(pairwise_iou(x, y), expected)
    monkeypatch.setattr(metrics, "_FLOAT32_EXACT", 0)   # force the float64 branch used for huge P
    np.testing.assert_allclose(pairwise_iou(x, y), expected)


def test_integer_masks_accepted():
    assert iou(A.astype(np.uint8), A.astype(np.float32)) == 1.0


# --- GED -------------------------------------------------------------------------------------------------

def test_ged_all_empty_is_zero():
    # every pair is (∅, ∅): IoU 1, d 0, so every term is 0
    assert ged(np.zeros((3, 4, 4), bool), np.zeros((2, 4, 4), bool)) == 0.0


def test_ged_identical_single_masks_is_zero():
    assert ged(stack(A), stack(A)) == 0.0


def test_ged_disjoint_and_empty_vs_nonempty():
    # one pair at d = 1, no spread: 2·1 − 0 − 0
    assert ged(stack(A), stack(B)) == pytest.approx(2.0)
    assert ged(stack(EMPTY), stack(A)) == pytest.approx(2.0)


def test_ged_includes_self_pairs():
    # S = {A, B} (disjoint), Y = {A}.
    # E d(S, Y) = (d(A,A) + d(B,A)) / 2 = (0 + 1) / 2 = 0.5
    # E d(S, S') over all 4 ordered pairs = (0 + 1 + 1 + 0) / 4 = 0.5   (distinct pairs only would be 1)
    # E d(Y, Y') = 0  ->  GED = 2·0.5 − 0.5 − 0 = 0.5  (the distinct-pair estimator would give 0)
    assert ged(stack(A, B), stack(A)) == pytest.approx(0.5)


def test_ged_partial_overlap():
    half = row_mask(range(5, 15))
    # S = {half}, Y = {A, B}: IoU(half, A) = IoU(half, B) = 5/15 -> d = 2/3 each, E d(S,Y) = 2/3
    # E d(Y,Y') = (0 + 1 + 1 + 0)/4 = 0.5, E d(S,S') = 0 -> GED = 4/3 − 0.5 = 5/6
    assert ged(stack(half), stack(A, B)) == pytest.approx(5 / 6)


# --- HM-IoU ----------------------------------------------------------------------------------------------

# IoU matrix (rows S0, S1; cols YA, YB):
#   S0 = {1..10}, YA = {0..9}:  ∩ {1..9} = 9,  ∪ {0..10} = 11 -> 9/11 ≈ 0.818   (largest entry)
#   S0,           YB = {4..13}: ∩ {4..10} = 7, ∪ {1..13} = 13 -> 7/13 ≈ 0.538
#   S1 = {0..4},  YA:           ∩ {0..4} = 5,  ∪ {0..9} = 10  -> 1/2
#   S1,           YB:           ∩ {4} = 1,     ∪ {0..13} = 14 -> 1/14
# Greedy (take 9/11 first) -> (9/11 + 1/14)/2 ≈ 0.445; Hungarian -> (7/13 + 1/2)/2 = 27/52 ≈ 0.519.
HS = stack(row_mask(range(1, 11)), row_mask(range(0, 5)))
HY = stack(row_mask(range(0, 10)), row_mask(range(4, 14)))


def test_hm_iou_hungarian_beats_greedy():
    np.testing.assert_allclose(pairwise_iou(HS, HY), [[9 / 11, 7 / 13], [1 / 2, 1 / 14]])
    assert hm_iou(HS, HY) == pytest.approx(27 / 52)
    assert hm_iou(HS, HY) != pytest.approx((9 / 11 + 1 / 14) / 2)


def test_hm_iou_brute_force_random():
    rng = np.random.default_rng(1)
    s, y = rng.random((4, 6, 6)) > 0.5, rng.random((2, 6, 6)) > 0.5
    cost = pairwise_iou(s, y)[:, [0, 1, 0, 1]]          # annotations tiled to 4
    best = max(np.mean([cost[i, p[i]] for i in range(4)]) for p in itertools.permutations(range(4)))
    assert hm_iou(s, y) == pytest.approx(best)


def test_hm_iou_tiles_annotations_and_does_not_pick_best_m():
    # N = 4, M = 1: Y tiled to (A, A, A, A); samples (A, B, B, B): one match at 1, three at 0 -> 1/4.
    # Matching only the best M = 1 sample would give 1.
    assert hm_iou(stack(A, B, B, B), stack(A)) == pytest.approx(0.25)
    # N = 4, M = 2: Y tiled to (A, B, A, B); samples (A, A, B, B) -> perfect matching -> 1
    assert hm_iou(stack(A, A, B, B), stack(A, B)) == pytest.approx(1.0)


def test_hm_iou_n_not_multiple_of_m_replicates_to_lcm():
    # N = 3, M = 2 -> L = lcm = 6: samples (A, A, B) x2 = (A, A, A, A, B, B); Y (A, B) x3 = (A, A, A, B, B, B).
    # Best matching: 3 x A-A (1), 2 x B-B (1), 1 x A-B (0) -> 5/6. (Cyclic repetition of Y would give 1.)
    assert hm_iou(stack(A, A, B), stack(A, B)) == pytest.approx(5 / 6)
    # samples (B, B, A) x2 = (B, B, B, B, A, A) vs (A, A, A, B, B, B): 3 B-B + 2 A-A + 1 B-A -> 5/6.
    assert hm_iou(stack(B, B, A), stack(A, B)) == pytest.approx(5 / 6)


def test_hm_iou_m_does_not_divide_n_hand_value_and_reader_order():
    # N = 4, M = 3 -> L = 12: samples (A, A, B, EMPTY) x3 = A x6, B x3, EMPTY x3; Y (A, B, EMPTY) x4 each.
    # Matching: 4 A-A (1), 3 B-B (1), 3 EMPTY-EMPTY (IoU(∅, ∅) = 1), 2 A left against B / EMPTY (0)
    # -> 10/12 = 5/6 for every order of the readers. Repeating Y cyclically to 4 would give 1 for the
    # order (A, B, EMPTY) -> (A, B, EMPTY, A) and 3/4 for (B, EMPTY, A) -> (B, EMPTY, A, B).
    samples = stack(A, A, B, EMPTY)
    for readers in itertools.permutations([A, B, EMPTY]):
        assert hm_iou(samples, stack(*readers)) == pytest.approx(5 / 6)


def test_hm_iou_reader_order_invariant_n16_m3():
    # The case: N = 16, M = 3 (L = 48). The matching value is a property of the two sets.
    rng = np.random.default_rng(3)
    s, y = rng.random((16, 8, 8)) > 0.6, rng.random((3, 8, 8)) > 0.5
    values = [hm_iou(s, y[list(order)]) for order in itertools.permutations(range(3))]
    assert np.ptp(values) < 1e-12
    assert hm_iou(s[::-1], y) == pytest.approx(values[0])


def test_hm_iou_fewer_samples_than_annotators():
    # N = 1 < M = 2: the samples are repeated to (A, A) against (A, B) -> (1 + 0)/2
    assert hm_iou(stack(A), stack(A, B)) == pytest.approx(0.5)


# --- calibration -----------------------------------------------------------------------------------------

def test_ece_hand_value():
    # p = (0.05, 0.05, 0.95, 0.55) on 4 pixels; readers y1 = (0, 0, 1, 1), y2 = (0, 1, 1, 0): every
    # (pixel, reader) pair is an outcome, 8 in all.
    #   bin 0 (p 0.05): 4 pairs, mean p 0.05, hits 1/4  -> |0.05 - 0.25| = 0.2,  weight 4/8
    #   bin 9 (p 0.95): 2 pairs, mean p 0.95, hits 2/2  -> 0.05,                  weight 2/8
    #   bin 5 (p 0.55): 2 pairs, mean p 0.55, hits 1/2  -> 0.05,                  weight 2/8
    # ECE = 0.1 + 0.0125 + 0.0125 = 0.125
    p = np.array([[0.05, 0.05, 0.95, 0.55]])
    y = stack(np.array([[0, 0, 1, 1]], bool), np.array([[0, 1, 1, 0]], bool))
    assert metrics.ece(p, y) == pytest.approx(0.125)
    # Restricted to the last two pixels: (2·0.05 + 2·0.05)/4 = 0.05
    assert metrics.ece(p, y, region=np.array([[0, 0, 1, 1]], bool)) == pytest.approx(0.05)
    # Bins add over cases: two copies of the case pool to the same ECE.
    bins = metrics.calibration_bins(p, y)
    assert metrics.ece_from_bins(bins + bins) == pytest.approx(0.125)


def test_ece_perfectly_calibrated_is_zero():
    # p = fraction of readers marking each pixel, on bin centres -> every bin's mean p equals its hit rate
    y = stack(row_mask([0, 1]), row_mask([0]), row_mask([0]), row_mask([]))
    p = y.mean(0)                                  # (1, 20): 0.75, 0.25, 0, ...
    assert metrics.ece(p, y) == pytest.approx(0.0, abs=1e-12)


# --- Dmax, diversity -------------------------------------------------------------------------------------

def test_dmax():
    half = row_mask(range(5, 15))
    # Dice(half, A) = 2·5/20 = 0.5 = Dice(half, B); Dice(EMPTY, ·) = 0 -> max 0.5
    assert dmax(stack(EMPTY, half), stack(A, B)) == pytest.approx(0.5)
    assert dmax(stack(EMPTY), stack(EMPTY)) == 1.0


def test_sample_diversity_distinct_pairs():
    # S = (A, A, B): 6 distinct ordered pairs; A-A twice (d 0), A-B four times (d 1) -> 4/6.
    # With self-pairs it would be 4/9.
    assert sample_diversity(stack(A, A, B)) == pytest.approx(2 / 3)
    assert sample_diversity(stack(A, A)) == 0.0
    assert np.isnan(sample_diversity(stack(A)))


# --- NCC -------------------------------------------------------------------------------------------------

# 4 pixels on a (2, 2) grid, flat order p0..p3. Samples s0 = [1,0,1,0], s1 = [1,0,0,1]:
# p0 both 1, p1 both 0, p2 and p3 disagree. With k = −ln(eps) and ln(1 + eps) ≈ 0:
#   E_s[CE(s̄, s)] = [0, 0, k/2, k/2]   (agreeing pixels cost 0; s̄ = 0.5 -> ½·k on the split pixels)
#   E_s[CE(y, s)] = k·[y ≠ both] on agreeing pixels, k/2 on split pixels.
NS = np.array([[1, 0, 1, 0], [1, 0, 0, 1]], bool).reshape(2, 2, 2)
Y1 = np.array([1, 0, 1, 0], bool).reshape(2, 2)   # map [0, 0, k/2, k/2]: NCC with [0,0,1,1] = 1
Y2 = np.array([0, 0, 1, 0], bool).reshape(2, 2)   # map [k, 0, k/2, k/2] ∝ [2,0,1,1]: centred [1,-1,0,0]
#                                                    against [-.5,-.5,.5,.5] -> covariance 0 -> NCC 0
Y4 = np.array([0, 1, 1, 1], bool).reshape(2, 2)   # map ∝ [2,2,1,1]: centred [.5,.5,-.5,-.5] -> NCC −1


def test_ncc_hand_values():
    assert ncc(NS, stack(Y1)) == pytest.approx(1.0, abs=1e-6)
    assert ncc(NS, stack(Y1, Y2)) == pytest.approx(0.5, abs=1e-6)    # (1 + 0)/2
    assert ncc(NS, stack(Y1, Y4)) == pytest.approx(0.0, abs=1e-6)    # (1 − 1)/2


def phiseg_loop_ncc(samples, gts, eps=1e-8):
    """PHiSeg's definition written out with explicit loops and one-hot (background, foreground) maps."""
    onehot = lambda m: np.stack([1 - m, m], -1).astype(np.float64)
    xent = lambda pred, target: -np.sum(target * np.log(pred + eps), axis=-1)
    s, g = onehot(samples), onehot(gts)
    mean = s.mean(0)
    e_ss = np.mean([xent(si, mean) for si in s], 0)
    out = []
    for gj in g:
        e_sy = np.mean([xent(si, gj) for si in s], 0)
        a, v = e_ss.ravel(), e_sy.ravel()
        out.append(np.mean((a - a.mean()) * (v - v.mean())) / (a.std() * v.std()))
    return np.mean(out)


def test_ncc_matches_phiseg_loops_on_probabilities():
    rng = np.random.default_rng(2)
    probs = rng.random((5, 7, 6))
    gts = rng.random((3, 7, 6)) > 0.5
    assert ncc(probs, gts) == pytest.approx(phiseg_loop_ncc(probs, gts), rel=1e-9)


def test_ncc_zero_variance_is_nan():
    # identical samples: E_s[CE(s̄, s)] is 0 everywhere -> NCC undefined
    assert np.isnan(ncc(stack(A, A), stack(A, B)))


# --- mean prediction -------------------------------------------------------------------------------------

def test_mean_prediction_scores():
    grid = lambda v: np.array(v, bool).reshape(2, 3)
    samples = stack(grid([1, 1, 1, 0, 0, 0]), grid([1, 1, 0, 0, 0, 0]), grid([1, 0, 0, 1, 0, 0]))
    # mean = [1, 2/3, 1/3, 1/3, 0, 0] -> "> 0.5" -> prediction = [1, 1, 0, 0, 0, 0]
    annotations = stack(grid([1, 1, 0, 0, 0, 0]),    # Dice 1,         IoU 1
                        grid([1, 0, 0, 0, 0, 0]),    # ∩ 1: Dice 2/3,  IoU 1/2
                        grid([0, 0, 0, 0, 1, 1]),    # ∩ 0: Dice 0,    IoU 0
                        grid([1, 1, 1, 1, 0, 0]))    # ∩ 2: Dice 4/6,  IoU 2/4
    # votes [3, 2, 1, 1, 1, 1]/4 -> ">= 0.5" -> majority [1, 1, 0, 0, 0, 0] (2 of 4 counts) -> Dice 1
    r = mean_prediction_scores(samples, annotations)
    np.testing.assert_allclose(r["dice_per_annotator"], [1, 2 / 3, 0, 2 / 3])
    np.testing.assert_allclose(r["iou_per_annotator"], [1, 0.5, 0, 0.5])
    assert r["dice_mean_annotator"] == pytest.approx(7 / 12)   # (1 + 2/3 + 0 + 2/3)/4
    assert r["iou_mean_annotator"] == pytest.approx(0.5)
    assert r["dice_majority"] == pytest.approx(1.0) and r["iou_majority"] == pytest.approx(1.0)


def test_mean_prediction_on_probabilities_tie_is_background():
    probs = np.full((2, 2, 3), 0.5)
    probs[:, 0, 0] = 0.9                              # mean 0.9 -> on; mean 0.5 elsewhere -> off
    ann = np.zeros((1, 2, 3), bool)
    ann[0, 0, :2] = True                              # 2 px, ∩ 1 -> Dice 2/3, IoU 1/2
    r = mean_prediction_scores(probs, ann)
    assert r["dice_per_annotator"] == [pytest.approx(2 / 3)]
    assert r["iou_majority"] == pytest.approx(0.5)


# --- 3D --------------------------------------------------------------------------------------------------

def test_3d_volumes():
    a = np.zeros((2, 3, 3), bool)
    b = np.zeros((2, 3, 3), bool)
    a[0, 0, 0] = a[1, 0, 0] = True                    # 2 voxels
    b[1, 0, 0] = b[1, 1, 1] = True                    # 2 voxels, shares (1, 0, 0)
    # IoU = 1/3, Dice = 2/4; GED = 2·(2/3) − 0 − 0 = 4/3
    assert iou(a, b) == pytest.approx(1 / 3)
    assert pairwise_iou(a[None], b[None])[0, 0] == pytest.approx(1 / 3)
    assert ged(a[None], b[None]) == pytest.approx(4 / 3)
    assert hm_iou(a[None], b[None]) == pytest.approx(1 / 3)
    assert dmax(a[None], b[None]) == pytest.approx(0.5)
    assert sample_diversity(np.stack([a, b])) == pytest.approx(2 / 3)


# --- errors ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fn", [ged, hm_iou, ncc, dmax, mean_prediction_scores, pairwise_iou])
def test_errors(fn):
    with pytest.raises(ValueError, match="stack"):
        fn(A, stack(A))                                # a single (H, W) mask is not a stack
    with pytest.raises(ValueError, match="spatial shapes"):
        fn(stack(A), np.zeros((1, 4, 5), bool))
    with pytest.raises(ValueError, match="empty stack"):
        fn(np.zeros((0, 1, 20), bool), stack(A))


def test_value_errors():
    with pytest.raises(ValueError, match="different shapes"):
        iou(A, np.zeros((2, 20), bool))
    with pytest.raises(ValueError, match="0/1"):
        ged(stack(A) * 0.5, stack(A))                  # probabilities are not masks
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        ncc(stack(A) * 2.0, stack(A))
    with pytest.raises(ValueError, match="empty spatial"):
        ged(np.zeros((1, 0, 3), bool), np.zeros((1, 0, 3), bool))
    with pytest.raises(ValueError, match="empty stack"):
        sample_diversity(np.zeros((0, 2, 2), bool))
