"""Align every image of a folder tree (or an explicit list of images) into OUT, resumably and in parallel.

Each image: decode, find the faces and their five landmarks (a source of facedata.align.detectors), keep the one
insightface keeps, warp it onto the 112x112 reference points, encode it in the format of its extension, and write
it to its path under OUT (temporary file, then rename: a crop is whole or absent).

OUT/.align_landmarks.csv is the journal: one row per image (path under OUT, source image, status, landmark source,
faces found, five points, note), appended and flushed before the image's crop is renamed into place. A killed run
therefore leaves rows for every crop it wrote (and at most a few rows whose crop is missing, which the next run
warps from the recorded points, without detecting again); the next run does only the images without a row. At the
end the journal is rewritten sorted by path, OUT/.align_report.txt lists the images left out (no face, unreadable,
...) and OUT/.align.log the counts; both follow from the journal, so a rerun rewrites nothing.
"""
from __future__ import annotations

import csv
import io
import multiprocessing
import os
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from tqdm import tqdm

from facedata.align.detectors import DetectorSpec, build_detector
from facedata.align.transform import ALIGNED_SIZE
from facedata.align.worker import ALIGNED, CENTRE, REASONS, WRITTEN, Job, Record, process, worker_init, worker_task
from utils.errors import UserError, listing
from utils.logs import get_logger
# facedata.dataset and utils.io are imported where they are used: they load torch, and every worker process
# (started fresh) imports the main script's modules again, which should stay light

log = get_logger(__name__)

LANDMARKS_NAME = ".align_landmarks.csv"
REPORT_NAME = ".align_report.txt"
LOG_NAME = ".align.log"
OWN_FILES = (LANDMARKS_NAME, REPORT_NAME, LOG_NAME)
COLUMNS = ["path", "source_image", "status", "landmarks_from", "faces",
           "x1", "y1", "x2", "y2", "x3", "y3", "x4", "y4", "x5", "y5", "note"]
_TMP = re.compile(r"^\..+\.\d+\.tmp$")   # this module's temporary files (left by a killed run)


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

    @property
    def left_out(self) -> list[Record]:
        return [r for r in self.records.values() if r.status not in WRITTEN]


# ---------------------------------------------------------------- the journal and OUT

def read_journal(path: Path) -> dict[str, Record]:
    """The rows of a landmarks journal; a last line cut off by a kill is dropped (and cut from the file)."""
    if not path.is_file():
        return {}
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        data = data[:data.rfind(b"\n") + 1]
        with open(path, "r+b") as fh:   # append after the last whole row from now on
            fh.truncate(len(data))
    records: dict[str, Record] = {}
    reader = csv.reader(io.StringIO(data.decode("utf-8")))
    header = next(reader, None)
    if header is not None and header != COLUMNS:
        raise UserError(f"'{path}' is not this tool's landmarks journal (its columns are {header[:4]}...). OUT holds "
                        f"content of another program: choose another OUT.")
    for n, row in enumerate(reader, start=2):
        if len(row) != len(COLUMNS):
            raise UserError(f"'{path}', line {n}: {len(row)} fields instead of {len(COLUMNS)}; the journal was edited "
                            f"or damaged. Restore it or choose a new OUT.")
        pts = np.array([float(v) for v in row[5:15]]).reshape(5, 2) if row[5] else None
        records[row[0]] = Record(row[0], row[1], row[2], row[3], int(row[4]), pts, row[15])
    return records


def _check_out(out: Path, jobs: dict[str, Job], records: dict[str, Record], source: str,
               keep: Sequence[str]) -> None:
    """Refuse an OUT holding anything this alignment would not write; remove this module's stale temp files."""
    conflicts = []
    for rel, rec in records.items():
        job = jobs.get(rel)
        if job is None:
            conflicts.append(f"'{rel}' (in {LANDMARKS_NAME}, not an image of this source)")
        elif rec.src != str(job.src):
            conflicts.append(f"'{rel}' (aligned from '{rec.src}', not '{job.src}')")
        elif rec.landmarks_from != source:
            conflicts.append(f"'{rel}' (landmarks from {rec.landmarks_from}, this run uses {source})")
    for folder, _dirs, files in os.walk(out):
        for name in files:
            path = Path(folder) / name
            rel = path.relative_to(out).as_posix()
            if folder == str(out) and (name in OWN_FILES or name in keep):
                continue
            if _TMP.match(name):
                path.unlink()   # a crop a killed run had not yet renamed into place
                continue
            rec = records.get(rel)
            if rec is None or rec.status not in WRITTEN:
                conflicts.append(f"'{rel}' (not written by this alignment)")
    if conflicts:
        raise UserError(f"OUT '{out}' already holds {len(conflicts)} entries that this alignment would not create: "
                        f"{listing(conflicts)}. Nothing was changed. Existing files are never overwritten: "
                        f"choose a new OUT, or remove these entries if they are left over from other inputs.")


def _write_crop(out: Path, rel: str, data: bytes) -> None:
    path = out / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _journal_text(records: dict[str, Record]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(COLUMNS)
    for rel in sorted(records):
        writer.writerow(records[rel].row())
    return buf.getvalue()


def _report_text(records: dict[str, Record]) -> str:
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
    return "\n".join(lines) + "\n"


def _log_text(description: str, records: dict[str, Record], source: str, fallback: bool) -> str:
    counts = Counter(r.status for r in records.values())
    several = sum(1 for r in records.values() if r.faces > 1 and r.status == ALIGNED)
    left = {s: k for s, k in counts.items() if s not in WRITTEN}
    lines = [f"face alignment (facedata.align): {description}",
             f"landmarks: {source}",
             f"transform: least-squares similarity (Umeyama) of the five landmarks onto insightface's "
             f"{ALIGNED_SIZE}x{ALIGNED_SIZE} reference points, cv2.warpAffine (bilinear, black border)",
             f"no face: {'centred crop, marked in ' + REPORT_NAME if fallback else 'left out'}",
             f"images: {len(records)}; aligned {counts[ALIGNED]} ({several} with several faces: kept the largest "
             f"nearest the centre); centred crops {counts[CENTRE]}; left out {sum(left.values())}"
             + (" (" + ", ".join(f"{REASONS.get(s, s)}: {k}" for s, k in sorted(left.items())) + ")" if left else "")
             + f"; listed in {REPORT_NAME}"]
    return "\n".join(lines) + "\n"


def _write_if_changed(path: Path, text: str) -> None:
    from utils.io import atomic_write_text
    if not path.is_file() or path.read_text() != text:
        atomic_write_text(path, text)


def default_workers() -> int:
    """One worker per core this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:   # macOS, Windows
        return max(1, os.cpu_count() or 1)


# ---------------------------------------------------------------- the run

def align_images(jobs: Iterable[Job], out: str | os.PathLike, spec: DetectorSpec, workers: int | None = None,
                 fallback: bool = False, keep: Sequence[str] = (), description: str = "",
                 progress: bool = True) -> AlignResult:
    """Align ``jobs`` into ``out`` (see the module docstring); ``keep`` names other hidden files of OUT's top folder
    that are not conflicts (a caller's own log)."""
    out = Path(out).resolve()
    jobs = {j.rel: j for j in jobs}
    workers = default_workers() if workers is None else workers
    if workers < 1:
        raise UserError(f"--workers {workers}: must be at least 1.")
    if out.exists() and not out.is_dir():
        raise UserError(f"OUT '{out}' exists and is not a folder. Choose another OUT.")
    detector = build_detector(spec)   # fails here, before any work, on a missing package or model
    journal = out / LANDMARKS_NAME
    records = read_journal(journal)
    if out.exists():
        _check_out(out, jobs, records, detector.source, keep)
    tasks = []
    for rel, job in sorted(jobs.items()):
        rec = records.get(rel)
        if rec is None:
            tasks.append((job, "detect", None, fallback))
        elif rec.status == "no_face" and fallback:
            tasks.append((job, "centre", None, fallback))   # a rerun asking for the fallback
        elif rec.status in WRITTEN and not (out / rel).is_file():
            # a row whose crop was not yet renamed into place when the run was killed: finish it from the row
            tasks.append((job, "warp" if rec.status == ALIGNED else "centre", rec.points, fallback))
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    if tasks:
        log.info("aligning %d images into %s (%d already done), %d worker(s), landmarks: %s",
                 len(tasks), out, len(jobs) - len(tasks), workers, detector.source)
        new_file = not journal.is_file()
        with open(journal, "a", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh, lineterminator="\n")
            if new_file:
                writer.writerow(COLUMNS)
            not_found = 0
            bar = tqdm(total=len(tasks), desc="aligning", unit="img", dynamic_ncols=True,
                       disable=None if progress else True)
            for rec, data in _results(detector, spec, tasks, workers):
                old = records.get(rec.rel)
                if old is not None and old.status == rec.status:
                    rec.faces, rec.note = old.faces, old.note   # a crop finished from its row: the row stands
                else:
                    writer.writerow(rec.row())
                    fh.flush()   # the row first, then the crop: a crop on disk always has its row
                records[rec.rel] = rec
                if data is not None:
                    _write_crop(out, rec.rel, data)
                not_found += rec.status in ("no_face", CENTRE)
                bar.update(1)
                bar.set_postfix_str(f"no face: {not_found}", refresh=False)
            bar.close()
    seconds = time.perf_counter() - start
    _write_if_changed(journal, _journal_text(records))
    _write_if_changed(out / REPORT_NAME, _report_text(records))
    _write_if_changed(out / LOG_NAME, _log_text(description or str(out), records, detector.source, fallback))
    counts = Counter(r.status for r in records.values())
    result = AlignResult(out, records, len(tasks), seconds, counts,
                         sum(1 for r in records.values() if r.faces > 1 and r.status == ALIGNED), detector.source)
    if tasks:
        log.info("aligned %d images in %.1f s (%.1f images/s): %s", len(tasks), seconds,
                 len(tasks) / max(seconds, 1e-9),
                 ", ".join(f"{s} {k}" for s, k in sorted(counts.items())))
    return result


def _results(detector, spec: DetectorSpec, tasks: list[tuple], workers: int):
    """(record, encoded crop) per task, in completion order."""
    if workers == 1 or len(tasks) == 1:
        for task in tasks:
            yield process(detector, *task)
        return
    with multiprocessing.get_context("spawn").Pool(min(workers, len(tasks)), worker_init, (spec,)) as pool:
        yield from pool.imap_unordered(worker_task, tasks, chunksize=max(1, min(16, len(tasks) // (workers * 8))))


def tree_jobs(src: str | os.PathLike) -> tuple[list[Job], Counter]:
    """Every visible image file under ``src`` (files and links to files; hidden entries skipped), mirrored to the
    same relative path; the other files are counted."""
    from facedata.dataset import IMAGE_EXTENSIONS
    src = Path(src)
    jobs, skipped = [], Counter()
    for folder, dirs, files in os.walk(src):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if name.startswith("."):
                continue
            path = Path(folder) / name
            if path.suffix.lower() not in IMAGE_EXTENSIONS:
                skipped["files without an image extension"] += 1
                continue
            rel = path.relative_to(src).as_posix()
            jobs.append(Job(path, rel, rel))
    return jobs, skipped


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def align_tree(src: str | os.PathLike, out: str | os.PathLike, spec: DetectorSpec, workers: int | None = None,
               fallback: bool = False, progress: bool = True) -> AlignResult:
    """Align every image under ``src`` to the same relative path under ``out`` (the tree mirrored one to one)."""
    src, out = Path(src).resolve(), Path(out).resolve()
    if not src.is_dir():
        raise UserError(f"SRC '{src}' does not exist or is not a folder. Give the folder of the images as "
                        f"downloaded (e.g. lfw/ with its Name/ folders).")
    if _inside(out, src) or _inside(src, out):
        raise UserError(f"OUT '{out}' and SRC '{src}' overlap; the source is never changed. Choose an OUT outside "
                        f"SRC (and not holding it).")
    jobs, skipped = tree_jobs(src)
    if not jobs:
        raise UserError(f"SRC '{src}' holds no image files (.jpg, .png, .ppm, ... as the training scanner reads).")
    for what, k in skipped.items():
        log.info("skipped %d %s in %s", k, what, src)
    return align_images(jobs, out, spec, workers, fallback, description=f"tools/align_faces.py {src}",
                        progress=progress)
