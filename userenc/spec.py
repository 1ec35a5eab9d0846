"""The declared feature spec: which features an event has and how each becomes integer ids.

Loaded from TOML (`[[feature]]` tables). Id 0 is padding, id 1 is "unknown or missing" (OOV),
real values start at 2, for every kind.
"""
from __future__ import annotations

import datetime as dt
import re
import tomllib
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

PAD_ID = 0
OOV_ID = 1
FIRST_ID = 2

KINDS = ("categorical", "multi_categorical", "numeric", "time")
TIME_PARTS = ("hour", "weekday", "gap", "next_gap", "date")
SPLITS = ("", "words")
DAY = 86_400
# Log-spaced gaps in seconds: same moment, minutes, hours, a day, days, weeks, months, a year.
DEFAULT_GAP_BOUNDARIES = [1, 60, 600, 3600, 6 * 3600, DAY, 3 * DAY, 7 * DAY, 30 * DAY, 90 * DAY, 365 * DAY]


def _unix_seconds(boundary: Any) -> float:
    """A date boundary: a TOML date (or date-time, UTC unless it says otherwise), or unix
    seconds already (a spec saved with a checkpoint holds those)."""
    if isinstance(boundary, dt.datetime):
        return (boundary if boundary.tzinfo else boundary.replace(tzinfo=dt.timezone.utc)).timestamp()
    if isinstance(boundary, dt.date):
        return dt.datetime(boundary.year, boundary.month, boundary.day, tzinfo=dt.timezone.utc).timestamp()
    if isinstance(boundary, (int, float)) and not isinstance(boundary, bool):
        return float(boundary)
    raise ValueError(f"date boundary {boundary!r} is not a date")


@dataclass(slots=True)
class Feature:
    name: str
    kind: str
    # Where the value comes from: "item_id", "timestamp", or a key of Event.fields.
    source: str = ""
    dim: int = 32
    # categorical / multi_categorical: vocabulary limits, built on the training split.
    max_vocab: int = 0  # 0: keep every value seen min_count times
    min_count: int = 1
    max_values: int = 8  # multi_categorical: values kept per event
    # multi_categorical: how a text value becomes values: "" (a list, or "a|b|c"), or "words"
    # (lowercased words of a free text such as a review: an encoder can read text this way).
    split: str = ""
    # categorical: a regular expression whose first group is the value, searched in the source
    # text (a movie's release year from "Heat (1995)"); no match: missing (the OOV id).
    pattern: str = ""
    # numeric / time "gap" / time "date": bucket boundaries (value < b[0] -> bucket 0, ...).
    # For "date" they are calendar dates (TOML dates, midnight UTC), kept as unix seconds.
    boundaries: list[float] = field(default_factory=list)
    # time: hour | weekday | gap (since the previous event) | next_gap (until the next event, or
    # for the last one until the request: known when a recommendation is asked, as "now") | date
    part: str = ""
    # Next-event prediction: this feature of the next event is a training target.
    target: bool = False
    loss_weight: float = 1.0
    # A static attribute of the item (genres of a movie): also used to embed ranking candidates.
    item_attribute: bool = False

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"feature {self.name!r}: kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if not self.source:
            self.source = "timestamp" if self.kind == "time" else self.name
        if self.kind == "time":
            if self.part not in TIME_PARTS:
                raise ValueError(f"feature {self.name!r}: time part must be one of {', '.join(TIME_PARTS)}")
            if self.part in ("gap", "next_gap") and not self.boundaries:
                self.boundaries = list(DEFAULT_GAP_BOUNDARIES)
            if self.part == "date":
                if not self.boundaries:
                    raise ValueError(f"feature {self.name!r}: a date part needs boundaries (dates)")
                self.boundaries = [_unix_seconds(b) for b in self.boundaries]
        if self.kind == "numeric" and not self.boundaries:
            raise ValueError(f"feature {self.name!r}: numeric features need bucket boundaries")
        if list(self.boundaries) != sorted(self.boundaries):
            raise ValueError(f"feature {self.name!r}: boundaries must be increasing")
        if self.dim <= 0 or self.max_values <= 0 or self.max_vocab < 0 or self.min_count < 1:
            raise ValueError(f"feature {self.name!r}: dim, max_values, max_vocab, min_count out of range")
        if self.split not in SPLITS or (self.split and self.kind != "multi_categorical"):
            raise ValueError(f"feature {self.name!r}: split must be one of {SPLITS} (multi_categorical only)")
        if self.pattern:
            if self.kind != "categorical":
                raise ValueError(f"feature {self.name!r}: a pattern needs a categorical feature")
            try:
                groups = re.compile(self.pattern).groups
            except re.error as err:
                raise ValueError(f"feature {self.name!r}: pattern is not a regular expression ({err})") from None
            if groups < 1:
                raise ValueError(f"feature {self.name!r}: pattern needs a group: the value to keep")
        if self.item_attribute and self.kind not in ("categorical", "multi_categorical"):
            raise ValueError(f"feature {self.name!r}: only categorical features can be item attributes")

    @property
    def is_item(self) -> bool:
        return self.source == "item_id"

    @property
    def fixed_size(self) -> int:
        """Vocabulary size of kinds whose ids need no vocabulary (buckets, hours, weekdays)."""
        if self.kind == "numeric" or (self.kind == "time" and self.part in ("gap", "next_gap", "date")):
            return FIRST_ID + len(self.boundaries) + 1
        if self.kind == "time":
            return FIRST_ID + (24 if self.part == "hour" else 7)
        return 0


@dataclass(slots=True)
class FeatureSpec:
    name: str
    features: list[Feature]

    def __post_init__(self) -> None:
        names = [f.name for f in self.features]
        if len(set(names)) != len(names):
            raise ValueError(f"spec {self.name!r}: feature names must be unique")
        items = [f for f in self.features if f.is_item]
        if len(items) != 1 or items[0].kind != "categorical":
            raise ValueError(f"spec {self.name!r}: exactly one categorical feature must have source = \"item_id\"")

    @property
    def item(self) -> Feature:
        return next(f for f in self.features if f.is_item)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "feature": [asdict(f) for f in self.features]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "FeatureSpec":
        if not isinstance(d.get("feature"), list) or not d["feature"]:
            raise ValueError("a feature spec needs at least one [[feature]] table")
        unknown_top = set(d) - {"name", "feature"}
        if unknown_top:
            raise ValueError(f"spec: unknown keys {', '.join(sorted(unknown_top))}")
        known = set(Feature.__dataclass_fields__)
        features = []
        for entry in d["feature"]:
            if not isinstance(entry, dict):
                raise ValueError("each [[feature]] entry must be a table")
            unknown = set(entry) - known
            if unknown:
                raise ValueError(f"feature {entry.get('name')!r}: unknown keys {', '.join(sorted(unknown))}")
            missing = {"name", "kind"} - set(entry)
            if missing:
                raise ValueError(f"feature {entry.get('name')!r}: missing {', '.join(sorted(missing))}")
            try:
                features.append(Feature(**entry))
            except TypeError as err:  # a value of the wrong type (dim = "big") fails a comparison
                raise ValueError(f"feature {entry.get('name')!r}: a value has the wrong type ({err})") from None
        return cls(name=str(d.get("name", "spec")), features=features)

    def only(self, names: list[str]) -> "FeatureSpec":
        """The same spec restricted to some features (the ID-only baseline is `only(["item"])`)."""
        kept = [Feature(**asdict(f)) for f in self.features if f.name in names]
        return FeatureSpec(f"{self.name}[{','.join(names)}]", kept)


def _feature_tables(data: dict[str, Any], where: str | Path) -> list[dict[str, Any]]:
    """The [[feature]] tables of a spec about to be merged, each a table with a name (the key
    the merge goes by); none is fine for a spec that only changes its base's name."""
    tables = data.get("feature", [])
    if not isinstance(tables, list) or not all(isinstance(t, dict) and "name" in t for t in tables):
        raise ValueError(f"{where}: each [[feature]] entry must be a table with a name")
    return tables


def _read_spec_table(path_or_name: str | Path, chain: tuple[str, ...] = ()) -> dict[str, Any]:
    """The TOML table of a spec file or built-in spec, with `extends` resolved: the base spec's
    features, each [[feature]] table here either updating the base feature of its name (only
    the keys it gives) or, for a new name, appended after them. A relative base path is read
    next to the extending file; a built-in spec extends built-in names."""
    path = Path(path_or_name)
    if path.suffix != ".toml" and not path.exists():
        builtin = resources.files("userenc") / "specs" / f"{path_or_name}.toml"
        if not builtin.is_file():
            raise FileNotFoundError(f"no spec file {path_or_name} and no built-in spec of that name")
        text, folder = builtin.read_text(encoding="utf-8"), None
    else:
        if not path.is_file():
            raise FileNotFoundError(f"no spec file {path}")
        text, folder = path.read_text(encoding="utf-8"), path.parent
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ValueError(f"{path_or_name}: invalid TOML: {err}") from None
    base_name = data.pop("extends", None)
    if base_name is None:
        return data
    if not isinstance(base_name, str) or not base_name:
        raise ValueError(f"{path_or_name}: extends must name a spec")
    here = str(path_or_name)
    if here in chain or len(chain) >= 8:
        raise ValueError(f"{path_or_name}: extends loops or nests too deep ({' -> '.join((*chain, here))})")
    base_path = folder / base_name if folder is not None and base_name.endswith(".toml") else base_name
    features = [dict(entry) for entry in _feature_tables(_read_spec_table(base_path, (*chain, here)), base_name)]
    for entry in _feature_tables(data, path_or_name):
        same = next((f for f in features if f["name"] == entry["name"]), None)
        if same is not None:
            same.update(entry)
        else:
            features.append(dict(entry))
    return data | {"feature": features}


def load_spec(path_or_name: str | Path) -> FeatureSpec:
    """A TOML file, or the name of a built-in spec (movielens, movielens_id_only, amazon, generic).
    A spec may start from another (`extends = "movielens_year"`, see _read_spec_table)."""
    return FeatureSpec.from_dict(_read_spec_table(path_or_name))
