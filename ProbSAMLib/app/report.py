"""The output folder of a volume sampling run: samples.seg.nrrd, the uncertainty volumes and summary.json (what
goes into the summary is ProbSAMLib.inference.summary; the PNG montage is app.montage).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ProbSAMLib.inference.agreement import AGREEMENT_LEVELS, AGREEMENT_NAMES, CONSENSUS_NAME
from ProbSAMLib.inference.summary import segment_names
from ProbSAMLib.inference.uncertainty import MAP_NAMES
from ProbSAMLib.io import imageio, segfile


def write_outputs(result, directory, split: bool = False, extra_summary: Optional[dict] = None,
                  tags: Optional[Sequence[dict]] = None, other_files: Sequence[str] = ()) -> list:
    """Write a VolumeSamplingResult into ``directory`` (a folder being filled: io.outputdir.OutputFolder);
    returns the paths.

    samples.seg.nrrd (the N samples, then the consensus and the agreement levels: ``segment_layout``), the four uncertainty volumes, summary.json, and with
    ``split`` also sample_00.nrrd, sample_01.nrrd, ... All on the input's full grid (the result's
    box-sized arrays are placed there). ``other_files``: names the caller writes into the folder too,
    listed in the summary's "files".
    """
    directory = Path(directory)
    masks = result.on_full_grid("masks")
    paths = [write_samples_segmentation(result, masks, directory / "samples.seg.nrrd", tags)]
    if split:
        paths += imageio.write_sample_files(masks, result.geometry, directory)
    del masks
    for name in MAP_NAMES:
        paths.append(imageio.write_image(result.on_full_grid(name), result.geometry, directory / f"{name}.nrrd",
                                         np.float32))
    summary = dict(result.summary, **(extra_summary or {}))
    summary["files"] = sorted([p.name for p in paths] + list(other_files) + ["summary.json"])
    paths.append(write_json(summary, directory / "summary.json"))
    return paths


def segment_layout(count: int) -> list:
    """(name, colour, tags) of each segment of samples.seg.nrrd, in order: the N samples (so segment n is
    sample n), then the consensus and the agreement levels, named as in the Slicer module's node."""
    colors = segfile.distinct_colors(count)
    layout = [(name, colors[n], {}) for n, name in enumerate(segment_names(count))]
    layout.append((CONSENSUS_NAME, segfile.CONSENSUS_COLOR, {"ProbSAMRole": "consensus"}))
    layout += [(AGREEMENT_NAMES[level], segfile.AGREEMENT_COLORS[level], {"ProbSAMRole": f"agreement-{level}"})
               for level in AGREEMENT_LEVELS]
    return layout


def write_samples_segmentation(result, masks_on_grid: np.ndarray, path, tags: Optional[Sequence[dict]] = None) -> Path:
    """samples.seg.nrrd: the samples (``tags``: one dict per sample), the consensus and the agreement levels."""
    count = len(masks_on_grid)
    layout = segment_layout(count)
    extra = [result.on_full_grid("consensus")] + [place_agreement(result, level) for level in AGREEMENT_LEVELS]
    stack = np.concatenate([masks_on_grid, np.stack(extra)])
    all_tags = list(tags or [{}] * count) + [entry[2] for entry in layout[count:]]
    return segfile.write_segmentation(stack, result.geometry, path, names=[entry[0] for entry in layout],
                                      colors=[entry[1] for entry in layout], tags=all_tags)


def place_agreement(result, level: str) -> np.ndarray:
    """One agreement level of the result on the input's full grid."""
    from ProbSAMLib.inference.volume import place_on_grid

    return place_on_grid(result.agreement[level], result.voxel_box, result.geometry.shape)


def write_json(data: dict, path) -> Path:
    path = Path(path)
    path.write_text(json.dumps(data, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    return path
