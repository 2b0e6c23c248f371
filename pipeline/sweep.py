"""Evaluate every checkpoint of every run of an experiment with the paper's protocol.

    python eval/evaluation.py --log-root L --model-root M --experiment-name E --reference-pth R
                              [--config PATH] [--set KEY=VALUE ...] [--force]

For every run folder under M/E (its method and settings read from its run.json; a folder without one, such as
the authors' released layers, is the paper's method) and every checkpoint in it (step order), on each of config
``test_targets`` (``rec/<name>.bin``): EER, TAR@FAR=0.1%, gender balanced accuracy of the paper's three attackers
and their mean, and PIC against the bare backbone's results in R (computed and written there first if R does not
exist). Writes ``L/E/<run>_metrics.csv`` (the authors' columns), ``L/E/<run>_attackers.csv`` (attackers beyond the
paper's, config option attackers), ``L/E/<run>_diagnostics.csv`` (what the protocol's threshold grid cannot see:
threshold-free EER, ROC AUC, grid resolution, template spread; warned about in the log and the report),
``L/E/evaluate.log``, ``L/E/report.md`` and PNG plots. Checkpoints already in a
CSV are skipped unless --force, so an interrupted sweep resumes where it stopped. The backbone runs once per
evaluation set (template cache), never once per checkpoint. The underscore spellings --log_root, --model_root,
--experiment_name, --reference_pth of the authors' README are accepted too.

The steps: ``preflight`` (names, files, every result CSV read once), ``pending_jobs`` (each (checkpoint, set) not yet
in the CSVs, a ``Job`` holding its run and checkpoint), ``evaluate_jobs`` with ``job_done`` after each job (its rows
appended to the run's CSVs), then ``finish`` (the bare backbone against every attacker, report.md). reproduce.py
sweeps exactly its experiment's run with ``evaluate_runs``.
"""
from __future__ import annotations

import argparse
import csv
import functools
import io
import logging
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, NamedTuple, Sequence


import torch
from joblib import delayed

from backbones import embedding_size_for
from backbones.spec import BackboneSpec
from config.config import Config
from eval.attackers import ATTACKERS, PAPER_ATTACKERS, expand_attackers
from eval.biometrics import RunCheckpoints, check_verification_files, sweep_verification
from eval.evalset import (METRIC_COLUMNS, EvalTemplates, SetResult, Transform, bare_scores, check_bins,
                          evaluate_set, pic, transform_scores, warn_if_below_grid, warn_if_collapsed,
                          warn_if_near_chance)
from eval.gender_folders import check_and_record_protocol, check_gender_folders, open_protocol_set
from eval.gender_leakage import WORST
from eval.verification import ScoreDiagnostics
from pipeline.report import DIAGNOSTICS, write_report
from pipeline.results import (ATTACKER_COLUMNS, BARE_ATTACKER_COLUMNS, BARE_ATTACKERS_FILE, BARE_DIAGNOSTICS_FILE,
                              CSV_COLUMNS, REFERENCE_COLUMNS)
from privacy.runs import SweptRun, check_names, find_runs
from templates.cache import TemplateCache
from templates.entry import open_written
from utils.distributed import processes
from config.loading import OVERRIDE_HELP, load_config
from utils.device import select_device
from utils.errors import UserError, run_cli
from utils.io import atomic_write_text, check_writable
from utils.logs import get_logger, log_to
from utils.workers import parallel

# <run>_diagnostics.csv, beside the authors' files: what their threshold grid cannot see (pipeline/report.py names
# the columns: threshold-free EER, ROC AUC, grid steps spanned by 90% of the pair distances, median impostor angle)
DIAGNOSTIC_COLUMNS = ["Step", "Dataset", *DIAGNOSTICS]
BARE_DIAGNOSTIC_COLUMNS = ["Dataset", *DIAGNOSTICS]
log = get_logger("pipeline.sweep")


def _fmt(v: float | None) -> str:
    return "" if v is None or not math.isfinite(v) else repr(float(v))


def _short(v: float | None) -> str:
    """A number for the log: four decimals, n/a where undefined."""
    return "n/a" if v is None or not math.isfinite(v) else f"{v:.4f}"


def _diagnostic_cells(scores: ScoreDiagnostics) -> dict[str, str]:
    return dict(zip(DIAGNOSTICS, (_fmt(scores.eer_exact), _fmt(scores.auc), _fmt(scores.grid_steps),
                                  _fmt(scores.impostor_angle))))


class ResultFile:
    """One of the sweep's CSVs: read once (a file with another header is refused, never overwritten; a last line cut
    by a kill is dropped, its row computed again), then grown as jobs finish: new rows are appended, so the cost is
    linear in the rows; a row replacing one already there (--force) rewrites the file once, atomically, from the
    rows held here. The bytes equal those of writing every row at once in the order they came."""

    def __init__(self, path: Path, columns: list[str], key: tuple[str, ...], what: str):
        self.path, self.columns, self.key, self.what = Path(path), columns, key, what
        self.rows: dict[tuple[str, ...], dict[str, str]] = {}
        if not self.path.is_file():
            return
        text = self.path.read_text()
        reader = csv.DictReader(io.StringIO(text))
        if reader.fieldnames != columns:
            raise UserError(f"{what} '{path}' has the columns {reader.fieldnames}, expected {columns}. It is not "
                            f"one of this tool's files: move it away or choose another --log-root.")
        if not text.endswith("\n"):   # a row cut by a kill while it was appended: it is computed again
            text = text[:text.rfind("\n") + 1]
            atomic_write_text(self.path, text)
            log.warning("%s '%s': its last line was cut (an interrupted write); that row is computed again", what,
                        path)
            reader = csv.DictReader(io.StringIO(text))
        for row in reader:
            self.rows[self._key(row)] = row

    def _key(self, row: dict[str, str]) -> tuple[str, ...]:
        return tuple(row[k] for k in self.key)

    def __contains__(self, key: tuple[str, ...]) -> bool:
        return key in self.rows

    def get(self, key: tuple[str, ...]) -> dict[str, str] | None:
        return self.rows.get(key)

    def _render(self, rows: Iterable[dict[str, str]], header: bool) -> str:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=self.columns, lineterminator="\n")
        if header:
            writer.writeheader()
        writer.writerows(rows)
        return buf.getvalue()

    def add(self, rows: list[dict[str, str]], only_if_changed: bool = False,
            drop: Callable[[dict[str, str]], bool] | None = None) -> None:
        """Add rows, replacing those with the same key (and, with ``drop``, every row it selects); the new rows go
        to the end in the order they come. With ``only_if_changed`` the file is not written when its content would
        stay the same."""
        rows = [{k: r[k] for k in self.columns} for r in rows]
        keys = [self._key(r) for r in rows]
        before = self._render(self.rows.values(), True) if only_if_changed else None
        dropped = [k for k, r in self.rows.items() if drop is not None and drop(r)]
        replacing = bool(dropped) or any(k in self.rows for k in keys)
        for k in dropped:
            del self.rows[k]
        for k, r in zip(keys, rows):
            self.rows.pop(k, None)
            self.rows[k] = r
        if self.path.is_file() and not replacing:
            with open(self.path, "a", newline="") as fh:   # one write: a kill leaves whole rows or a cut last line
                fh.write(self._render(rows, False))
            return
        text = self._render(self.rows.values(), True)
        if not (only_if_changed and self.path.is_file() and text == before):
            atomic_write_text(self.path, text)


def read_reference(path: Path, targets: list[str]) -> dict[str, dict[str, float]]:
    """The bare backbone's metrics per dataset; a missing column, row or number is a clear error."""
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        missing_cols = [c for c in ("Dataset", "EER", *METRIC_COLUMNS[2:5]) if c not in (reader.fieldnames or [])]
        if missing_cols:
            raise UserError(f"reference file '{path}' (--reference-pth) lacks the column(s) {missing_cols}; it needs "
                            f"Dataset, EER and the three BACC-Gender columns. Delete or move it to have it recomputed.")
        rows = {r["Dataset"]: r for r in reader}
    out = {}
    for name in targets:
        if name not in rows:
            raise UserError(f"reference file '{path}' has no row for dataset '{name}' (it has {sorted(rows)}). Add the "
                            f"bare backbone's results for it, or move the file away to have all rows recomputed.")
        vals = {}
        for col in METRIC_COLUMNS:
            raw = rows[name].get(col, "")
            try:
                vals[col] = float(raw) if raw not in ("", None) else float("nan")
            except ValueError:
                raise UserError(f"reference file '{path}', dataset '{name}', column '{col}': '{raw}' is not a "
                                f"number.") from None
            if col in ("EER", *METRIC_COLUMNS[2:5]) and not math.isfinite(vals[col]) and raw not in ("", None):
                raise UserError(f"reference file '{path}', dataset '{name}', column '{col}' is {raw}.")
        out[name] = vals
    return out


class Task(NamedTuple):
    """One (transform, set) to evaluate: ``load`` gives the transform (None: the bare backbone); ``source``, the
    checkpoint it comes from, is named by errors about its templates."""
    load: Callable[[], Transform | None]
    ev: EvalTemplates
    source: Path | None = None


def _plugin_modules(plugins: Sequence[str]) -> list:
    """The imported modules of the plug-ins: their classes (a method's transform) are sent to workers by value,
    since a plug-in file's module name is private to the process that imported it."""
    files = {Path(p).resolve() for p in plugins if p.endswith(".py")}
    return [m for m in list(sys.modules.values()) if m is not None and (
        getattr(m, "__name__", None) in plugins
        or ((where := getattr(m, "__file__", None)) and Path(where).resolve() in files))]


def _evaluate_in_worker(factories: dict, name: str, folder: Path, labels: tuple, transform: Transform | None,
                        source: Path | None, gender_folds: int, attackers: tuple[str, ...], seed: int,
                        bootstrap: int) -> SetResult:
    """One (checkpoint, set) in a joblib worker: the parent's attacker factories registered (whatever registered
    them there: a plug-in, a notebook, a test), the set's cache entry reopened as a memory map (never copied through
    the pipe), its attackers and folds fitted one after another."""
    ATTACKERS.update(factories)
    ev = EvalTemplates(name, open_written(folder), *labels)   # the parent holds it open: it is complete
    return evaluate_set(ev, transform, gender_folds, attackers, seed, bootstrap, 1, source)


def evaluate_all(tasks: Sequence[Task | tuple], gender_folds: int, attackers: Sequence[str], seed: int, bootstrap: int,
                 n_jobs: int, device: torch.device = torch.device("cpu"), plugins: Sequence[str] = ()
                 ) -> Iterator[SetResult]:
    """evaluate_set of every (transform, set), in order, each as soon as it and those before it are done.

    With ``n_jobs`` 1 each runs here as it always has. Otherwise the tasks run on ``n_jobs`` joblib workers (-1:
    all cores), each fitting its attackers and folds itself: every fit is seeded and independent, so the results
    do not depend on ``n_jobs``; joblib's workers limit their own BLAS/OpenMP threads to their share of the cores,
    so nothing is oversubscribed. Transforms on a GPU stay in this process (one CUDA context); their attackers and
    folds then run on the workers instead.
    """
    attackers = tuple(attackers)
    pending = [Task(*t) for t in tasks]   # (load, set) pairs too
    if n_jobs == 1 or device.type != "cpu":
        for t in pending:
            yield evaluate_set(t.ev, t.load(), gender_folds, attackers, seed, bootstrap, n_jobs, t.source)
        return
    import cloudpickle   # what joblib's process pool pickles with
    for module in _plugin_modules(plugins):
        cloudpickle.register_pickle_by_value(module)
    factories = {k: ATTACKERS[k] for k in expand_attackers(attackers)}
    calls = (delayed(_evaluate_in_worker)(factories, t.ev.name, t.ev.templates.path,
                                          (t.ev.issame, t.ev.id_labels, t.ev.gender_labels), t.load(), t.source,
                                          gender_folds, attackers, seed, bootstrap) for t in pending)
    yield from parallel(n_jobs, return_as="generator")(calls)


def compute_reference(path: Path, sets: list[EvalTemplates], gender_folds: int,
                      n_jobs: int = 1) -> dict[str, dict[str, float]]:
    """Evaluate the bare backbone on each set with the paper's attackers and write the reference CSV (atomically);
    a near-chance EER is warned about."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=REFERENCE_COLUMNS, lineterminator="\n")
    writer.writeheader()
    out = {}
    results = evaluate_all([Task(lambda: None, ev) for ev in sets], gender_folds, PAPER_ATTACKERS, 0, 0, n_jobs)
    for ev, res in zip(sets, results):
        m = res.metrics
        warn_if_near_chance(ev.name, m["EER"], log)
        out[ev.name] = m
        writer.writerow({"Dataset": ev.name, **{c: _fmt(m[c]) for c in METRIC_COLUMNS}})
    atomic_write_text(path, buf.getvalue())
    return out


def bare_backbone_attacks(file: ResultFile, sets: list[EvalTemplates], attackers: tuple[str, ...], gender_folds: int,
                          seed: int, bootstrap: int, n_jobs: int) -> None:
    """The bare backbone against every attacker (with intervals and the worst case), for the report's first row and
    the plan's tables; kept in ``file`` and computed only for sets or attackers it lacks."""
    todo = [ev for ev in sets if len(ev.gender_labels) and any((ev.name, a) not in file for a in (*attackers, WORST))]
    for ev, res in zip(todo, evaluate_all([Task(lambda: None, ev) for ev in todo], gender_folds, attackers, seed,
                                          bootstrap, n_jobs)):
        _, extra = _rows(0, ev, res, {})
        file.add(extra, drop=functools.partial(_of_set, ev.name))   # the set's rows, all made anew


def _of_set(name: str, row: dict[str, str]) -> bool:
    """Whether a results row is of the evaluation set ``name``."""
    return row["Dataset"] == name


def _rows(step: int, ev: EvalTemplates, res: SetResult, ref: dict[str, float]) -> tuple[dict, list[dict]]:
    """The metrics-CSV row (the authors' columns) and the attackers-CSV rows (each attacker and the worst case)."""
    row = {"Step": str(step), "Dataset": ev.name, **{c: _fmt(res[c]) for c in METRIC_COLUMNS},
           "PIC": _fmt(pic(res, ref)) if ref else ""}
    leak = res.leakage
    if leak is None:
        return row, []
    key = {"Step": str(step), "Dataset": ev.name}
    extra = [{**key, "Attacker": k, "BACC": _fmt(leak.bacc[k]), "CI-Low": _fmt(leak.ci_low[k]),
              "CI-High": _fmt(leak.ci_high[k]), "Reached-By": ""} for k in leak.attackers]
    extra.append({**key, "Attacker": WORST, "BACC": _fmt(leak.worst_bacc), "CI-Low": _fmt(leak.worst_ci_low),
                  "CI-High": _fmt(leak.worst_ci_high), "Reached-By": leak.worst_attacker})
    return row, extra


@dataclass
class RunFiles:
    """A run's result files: the metrics (the authors' columns), attackers and score-diagnostics CSVs."""
    metrics: ResultFile
    attackers: ResultFile
    diagnostics: ResultFile

    @classmethod
    def open(cls, out_dir: Path, run: SweptRun) -> "RunFiles":
        def file(kind: str, columns: list[str], key: tuple[str, ...]) -> ResultFile:
            return ResultFile(out_dir / f"{run.name}_{kind}.csv", columns, key, f"{kind} file")
        return cls(file("metrics", CSV_COLUMNS, ("Step", "Dataset")),
                   file("attackers", ATTACKER_COLUMNS, ("Step", "Dataset", "Attacker")),
                   file("diagnostics", DIAGNOSTIC_COLUMNS, ("Step", "Dataset")))


@dataclass
class Sweep:
    """What pre-flight established: the runs and sets to evaluate, where results go (each result file read once,
    foreign ones refused), which attackers run."""
    cfg: Config
    out_dir: Path
    reference: Path
    runs: list[SweptRun]
    targets: list[str]
    backbone: BackboneSpec
    attackers: tuple[str, ...]
    beyond: bool        # attackers beyond the paper's: the attackers CSV (intervals, worst case) is written too
    bootstrap: int
    force: bool
    files: dict[str, RunFiles] = field(default_factory=dict)   # run name -> its result files
    # the bare backbone's result files, opened with the runs' by open_result_files (preflight) before any use
    bare_attackers: ResultFile = field(init=False)
    bare_diagnostics: ResultFile = field(init=False)


@dataclass
class Job:
    """One (checkpoint, set) of a run to evaluate: in full, or (``scores_only``) only its score diagnostics, for a
    checkpoint swept before the diagnostics existed."""
    run: SweptRun
    step: int
    checkpoint: Path
    ev: EvalTemplates
    scores_only: bool = False


def preflight(cfg: Config, out_dir: str | Path, run_base: str | Path, reference: str | Path, force: bool,
              names: Sequence[str] | None = None) -> Sweep:
    """Check names, evaluation files, weights, folders and every existing CSV before any compute. The runs are the
    folders under ``run_base`` (those of ``names`` when given); results go to ``out_dir``."""
    check_names(cfg)
    cfg = embedding_size_for(cfg)   # the template size the backbone weights produce
    out_dir, reference = Path(out_dir), Path(reference)
    runs = find_runs(Path(run_base), cfg, names)
    targets = list(cfg.test_targets)
    if not targets:
        raise UserError("config option test_targets is empty: name at least one rec/<name>.bin to evaluate on.")
    check_bins(cfg.rec, targets, "config options rec, test_targets",
               "choose targets with --set test_targets=\"['lfw']\"")
    folders = check_gender_folders(cfg, targets)   # gender_protocol=folders: each target's folder, both genders
    backbone = BackboneSpec.from_config(cfg)
    backbone.check()
    check_writable(out_dir, "--log-root")
    if reference.exists() and not reference.is_file():
        raise UserError(f"--reference-pth '{reference}' is a folder, not a file: it names the CSV of the bare "
                        f"backbone's results (read if it exists, else computed and written), e.g. "
                        f"--reference-pth {reference / 'reference.csv'}.")
    if not reference.is_file():
        check_writable(reference.parent if str(reference.parent) else Path("."), "--reference-pth")
    attackers = expand_attackers(cfg.attackers)
    # the default sweep costs what the paper's protocol costs and writes the authors' files (and the diagnostics)
    beyond = set(attackers) != set(PAPER_ATTACKERS)
    sweep = Sweep(cfg, out_dir, reference, runs, targets, backbone, attackers, beyond,
                  cfg.bootstrap if beyond else 0, force)
    open_result_files(sweep)
    check_and_record_protocol(cfg, out_dir, reference, targets, folders)   # one gender-test protocol per folder
    return sweep


def open_result_files(sweep: Sweep) -> None:
    """Read every CSV the sweep adds rows to, once: each is one of ours (or absent); a foreign one is refused, not
    overwritten."""
    sweep.bare_attackers = ResultFile(sweep.out_dir / BARE_ATTACKERS_FILE, BARE_ATTACKER_COLUMNS,
                                      ("Dataset", "Attacker"), "bare-backbone attackers file")
    sweep.bare_diagnostics = ResultFile(sweep.out_dir / BARE_DIAGNOSTICS_FILE, BARE_DIAGNOSTIC_COLUMNS, ("Dataset",),
                                        "bare-backbone diagnostics file")
    sweep.files = {run.name: RunFiles.open(sweep.out_dir, run) for run in sweep.runs}
    check_verification_files(sweep.out_dir, [run.name for run in sweep.runs])


def reference_results(sweep: Sweep, sets: list[EvalTemplates], lg: logging.Logger
                      ) -> tuple[dict[str, dict[str, float]], bool]:
    """The bare backbone's protocol results: read from --reference-pth, or computed and written there (True)."""
    if sweep.reference.is_file():
        ref = read_reference(sweep.reference, sweep.targets)
        lg.info("reference results read from %s", sweep.reference)
        for name, m in ref.items():
            warn_if_near_chance(name, m["EER"], lg)
        return ref, False
    ref = compute_reference(sweep.reference, sets, sweep.cfg.gender_folds, sweep.cfg.n_jobs)
    lg.info("reference file %s did not exist: computed the bare backbone's results with the same protocol and "
            "wrote them there", sweep.reference)
    return ref, True


def bare_backbone_scores(sweep: Sweep, sets: list[EvalTemplates], ref: dict[str, dict[str, float]],
                         lg: logging.Logger) -> dict[str, ScoreDiagnostics]:
    """The bare backbone's score diagnostics per set (cheap: verification only), logged, warned about and kept in
    bare_backbone_diagnostics.csv (rewritten only when they change)."""
    scores = {ev.name: bare_scores(ev) for ev in sets}
    rows = [{"Dataset": name, **_diagnostic_cells(sc)} for name, sc in scores.items()]
    for name, sc in scores.items():
        lg.info("bare backbone on %s: threshold-free EER %.4f, AUC %.4f, spread (median impostor angle) %.1f "
                "degrees", name, sc.eer_exact, sc.auc, sc.impostor_angle)
        warn_if_below_grid(f"bare backbone on '{name}'", ref[name]["EER"], sc, lg)
    sweep.bare_diagnostics.add(rows, only_if_changed=True)
    return scores


def pending_jobs(sweep: Sweep, sets: list[EvalTemplates], lg: logging.Logger) -> list[Job]:
    """Every (checkpoint, set) not yet in its run's CSVs (all of them with --force), in run and step order."""
    jobs: list[Job] = []
    for run in sweep.runs:
        files = sweep.files[run.name]
        lg.info("run %s: %s%s", run.name, run.settings, "" if run.described else " (no run.json: the paper's "
                "method with this sweep's settings)")
        for step, ckpt in run.checkpoints:
            full = [ev for ev in sets if sweep.force or (str(step), ev.name) not in files.metrics
                    or (sweep.beyond and any((str(step), ev.name, a) not in files.attackers
                                             for a in (*sweep.attackers, WORST)))]
            scores = [ev for ev in sets if ev not in full and (str(step), ev.name) not in files.diagnostics]
            if not full and not scores:
                lg.info("%s step %d: already in %s, skipped (use --force to recompute)", run.name, step,
                        files.metrics.path.name)
            jobs += [Job(run, step, ckpt, ev) for ev in full] + [Job(run, step, ckpt, ev, True) for ev in scores]
    return jobs


def evaluate_jobs(sweep: Sweep, jobs: list[Job], ref: dict[str, dict[str, float]],
                  bare: dict[str, ScoreDiagnostics], device: torch.device, lg: logging.Logger) -> bool:
    """Evaluate the jobs (the full ones on joblib workers when n_jobs > 1), each job's rows written as soon as it is
    done (``job_done``); True when anything was written."""
    cfg = sweep.cfg

    methods = {run.name: run.method for run in sweep.runs}

    @functools.lru_cache(maxsize=1)   # a checkpoint's sets are consecutive: each checkpoint is loaded once
    def load(run: str, ckpt: Path) -> Transform:
        return methods[run].load_transform(ckpt).to(device)
    for job in (j for j in jobs if j.scores_only):   # cheap: verification only, here
        scores = transform_scores(job.ev, load(job.run.name, job.checkpoint))
        eer = sweep.files[job.run.name].metrics.get((str(job.step), job.ev.name))   # the protocol's, swept before
        _write_diagnostics(sweep, job, scores, bare, lg, float(eer["EER"]) if eer else math.nan)
    full = [j for j in jobs if not j.scores_only]
    tasks = [Task(functools.partial(load, j.run.name, j.checkpoint), j.ev, j.checkpoint) for j in full]
    results = evaluate_all(tasks, cfg.gender_folds, sweep.attackers, cfg.seed, sweep.bootstrap, cfg.n_jobs, device,
                           cfg.plugins)
    for job, res in zip(full, results):
        job_done(sweep, job, res, ref[job.ev.name], bare, lg)
    return bool(jobs)


def job_done(sweep: Sweep, job: Job, res: SetResult, ref: dict[str, float], bare: dict[str, ScoreDiagnostics],
             lg: logging.Logger) -> None:
    """The step after each evaluated (checkpoint, set): its rows of the run's metrics, attackers and diagnostics
    CSVs, and its log lines."""
    files = sweep.files[job.run.name]
    row, extra = _rows(job.step, job.ev, res, ref)
    files.metrics.add([row])
    if sweep.beyond and extra:
        files.attackers.add(extra)
    lg.info("%s step %d %s: EER %.4f TAR %.4f BACC-AVG %s PIC %s", job.run.name, job.step, job.ev.name,
            res["EER"], res["TAR@FAR=0.1%"], _short(res["BACC-Gender-AVG"]), _short(pic(res, ref) if ref else None))
    scores = res.scores
    assert scores is not None, "evaluate_set always computes the score diagnostics"
    _write_diagnostics(sweep, job, scores, bare, lg, res["EER"])


def _write_diagnostics(sweep: Sweep, job: Job, scores: ScoreDiagnostics, bare: dict[str, ScoreDiagnostics],
                       lg: logging.Logger, eer: float) -> None:
    """A job's row of <run>_diagnostics.csv, its log line, and the grid and collapse warnings (``eer``: the
    protocol's)."""
    run, name = job.run, job.ev.name
    sweep.files[run.name].diagnostics.add([{"Step": str(job.step), "Dataset": name, **_diagnostic_cells(scores)}])
    lg.info("%s step %d %s: threshold-free EER %.4f AUC %.4f, spread (median impostor angle) %.1f degrees (bare "
            "backbone %.1f)", run.name, job.step, name, scores.eer_exact, scores.auc, scores.impostor_angle,
            bare[name].impostor_angle)
    where = f"{run.name} step {job.step} ({job.checkpoint.name}) on '{name}'"
    warn_if_below_grid(where, eer, scores, lg)
    warn_if_collapsed(where, scores.impostor_angle, bare[name].impostor_angle, lg)


def finish(sweep: Sweep, sets: list[EvalTemplates], ref: dict[str, dict[str, float]],
           bare: dict[str, ScoreDiagnostics], changed: bool, lg: logging.Logger) -> None:
    """The step after all jobs: the bare backbone against every attacker (attackers beyond the paper's), then
    report.md and the plots when anything changed or the report is missing."""
    cfg = sweep.cfg
    if sweep.beyond:
        bare_backbone_attacks(sweep.bare_attackers, sets, sweep.attackers, cfg.gender_folds, cfg.seed,
                              sweep.bootstrap, cfg.n_jobs)
    if changed or not (sweep.out_dir / "report.md").is_file():
        report = write_report(sweep.out_dir, sweep.runs, ref, sets, cfg.gender_folds, bare)
        lg.info("report: %s", report)
    else:
        lg.info("nothing new: %s and the plots are up to date", sweep.out_dir / "report.md")


def evaluate(cfg: Config, log_root: str | Path, model_root: str | Path, experiment: str, reference: str | Path,
             force: bool = False) -> Path | None:
    """Sweep every run of an experiment folder (eval/evaluation.py): the runs under M/E, results in L/E; returns
    that folder (None in the torchrun processes other than 0, which only extract their shares of the templates)."""
    return evaluate_runs(cfg, Path(log_root) / experiment, Path(model_root) / experiment, reference, force)


def evaluate_runs(cfg: Config, out_dir: str | Path, run_base: str | Path, reference: str | Path, force: bool = False,
                  names: Sequence[str] | None = None) -> Path | None:
    """Sweep the runs under ``run_base`` (those of ``names`` when given: reproduce.py sweeps exactly its
    experiment's run) into ``out_dir``; returns it (None in torchrun processes other than 0). Nothing here needs
    gradients: they are off for every entry."""
    with torch.set_grad_enabled(False):
        return _sweep(preflight(cfg, out_dir, run_base, reference, force, names))


def _sweep(sweep: Sweep) -> Path | None:
    cfg = sweep.cfg   # embedding_size as the backbone weights say
    device = select_device(cfg.device)
    with processes(device) as procs:
        device = procs.device(device)
        cache = TemplateCache.from_config(cfg, device, procs, sweep.backbone)
        if not procs.main:   # the other processes extract their shares of the sets' templates, nothing else
            for name in sweep.targets:
                open_protocol_set(cache, cfg, name)
            procs.leave()
            return None
        with log_to(sweep.out_dir / "evaluate.log", log.name) as lg:
            lg.info("evaluating %d run(s) of %s on %s with attackers %s", len(sweep.runs), sweep.out_dir,
                    ", ".join(sweep.targets), ", ".join(sweep.attackers))
            if procs.world > 1:
                lg.info("torchrun: %d processes share the template extraction; process 0 then sweeps alone",
                        procs.world)
            sets = [open_protocol_set(cache, cfg, name) for name in sweep.targets]
            procs.leave()   # the sweep runs in this process alone
            ref, changed = reference_results(sweep, sets, lg)
            bare = bare_backbone_scores(sweep, sets, ref, lg)
            changed |= evaluate_jobs(sweep, pending_jobs(sweep, sets, lg), ref, bare, device, lg)
            changed |= sweep_verification(sweep.out_dir, cfg.rec, sets, [RunCheckpoints(
                run.name, run.checkpoints, run.method.load_transform) for run in sweep.runs], sweep.force, cfg.seed,
                cfg.bootstrap, lg)
            finish(sweep, sets, ref, bare, changed, lg)
    return sweep.out_dir


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, epilog=OVERRIDE_HELP,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--log-root", "--log_root", dest="log_root", required=True,
                        help="folder for the CSVs, evaluate.log, report.md and plots (under L/E)")
    parser.add_argument("--model-root", "--model_root", dest="model_root", required=True,
                        help="folder holding E/<run>/{step}ftn_layers.pth, e.g. checkpoint_root/ArcFace")
    parser.add_argument("--experiment-name", "--experiment_name", dest="experiment_name", required=True,
                        help="experiment sub-path, e.g. OneDataset/ColorFeret")
    parser.add_argument("--reference-pth", "--reference_pth", dest="reference_pth", required=True,
                        help="CSV of the bare backbone's results; computed and written if it does not exist")
    parser.add_argument("--config", default=None, help="config module (default: config/config.py)")
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", help="override config options")
    parser.add_argument("--force", action="store_true", help="recompute checkpoints already in the CSVs")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def body() -> None:
        cfg = load_config(args.config, args.set)
        out = evaluate(cfg, args.log_root, args.model_root, args.experiment_name, args.reference_pth, args.force)
        if out is not None:   # process 0 (the others of a torchrun only extracted)
            print(f"results: {out}")
    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
