"""The product's checks of a model on a frozen backbone (lite_medsam): drift, empty samples, the marking share.

    python Training/evaluation/product_checks.py --data data/phantom_v3 --split test \
        --model runs/phantom_lite_medsam/best.safetensors --samples 16 --out results/lite_checks

On every slice of the split (the readers' union box + 2 px as the prompt, as evaluate.py), from one encoding:
- drift: the Dice between the consensus of the N samples (pixels in more than half of them) and the
  backbone's own mask (LiteMedSAM alone, an untrained model on the same weights). The heads must add
  spread without moving the outline: the target is a mean Dice >= 0.90;
- empty samples: samples with no pixel on slices where the backbone's mask is not empty (a visible object):
  the target is none;
- the marking share: the marking head's estimate of the share of readers who mark the object, averaged over
  each nodule's slices, against the nodule's actual share (its readers / 4), as a reliability table (bins of
  the estimate: count, mean estimate, mean actual share), and the same head on each slice's box moved off
  the lesion (learners.boxes_off_lesion), which should be low.
Each slice's latent noise and moved box depend only on (seed, slice), as in evaluate.py. Writes checks.md, checks.json
and per_slice.csv into --out (whole or not at all).
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Optional, Sequence

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from ProbSAMLib import metrics  # noqa: E402
from ProbSAMLib.errors import SettingsError, run_main  # noqa: E402
from ProbSAMLib.inference.agreement import consensus_mask  # noqa: E402
from ProbSAMLib.inference.sampling import marking_shares, sample_from_embeddings  # noqa: E402
from ProbSAMLib.modeling import preprocess  # noqa: E402
from Training import guards  # noqa: E402
from Training.data.batches import SliceBatches, validation_positions  # noqa: E402
from Training.data.dataset_format import load_split  # noqa: E402
from Training.evaluation.scoring import slice_noise  # noqa: E402
from Training.learning.learners import boxes_off_lesion, load_weights  # noqa: E402

SHARE_BINS = (0.0, 0.25, 0.5, 0.75, 1.0001)


def check_slice(model, images, box, n_samples: int, noise: torch.Tensor, generator: torch.Generator) -> dict:
    """One slice: drift Dice, empty samples, marking share on the lesion and off it (the moved box drawn from
    `generator`). The backbone's own mask comes from the same model and encoding (ProbSAM.decode_backbone:
    its frozen SAM without the latent)."""
    image_hw = tuple(images.shape[-2:])
    with torch.no_grad():
        embeddings = model.encode(images.to(model.device)).float()
        probs, _ = sample_from_embeddings(model, embeddings, box, image_hw, n_samples, noise=noise[None])
        box_model = preprocess.boxes_to_model_frame(box.to(embeddings.device), image_hw, model.config.img_size)
        own = preprocess.logits_to_image(model.decode_backbone(embeddings, box_model).float(), image_hw,
                                         model.config.img_size)
        share = float(marking_shares(model, embeddings, box, image_hw)[0])
        off = float(torch.sigmoid(model.marking_logit(embeddings, boxes_off_lesion(box_model, model.config.img_size, generator)))[0])
    samples = (probs[0] > metrics.MASK_THRESHOLD).cpu().numpy()
    reference = (torch.sigmoid(own[0, 0]) > metrics.MASK_THRESHOLD).cpu().numpy()
    return {"drift_dice": float(metrics.dice(consensus_mask(samples), reference)),
            "backbone_empty": int(not reference.any()),
            "empty_samples": int((~samples.reshape(len(samples), -1).any(1)).sum()),
            "marking_share": share, "marking_share_off_lesion": off}


def reliability(rows: Sequence[dict]) -> list:
    """Per nodule (mean estimate over its slices vs its readers / 4), binned by the estimate."""
    by_nodule = defaultdict(list)
    for row in rows:
        by_nodule[row["nodule_id"]].append(row)
    nodules = [(float(np.mean([r["marking_share"] for r in rs])), rs[0]["n_readers"] / 4.0)
               for rs in by_nodule.values()]
    table = []
    for lo, hi in zip(SHARE_BINS[:-1], SHARE_BINS[1:]):
        inside = [(e, a) for e, a in nodules if lo <= e < hi]
        table.append({"bin": f"{lo:.2f}-{min(hi, 1.0):.2f}", "nodules": len(inside),
                      "mean_estimate": float(np.mean([e for e, _ in inside])) if inside else None,
                      "mean_actual": float(np.mean([a for _, a in inside])) if inside else None})
    return table


def summarise(rows: Sequence[dict], n_samples: int) -> dict:
    drift = np.array([r["drift_dice"] for r in rows])
    visible = [r for r in rows if not r["backbone_empty"]]
    return {"slices": len(rows), "samples": n_samples,
            "drift_dice_mean": float(drift.mean()), "drift_dice_p05": float(np.percentile(drift, 5)),
            "drift_share_at_least_0.9": float((drift >= 0.9).mean()),
            "visible_slices": len(visible), "empty_samples_on_visible": int(sum(r["empty_samples"] for r in visible)),
            "marking_share_mean": float(np.mean([r["marking_share"] for r in rows])),
            "marking_share_off_lesion_mean": float(np.mean([r["marking_share_off_lesion"] for r in rows])),
            "reliability": reliability(rows)}


def markdown(summary: dict, data: str, split: str, model: str) -> str:
    s = summary
    lines = [f"# Product checks: `{model}` on `{data}` ({split}), {s['slices']} slices, N = {s['samples']}", "",
             f"- drift: consensus vs LiteMedSAM's own mask, Dice mean {s['drift_dice_mean']:.3f} (5th percentile "
             f"{s['drift_dice_p05']:.3f}; {s['drift_share_at_least_0.9']:.0%} of slices >= 0.90)",
             f"- empty samples on the {s['visible_slices']} slices where LiteMedSAM outlines something: "
             f"{s['empty_samples_on_visible']}",
             f"- marking share: mean {s['marking_share_mean']:.3f} on the lesions' boxes, "
             f"{s['marking_share_off_lesion_mean']:.3f} on the same boxes moved off the lesion", "",
             "Reliability of the marking share, per nodule (estimate = mean over its slices; actual = its readers / 4):",
             "", "| estimate bin | nodules | mean estimate | mean actual share |", "|---|---|---|---|"]
    for b in s["reliability"]:
        fmt = (lambda v: "–" if v is None else f"{v:.3f}")
        lines.append(f"| {b['bin']} | {b['nodules']} | {fmt(b['mean_estimate'])} | {fmt(b['mean_actual'])} |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_main("product_checks.py", lambda: _main(argv))


def _main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, type=Path)  # type=Path: an input the output guard knows
    parser.add_argument("--split", default="test", choices=["train", "val", "test"])
    parser.add_argument("--model", required=True, type=Path, help="a heads file of a lite_medsam model")
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--max-slices", type=int, default=0, help="seeded subset of the split (0 = all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-threads", type=int, default=0)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--force", action="store_true")
    args = parser.parse_args(argv)
    guards.at_least("--samples", args.samples, 1, guards.MAX_SAMPLES)
    guards.at_least("--max-slices", args.max_slices, 0)
    if not Path(args.model).is_file():
        raise SettingsError(f"no weights file at {args.model}")
    output = guards.output_folder(parser, args, tool="product_checks.py")
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    learner = load_weights(args.model, None)
    model = getattr(learner, "model", None)
    if model is None or not model.config.frozen_backbone or model.marking is None:
        raise SettingsError(f"{args.model} is not a model on a frozen backbone with a marking head (lite_medsam)")
    model.eval()
    batches = SliceBatches(load_split(args.data, args.split), window=model.config.window)
    positions = validation_positions(len(batches), args.max_slices, args.seed)
    table = batches.dataset.table
    rows = []
    for position in positions:
        batch = batches.read(np.array([position]))
        index = int(batches.dataset.indices[position])
        noise = slice_noise(args.seed, index, args.samples, model.config.latent_dim)
        # the box moved off the lesion, like the noise, a function of (seed, slice) only
        moved_box = torch.Generator().manual_seed(int(np.random.SeedSequence([args.seed, index, 11]).generate_state(1)[0]))
        row = {"slice": index, "patient_id": str(table["patient_id"][index]),
               "nodule_id": str(table["nodule_id"][index]), "n_readers": int(table["n_readers"][index])}
        row.update(check_slice(model, batch.model_images(False), batch.boxes, args.samples, noise, moved_box))
        rows.append(row)
    summary = summarise(rows, args.samples)
    with output as tmp:
        (tmp / "checks.md").write_text(markdown(summary, args.data, args.split, args.model), encoding="utf-8")
        (tmp / "checks.json").write_text(json.dumps(summary, indent=1), encoding="utf-8")
        with open(tmp / "per_slice.csv", "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    print(markdown(summary, args.data, args.split, args.model))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
