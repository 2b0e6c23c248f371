"""Align every image of a folder tree (or an explicit list of images) into OUT, resumably and in parallel.

Each image: decode (refused from its header when larger than the pixel limit), find the faces and their five
landmarks (a source of facedata.align.detectors), keep the one insightface keeps among those whose landmarks are a
plausible face of the image, warp it onto the 112x112 reference points, encode it in the format of its extension,
and write it to its path under OUT (temporary file, then rename: a crop is whole or absent).

OUT/.align_landmarks.csv is the journal: one row per image (path under OUT, source image, status, landmark source,
faces found, five points, note, the detector that found the face, the source's size and modification time),
appended and flushed before the image's crop is renamed into place. A killed run therefore leaves rows for every
crop it wrote (and at most a few rows whose crop is missing, which the next run warps from the recorded points,
without detecting again); the next run does only the images without a row, and again those whose source file
changed since (size or modification time). The journal also records a hash of every version of .align.log and
.align_report.txt it wrote: files of those names that it does not know are the user's, and refused. At the end
the journal is rewritten sorted by path, OUT/.align_report.txt lists the images left out (no face, unreadable,
...) and OUT/.align.log the counts; both follow from the journal, so a rerun rewrites nothing. The log is also
rewritten while the run goes, at each progress line.

Nothing in OUT is touched before the whole of OUT is checked: a file this alignment would not write is refused
(and so is a temporary file unless its name carries this tool's marker and names an image of its journal).
"""
from __future__ import annotations

import contextlib
import csv
import errno
import hashlib
import io
import multiprocessing
import os
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
from tqdm import tqdm

from facedata.align.detectors import DetectorSpec, LeftOut, build_detector
from facedata.align.transform import ALIGNED_SIZE, MAX_SCALE, OUTSIDE_MARGIN
from facedata.align.worker import (ALIGNED, CENTRE, MAX_MEGAPIXELS, REASONS, STATUSES, WRITTEN, Job, Record, Task,
                                   process, worker_init, worker_task)
from utils.errors import UserError, disk_full_error, is_disk_full, listing
from utils.logs import get_logger
# facedata.dataset and utils.io are imported where they are used: they load torch, and every worker process
# (started fresh) imports the main script's modules again, which should stay light

log = get_logger(__name__)

LANDMARKS_NAME = ".align_landmarks.csv"
REPORT_NAME = ".align_report.txt"
LOG_NAME = ".align.log"
OWN_FILES = (LANDMARKS_NAME, REPORT_NAME, LOG_NAME)
HASHED = (REPORT_NAME, LOG_NAME)      # the journal records the hashes of the versions of these it wrote
OWN_STATUS = "own_file"               # the journal's rows of those hashes
LEGACY_COLUMNS = ["path", "source_image", "status", "landmarks_from", "faces",
                  "x1", "y1", "x2", "y2", "x3", "y3", "x4", "y4", "x5", "y5", "note"]
COLUMNS = LEGACY_COLUMNS + ["found_by", "source_size", "source_mtime_ns"]
# the first lines of the report and the log: a journal of the earlier layout (no hashes) vouches for files that
# begin with them
_FIRST_LINES = {REPORT_NAME: "# Images left out by the alignment", LOG_NAME: "face alignment (facedata.align):"}
TMP_MARK = ".align-tmp"
_TMP = re.compile(r"^\.(?P<name>.+)\.\d+" + re.escape(TMP_MARK) + "$")   # this module's temporary files
PROGRESS_SECONDS = 30.0               # a progress line (and the log rewritten) at most this often


@dataclass
class AlignResult:
    """What a run did (for callers, tests and the benchmark)."""
    out: Path
    records: dict[str, Record]        # every image's final row
    processed: int                    # images handled by this run (0 on a repeated run)
    seconds: float                    # time spent on them
    counts: Counter = field(default_factory=Counter)   # status -> images
    several_faces: int = 0
    source: str = ""                  # the landmark source (as the journal records it)
    workers: int = 0                  # worker processes used (after the cap)

    @property
    def left_out(self) -> list[Record]:
        return [r for r in self.records.values() if r.status not in WRITTEN]


# ---------------------------------------------------------------- the journal and OUT

@dataclass
class Journal:
    """A landmarks journal as read (the file is not changed by reading it)."""
    records: dict[str, Record] = field(default_factory=dict)
    own: dict[str, list[str]] = field(default_factory=dict)   # own file name -> hashes of the versions written
    exists: bool = False
    legacy: bool = False      # the layout before size, mtime and hashes were recorded
    whole: int = 0            # bytes up to the end of the last whole line (a kill may cut the last one)
    cut: bool = False


def _int(value: str, what: str, path: Path, line: int, empty_ok: bool = False) -> int | None:
    if value == "" and empty_ok:
        return None
    try:
        number = int(value)
    except ValueError:
        number = -1
    if number < 0:
        raise UserError(f"'{path}', line {line}: {what} {value!r} is not a whole number >= 0; the journal was edited "
                        f"or damaged. Restore it, or align into a new OUT.")
    return number


def load_journal(path: Path) -> Journal:
    """The journal at ``path``; refused (before anything is changed) when it is not this tool's or is damaged."""
    if not os.path.lexists(path):
        return Journal()
    if path.is_symlink() or not path.is_file():
        raise UserError(f"'{path}' is not a regular file, so not this tool's landmarks journal. OUT holds content of "
                        f"another program: choose another OUT.")
    data = path.read_bytes()
    journal = Journal(exists=True, whole=len(data))
    if not data:
        return journal   # created by a run killed before its first row
    first = data.split(b"\n", 1)[0]
    try:
        header = next(csv.reader([first.decode("utf-8")]), [])
    except (UnicodeDecodeError, csv.Error):
        header = None
    if header not in (COLUMNS, LEGACY_COLUMNS) or b"\n" not in data:
        shown = header[:4] if header else repr(first[:40])
        raise UserError(f"'{path}' is not this tool's landmarks journal (it begins with {shown}...). OUT holds "
                        f"content of another program: choose another OUT. Nothing was changed.")
    journal.legacy = header == LEGACY_COLUMNS
    if not data.endswith(b"\n"):   # a last line cut off by a kill: dropped (and cut from the file after the checks)
        journal.whole, journal.cut = data.rfind(b"\n") + 1, True
    try:
        text = data[:journal.whole].decode("utf-8")
    except UnicodeDecodeError:
        raise UserError(f"'{path}' is not UTF-8 text; the journal was damaged. Restore it, or align into a new "
                        f"OUT.") from None
    try:
        rows = list(csv.reader(io.StringIO(text)))[1:]
    except csv.Error as exc:
        raise UserError(f"'{path}' is not a readable CSV ({exc}); the journal was edited or damaged. Restore it, or "
                        f"align into a new OUT.") from None
    width = len(header)
    for n, row in enumerate(rows, start=2):
        if len(row) != width:
            raise UserError(f"'{path}', line {n}: {len(row)} fields instead of {width}; the journal was edited or "
                            f"damaged. Restore it, or align into a new OUT.")
        if row[2] == OWN_STATUS and row[0] in HASHED:
            journal.own.setdefault(row[0], []).append(row[15])
            continue
        if row[2] not in STATUSES:
            raise UserError(f"'{path}', line {n}: status {row[2]!r} is not one of {', '.join(STATUSES)}; the journal "
                            f"was edited or damaged. Restore it, or align into a new OUT.")
        faces = _int(row[4], "face count", path, n) or 0
        points = None
        if any(row[5:15]):
            try:
                points = np.array([float(v) for v in row[5:15]]).reshape(5, 2)
            except ValueError:
                points = None
            if points is None or not np.isfinite(points).all():
                raise UserError(f"'{path}', line {n}: the points {','.join(row[5:15])[:80]!r} are not ten finite "
                                f"numbers; the journal was edited or damaged. Restore it, or align into a new "
                                f"OUT.")
        elif row[2] == ALIGNED:
            raise UserError(f"'{path}', line {n}: an aligned image without points; the journal was edited or "
                            f"damaged. Restore it, or align into a new OUT.")
        extra = row[16:] if not journal.legacy else ["", "", ""]
        journal.records[row[0]] = Record(row[0], row[1], row[2], row[3], faces, points, row[15], extra[0],
                                         _int(extra[1], "source size", path, n, True),
                                         _int(extra[2], "source modification time", path, n, True))
    return journal


def read_journal(path: Path) -> dict[str, Record]:
    """The image rows of a landmarks journal (a last line cut off by a kill is left out)."""
    return load_journal(path).records


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _ours(path: Path, journal: Journal) -> bool:
    """Whether the report or log at ``path`` is a version this tool wrote (its journal records it)."""
    if path.is_symlink() or not path.is_file():
        return False
    data = path.read_bytes()
    if _sha(data) in journal.own.get(path.name, []):
        return True
    return journal.legacy and data.startswith(_FIRST_LINES[path.name].encode())


def _check_out(out: Path, jobs: dict[str, Job], journal: Journal, source: str, keep: Sequence[str]) -> list[Path]:
    """Refuse an OUT holding anything this alignment would not write; return the temporary files of a killed run
    of this tool (removed by the caller, once the whole of OUT has passed)."""
    records = journal.records
    conflicts, stale = [], []
    for rel, rec in records.items():
        job = jobs.get(rel)
        if job is None:
            conflicts.append(f"'{rel}' (in {LANDMARKS_NAME}, not an image of this source)")
        elif rec.src != str(job.src):
            conflicts.append(f"'{rel}' (aligned from '{rec.src}', not '{job.src}')")
        elif rec.landmarks_from != source:
            conflicts.append(f"'{rel}' (landmarks from {rec.landmarks_from}, this run uses {source})")
    for folder, dirs, files in os.walk(out):
        top = folder == str(out)
        if top:
            conflicts += [f"'{d}' (a folder where this tool writes its file)" for d in dirs if d in HASHED]
        for name in files + [d for d in dirs if os.path.islink(os.path.join(folder, d))]:
            path = Path(folder) / name
            rel = path.relative_to(out).as_posix()
            if top and (name == LANDMARKS_NAME or name in keep):
                continue
            if top and name in HASHED:
                if not _ours(path, journal):
                    conflicts.append(f"'{rel}' (not written by this tool: its journal {LANDMARKS_NAME} does not "
                                     f"record this file)")
                continue
            tmp = _TMP.match(name)
            if tmp and journal.exists and not path.is_symlink():
                target = (Path(rel).parent / tmp["name"]).as_posix()
                if target in records or (top and tmp["name"] in OWN_FILES):
                    stale.append(path)   # a crop or own file a killed run had not yet renamed into place
                    continue
            written = records.get(rel)
            if written is None or written.status not in WRITTEN or path.is_symlink():
                conflicts.append(f"'{rel}' (not written by this alignment)")
    if conflicts:
        raise UserError(f"OUT '{out}' already holds {len(conflicts)} entries that this alignment would not create: "
                        f"{listing(conflicts)}. Nothing was changed. Existing files are never overwritten: "
                        f"choose a new OUT, or remove these entries if they are left over from other inputs.")
    return stale


def _atomic_write(path: Path, data: bytes) -> None:
    """Write ``path`` whole or not at all, through a temporary file whose name only this tool uses."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}{TMP_MARK}")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _own_row(name: str, digest: str) -> list[str]:
    return [name, "", OWN_STATUS, "", "0", *[""] * 10, digest, "", "", ""]


def _journal_text(records: dict[str, Record], own: dict[str, list[str]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(COLUMNS)
    for rel in sorted(records):
        writer.writerow(records[rel].row())
    for name in HASHED:
        for digest in dict.fromkeys(own.get(name, [])):
            writer.writerow(_own_row(name, digest))
    return buf.getvalue()


def _report_text(records: dict[str, Record], skipped: Sequence[tuple[str, str]] = ()) -> str:
    lines = ["# Images left out by the alignment (never guessed): no crop was written for them. Check the image, "
             "give its landmarks with --detector file, or use --fallback centre.",
             "# reason\tpath\tsource image\tdetails"]
    for rel in sorted(records):
        r = records[rel]
        if r.status not in WRITTEN:
            lines.append(f"{REASONS.get(r.status, r.status)}\t{rel}\t{r.src}\t{r.note}")
    centre = [r for rel, r in sorted(records.items()) if r.status == CENTRE]
    if centre:
        lines.append("# no face found, replaced by a centred crop (--fallback centre): not aligned")
        lines += [f"centred crop\t{r.rel}\t{r.src}\t{r.note}" for r in centre]
    several = [r for rel, r in sorted(records.items()) if r.faces > 1 and r.status == ALIGNED]
    if several:
        lines.append("# several faces found: the largest nearest the image centre was aligned (insightface's rule)")
        lines += [f"several faces\t{r.rel}\t{r.src}\t{r.faces} faces" for r in several]
    mmod = [r for rel, r in sorted(records.items()) if r.found_by == "mmod" and r.status == ALIGNED]
    if mmod:
        lines.append("# found by dlib's CNN detector (MMOD) where the HOG detector found no face (every other face "
                     "of --detector dlib: by HOG; the journal's found_by column)")
        lines += [f"found by MMOD\t{r.rel}\t{r.src}\t" for r in mmod]
    if skipped:
        lines.append("# entries of SRC that are not aligned (not images)")
        lines += [f"skipped\t{rel}\t\t{why}" for rel, why in sorted(skipped)]
    return "\n".join(lines) + "\n"


def _log_text(description: str, records: dict[str, Record], source: str, fallback: bool, max_pixels: float,
              skipped: Sequence[tuple[str, str]] = (), running: str = "") -> str:
    counts = Counter(r.status for r in records.values())
    several = sum(1 for r in records.values() if r.faces > 1 and r.status == ALIGNED)
    left = {s: k for s, k in counts.items() if s not in WRITTEN}
    found_by = Counter(r.found_by for r in records.values() if r.status == ALIGNED and r.found_by)
    lines = [f"face alignment (facedata.align): {description}",
             f"landmarks: {source}"
             + (" (faces found by " + ", ".join(f"{k.upper()} {n}" for k, n in sorted(found_by.items())) + ")"
                if found_by else ""),
             f"transform: least-squares similarity (Umeyama) of the five landmarks onto insightface's "
             f"{ALIGNED_SIZE}x{ALIGNED_SIZE} reference points, cv2.warpAffine (bilinear, black border); landmarks "
             f"more than {OUTSIDE_MARGIN:.0%} of the image's size outside it, or a scale above {MAX_SCALE:g}, are "
             f"left out",
             f"images above {max_pixels / 1e6:g} megapixels: left out without decoding",
             f"no face: {'centred crop, marked in ' + REPORT_NAME if fallback else 'left out'}",
             f"images: {len(records)}; aligned {counts[ALIGNED]} ({several} with several faces: kept the largest "
             f"nearest the centre); centred crops {counts[CENTRE]}; left out {sum(left.values())}"
             + (" (" + ", ".join(f"{REASONS.get(s, s)}: {k}" for s, k in sorted(left.items())) + ")" if left else "")
             + f"; listed in {REPORT_NAME}"]
    if skipped:
        lines.append(f"skipped in SRC: {len(skipped)} entries that are not images (listed in {REPORT_NAME})")
    if running:
        lines.append(f"in progress: {running}")
    return "\n".join(lines) + "\n"


def default_workers() -> int:
    """One worker per core this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:   # macOS, Windows
        return max(1, os.cpu_count() or 1)


@contextlib.contextmanager
def _writing(out: Path) -> Iterator[None]:
    """Turn a failed write under OUT into one paragraph naming OUT (a full disk, a read-only file system, no
    permission, a file where a folder should be)."""
    try:
        yield
    except OSError as exc:
        if is_disk_full(exc):
            raise disk_full_error(out, "OUT", exc) from None
        if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EEXIST, errno.EISDIR):
            where = f" ('{exc.filename}')" if exc.filename else ""
            raise UserError(f"cannot write to OUT '{out}'{where}: {exc.strerror or exc}. Every crop completed before "
                            f"was kept with its journal row and no partial file was left. Choose an OUT on a "
                            f"writable disk (or fix its permissions), then run again: the run continues where it "
                            f"stopped.") from None
        raise


# ---------------------------------------------------------------- progress

def _duration(seconds: float) -> str:
    if not np.isfinite(seconds):
        return "unknown"
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"
    return f"{seconds // 60} min {seconds % 60:02d} s" if seconds >= 60 else f"{seconds} s"


class Progress:
    """A progress line at a steady interval (done / total, images/s, images left out so far, time left), for runs
    whose output goes to a file (no progress bar there) and for the log written as the run goes."""

    def __init__(self, total: int, interval_s: float = PROGRESS_SECONDS, clock: Callable[[], float] = time.monotonic):
        self.total, self.interval, self.clock = total, interval_s, clock
        self.start = self.last = clock()
        self.done = 0
        self.left: Counter = Counter()

    def add(self, rec: Record) -> str | None:
        """Count one finished image; the progress line when one is due."""
        self.done += 1
        if rec.status not in WRITTEN or rec.status == CENTRE:
            self.left["no face" if rec.status in ("no_face", CENTRE) else
                      "undecodable" if rec.status in ("unreadable", "too_large") else "other"] += 1
        now = self.clock()
        if now - self.last < self.interval and self.done < self.total:
            return None
        self.last = now
        return self.line(now)

    def line(self, now: float) -> str:
        elapsed = max(now - self.start, 1e-9)
        rate = self.done / elapsed
        remaining = (self.total - self.done) / rate if rate > 0 else float("inf")
        left = ", ".join(f"{what} {self.left[what]}" for what in ("no face", "undecodable", "other")
                         if what != "other" or self.left[what])
        return (f"aligned {self.done}/{self.total} images ({100 * self.done / max(self.total, 1):.1f}%), "
                f"{rate:.1f} images/s, {left}, about {_duration(remaining)} left")


# ---------------------------------------------------------------- the run

def _plan(jobs: dict[str, Job], records: dict[str, Record], detector, fallback: bool, source: str,
          max_pixels: float, out: Path) -> tuple[list[Task], set[str]]:
    """The tasks of this run, and the images finished from their journal row (whose row stands)."""
    tasks, from_row = [], set()

    def fresh(job: Job) -> Task:
        if detector.needs_pixels:
            return Task(job, "detect", None, fallback, source, max_pixels)
        try:   # a landmark file, read once here: each task carries its own points
            given: object = detector.faces(None, job.key)
        except LeftOut as exc:
            given = exc
        return Task(job, "given", given, fallback, source, max_pixels)

    for rel, job in sorted(jobs.items()):
        rec = records.get(rel)
        if rec is None:
            tasks.append(fresh(job))
            continue
        if rec.size is not None:
            try:
                st = os.stat(job.src)
                changed = (st.st_size, st.st_mtime_ns) != (rec.size, rec.mtime_ns)
            except OSError:
                changed = True
            if changed:   # the source was replaced since: aligned again
                tasks.append(fresh(job))
                continue
        if rec.status == "no_face" and fallback:
            tasks.append(Task(job, "centre", None, fallback, source, max_pixels))   # a rerun asking for the fallback
        elif rec.status in WRITTEN and not (out / rel).is_file():
            # a row whose crop was not yet renamed into place when the run was killed: finish it from the row
            from_row.add(rel)
            tasks.append(Task(job, "warp", rec.points, fallback, source, max_pixels) if rec.status == ALIGNED
                         else Task(job, "centre", None, fallback, source, max_pixels))
    return tasks, from_row


def align_images(jobs: Iterable[Job], out: str | os.PathLike, spec: DetectorSpec, workers: int | None = None,
                 fallback: bool = False, keep: Sequence[str] = (), description: str = "",
                 progress: bool = True, skipped: Sequence[tuple[str, str]] = (),
                 max_megapixels: float = MAX_MEGAPIXELS, progress_seconds: float = PROGRESS_SECONDS,
                 clock: Callable[[], float] = time.monotonic) -> AlignResult:
    """Align ``jobs`` into ``out`` (see the module docstring); ``keep`` names other hidden files of OUT's top folder
    that are not conflicts (a caller's own log); ``skipped`` lists (path, reason) of source entries not aligned."""
    from utils.io import check_creatable
    out = Path(out).resolve()
    by_rel = {j.rel: j for j in jobs}
    workers = default_workers() if workers is None else workers
    if workers < 1:
        raise UserError(f"--workers {workers}: must be at least 1.")
    if not (max_megapixels > 0 and np.isfinite(max_megapixels)):
        raise UserError(f"--max-megapixels {max_megapixels}: must be a positive number (e.g. {MAX_MEGAPIXELS:g}).")
    if not (progress_seconds >= 0 and np.isfinite(progress_seconds)):
        raise UserError(f"--progress-seconds {progress_seconds}: must be a number >= 0 (0: a line per image).")
    max_pixels = max_megapixels * 1e6
    if os.path.lexists(out) and not out.is_dir():
        raise UserError(f"OUT '{out}' exists and is not a folder. Choose another OUT.")
    check_creatable(out, "OUT")
    detector = build_detector(spec)   # fails here, before any work, on a missing package, model or landmark file
    journal_path = out / LANDMARKS_NAME
    journal = load_journal(journal_path) if out.is_dir() else Journal()
    stale = _check_out(out, by_rel, journal, detector.source, keep) if out.is_dir() else []
    records, own = journal.records, journal.own
    tasks, from_row = _plan(by_rel, records, detector, fallback, detector.source, max_pixels, out)
    # OUT has passed every check: from here on it is changed
    start = time.perf_counter()
    n_workers = min(workers, max(len(tasks), 1), default_workers())
    with _writing(out):
        out.mkdir(parents=True, exist_ok=True)
        for path in stale:
            path.unlink()
        if journal.cut:
            with open(journal_path, "r+b") as cut:   # append after the last whole row from now on
                cut.truncate(journal.whole)
        if journal.legacy and tasks:   # rows of the new layout are appended below: the journal takes it first,
            for name in HASHED:        # with the hashes of the report and log that passed the check
                if (out / name).is_file():
                    own[name] = [_sha((out / name).read_bytes())]
            _atomic_write(journal_path, _journal_text(records, own).encode())
        if tasks:
            if n_workers < workers:
                log.info("--workers %d: %d worker process(es), at most one per image to align (%d) and per core "
                         "(%d)", workers, n_workers, len(tasks), default_workers())
            log.info("aligning %d images into %s (%d already done), %d worker(s), landmarks: %s",
                     len(tasks), out, len(by_rel) - len(tasks), n_workers, detector.source)
            new_file = not journal_path.is_file() or journal_path.stat().st_size == 0
            with open(journal_path, "a", newline="", encoding="utf-8") as fh:
                writer = csv.writer(fh, lineterminator="\n")
                if new_file:
                    writer.writerow(COLUMNS)
                    fh.flush()

                def write_log(running: str) -> None:   # the log as the run goes: its hash first, then the file
                    text = _log_text(description or str(out), records, detector.source, fallback, max_pixels,
                                     skipped, running).encode()
                    own.setdefault(LOG_NAME, []).append(_sha(text))
                    writer.writerow(_own_row(LOG_NAME, own[LOG_NAME][-1]))
                    fh.flush()
                    _atomic_write(out / LOG_NAME, text)

                meter = Progress(len(tasks), progress_seconds, clock)
                bar = tqdm(total=len(tasks), desc="aligning", unit="img", dynamic_ncols=True,
                           disable=None if progress else True)
                worker_spec = spec if detector.needs_pixels else None   # landmark files: read here only
                for rec, data in _results(detector, worker_spec, tasks, n_workers):
                    old = records.get(rec.rel)
                    if rec.rel in from_row and old is not None and old.status == rec.status:
                        rec = old   # a crop finished from its row: the row stands
                    else:
                        if old is not None and old.status in WRITTEN and (out / rec.rel).is_file():
                            (out / rec.rel).unlink()   # this tool's crop of a source replaced since
                        writer.writerow(rec.row())
                        fh.flush()   # the row first, then the crop: a crop on disk always has its row
                    records[rec.rel] = rec
                    if data is not None:
                        _atomic_write(out / rec.rel, data)
                    bar.update(1)
                    bar.set_postfix_str(f"left out: {sum(meter.left.values())}", refresh=False)
                    line = meter.add(rec)
                    if line is not None:
                        if bar.disable:
                            log.info("%s", line)
                        write_log(line)
                bar.close()
        seconds = time.perf_counter() - start
        _finish(out, records, own, detector.source, fallback, max_pixels, skipped, description)
    counts = Counter(r.status for r in records.values())
    result = AlignResult(out, records, len(tasks), seconds, counts,
                         sum(1 for r in records.values() if r.faces > 1 and r.status == ALIGNED), detector.source,
                         n_workers if tasks else 0)
    if tasks:
        log.info("aligned %d images in %.1f s (%.1f images/s): %s", len(tasks), seconds,
                 len(tasks) / max(seconds, 1e-9),
                 ", ".join(f"{s} {k}" for s, k in sorted(counts.items())))
    return result


def _finish(out: Path, records: dict[str, Record], own: dict[str, list[str]], source: str, fallback: bool,
            max_pixels: float, skipped: Sequence[tuple[str, str]], description: str) -> None:
    """The journal rewritten sorted (recording the hashes of the report and log on disk and of those about to
    replace them), then the report and the log, then the journal with the new hashes only: each file only when it
    changes (a rerun rewrites nothing), and a kill at any point leaves files the journal vouches for."""
    texts = {REPORT_NAME: _report_text(records, skipped).encode(),
             LOG_NAME: _log_text(description or str(out), records, source, fallback, max_pixels, skipped).encode()}
    both, final = {}, {}
    for name, data in texts.items():
        path = out / name
        final[name] = [_sha(data)]
        # the version on disk passed the check of OUT (or was written by this run): vouched for until replaced
        both[name] = ([_sha(path.read_bytes())] if path.is_file() else []) + final[name]
    journal = out / LANDMARKS_NAME
    for hashes in (both, final):
        text = _journal_text(records, hashes).encode()
        if not journal.is_file() or journal.read_bytes() != text:
            _atomic_write(journal, text)
        if hashes is both:
            for name, data in texts.items():
                if not (out / name).is_file() or (out / name).read_bytes() != data:
                    _atomic_write(out / name, data)
    own.clear()
    own.update(final)


def _results(detector, spec: DetectorSpec | None, tasks: list[Task], workers: int):
    """(record, encoded crop) per task, in completion order."""
    if workers == 1 or len(tasks) == 1:
        for task in tasks:
            yield process(detector, task)
        return
    with multiprocessing.get_context("spawn").Pool(workers, worker_init, (spec,)) as pool:
        yield from pool.imap_unordered(worker_task, tasks, chunksize=max(1, min(16, len(tasks) // (workers * 8))))


def tree_jobs(src: str | os.PathLike, out: str | os.PathLike | None = None
              ) -> tuple[list[Job], Counter, list[tuple[str, str]]]:
    """Every visible image file under ``src``, mirrored to the same relative path; links to files and folders are
    followed as the training scan follows them, except a link to a folder above it (a loop) or into ``out``,
    which is listed as skipped with broken links and entries that are neither files nor folders. Returns the
    jobs, the count of other files (no image extension) and the skipped entries (path, reason)."""
    from facedata.dataset import BROKEN_LINK, IMAGE_EXTENSIONS, entry_kind, visible_entries
    src = Path(src)
    out = Path(out).resolve() if out is not None else None
    jobs: list[Job] = []
    others: Counter = Counter()
    skipped: list[tuple[str, str]] = []
    st = os.stat(src)
    stack: list[tuple[Path, str, tuple[tuple[int, int], ...]]] = [(src, "", ((st.st_dev, st.st_ino),))]
    while stack:
        folder, prefix, above = stack.pop()
        try:
            entries = visible_entries(folder)
        except OSError as exc:
            skipped.append((prefix.rstrip("/") or ".", f"the folder cannot be listed ({exc.strerror or exc})"))
            continue
        for entry in entries:
            rel = prefix + entry.name
            kind = entry_kind(entry)
            if kind in ("dir", "file") and entry.is_symlink() and out is not None and _inside(
                    Path(entry.path).resolve(), out):
                skipped.append((rel, "a symbolic link into OUT: not followed"))
            elif kind == "dir":
                try:
                    st = os.stat(entry.path)
                except OSError as exc:
                    skipped.append((rel, f"cannot be examined ({exc.strerror or exc})"))
                    continue
                if (st.st_dev, st.st_ino) in above:
                    skipped.append((rel, "a symbolic link to a folder above it (a loop): not followed"))
                    continue
                stack.append((Path(entry.path), rel + "/", above + ((st.st_dev, st.st_ino),)))
            elif kind == "file":
                if Path(entry.name).suffix.lower() in IMAGE_EXTENSIONS:
                    jobs.append(Job(Path(entry.path), rel, rel))
                else:
                    others["files without an image extension"] += 1
            elif kind == "broken":
                skipped.append((rel, BROKEN_LINK))
            else:
                skipped.append((rel, "neither a file nor a folder (a pipe, socket or device)"))
    return sorted(jobs, key=lambda j: j.rel), others, skipped


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def align_tree(src: str | os.PathLike, out: str | os.PathLike, spec: DetectorSpec, workers: int | None = None,
               fallback: bool = False, progress: bool = True, max_megapixels: float = MAX_MEGAPIXELS,
               progress_seconds: float = PROGRESS_SECONDS, clock: Callable[[], float] = time.monotonic
               ) -> AlignResult:
    """Align every image under ``src`` to the same relative path under ``out`` (the tree mirrored one to one)."""
    src, out = Path(src).resolve(), Path(out).resolve()
    if not src.is_dir():
        raise UserError(f"SRC '{src}' does not exist or is not a folder. Give the folder of the images as "
                        f"downloaded (e.g. lfw/ with its Name/ folders).")
    if _inside(out, src) or _inside(src, out):
        raise UserError(f"OUT '{out}' and SRC '{src}' overlap; the source is never changed. Choose an OUT outside "
                        f"SRC (and not holding it).")
    jobs, others, skipped = tree_jobs(src, out)
    if not jobs:
        raise UserError(f"SRC '{src}' holds no image files (.jpg, .png, .ppm, ... as the training scanner reads).")
    for what, k in others.items():
        log.info("skipped %d %s in %s", k, what, src)
    if skipped:
        log.info("skipped %d entries of %s that are not images (listed in %s)", len(skipped), src, REPORT_NAME)
    return align_images(jobs, out, spec, workers, fallback, description=f"tools/align_faces.py {src}",
                        progress=progress, skipped=skipped, max_megapixels=max_megapixels,
                        progress_seconds=progress_seconds, clock=clock)
