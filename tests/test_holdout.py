"""The validation split: stable, sized as asked, never overlapping training."""

from __future__ import annotations

from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from core.config import defaults
from core.data.discovery import Item
from core.data.holdout import VALIDATION_DATASET, holdout_count, split_holdout


def _items(root: Path, n: int, dataset: int = 0) -> list[Item]:
    return [Item(root / f"clip{i:03}.mp4", f"caption {i}", root / f"clip{i:03}.txt", dataset, 1, "video", root) for i in range(n)]


def _config(fraction: float = 0.0, seed: int = 42, folder: str = "") -> dict:
    config = defaults()
    config["seed"] = seed
    config["validation"]["holdout_fraction"] = fraction
    config["validation"]["folder"] = folder
    return config


def test_fraction_zero_holds_nothing_out(tmp_path: Path) -> None:
    items = _items(tmp_path, 10)
    assert split_holdout(items, _config(0.0)) == (items, [])


@settings(max_examples=50, deadline=None)
@given(n=st.integers(0, 60), fraction=st.floats(0.0, 0.5), seed=st.integers(0, 2**31 - 1))
def test_split_sizes_and_disjointness(n: int, fraction: float, seed: int) -> None:
    items = _items(Path("/data/set"), n)
    train, val = split_holdout(items, _config(fraction, seed))
    assert len(train) + len(val) == n
    assert not {i.path for i in train} & {i.path for i in val}
    assert len(val) == holdout_count(n, fraction)
    if fraction > 0 and n >= 2:
        assert 1 <= len(val) <= n - 1
    if fraction == 0 or n < 2:
        assert val == []
    assert train == [i for i in items if i not in val]  # training keeps the discovery order


def test_choice_is_stable_across_locations_and_seeds(tmp_path: Path) -> None:
    a = split_holdout(_items(Path("/home/me/clips"), 40), _config(0.25, 1))[1]
    b = split_holdout(_items(Path("/mnt/other/copy"), 40), _config(0.25, 1))[1]
    assert [i.relative_path for i in a] == [i.relative_path for i in b]
    assert len(a) == 10
    c = split_holdout(_items(Path("/home/me/clips"), 40), _config(0.25, 2))[1]
    assert {i.relative_path for i in c} != {i.relative_path for i in a}
    # Adding clips moves at most as many held-out items as the count grows by.
    grown = split_holdout(_items(Path("/home/me/clips"), 44), _config(0.25, 1))[1]
    assert len({i.relative_path for i in a} - {i.relative_path for i in grown}) <= 1


def test_same_file_in_two_datasets_never_lands_on_both_sides(tmp_path: Path) -> None:
    items = _items(tmp_path, 6, 0) + _items(tmp_path, 6, 1)
    train, val = split_holdout(items, _config(0.5))
    assert val and not {i.path for i in train} & {i.path for i in val}


def test_validation_folder_replaces_the_fraction(tmp_path: Path) -> None:
    data = tmp_path / "data"
    held = data / "held"  # a validation folder inside the dataset: its files must leave training
    held.mkdir(parents=True)
    for folder, name in ((data, "a"), (data, "b"), (held, "v")):
        (folder / f"{name}.mp4").write_bytes(b"x")
        (folder / f"{name}.txt").write_text(f"caption {name}", encoding="utf-8")
    items = [
        Item(data / f"{n}.mp4", f"caption {n}", data / f"{n}.txt", 0, 1, "video", data) for n in ("a", "b")
    ] + [Item(held / "v.mp4", "caption v", held / "v.txt", 0, 1, "video", data)]
    train, val = split_holdout(items, _config(0.5, folder=str(held)))
    assert [i.path.name for i in train] == ["a.mp4", "b.mp4"]
    assert [(i.path.name, i.dataset_index, i.caption) for i in val] == [("v.mp4", VALIDATION_DATASET, "caption v")]
