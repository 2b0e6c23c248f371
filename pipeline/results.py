"""The one reader of what experiments left behind: each experiment's state file (<results>/.experiments) and the
result files of its sweep (the run's metrics, attackers and diagnostics CSVs, the bare backbone's attackers CSV and
reference file). report.md (pipeline/report.py) and a plan's tables.md (pipeline/tables.py) are both made from what
this module reads; every file is read once, and the digest of its bytes says whether anything changed.
"""
from __future__ import annotations

import io
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from eval.biometrics import BARE, BARE_VERIFICATION_COLUMNS, VERIFICATION_COLUMNS
from eval.evalset import METRIC_COLUMNS
from eval.gender_leakage import WORST
from pipeline.plans import digest, safe_name
from utils.errors import UserError
from utils.io import atomic_write_text

__all__ = ["BARE_ATTACKERS_FILE", "BARE_DIAGNOSTICS_FILE", "ResultReader", "StateStore", "SweepResults"]

BARE_ATTACKERS_FILE = "bare_backbone_attackers.csv"
BARE_DIAGNOSTICS_FILE = "bare_backbone_diagnostics.csv"


class StateStore:
    """One small JSON file per experiment, ``<label>-<key>.json``, found again by its key alone (the label is for
    people). A damaged file (not JSON, not an object, no ``run``) is reported and the experiment is not done."""

    def __init__(self, folder: Path, say: Callable[[str], None] = print):
        self.folder, self.say = Path(folder), say
        if self.folder.exists() and not self.folder.is_dir():
            raise UserError(f"the plan runner's state folder '{self.folder}' is a file; it keeps one small JSON file "
                            f"per experiment. Move the file away (or give another --results folder).")

    def path(self, key: str, label: str = "") -> Path:
        found = sorted(self.folder.glob(f"*-{key}.json")) if self.folder.is_dir() else []
        return found[0] if found else self.folder / f"{safe_name(label)[:80]}-{key}.json"

    def read(self, key: str) -> dict:
        path = self.path(key)
        if not path.is_file():
            return {}
        try:
            state = json.loads(path.read_text())
            if not isinstance(state, dict) or not isinstance(state.get("run"), str):
                raise ValueError("it is not an object with a 'run' entry")
        except (OSError, ValueError) as exc:
            self.say(f"warning: state file '{path}' is damaged ({type(exc).__name__}: {exc}); its experiment is "
                     f"treated as not done and the file is replaced once the experiment has run again.")
            return {}
        if not Path(state["run"]).is_dir():   # its run folder was deleted: the experiment is done again
            return {}
        return state

    def write(self, key: str, label: str, state: dict) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.path(key, label), json.dumps(state, indent=1, default=str) + "\n")


# The sweep's result files (pipeline/sweep.py writes them; the tables and reports read them here).
# <run>_metrics.csv: the authors' columns
CSV_COLUMNS = ["Step", "Dataset", *METRIC_COLUMNS, "PIC"]
# <run>_attackers.csv, written when attackers beyond the paper's run: every attacker's balanced accuracy with its
# identity-level bootstrap interval, and a 'worst-case' row (the maximum over them, Reached-By naming the attacker)
ATTACKER_COLUMNS = ["Step", "Dataset", "Attacker", "BACC", "CI-Low", "CI-High", "Reached-By"]
BARE_ATTACKER_COLUMNS = ["Dataset", *ATTACKER_COLUMNS[2:]]
REFERENCE_COLUMNS = ["Dataset", *METRIC_COLUMNS]
# the columns each kind of file must hold to be read
NEEDED = {"metrics": CSV_COLUMNS, "attackers": ATTACKER_COLUMNS, "diagnostics": ["Step", "Dataset"],
          "bare attackers": BARE_ATTACKER_COLUMNS, "reference": REFERENCE_COLUMNS,
          "verification": VERIFICATION_COLUMNS, "bare verification": BARE_VERIFICATION_COLUMNS}
BARE_VERIFICATION_FILE = f"{BARE}_verification.csv"


def _frame(data: bytes | None, path: Path | None = None, kind: str | None = None) -> pd.DataFrame:
    """A CSV's bytes as a frame (empty cells as NaN); no bytes, no rows. A file that is not what the sweep writes
    (not a CSV, not UTF-8, columns missing, steps that are not numbers) is named, never read as something else."""
    if not data:
        return pd.DataFrame()
    redo = ("Move it away (and its experiment's state file under the results folder's .experiments) and run again: "
            "its sweep is redone.")
    try:
        frame = pd.read_csv(io.BytesIO(data), keep_default_na=False, na_values=[""], encoding="utf-8")
    except (ValueError, UnicodeDecodeError, pd.errors.ParserError) as exc:
        raise UserError(f"result file '{path}' cannot be read as a CSV ({type(exc).__name__}: {str(exc)[:160]}); it "
                        f"is not what the sweep wrote. {redo}") from None
    missing = [c for c in NEEDED.get(kind or "", []) if c not in frame.columns]
    if missing:
        raise UserError(f"result file '{path}' lacks the column(s) {missing} the sweep writes; it is not a sweep's "
                        f"{kind} file (or was edited). {redo}")
    if "Step" in frame and len(frame) and pd.to_numeric(frame["Step"], errors="coerce").isna().any():
        raise UserError(f"result file '{path}': column Step holds values that are not numbers; it is not a sweep's "
                        f"output (or was edited). {redo}")
    return frame


@dataclass
class ResultReader:
    """Reads each result file once (a reference file shared by several experiments too) and keeps its bytes for the
    digest of what a table or report was made from."""
    texts: dict[Path, bytes | None] = field(default_factory=dict)

    def bytes(self, path: Path | str | None) -> bytes | None:
        if not path:
            return None
        path = Path(path)
        if path not in self.texts:
            try:
                self.texts[path] = path.read_bytes() if path.is_file() else None
            except OSError:
                self.texts[path] = None
        return self.texts[path]

    def frame(self, path: Path | str | None, kind: str | None = None) -> pd.DataFrame:
        """The file as a frame, checked as a result file of ``kind`` (metrics, attackers, diagnostics, reference)."""
        return _frame(self.bytes(path), Path(path) if path else None, kind)

    def digest(self) -> str:
        """What was read: every file's path and bytes."""
        return digest([[str(p), (b or b"").decode("utf-8", "replace")] for p, b in sorted(self.texts.items())])

    def sweep(self, folder: Path | str, runs: Iterable[str], reference: Path | str | None = None) -> SweepResults:
        """The results of ``runs`` in a sweep folder, each run's files with a Run column."""
        folder = Path(folder)
        runs = list(runs)

        def per_run(kind: str) -> pd.DataFrame:
            frames = [f.assign(Run=run) for run in runs
                      if not (f := self.frame(folder / f"{run}_{kind}.csv", kind)).empty]
            return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
        return SweepResults(folder, runs, per_run("metrics"), per_run("attackers"), per_run("diagnostics"),
                            self.frame(folder / BARE_ATTACKERS_FILE, "bare attackers"),
                            self.frame(reference, "reference"), per_run("verification"),
                            self.frame(folder / BARE_VERIFICATION_FILE, "bare verification"))


@dataclass
class SweepResults:
    """One sweep folder's results for some of its runs."""
    folder: Path
    runs: list[str]
    metrics: pd.DataFrame
    attackers: pd.DataFrame
    diagnostics: pd.DataFrame
    bare_attackers: pd.DataFrame     # the bare backbone against every attacker (attackers beyond the paper's)
    reference: pd.DataFrame          # the bare backbone's protocol results (empty when not asked for)
    verification: pd.DataFrame = field(default_factory=pd.DataFrame)        # eval/biometrics.py's report, per run
    bare_verification: pd.DataFrame = field(default_factory=pd.DataFrame)   # and of the bare backbone

    def verification_row(self, dataset: str, run: str | None = None, step: int | None = None) -> pd.Series | None:
        """The verification report's row of a run's checkpoint on ``dataset`` (run None: the bare backbone's)."""
        table = self.bare_verification if run is None else self.verification
        if table.empty:
            return None
        hit = table[table["Dataset"] == dataset]
        if run is not None:
            hit = hit[(hit["Run"] == run) & (pd.to_numeric(hit["Step"]) == step)]
        return hit.iloc[0] if len(hit) else None

    def worst(self) -> pd.DataFrame:
        """The worst-case rows of the attackers frame, indexed by (Run, Step, Dataset)."""
        if self.attackers.empty:
            return self.attackers
        return self.attackers[self.attackers["Attacker"] == WORST].set_index(["Run", "Step", "Dataset"])

    def bare_worst(self, dataset: str) -> pd.Series | None:
        """The bare backbone's worst case on ``dataset`` (None when the sweep ran the paper's attackers only)."""
        b = self.bare_attackers
        if b.empty:
            return None
        hit = b[(b["Dataset"] == dataset) & (b["Attacker"] == WORST)]
        return hit.iloc[0] if len(hit) else None
