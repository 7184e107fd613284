"""The four Fed-Heart-Disease hospitals, preprocessed exactly as FLamby does it.

The raw UCI files ship inside the package (``data/``), together with FLamby's train/test
split (``flamby_split.csv``) and their SHA-256 sums, which are checked on every load. The
steps, in order (see the dataset's README):

1. read a hospital's file; ``?`` is missing;
2. drop columns 10-12 (``slope``, ``ca``, ``thal``);
3. drop every row that still has a missing value;
4. label = 1 if ``num`` > 0 else 0;
5. one-hot ``cp`` and ``restecg`` with their first level dropped, giving 13 features:
   age, sex, trestbps, chol, fbs, thalach, exang, oldpeak, cp=2, cp=3, cp=4,
   restecg=1, restecg=2;
6. split by ``flamby_split.csv`` (``raw_line`` = 1-based line in the hospital's file);
7. z-score every row with the mean and unbiased std (n-1) of the hospital's own training
   rows, plus 1e-9 on the std.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from importlib import resources
from importlib.resources.abc import Traversable

import numpy as np
import numpy.typing as npt

from conclave.core.errors import ConfigError, TrainerError

FEATURE_NAMES: tuple[str, ...] = (
    "age",
    "sex",
    "trestbps",
    "chol",
    "fbs",
    "thalach",
    "exang",
    "oldpeak",
    "cp=2",
    "cp=3",
    "cp=4",
    "restecg=1",
    "restecg=2",
)
NUM_FEATURES = len(FEATURE_NAMES)

HOSPITAL_FILES: tuple[str, ...] = (
    "processed.cleveland.data",
    "processed.hungarian.data",
    "processed.switzerland.data",
    "processed.va.data",
)
HOSPITAL_NAMES: tuple[str, ...] = ("cleveland", "hungarian", "switzerland", "va")
HOSPITALS: tuple[str, ...] = tuple(f"hospital-{i}" for i in range(len(HOSPITAL_FILES)))
"""Participant names, in hospital-index order."""

_SPLIT_FILE = "flamby_split.csv"
_SUMS_FILE = "SHA256SUMS"
_STD_EPSILON = 1e-9
_NUMERIC_COLUMNS = (0, 1, 3, 4, 5, 7, 8, 9)  # age sex trestbps chol fbs thalach exang oldpeak
_CP_COLUMN, _RESTECG_COLUMN, _LABEL_COLUMN = 2, 6, 13
_CP_LEVELS = (2.0, 3.0, 4.0)  # level 1 dropped
_RESTECG_LEVELS = (1.0, 2.0)  # level 0 dropped

Float32Array = npt.NDArray[np.float32]


class DataIntegrityError(TrainerError):
    """A packaged data file is missing or does not match its recorded SHA-256 sum."""


@dataclass(frozen=True, slots=True, kw_only=True)
class HospitalData:
    """One hospital's standardised features and binary labels (read-only arrays)."""

    name: str
    x_train: Float32Array
    y_train: Float32Array
    x_test: Float32Array
    y_test: Float32Array


def hospital_index(participant: str) -> int:
    """Map a participant name (``hospital-0`` .. ``hospital-3``) to its hospital index."""
    try:
        return HOSPITALS.index(participant)
    except ValueError:
        raise ConfigError(
            "participant", participant, f"the heart-disease task knows {', '.join(HOSPITALS)}"
        ) from None


def load_hospital(index: int) -> HospitalData:
    """Load hospital ``index`` (0 Cleveland, 1 Hungary, 2 Switzerland, 3 VA Long Beach)."""
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(HOSPITALS):
        raise ConfigError("hospital index", index, f"0 to {len(HOSPITALS) - 1}")
    return _load_hospital(index)


@functools.lru_cache(maxsize=len(HOSPITAL_FILES))
def _load_hospital(index: int) -> HospitalData:
    text = _read_verified(HOSPITAL_FILES[index])
    train_lines, test_lines = _split_lines(index)
    raw = _parse(text)  # (lines, 14), NaN for missing, row i = line i + 1
    missing = np.isnan(np.delete(raw, (10, 11, 12), axis=1))
    kept = np.asarray(~missing.any(axis=1), dtype=np.bool_)
    for line in (*train_lines, *test_lines):
        if not 1 <= line <= raw.shape[0] or not kept[line - 1]:
            raise DataIntegrityError(
                f"{_SPLIT_FILE} puts line {line} of {HOSPITAL_FILES[index]} in a split, "
                "but that line does not exist or has missing values"
            )
    features = _features(raw)
    labels = (raw[:, _LABEL_COLUMN] > 0).astype(np.float64)
    train_rows = np.asarray(train_lines, dtype=np.intp) - 1
    test_rows = np.asarray(test_lines, dtype=np.intp) - 1
    mean = features[train_rows].mean(axis=0)
    std = features[train_rows].std(axis=0, ddof=1) + _STD_EPSILON
    scaled = (features - mean) / std
    return HospitalData(
        name=HOSPITAL_NAMES[index],
        x_train=_frozen(scaled[train_rows]),
        y_train=_frozen(labels[train_rows]),
        x_test=_frozen(scaled[test_rows]),
        y_test=_frozen(labels[test_rows]),
    )


def _features(raw: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """Steps 2 and 5: the 13 model features, in FEATURE_NAMES order (NaN rows kept)."""
    numeric = raw[:, _NUMERIC_COLUMNS]
    cp = np.stack([raw[:, _CP_COLUMN] == level for level in _CP_LEVELS], axis=1)
    restecg = np.stack([raw[:, _RESTECG_COLUMN] == level for level in _RESTECG_LEVELS], axis=1)
    return np.concatenate([numeric, cp.astype(np.float64), restecg.astype(np.float64)], axis=1)


def _parse(text: str) -> npt.NDArray[np.float64]:
    rows: list[list[float]] = []
    for number, line in enumerate(text.splitlines(), start=1):
        cells = line.strip().split(",")
        if len(cells) != 14:
            raise DataIntegrityError(f"line {number} has {len(cells)} columns, expected 14")
        rows.append([float("nan") if cell == "?" else float(cell) for cell in cells])
    return np.asarray(rows, dtype=np.float64)


@functools.lru_cache(maxsize=1)
def _split_table() -> dict[tuple[int, str], tuple[int, ...]]:
    lines = _read_verified(_SPLIT_FILE).splitlines()
    if not lines or lines[0].strip() != "center,center_name,raw_line,split":
        raise DataIntegrityError(f"{_SPLIT_FILE} lacks its expected header")
    table: dict[tuple[int, str], list[int]] = {}
    for line in lines[1:]:
        center, _name, raw_line, split = line.strip().split(",")
        table.setdefault((int(center), split), []).append(int(raw_line))
    return {key: tuple(value) for key, value in table.items()}


def _split_lines(index: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    table = _split_table()
    return table.get((index, "train"), ()), table.get((index, "test"), ())


@functools.lru_cache(maxsize=1)
def _expected_sums() -> dict[str, str]:
    sums: dict[str, str] = {}
    for line in _data_dir().joinpath(_SUMS_FILE).read_text(encoding="ascii").splitlines():
        if line.strip():
            digest, name = line.split(maxsplit=1)
            sums[name.strip().lstrip("*")] = digest.lower()
    return sums


def _read_verified(name: str) -> str:
    expected = _expected_sums().get(name)
    if expected is None:
        raise DataIntegrityError(f"{_SUMS_FILE} has no checksum for {name}")
    try:
        data = _data_dir().joinpath(name).read_bytes()
    except OSError as exc:
        raise DataIntegrityError(f"cannot read packaged data file {name}: {exc}") from exc
    actual = hashlib.sha256(data).hexdigest()
    if actual != expected:
        raise DataIntegrityError(
            f"packaged data file {name} has been altered: sha256 {actual}, expected {expected}"
        )
    return data.decode("ascii")


def _data_dir() -> Traversable:
    return resources.files("conclave.tasks.heart_disease").joinpath("data")


def _frozen(values: npt.NDArray[np.float64]) -> Float32Array:
    out = np.ascontiguousarray(values, dtype=np.float32)
    out.flags.writeable = False
    return out
