"""research/phantom_ceiling.py: what ideal predictors score on the phantom."""
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]


def test_phantom_ceiling_scores_the_ideal_predictors_against_the_slot_majority(tmp_path):
    """research/phantom_ceiling.py: on a nodule only one of four radiologists annotated, the nodule's own
    readers' majority is the disc (Dice 0 against the empty slot majority) and the calibrated mean is
    empty (Dice 1); where 2 of 4 drew, the calibrated mean ("> 0.5") misses the disc the majority holds;
    the threshold finds the bright disc; through the decoder grid the disc loses its edge. A missing data set
    is one clear error line, exit 2."""
    from research.phantom_ceiling import slice_scores, through_decoder_grid

    yy, xx = np.mgrid[:32, :32]
    disc = (yy - 16) ** 2 + (xx - 16) ** 2 < 36
    image = np.where(disc, 40.0, -850.0).astype(np.float32)
    box = np.array([8.0, 8.0, 24.0, 24.0])
    empty = np.zeros_like(disc)
    one_reader = slice_scores(image, np.stack([disc, empty, empty, empty]), np.array([1, 0, 0, 0], bool), box, -400.0)
    assert one_reader == {"threshold": 0.0, "readers' majority": 0.0, "calibrated mean": 1.0,
                          "majority via the grid": 0.0}
    two_of_four = slice_scores(image, np.stack([disc, disc, empty, empty]), np.ones(4, bool), box, -400.0)
    assert {k: two_of_four[k] for k in ("threshold", "readers' majority", "calibrated mean")} == {
        "threshold": 1.0, "readers' majority": 1.0, "calibrated mean": 0.0}
    # A 5-pixel-radius disc on a 32-pixel image: 4x up to the 128 model frame, so the 64 grid is finer than
    # the image and keeps it; on a 128-pixel image (the grid at half resolution) a small disc loses pixels.
    assert two_of_four["majority via the grid"] > 0.95
    yy, xx = np.mgrid[:128, :128]
    small = (yy - 64.3) ** 2 + (xx - 63.6) ** 2 < 20
    round_trip = through_decoder_grid(small)
    assert round_trip.shape == small.shape and 0 < round_trip.sum() < small.sum()
    done = subprocess.run([sys.executable, str(ROOT / "research" / "phantom_ceiling.py"),
                           "--data", str(tmp_path / "none")], capture_output=True, text=True)
    assert done.returncode == 2 and "no meta.json" in done.stderr and "Traceback" not in done.stderr


def test_phantom_ceiling_what_if_scores_named_patients_as_a_model_did(tmp_path, capsys):
    """--as-scored: on the named patients' slices every ideal predictor scores what a per-slice table
    recorded, so the table shows whether those patients alone decide a target."""
    from research.tests.builders import faint_and_dense_dataset, write_per_slice_table
    from research import phantom_ceiling
    from Training.data.dataset_format import load_dataset

    data = faint_and_dense_dataset(tmp_path / "ds", {"train": 1, "val": 1, "test": 1})
    test = load_dataset(data, "test")
    table = test.table
    # The model drew on the faint (one-slot, majority-empty) slices of P15 only: Dice 0 there, 1 elsewhere.
    wrong = (table["patient_id"][test.indices] == "P15") & (table["case"][test.indices] == "faint")
    write_per_slice_table(tmp_path / "per_slice_m.csv", "m", test, np.where(wrong, 0.0, 1.0))

    def faint_row(argv):
        assert phantom_ceiling.main(["--data", str(data), "--bootstrap", "50"] + argv) == 0
        out = capsys.readouterr().out
        return out, next(line for line in out.splitlines() if line.startswith("| case faint |"))

    _, plain = faint_row([])
    # the threshold leaves the faint blobs out, as the readers' majority does: both 1.000, difference 0
    assert plain.startswith("| case faint | 20 | 1.000 | 1.000 |") and "0.000 [0.000, 0.000]" in plain
    out, what_if = faint_row(["--as-scored", str(tmp_path / "per_slice_m.csv"), "--patients", "P15"])
    assert "What if: on the slices of P15 every ideal predictor scores what m scored" in out
    assert what_if.startswith("| case faint | 20 | 1.000 | 0.800 |")  # 4 of 20 faint slices now 0
    assert "| -0.200 [" in what_if
    for argv, message in ((["--patients", "P15"], "go together"),
                          (["--as-scored", str(tmp_path / "per_slice_m.csv"), "--patients", "P01"],
                           "P01 has no slice in this split")):
        assert phantom_ceiling.main(["--data", str(data)] + argv) == 2
        assert message in capsys.readouterr().err
