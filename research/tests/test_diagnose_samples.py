"""research/diagnose_samples.py: empty samples and areas by how many readers marked the slice."""
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]


def test_diagnose_samples_counts_empty_samples_and_areas_per_slice(tmp_path):
    """research/diagnose_samples.py: the readers themselves as 4 samples give the readers' own figures;
    bad input is one error line, exit 2."""
    from research.diagnose_samples import slice_diagnosis

    masks = np.zeros((4, 16, 16), bool)
    masks[0, 4:10, 4:10] = True   # 36 px
    masks[1, 4:8, 4:8] = True     # 16 px, inside reader 0's square
    row = slice_diagnosis(masks.astype(np.float32), masks)  # slots 2, 3: readers who drew nothing
    assert row["n_marked"] == 2 and row["empty_share"] == 0.5
    assert row["sample_area"] == (36 + 16) / 4 and row["reader_area"] == (36 + 16) / 2
    # The mean of the readers is 0.5 on their overlap: > 0.5 is empty there, > 0.4 is the overlap =
    # the majority (2 of 4), > 0.3 too; the 0.25 ring is out of the majority at every threshold >= 0.3.
    assert row["dice@0.5"] == 0.0 and row["dice@0.4"] == 1.0 and row["dice@0.3"] == 1.0
    root = ROOT
    not_weights = tmp_path / "notes.safetensors"
    not_weights.write_text("not a weights file", encoding="utf-8")
    weights = str(root / "ProbSAMLib" / "models" / "probsam_tiny_demo_v3.safetensors")
    for arguments, named in ([str(tmp_path / "missing.safetensors"), "--data", str(tmp_path)], "missing.safetensors"), \
            ([weights, "--data", str(tmp_path), "--max-slices", "-5"], "--max-slices"), \
            ([str(not_weights), "--data", str(tmp_path)], "notes.safetensors"):
        done = subprocess.run([sys.executable, str(root / "research" / "diagnose_samples.py"), *arguments],
                              cwd=root, capture_output=True, text=True, encoding="utf-8")
        assert done.returncode == 2 and named in done.stderr and "Traceback" not in done.stderr, done.stderr
