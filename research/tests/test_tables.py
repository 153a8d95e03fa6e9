"""research/tables.py: the README and docs tables come from the tools' own outputs."""
import json

import pytest
import yaml

from ProbSAMLib.errors import SettingsError
from research.tables import compare_table, influence_table, main, runs_table


def interval(estimate, low, high):
    return {"estimate": estimate, "low": low, "high": high, "n": 3}


RESULTS = {
    "intervals": {
        "all": {"a": {"dice_majority": interval(0.7, 0.6, 0.8), "slices": 10, "patients": 4},
                "b": {"dice_majority": interval(0.5, 0.4, 0.6), "slices": 10, "patients": 4}},
        "case plain": {"a": {"dice_majority": interval(0.9, 0.85, 0.95), "slices": 6, "patients": 3},
                       "b": {"dice_majority": interval(0.8, 0.7, 0.9), "slices": 6, "patients": 3}},
    },
    "differences": {"all": {"a − b": {"dice_majority": interval(0.2, 0.1, 0.3)}},
                    "case plain": {"a − b": {"dice_majority": interval(0.1, -0.05, 0.2)}}},
}


def test_compare_table_rows_are_groups_and_columns_methods_then_differences():
    lines = compare_table(RESULTS, "dice_majority").splitlines()
    assert lines[0] == "| slices | n | a | b | Δ a − b |"
    assert lines[2] == "| all | 10 (4 patients) | 0.700 [0.600, 0.800] | 0.500 [0.400, 0.600] | 0.200 [0.100, 0.300] |"
    assert lines[3].startswith("| case plain | 6 (3 patients) | 0.900") and lines[3].endswith("0.100 [-0.050, 0.200] |")
    # another order puts b first: its column leads and the difference is b − a, absent here -> "–"
    assert compare_table(RESULTS, "dice_majority", ["b", "a"]).splitlines()[2].endswith("| – |")
    ratio = dict(RESULTS, differences={"all": {"a − b": {"ged_ratio@16": interval(0.5, 0.4, 0.6)}}})
    assert compare_table(ratio, "dice_majority", difference="ged_ratio@16").splitlines()[0].endswith("| a / b |")
    assert compare_table(ratio, "dice_majority", difference="ged_ratio@16").splitlines()[2].endswith(
        "| 0.500 [0.400, 0.600] |")
    with pytest.raises(SettingsError, match="no method"):
        compare_table(RESULTS, "dice_majority", ["a", "c"])
    with pytest.raises(SettingsError, match="no metric 'ged@16'"):
        compare_table(RESULTS, "ged@16")


def test_runs_table_reads_logs_and_configs(tmp_path, capsys):
    for seed, (best, steps) in enumerate([(0.30, 100), (0.40, 60)]):
        run = tmp_path / f"m_seed{seed}"
        run.mkdir()
        (run / "config.yaml").write_text(yaml.safe_dump({"max_steps": 100}), encoding="utf-8")
        log = [{"step": 50, "val/ged@16": best + 0.1}, {"step": steps, "val/ged@16": best},
               {"step": steps, "done": True, "best_val_ged": best, "train_seconds": 12.3}]
        (run / "log.jsonl").write_text("\n".join(json.dumps(r) for r in log), encoding="utf-8")
    text = runs_table(tmp_path)
    assert "| m_seed0 | 100 | no | 0.300 | 0.400 (50), 0.300 (100) | 12 |" in text
    assert "| m_seed1 | 60 | yes (of 100) | 0.400 |" in text
    assert "m: best val GED@16 0.350 ± 0.071 (mean ± sd over 2 runs)" in text
    assert main(["runs", str(tmp_path / "nothing")]) == 2
    assert "no training runs" in capsys.readouterr().err


def _slices(differences_by_patient, case="partial_volume"):
    """Two methods' per-slice rows: method a scores 0.5 + d on each slice of a patient whose difference is d."""
    a, b = [], []
    for patient, (n, d) in differences_by_patient.items():
        for k in range(n):
            row = {"patient_id": patient, "n_marked": 1 + k % 4, "case": case}
            a.append(dict(row, dice_majority=0.5 + d + 0.01 * k))
            b.append(dict(row, dice_majority=0.5 + 0.01 * k))
    return {"a": a, "b": b}


def test_influence_table_finds_the_patient_that_decides_the_interval():
    patients = {f"P{i:02d}": (3, 0.1 + 0.01 * (i % 3)) for i in range(12)}
    patients["OUTLIER"] = (10, -0.9)  # many slices, all lost: drags the lower bound below 0
    lines = influence_table(_slices(patients), "case partial_volume", n_boot=200).splitlines()
    assert lines[0] == "case partial_volume: a − b, dice_majority, 46 slices of 13 patients"
    everyone, first = lines[4], lines[5]
    low_all = float(everyone.split("[")[1].split(",")[0])
    assert first.startswith("| OUTLIER | 10 | -0.900 |")
    low_without = float(first.split("[")[1].split(",")[0])
    assert low_all < 0 < low_without
    assert len(lines) == 5 + 5  # the top 5 patients
    with pytest.raises(SettingsError, match="no slice group 'case plain'"):
        influence_table(_slices(patients), "case plain")
    with pytest.raises(SettingsError, match="two methods"):
        influence_table(_slices(patients), "all", methods=["a", "c"])
    shuffled = _slices(patients)
    shuffled["b"] = shuffled["b"][::-1]  # another order of the slices: pairing them would be meaningless
    with pytest.raises(SettingsError, match="not scored on the same slices"):
        influence_table(shuffled, "all")


def test_influence_command_reads_an_evaluate_folder_in_its_method_order(tmp_path, capsys):
    import numpy as np
    from Training.evaluation.report import write_per_slice

    per_slice = _slices({f"P{i}": (2, 0.1 * (i - 2)) for i in range(5)})
    for name, rows in per_slice.items():
        rows = [dict(r, position=k, slice=k, series_uid="s", calibration_bins=np.zeros((10, 3)))
                for k, r in enumerate(rows)]
        write_per_slice(tmp_path / f"per_slice_{name}.csv", name, rows, 0, "", "abc")
    # evaluate.py ran b first: its order, not the files' names, decides which difference is shown
    (tmp_path / "results.json").write_text(json.dumps({"intervals": {"all": {"b": {}, "a": {}}}}))
    assert main(["influence", str(tmp_path), "--group", "case partial_volume", "--top", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("case partial_volume: b − a, dice_majority, 10 slices of 5 patients")
    assert len(lines) == 5 + 2
    assert main(["influence", str(tmp_path), "--methods", "a", "b"]) == 0
    assert capsys.readouterr().out.startswith("all: a − b")
    assert main(["influence", str(tmp_path / "nowhere")]) != 0
    assert "no per_slice_*.csv" in capsys.readouterr().err
    (tmp_path / "results.json").unlink()
    assert main(["influence", str(tmp_path)]) != 0
    err = capsys.readouterr().err
    assert "no results.json" in err and "--methods A B" in err
