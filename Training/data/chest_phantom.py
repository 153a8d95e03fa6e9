"""Phantom generator v3: each LIDC nodule rendered inside a whole chest-sized slice field.

The renderer itself lives in ProbSAMLib/demo/chest.py (the offline demo uses it too; ProbSAMLib never
imports Training). This module is generator v3's glue for Training/data/make_phantom.py:

- the field: the scan's whole 512 x 512 slice at its own pixel spacing by default (``--crop 512``; a
  smaller crop renders that window of the same chest, centred on the nodule as in v1/v2);
- the nodule at its real in-plane position when the synthetic lungs allow it (else the chest is moved);
- the hard cases of generator v2 (Training.data.phantom_cases) with the same shares, variants and
  per-nodule choice; juxta_pleural becomes a placement against the synthetic chest wall (base) or
  mediastinum (held out) instead of a local wall;
- a rendering seed of its own (``stable_seed("phantom-v3", ...)``), so v3 never shares noise with v1/v2.

Generator v3 is frozen once a data set is built from it: what changes what is drawn is a new version.
"""
from __future__ import annotations

from ProbSAMLib.demo.chest import (PLACEMENTS, SCAN_SIZE, ChestAnatomy, placement_of,  # noqa: F401
                                   render_chest_volume)
from ProbSAMLib.demo.phantom import stable_seed

GENERATOR_VERSION = 3
DEFAULT_CROP = SCAN_SIZE  # v3 renders whole slices unless told otherwise


def chest_seed(seed: int, nodule) -> int:
    """Rendering seed of one nodule under generator v3 (base seed + the nodule's identity)."""
    return stable_seed("phantom-v3", seed, nodule.series_uid, nodule.nodule_index)


def render_chest_nodule(nodule, seed: int = 0, case=None, scan_size: int = SCAN_SIZE):
    """The v3 PhantomVolume of one LIDCNodule (Training.data.lidc_nodules) on its crop grid.

    The grid's in-plane window sits at nodule.grid_index[1:] (row0, col0) of the scan's slice, so with
    crop 512 it is the whole slice and the masks are where the readers drew them.
    """
    row0, col0 = int(nodule.grid_index[1]), int(nodule.grid_index[2])
    return render_chest_volume(nodule.reader_masks, nodule.spacing, nodule.ratings,
                               seed=chest_seed(seed, nodule), grid_offset=(row0, col0),
                               scan_size=scan_size, case=case)
