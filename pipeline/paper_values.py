"""The paper's own numbers (``reproduce.py --paper-values CSV``), read and checked once before any compute, then
set beside ours in the plan's tables.

The CSV has the columns ``Metric`` and ``Value`` and any of the tables' identifying columns (``ID_COLUMNS``) naming
the rows a value belongs to; an identifying column left empty matches every row (``Checkpoint`` empty matches the
last checkpoint). Every value must be a finite number and no row may be named twice: a value the paper does not
give is simply left out of the file.
"""
from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Protocol, Sequence

import pandas as pd

from utils.errors import UserError

ID_COLUMNS = ["Backbone", "Setting", "Trained on", "Held out", "Dataset", "Method", "Settings", "Checkpoint", "Step",
              "alpha", "beta"]
README = "README: 'Reproducing the paper'"
__all__ = ["ID_COLUMNS", "PaperValues", "read_paper_values"]


def _norm(text: object) -> tuple[str, object]:
    """One spelling per value, so that rows are matched by a dictionary look-up: numbers by value (``20`` is
    ``20.0``), text case- and space-insensitively."""
    s = "" if text is None or (isinstance(text, float) and math.isnan(text)) else str(text).strip()
    try:
        number = float(s)
    except ValueError:
        return ("text", s.lower())
    return ("number", number) if math.isfinite(number) else ("text", s.lower())


class AnnotatedTable(Protocol):
    """What ``PaperValues.annotate`` adds columns to (pipeline.tables.Table): the rows and the columns shown."""
    frame: pd.DataFrame
    shown: list[str]


@dataclass
class PaperValues:
    """The checked file: for each set of identifying columns a row gives, the values by (metric, identity)."""
    path: Path
    # given columns -> {(metric, normalised identity values): (value, line)}
    groups: dict[tuple[str, ...], dict[tuple, tuple[float, int]]]

    @property
    def rows(self) -> int:
        return sum(len(g) for g in self.groups.values())

    def annotate(self, tables: Mapping[str, AnnotatedTable], metrics: Sequence[str]) -> int:
        """Add '<metric> (paper)' and '<metric> diff' (ours minus the paper's) beside each metric the file gives a
        value for, in every table (objects with ``frame``, a DataFrame, and ``shown``, its column order); returns the
        number of cells matched. Linear in the table rows times the few column sets the file uses."""
        matched = 0
        for table in tables.values():
            frame = table.frame
            records = frame.reindex(columns=ID_COLUMNS).astype(object).where(
                frame.reindex(columns=ID_COLUMNS).notna(), "").to_dict("records")
            for metric in metrics:
                found = [self._value(r, metric) for r in records]
                if all(v is None for v in found):
                    continue
                col, diff = f"{metric} (paper)", f"{metric} diff"
                if col not in table.shown:
                    at = table.shown.index(metric) + 1 if metric in table.shown else len(table.shown)
                    table.shown[at:at] = [col, diff]
                paper = pd.Series([float("nan") if v is None else v for v in found], index=frame.index, dtype=float)
                frame[col] = paper
                frame[diff] = pd.to_numeric(frame[metric], errors="coerce") - paper if metric in frame else paper * 0
                matched += sum(v is not None for v in found)
        return matched

    def _value(self, record: Mapping[str, object], metric: str) -> float | None:
        checkpoint = str(record.get("Checkpoint", "") or "")
        hits = []
        for given, values in self.groups.items():
            if "Checkpoint" not in given and checkpoint not in ("last", ""):
                continue   # a value without a checkpoint is the paper's final model: our last checkpoint
            hit = values.get((metric, *(_norm(record.get(col, "")) for col in given)))
            if hit is not None:
                hits.append(hit)
        if len(hits) > 1:
            lines = " and ".join(str(line) for _, line in hits)
            raise UserError(f"--paper-values '{self.path}' lines {lines} all give {metric} for the row "
                            f"{', '.join(f'{c}={record.get(c)}' for c in ID_COLUMNS if record.get(c, '') != '')}; "
                            f"name each row by one line only.")
        return hits[0][0] if hits else None


def read_paper_values(path: str | Path, metrics: Sequence[str]) -> PaperValues:
    """Read and check ``--paper-values`` completely (before any training, so that a bad file costs nothing)."""
    path = Path(path)
    where = f"--paper-values '{path}'"
    if not path.exists():
        raise UserError(f"{where} does not exist. Give the CSV of the paper's numbers (columns Metric, Value and any "
                        f"of {', '.join(ID_COLUMNS)}; {README}), or leave the option out.")
    if path.is_dir():
        raise UserError(f"{where} is a folder; give the CSV file of the paper's numbers ({README}).")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise UserError(f"{where} cannot be read ({exc.strerror or exc}); check its permissions.") from None
    if not raw.strip():
        raise UserError(f"{where} is empty; it needs a header line 'Metric,Value,...' and one line per value of the "
                        f"paper ({README}).")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise UserError(f"{where} is not UTF-8 text (byte {exc.start} is {raw[exc.start]:#x}); save it as UTF-8 "
                        f"(e.g. from a spreadsheet: 'CSV UTF-8').") from None
    reader = csv.reader(io.StringIO(text))
    header = [h.strip() for h in next(reader)]
    need = {"Metric", "Value"}
    if not need <= set(header):
        raise UserError(f"{where} has the columns {header}; it needs Metric and Value, plus any of "
                        f"{', '.join(ID_COLUMNS)} naming the row ({README}).")
    unknown = set(header) - need - set(ID_COLUMNS)
    if unknown:
        raise UserError(f"{where}: unknown column(s) {sorted(unknown)}; the row is named by {', '.join(ID_COLUMNS)}.")
    if len(set(header)) != len(header):
        raise UserError(f"{where} names a column twice in its header {header}; keep one of each.")
    groups: dict[tuple[str, ...], dict[tuple, tuple[float, int]]] = {}
    for line, cells in enumerate(reader, start=2):
        if not any(c.strip() for c in cells):
            continue
        if len(cells) != len(header):
            raise UserError(f"{where} line {line} has {len(cells)} cells for the {len(header)} columns of the header; "
                            f"quote cells that hold commas.")
        row = {h: c.strip() for h, c in zip(header, cells)}
        if row["Metric"] not in metrics:
            raise UserError(f"{where} line {line}: Metric '{row['Metric']}' is not one of {', '.join(metrics)}.")
        try:
            value = float(row["Value"])
        except ValueError:
            raise UserError(f"{where} line {line}: Value '{row['Value']}' is not a number.") from None
        if not math.isfinite(value):
            raise UserError(f"{where} line {line}: Value '{row['Value']}' is not a finite number; leave out the "
                            f"values the paper does not give.")
        given = tuple(c for c in ID_COLUMNS if row.get(c, ""))
        key = (row["Metric"], *(_norm(row[c]) for c in given))
        values = groups.setdefault(given, {})
        if key in values:
            first_value, first_line = values[key]
            raise UserError(f"{where} lines {first_line} and {line} both give {row['Metric']} for the same row "
                            f"({', '.join(f'{c}={row[c]}' for c in given) or 'every row'}): values {first_value:g} "
                            f"and {value:g}. Keep one line per value.")
        values[key] = (value, line)
    if not groups:
        raise UserError(f"{where} has a header but no values; add one line per value of the paper ({README}).")
    return PaperValues(path, groups)
