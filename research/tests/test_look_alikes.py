"""research/look_alikes.py: what the reference split's look-alikes of a slice group say about its majority."""
import numpy as np
import pytest

from research.tests.builders import faint_and_dense_dataset, faint_or_dense_slice, write_per_slice_table
from research import look_alikes
from Training.data.dataset_format import N_READERS

def _table_row(text: str, name: str) -> list:
    line = next(line for line in text.splitlines() if line.startswith(f"| {name} |"))
    return [cell.strip() for cell in line.strip("|").split("|")]


def test_the_look_alikes_carry_the_reference_splits_answer(tmp_path, capsys):
    # In train the faint blobs were drawn by one slot (majority empty); the test group inherits that answer.
    data = faint_and_dense_dataset(tmp_path / "one", {"train": 1, "val": 1, "test": 1})
    assert look_alikes.main(["--data", str(data), "--split", "test", "--n-marked", "1", "--k", "10"]) == 0
    out = capsys.readouterr().out
    group = _table_row(out, "the group")
    assert group[1:3] == ["20", "1.00"]  # 5 test patients x 4 faint slices, all majority-empty
    assert group[3].startswith("1.00")
    every = _table_row(out, "every marked test slice")
    assert every[1:3] == ["40", "0.50"] and every[3].startswith("0.50")
    assert "AUC 1.000" in out
    assert "The group's 200 look-alikes by case type, majority drawn / empty: faint 0 / 200." in out
    # the share is calibrated here: dense slices (share 0) are never majority-empty, faint ones (share 1) always
    assert "| 0.0–0.2 | 20 | 0.00 |" in out and "| 0.8–1.0 | 20 | 1.00 |" in out and "| 0.4–0.6 | 0 | – |" in out

    # Same images, but in train all four slots drew the faint blobs: now the look-alikes say "not empty",
    # though the test group's own majority is still empty -- the case a model cannot learn from train.
    data = faint_and_dense_dataset(tmp_path / "four", {"train": 4, "val": 4, "test": 1})
    assert look_alikes.main(["--data", str(data), "--split", "test", "--case", "faint", "--k", "10",
                             "--per-slice"]) == 0
    out = capsys.readouterr().out
    group = _table_row(out, "the group")
    assert group[1:3] == ["20", "1.00"] and group[3].startswith("0.00")
    assert "AUC 0.500" in out  # every train slice's majority drew: the share is 0 everywhere, a tie
    assert "majority drawn / empty: faint 200 / 0." in out
    assert out.count("| P1") == 20  # one line a slice of the group (patients P15-P19)


def test_filters_combine_and_the_statistics_see_the_box():
    image, blob = faint_or_dense_slice(np.random.default_rng(1), faint=True)
    box = np.array([10.0, 10.0, 39.0, 39.0])
    stats = look_alikes.box_statistics(image, box)
    assert stats.shape == (len(look_alikes.FEATURES),)
    assert stats[4] == pytest.approx(np.log(29 * 29))
    inside = image[10:39, 10:39].astype(float)
    assert stats[0] == pytest.approx(inside.mean()) and stats[3] == pytest.approx(np.percentile(inside, 99))
    with_neighbours = look_alikes.box_statistics(image, box, np.stack([image, image + 10]))
    assert with_neighbours[-2:] == pytest.approx([0.0, 10.0])
    masks = np.zeros((N_READERS, 8, 8), bool)
    masks[0, 2:4, 2:4] = masks[1, 4:6, 4:6] = True  # two slots, but on no common pixel
    assert look_alikes.majority_is_empty(masks)
    masks[1, 3, 3] = True
    assert not look_alikes.majority_is_empty(masks)


@pytest.mark.parametrize("argv, message", [
    (["--reference", "test"], "another split than --split"),
    (["--patient", "NOBODY"], "no marked test slice matches"),
    (["--k", "1000"], "more than the 96 marked train slices"),
    (["--k", "0"], "--k must be at least 1"),
    (["--case", "faint", "--n-marked", "0"], "--n-marked must be at least 1"),
])
def test_bad_settings_are_one_line_errors(tmp_path, capsys, argv, message):
    data = faint_and_dense_dataset(tmp_path / "ds", {"train": 1, "val": 1, "test": 1})
    assert look_alikes.main(["--data", str(data), "--split", "test"] + argv) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_results_show_how_often_each_method_left_the_majority_empty_slices_empty(tmp_path, capsys):
    from Training.data.dataset_format import load_dataset

    data = faint_and_dense_dataset(tmp_path / "ds", {"train": 1, "val": 1, "test": 1})
    test = load_dataset(data, "test")
    results = tmp_path / "results"
    results.mkdir()
    faint = test.table["case"][test.indices] == "faint"  # the majority-empty slices (one slot drew them)
    # "model" leaves every faint slice empty (Dice 1 there); "greedy" draws on all of them (Dice 0).
    write_per_slice_table(results / "per_slice_model.csv", "model", test, np.where(faint, 1.0, 0.9))
    write_per_slice_table(results / "per_slice_greedy.csv", "greedy", test, np.where(faint, 0.0, 0.9))
    assert look_alikes.main(["--data", str(data), "--split", "test", "--case", "faint", "--k", "10",
                             "--results", str(results)]) == 0
    out = capsys.readouterr().out
    assert "| look-alikes' majority empty | slices | greedy | model |" in out
    assert "| 0.8–1.0 | 20 | 0.00 | 1.00 |" in out  # train says "empty" for every faint test slice
    assert "| 0.0–0.2 | 0 | – | – |" in out
    assert "| the group | 20 | 0.00 | 1.00 |" in out

    # A folder that scored only part of the split cannot be joined: one line, exit 2.
    test.indices = test.indices[:5]
    write_per_slice_table(results / "per_slice_greedy.csv", "greedy", test, np.zeros(5))
    assert look_alikes.main(["--data", str(data), "--split", "test", "--results", str(results)]) == 2
    assert "did not score" in capsys.readouterr().err
