"""Training/look_alikes.py: what the reference split's look-alikes of a slice group say about its majority."""
import numpy as np
import pytest

from Training import look_alikes
from Training.dataset_format import N_READERS, Chunk, write_dataset

SIZE = 48


def _slice(rng, faint: bool):
    """A faint, wide blob (-700 HU) or a dense, small one (-50 HU) in noisy lung, and its 4 slot masks."""
    image = rng.normal(-850, 20, (SIZE, SIZE))
    yy, xx = np.mgrid[:SIZE, :SIZE]
    radius = 12 if faint else 5
    blob = (yy - 24) ** 2 + (xx - 24) ** 2 <= radius ** 2
    image[blob] = -700 if faint else -50
    return image.astype(np.int16), blob


def write(out, faint_slots_by_split, seed=0):
    """20 patients, 4 faint and 4 dense slices each. Dense blobs: all 4 slots drew them. Faint ones: as
    many slots as faint_slots_by_split[split] (1: the slot majority is empty; 4: it is not)."""
    splits = {"seed": 0, "fractions": [0.64, 0.16, 0.2], "unit": "patient",
              "train": [f"P{i:02d}" for i in range(12)], "val": [f"P{i:02d}" for i in range(12, 15)],
              "test": [f"P{i:02d}" for i in range(15, 20)]}
    where = {p: s for s in ("train", "val", "test") for p in splits[s]}
    rng = np.random.default_rng(seed)
    images, masks, rows = [], [], []
    for p in range(20):
        patient = f"P{p:02d}"
        for k in range(8):
            faint = k % 2 == 0
            image, blob = _slice(rng, faint)
            slots = faint_slots_by_split[where[patient]] if faint else N_READERS
            stack = np.zeros((N_READERS, SIZE, SIZE), bool)
            stack[:slots] = blob
            images.append(image)
            masks.append(stack)
            rows.append({"patient_id": patient, "series_uid": f"1.{p}", "scan_id": p, "nodule_id": f"{patient}_n0",
                         "k": k, "z_mm": float(k), "crop_row0": 0, "crop_col0": 0, "n_readers": N_READERS,
                         "n_marked": slots, "truncated": 0, "source_key": "", "case": "faint" if faint else "dense"})
    n = len(rows)
    write_dataset(out, [Chunk(np.stack(images), np.stack(masks), np.ones((n, N_READERS), bool), rows)],
                  {"source": "test", "intensity": "hu"}, splits=splits)
    return out


def _table_row(text: str, name: str) -> list:
    line = next(line for line in text.splitlines() if line.startswith(f"| {name} |"))
    return [cell.strip() for cell in line.strip("|").split("|")]


def test_the_look_alikes_carry_the_reference_splits_answer(tmp_path, capsys):
    # In train the faint blobs were drawn by one slot (majority empty); the test group inherits that answer.
    data = write(tmp_path / "one", {"train": 1, "val": 1, "test": 1})
    assert look_alikes.main(["--data", str(data), "--split", "test", "--n-marked", "1", "--k", "10"]) == 0
    out = capsys.readouterr().out
    group = _table_row(out, "the group")
    assert group[1:3] == ["20", "1.00"]  # 5 test patients x 4 faint slices, all majority-empty
    assert group[3].startswith("1.00")
    every = _table_row(out, "every marked test slice")
    assert every[1:3] == ["40", "0.50"] and every[3].startswith("0.50")
    assert "AUC 1.000" in out

    # Same images, but in train all four slots drew the faint blobs: now the look-alikes say "not empty",
    # though the test group's own majority is still empty -- the case a model cannot learn from train.
    data = write(tmp_path / "four", {"train": 4, "val": 4, "test": 1})
    assert look_alikes.main(["--data", str(data), "--split", "test", "--case", "faint", "--k", "10",
                             "--per-slice"]) == 0
    out = capsys.readouterr().out
    group = _table_row(out, "the group")
    assert group[1:3] == ["20", "1.00"] and group[3].startswith("0.00")
    assert "AUC 0.500" in out  # every train slice's majority drew: the share is 0 everywhere, a tie
    assert out.count("| P1") == 20  # one line a slice of the group (patients P15-P19)


def test_filters_combine_and_the_statistics_see_the_box():
    image, blob = _slice(np.random.default_rng(1), faint=True)
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
    data = write(tmp_path / "ds", {"train": 1, "val": 1, "test": 1})
    assert look_alikes.main(["--data", str(data), "--split", "test"] + argv) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
