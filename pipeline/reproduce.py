"""Reproduce the paper in one command: run every experiment of a plan (plans/<name>.py), resumably, then write its
tables and figures.

    python reproduce.py PLAN [--set KEY=VALUE ...] [--dry-run] [--shard K/N] [--jobs N] [--devices cuda:0,cuda:1]
                             [--results work_dirs/results] [--paper-values CSV] [--released DIR] [--mapping CSV]

An experiment is its settings and run folder -> its run -> its sweep -> rows of the plan's tables. It trains through
finetune.py's code (pipeline.train) and is swept through eval/evaluation.py's (pipeline.sweep), so its checkpoints,
CSVs, report and template cache entries are those of the two commands: its run in
checkpoint_root/<pretrained>/<experiment>/<data>/<run>, its sweep (that run alone) in a folder of its own,
<results>/<pretrained>/<setting>/<data>/<run>/. Experiments are matched to earlier work by their settings (a hash of
every option that changes results, the runtime-only and folder-naming ones left out), never by folder names: a
finished one is skipped, one interrupted in training resumes from its last resume state, one interrupted in its
sweep resumes per checkpoint, and a finished run that finetune.py made with the same settings (its run.json) is
adopted instead of trained again. Its state is kept in <results>/.experiments/<label>-<hash>.json and checked before
use: a recorded run whose run.json holds other settings is trained again, recorded results that are gone are swept
again. Tables and figures go to <results>/<plan>/.

--shard K/N runs a deterministic share of the plan (N processes, machines or job-array tasks sharing the folders);
--jobs N runs N shares at once on this machine; --devices gives each share its own device. Every experiment is
seeded and independent, so the results do not depend on the split. --dry-run lists every experiment with its state,
every missing input and the images to extract, and exits with status 1 when an input is missing, computing nothing.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

import torch
from tqdm import tqdm

from backbones.spec import BackboneSpec
from config.loading import OVERRIDE_HELP
from eval.evalset import METRIC_COLUMNS
from eval.gender_folders import protocol_lines, protocol_tag
from facedata.dataset import scan_training_data
from pipeline import sweep as sweep_mod
from pipeline import train as train_mod
from pipeline.paper_values import read_paper_values
from pipeline.plans import Experiment, Plan, digest, inputs, load_plan, safe_name, settings, training_key
from pipeline.released import released_experiments, stage
from pipeline.results import StateStore
from pipeline.tables import write_outputs
from privacy import get_method
from privacy.layer_training import RESUME_FILE
from privacy.runs import RUN_FILE, choose_run_folders, read_run_config
from utils.errors import UserError, run_cli
from utils.io import safe_torch_load
from utils.logs import get_logger
from templates.cache import ExtractionSettings, TemplateCache, index_inputs, open_entry

log = get_logger("pipeline.reproduce")
PAPER_METRICS = [*METRIC_COLUMNS, "PIC"]   # what --paper-values may name (the tables' metric columns)
__all__ = ["StateStore", "run_experiment", "sweep_folder", "adoptable_run", "run_plan", "select_shard", "status",
           "dry_run", "main"]


# ---------------------------------------------------------------------------------------------------------------
# each experiment: its run (trained, resumed or adopted) and its own sweep
# ---------------------------------------------------------------------------------------------------------------
def reference_path(exp: Experiment, results: Path) -> Path:
    """The bare backbone's results for the experiment's evaluation sets, shared by the experiments of that backbone."""
    cfg = exp.cfg
    values = settings(cfg)
    keys = ("network", "SE", "output_ori", "embedding_size", "cache_dtype", "gender_folds", "rec", "plugins")
    own = sorted(k for k in values if k.startswith(f"{cfg.network}."))   # a network's own options (onnx.model, ...)
    backbone = digest({k: values.get(k) for k in (*keys, *own)})
    name = f"reference_{'+'.join(cfg.test_targets)}-{backbone[:8]}{protocol_tag(cfg)}.csv"
    return Path(results) / cfg.pretrained / name


def sweep_folder(exp: Experiment, results: Path, run: Path) -> Path:
    """The experiment's own sweep folder, <results>/<pretrained>/<setting>/<data>/<run>: its run's CSVs, report.md
    and plots, and nothing of another experiment's runs."""
    cfg = exp.cfg
    return Path(results) / cfg.pretrained / (exp.setting + protocol_tag(cfg)) / cfg.data / run.name   # one per protocol


def run_mismatch(exp: Experiment, run: Path) -> str:
    """Why the run folder is not this experiment's training ('' when it is): its run.json must hold the
    experiment's settings."""
    try:
        recorded = read_run_config(run)
    except UserError as exc:
        return str(exc)
    if recorded is None:
        return f"'{run}' has no {RUN_FILE}"
    if training_key(recorded) != exp.key:
        return f"the {RUN_FILE} of '{run}' holds other settings (settings hash {training_key(recorded)}, not {exp.key})"
    return ""


def run_finished(exp: Experiment, run: Path) -> bool:
    """A run whose training ended: its resume state at the last epoch, or (methods fit in one go) checkpoints and no
    resume state."""
    method = get_method(exp.cfg.method)(exp.cfg)
    if (run / RESUME_FILE).is_file():
        try:
            state = safe_torch_load(run / RESUME_FILE, "resume state")
        except UserError:
            return False
        return isinstance(state, dict) and state.get("epoch", 0) >= exp.cfg.num_epoch
    return bool(method.list_checkpoints(run))


def adoptable_run(exp: Experiment) -> Path | None:
    """A finished run (made by finetune.py, or by an earlier plan whose state is gone) whose run.json holds the
    experiment's settings: checkpoint_root/<pretrained>/<any experiment folder>/<data>/<run>."""
    cfg = exp.cfg
    base = Path(cfg.checkpoint_root) / cfg.pretrained
    if not base.is_dir():
        return None
    for folder in sorted(base.iterdir()):
        data = folder / cfg.data
        if not data.is_dir():
            continue
        for run in sorted(p for p in data.iterdir() if (p / RUN_FILE).is_file()):
            if not run_mismatch(exp, run) and run_finished(exp, run):
                return run
    return None


def checked_state(exp: Experiment, store: StateStore, say: Callable[[str], None] = lambda _: None) -> dict:
    """The experiment's state, once what it records is checked: a run folder whose run.json holds other settings is
    not this experiment's (trained again, said by name); a sweep whose files are gone is done again."""
    state = store.read(exp.key)
    if not state or exp.released:
        return state
    why = run_mismatch(exp, Path(state["run"])) if (Path(state["run"]) / RUN_FILE).is_file() or \
        state.get("trained") else ""
    if why:
        say(f"[reproduce] {exp.name}: its state file names run '{state['run']}', but {why}; the experiment is "
            f"trained again in a folder of its own.")
        return {}
    kept = {}
    for key, sw in state.get("sweeps", {}).items():
        files = [Path(sw.get("folder", "")) / f"{sw.get('run', '')}_metrics.csv", Path(sw.get("reference", ""))]
        if all(f.is_file() for f in files):
            kept[key] = sw
        elif key == exp.sweep_key:
            say(f"[reproduce] {exp.name}: its recorded results ({files[0]}) are gone; it is swept again.")
    state["sweeps"] = kept
    return state


def run_experiment(exp: Experiment, store: StateStore, results: Path,
                   reference: Callable[[Experiment], Path] | None = None) -> dict:
    """Train (or resume, or adopt a finished run of the same settings) and sweep one experiment unless its state
    says it was done; its sweep covers its own run alone, in its own folder. Returns its state."""
    cfg = exp.cfg
    state = checked_state(exp, store, tqdm.write)
    label = exp.name
    if exp.released:
        if not state:
            state = {"label": label, "run": str(stage(exp)), "trained": True}
            store.write(exp.key, label, state)
    elif not state.get("trained"):
        run = Path(state["run"]) if state.get("run") else None
        adopted = adoptable_run(exp) if run is None else None
        if adopted is not None:
            tqdm.write(f"[reproduce] {exp.name}: adopted the finished run '{adopted}' (its {RUN_FILE} holds this "
                       f"experiment's settings); not trained again")
            state = {"label": label, "run": str(adopted), "logs": "", "trained": True, "adopted": True}
            store.write(exp.key, label, state)
        else:
            if run is not None and (run / RESUME_FILE).is_file():
                run_cfg = dataclasses.replace(cfg, output=str(run), log_output=state["logs"], resume=True)
            else:   # a new run folder (a fit interrupted without a resume state is started again, beside the old one)
                folders = choose_run_folders(dataclasses.replace(cfg, resume=False), get_method(cfg.method)(cfg))
                run_cfg = dataclasses.replace(cfg, output=str(folders.checkpoints), log_output=str(folders.logs),
                                              resume=False)
                state = {"label": label, "run": str(folders.checkpoints), "logs": str(folders.logs), "trained": False}
                store.write(exp.key, label, state)
            result = train_mod.train(run_cfg)
            assert result is not None, "reproduce.py trains in one process (process 0), to which train returns the run"
            state.update(run=str(result.checkpoint_dir), logs=str(result.log_dir), trained=True, step=result.step)
            store.write(exp.key, label, state)
    if exp.sweep_key not in state.get("sweeps", {}):
        run = Path(state["run"])
        ref = (reference or (lambda e: reference_path(e, results)))(exp)
        out = sweep_folder(exp, results, run)
        sweep_mod.evaluate_runs(cfg, out, run.parent, ref, names=[run.name])
        state.setdefault("sweeps", {})[exp.sweep_key] = {"folder": str(out), "run": run.name, "reference": str(ref)}
        store.write(exp.key, label, state)
    return state


def status(exp: Experiment, store: StateStore) -> str:
    """done, partly (started, trained, or swept with other evaluation settings) or to do."""
    state = checked_state(exp, StateStore(store.folder, lambda _: None))   # damage is reported when it runs
    if not state:
        return "to do"
    return "done" if exp.sweep_key in state.get("sweeps", {}) and state.get("trained") else "partly"


# ---------------------------------------------------------------------------------------------------------------
# the plan: unique experiments, shares, inputs
# ---------------------------------------------------------------------------------------------------------------
def unique(experiments: list[Experiment]) -> list[Experiment]:
    """One experiment per key (a plan may name the same training twice, e.g. the ablation's default point)."""
    seen: dict[tuple[str, str], Experiment] = {}
    for exp in experiments:
        seen.setdefault((exp.key, exp.sweep_key), exp)
    return list(seen.values())


def select_shard(experiments: list[Experiment], k: int, n: int) -> list[Experiment]:
    """Share k (1-based) of n: whole groups (same backbone and training data, so one process extracts their
    templates) dealt round-robin in plan order, or single experiments when there are fewer groups than shares."""
    groups: dict[tuple, list[Experiment]] = {}
    for exp in experiments:
        groups.setdefault(exp.group, []).append(exp)
    if n <= len(groups):
        return [e for i, g in enumerate(groups.values()) if i % n == k - 1 for e in g]
    return [e for i, e in enumerate(experiments) if i % n == k - 1]


def parse_shard(text: str | None) -> tuple[int, int]:
    if text is None:
        return 1, 1
    try:
        k, n = (int(x) for x in text.split("/"))
    except ValueError:
        k = n = 0
    if not 1 <= k <= n:
        raise UserError(f"--shard {text}: expected K/N with 1 <= K <= N, e.g. --shard 2/4 (the second of four "
                        f"shares; a SLURM job array passes --shard "
                        f"$((SLURM_ARRAY_TASK_ID+1))/$SLURM_ARRAY_TASK_COUNT).")
    return k, n


def missing_inputs(plan: Plan) -> dict[Path, tuple[str, str, list[str]]]:
    """Every input of the plan that is not there: path -> (what, README section, experiments needing it)."""
    made = plan.generated_root
    out: dict[Path, tuple[str, str, list[str]]] = {}
    for exp in plan.experiments:
        for what, path, section in inputs(exp):
            if path.exists() or (made is not None and _under(path, made)):
                continue
            out.setdefault(path, (what, section, []))[2].append(exp.name)
    return out


def _under(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(root.resolve())
        return True
    except ValueError:
        return False


def images_to_extract(experiments: list[Experiment], store: StateStore) -> dict[str, int]:
    """Training images whose templates are not yet in the cache, per (backbone, training data), for the experiments
    not done (reading file lists and the weights' hash only)."""
    out: dict[str, int] = {}
    for exp in experiments:
        cfg = exp.cfg
        name = f"{cfg.pretrained}: {cfg.data}"
        if exp.released or name in out or status(exp, store) == "done" or not cfg.cache:
            continue
        dirs = cfg.data_dir if isinstance(cfg.data_dir, list) else [cfg.data_dir]
        if not BackboneSpec.from_config(cfg).weights.is_file() or not all(Path(d).exists() for d in dirs):
            continue
        try:
            index = scan_training_data(cfg.data_dir, cfg.rec_genders)
            cache = TemplateCache(cfg.cache_dir, BackboneSpec.from_config(cfg),
                                  ExtractionSettings.from_config(cfg, torch.device("cpu")))
            entry = cache.folder / f"train-{index.name}-{cache.key(index_inputs(index))}"
        except UserError:
            continue   # the experiment's own pre-flight names the problem
        out[name] = 0 if open_entry(entry) is not None else len(index)
    return out


def dry_run(plan: Plan, store: StateStore, selected: list[Experiment]) -> int:
    """Print the plan as a table; 1 when inputs are missing, else 0. Computes nothing."""
    rows = [(str(i + 1), status(e, store), e.backbone, e.setting, e.trained_on + (f" (held out {e.held_out})"
             if e.held_out else ""), e.label or e.method, e.key) for i, e in enumerate(selected)]
    header = ("#", "state", "backbone", "setting", "trained on", "method", "settings hash")
    widths = [max(len(str(r[c])) for r in [header, *rows]) for c in range(len(header))]
    print(f"plan '{plan.name}' ({plan.path}): {len(selected)} experiment(s)")
    for r in [header, *rows]:
        print("  ".join(str(v).ljust(w) for v, w in zip(r, widths)).rstrip())
    counts = {s: sum(r[1] == s for r in rows) for s in ("done", "partly", "to do")}
    print(f"\n{counts['done']} done, {counts['partly']} partly done, {counts['to do']} to do")
    if plan.generated_root is not None:
        print(f"inputs under {plan.generated_root} are generated by the plan itself when it runs")
    images = images_to_extract(selected, store)
    if images:
        print("training images to extract (each with its flip): " +
              ", ".join(f"{k}: {v}" for k, v in images.items()))
    for line in protocol_lines(selected, plan.generated_root):
        print(line)
    missing = missing_inputs(plan)
    if missing:
        print(f"\nMISSING INPUTS ({len(missing)}):")
        for path, (what, section, users) in missing.items():
            print(f"  {what}: {path}  (README: '{section}'; needed by {len(users)} experiment(s))")
        return 1
    return 0


def check_inputs(plan: Plan) -> None:
    missing = missing_inputs(plan)
    if missing:
        listed = "; ".join(f"{what} {path} (README: '{section}')" for path, (what, section, _) in missing.items())
        raise UserError(f"plan '{plan.name}' lacks {len(missing)} input(s), found before any compute: {listed}. Get "
                        f"them as those README sections say (or change the plan / --set), then run again; "
                        f"--dry-run lists them with the experiments needing each.")


# ---------------------------------------------------------------------------------------------------------------
# running
# ---------------------------------------------------------------------------------------------------------------
def run_plan(plan: Plan, results: Path, shard: tuple[int, int] = (1, 1), progress: bool = True) -> list[dict]:
    """Run this share of the plan's experiments in plan order (each skipped when done); returns their states."""
    store = StateStore(Path(results) / ".experiments", tqdm.write)
    selected = select_shard(unique(plan.experiments), *shard)
    done = sum(status(e, store) == "done" for e in selected)
    bar = tqdm(total=len(selected), initial=done, desc=f"plan {plan.name}" + (f" shard {shard[0]}/{shard[1]}"
               if shard[1] > 1 else ""), unit="exp", position=0, dynamic_ncols=True, disable=not progress or None)
    states = []
    try:
        for exp in selected:
            if status(exp, store) == "done":
                states.append(store.read(exp.key))
                continue
            bar.set_postfix_str(exp.name[:60])
            tqdm.write(f"[reproduce] {exp.name}: {status(exp, store)}")
            states.append(run_experiment(exp, store, results))
            bar.update(1)
    finally:
        bar.close()
    return states


def run_shares(argv: list[str], jobs: int, devices: list[str], shard: tuple[int, int], logs: Path,
             total: Callable[[], tuple[int, int]]) -> None:
    """Run ``jobs`` shares of this process's share at once, each in its own process (and on its own device)."""
    k, n = shard
    logs.mkdir(parents=True, exist_ok=True)
    procs = []
    for j in range(jobs):
        child = [sys.executable, str(Path(__file__).resolve().parents[1] / "reproduce.py"), *argv,
                 "--shard", f"{(k - 1) * jobs + j + 1}/{n * jobs}", "--jobs", "1", "--no-tables"]
        if devices:
            child += ["--set", f"device={devices[j % len(devices)]}"]
        out = open(logs / f"job{(k - 1) * jobs + j + 1}of{n * jobs}.log", "a")
        procs.append((subprocess.Popen(child, stdout=out, stderr=subprocess.STDOUT), out))
    done, count = total()
    bar = tqdm(total=count, initial=done, desc=f"plan ({jobs} jobs)", unit="exp", dynamic_ncols=True, disable=None)
    try:
        while any(p.poll() is None for p, _ in procs):
            time.sleep(2)
            now, _ = total()
            bar.update(now - bar.n)
    finally:
        bar.close()
        for p, out in procs:
            if p.poll() is None:
                p.terminate()
            p.wait()
            out.close()
    failed = [i + 1 for i, (p, _) in enumerate(procs) if p.returncode != 0]
    if failed:
        raise UserError(f"{len(failed)} of the {jobs} jobs failed (job(s) {failed}); their logs are in {logs}. "
                        f"Run the same command again after fixing the cause: finished experiments are not redone.")


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock on ``path`` (shares finishing together write the tables one after the other)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        try:
            import fcntl
            fcntl.flock(fh, fcntl.LOCK_EX)
        except (ImportError, OSError):   # no POSIX locks (Windows, some network file systems): last writer wins
            pass
        yield


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, epilog=OVERRIDE_HELP,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("plan", help="a plan name (paper, ablation, released, synthetic) or the path of a plan file")
    parser.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                        help="override config options of every experiment")
    parser.add_argument("--dry-run", action="store_true", help="list the experiments, their state and missing inputs")
    parser.add_argument("--shard", default=None, metavar="K/N", help="run the K-th of N deterministic shares")
    parser.add_argument("--jobs", type=int, default=None, help="shares run at once on this machine (default 1, or "
                                                               "one per --devices entry)")
    parser.add_argument("--devices", default="", help="comma-separated devices, one per job (e.g. cuda:0,cuda:1)")
    parser.add_argument("--results", default="work_dirs/results", help="root of sweeps, states and tables")
    parser.add_argument("--paper-values", default=None, metavar="CSV", help="the paper's numbers, to compare with")
    parser.add_argument("--released", default=None, metavar="DIR", help="the authors' released layers, as unpacked")
    parser.add_argument("--mapping", default=None, metavar="CSV", help="backbone and setting of each released layer")
    parser.add_argument("--no-tables", action="store_true", help=argparse.SUPPRESS)   # the jobs' children
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    raw = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(raw)
    outcome = {"status": 0}

    def body() -> None:
        shard = parse_shard(args.shard)
        devices = [d.strip() for d in args.devices.split(",") if d.strip()]
        jobs = args.jobs if args.jobs is not None else max(1, len(devices))
        if jobs < 1:
            raise UserError(f"--jobs {jobs}: give 1 or more experiments to run at once.")
        results = Path(args.results)
        if results.exists() and not results.is_dir():
            raise UserError(f"--results '{results}' is a file; give the folder of the plan's sweeps, states and "
                            f"tables (it is made when missing).")
        paper = read_paper_values(args.paper_values, PAPER_METRICS) if args.paper_values else None
        extra = {"released_dir": args.released, "mapping": args.mapping, "results": args.results}
        added = released_experiments if args.released else None   # the authors' rows beside the plan's
        plan = load_plan(args.plan, args.set, extra, added)
        store = StateStore(results / ".experiments")
        if args.dry_run:
            outcome["status"] = dry_run(plan, store, select_shard(unique(plan.experiments), *shard))
            return
        plan.prepare()
        check_inputs(plan)
        if jobs > 1:
            selected = select_shard(unique(plan.experiments), *shard)
            child_argv = [a for a in _strip(raw, {"--jobs", "--devices", "--shard"})]
            run_shares(child_argv, jobs, devices, shard, results / safe_name(plan.name) / "logs",
                     lambda: (sum(status(e, store) == "done" for e in selected), len(selected)))
        else:
            if len(devices) == 1:
                plan = load_plan(args.plan, [*args.set, f"device={devices[0]}"], extra, added)
            run_plan(plan, results, shard)
        if not args.no_tables:
            with _locked(results / safe_name(plan.name) / ".tables.lock"):
                written = write_outputs(plan, results, paper)
            print(written)
    return run_cli(body) or outcome["status"]


def _strip(argv: list[str], options: set[str]) -> list[str]:
    """``argv`` without the given options and their values."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        name = a.split("=", 1)[0]
        if name in options:
            skip = "=" not in a
            continue
        out.append(a)
    return out


if __name__ == "__main__":
    sys.exit(main())
