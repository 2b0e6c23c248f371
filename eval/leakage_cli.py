"""The gender (or any attribute) leakage command, for templates of any system (the code behind eval/leakage.py):

    python eval/leakage.py --templates T.npy (--labels L.csv | --folder DIR) [--attackers NAME ...|all]
                           [--identity-column identity] [--attribute-column gender] [--folds 3] [--bootstrap 1000]
                           [--seed 0] [--n-jobs N] [--out DIR]

--folder DIR takes the labels from a subjectid_gender folder (the paper-era gender test, README "Gender-test
protocols"): one template per image file, identities in folder order and images in sorted order within each.
"""
from __future__ import annotations

import argparse
import csv
import difflib
import io
import math
from pathlib import Path

import numpy as np
import pandas as pd

from eval.attackers import ALL, ATTACKERS, PAPER_ATTACKERS, expand_attackers
from eval.gender_folders import folder_index
from eval.gender_leakage import LeakageResult, leakage_report, merged_note, normalise_labels
from utils.errors import UserError, run_cli
from utils.io import atomic_write_text, free_path


CSV_COLUMNS = ["Kind", "Attacker", "BACC", "CI_low", "CI_high"]   # Kind: paper, extra, paper-mean, worst-case


def load_templates(path: Path) -> np.ndarray:
    """A (N, D) numeric array from a .npy file (no pickled objects), or a UserError naming the file."""
    try:   # memory-mapped first: a header claiming more data than the file holds fails here, before any allocation
        x = np.load(path, allow_pickle=False, mmap_mode="r")
        x = np.array(x) if isinstance(x, np.ndarray) else x
    except FileNotFoundError:
        raise UserError(f"templates file '{path}' does not exist; pass the .npy file of your templates "
                        f"(np.save(path, array) with one row per template).") from None
    except MemoryError:
        raise UserError(f"templates file '{path}' holds more data than fits in memory; evaluate a subset of its "
                        f"rows (one .npy per subset).") from None
    except (ValueError, OSError, EOFError) as exc:
        raise UserError(f"templates file '{path}' could not be read as a .npy array ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0][:200] if str(exc) else 'no detail'}). It must be a numeric "
                        f"array saved with np.save (object arrays, which need pickle, are refused).") from None
    if not isinstance(x, np.ndarray) or x.ndim != 2 or not (np.issubdtype(x.dtype, np.number)
                                                           and not np.issubdtype(x.dtype, np.complexfloating)):
        raise UserError(f"templates file '{path}' holds a {getattr(x, 'dtype', type(x).__name__)} array of shape "
                        f"{getattr(x, 'shape', '?')}; it must be a real-valued (N, D) array, one template per row.")
    return x


def read_text_csv(path: Path, what: str, expected: str) -> "pd.DataFrame":
    """A user's CSV (labels, pairs) as text cells, or a UserError naming ``what`` it is and ``expected`` (the columns
    and rows it should hold)."""
    try:
        return pd.read_csv(path, dtype=str, keep_default_na=False, skipinitialspace=True)
    except FileNotFoundError:
        raise UserError(f"{what} '{path}' does not exist; pass a CSV with {expected}.") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, OSError) as exc:
        raise UserError(f"{what} '{path}' could not be read as a CSV ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0][:200] if str(exc) else 'no detail'}). It must be a text CSV "
                        f"with a header row and {expected}.") from None


def _load_labels(path: Path, identity_column: str, attribute_column: str) -> tuple[np.ndarray, np.ndarray]:
    """The identity and attribute columns of the labels CSV, as text, or a UserError naming the file and column."""
    table = read_text_csv(path, "labels file", f"one row per template and the columns '{identity_column}' and "
                                               f"'{attribute_column}'")
    for column, option in ((identity_column, "--identity-column"), (attribute_column, "--attribute-column")):
        if column not in table.columns:
            close = difflib.get_close_matches(column, list(table.columns), n=1)
            hint = f" Did you mean '{close[0]}' ({option} {close[0]})?" if close else f" Choose one with {option}."
            raise UserError(f"labels file '{path}' has no column '{column}'; its columns are "
                            f"{', '.join(map(repr, table.columns))}.{hint}")
        empty = np.flatnonzero(table[column].str.strip().to_numpy() == "")
        if len(empty):
            raise UserError(f"labels file '{path}': column '{column}' is empty in {len(empty)} row(s) (first: data "
                            f"row {empty[0] + 1}); every template needs an identity and an attribute value.")
    return table[identity_column].str.strip().to_numpy(), table[attribute_column].str.strip().to_numpy()


def _fmt(v: float) -> str:
    """A CSV cell: the full value, empty where undefined (as the sweep's CSVs)."""
    return "" if math.isnan(v) else repr(v)


def _result_rows(res: LeakageResult) -> list[list[str]]:
    """CSV rows: one per attacker (kind 'paper' or 'extra'), 'AVG' when the paper's three ran ('paper-mean'), and
    the worst case ('worst-case', with the attacker that reached it; its interval is that of the maximum)."""
    rows = [["paper" if k in PAPER_ATTACKERS else "extra", k, _fmt(res.bacc[k]), _fmt(res.ci_low[k]),
             _fmt(res.ci_high[k])] for k in res.attackers]
    if "AVG" in res.bacc:
        rows.append(["paper-mean", "AVG", _fmt(res.bacc["AVG"]), _fmt(res.ci_low["AVG"]), _fmt(res.ci_high["AVG"])])
    rows.append(["worst-case", res.worst_attacker, _fmt(res.worst_bacc), _fmt(res.worst_ci_low),
                 _fmt(res.worst_ci_high)])
    return rows


def main(argv: list[str] | None = None) -> int:
    """Command line: leakage of the attribute in a .npy of templates labelled by a CSV; table printed, CSV written."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--templates", required=True, help=".npy file of an (N, D) array, one template per row")
    labels = parser.add_mutually_exclusive_group(required=True)
    labels.add_argument("--labels", help="CSV with a header and one row per template, in order")
    labels.add_argument("--folder", help="subjectid_gender folder whose images the templates are, in sorted order")
    parser.add_argument("--attackers", nargs="+", default=list(PAPER_ATTACKERS),
                        help=f"attackers to run, or 'all' (registered: {', '.join(ATTACKERS)}); default: the paper's")
    parser.add_argument("--identity-column", default="identity", help="the labels' identity column (folds group it)")
    parser.add_argument("--attribute-column", default="gender", help="the labels' attribute column (any classes)")
    parser.add_argument("--folds", type=int, default=3, help="identity-grouped stratified folds (paper: 3)")
    parser.add_argument("--bootstrap", type=int, default=1000,
                        help="bootstrap replicates of the 95%% intervals (0: none)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the attackers and of the bootstrap")
    parser.add_argument("--n-jobs", type=int, default=1, help="parallel (attacker, fold) fits; -1: all cores")
    parser.add_argument("--out", default=".", help="folder for the CSV <templates name>_leakage.csv (never replaced)")
    args = parser.parse_args(argv)

    def body() -> None:
        unknown = [a for a in args.attackers if a != ALL and a not in ATTACKERS]
        if unknown:
            close = difflib.get_close_matches(unknown[0], list(ATTACKERS), n=1)
            raise UserError(f"unknown attacker '{unknown[0]}' in --attackers; choose from {', '.join(ATTACKERS)} or "
                            f"'{ALL}'." + (f" Did you mean '{close[0]}'?" if close else ""))
        if args.folds < 2 or args.bootstrap < 0:
            raise UserError(f"--folds must be at least 2 and --bootstrap at least 0 (got {args.folds} and "
                            f"{args.bootstrap}).")
        if args.n_jobs == 0:
            raise UserError("--n-jobs 0: give the number of parallel fits (1 or more), or -1 for all cores.")
        if not 0 <= args.seed < 2 ** 32:
            raise UserError(f"--seed {args.seed}: a seed is a whole number from 0 to {2 ** 32 - 1}.")
        templates = Path(args.templates)
        x = load_templates(templates)
        if args.folder is not None:
            index = folder_index("", args.folder, "--folder")
            ids, attr = np.asarray(index.folders)[index.labels], index.genders.astype(str)
            source = f"--folder '{args.folder}' has {len(ids)} images"
        else:
            ids, attr = _load_labels(Path(args.labels), args.identity_column, args.attribute_column)
            source = f"'{args.labels}' has {len(ids)} label rows"
        if len(x) != len(ids):
            raise UserError(f"'{templates}' holds {len(x)} templates but {source}; they must match one to one, in "
                            f"the same order.")
        out = Path(args.out)
        if out.exists() and not out.is_dir():
            raise UserError(f"--out '{out}' is a file; name a folder for the result CSV.")
        res = leakage_report(x, attr, ids, args.folds, name=str(templates), attackers=expand_attackers(args.attackers),
                             n_bootstrap=args.bootstrap, seed=args.seed, n_jobs=args.n_jobs,
                             attribute=args.attribute_column)
        rows = _result_rows(res)
        attr, merged = normalise_labels(attr)   # as leakage_report counted them
        if merged:
            print(f"note: {merged_note(merged, args.attribute_column)}")
        classes, counts = np.unique(attr, return_counts=True)
        print(f"{templates}: {len(x)} templates of dimension {x.shape[1]}, {len(np.unique(ids))} identities; "
              f"'{args.attribute_column}' classes " + ", ".join(f"{c} ({n})" for c, n in zip(classes, counts))
              + f"; {args.folds} identity-grouped folds; chance = {1 / len(classes):.3f}")
        head = ["", "attacker", "BACC", f"{res.confidence:.0%} interval" if args.bootstrap else ""]
        table = [[kind, name, f"{float(bacc):.4f}", f"[{float(low):.4f}, {float(high):.4f}]" if low else ""]
                 for kind, name, bacc, low, high in rows]
        widths = [max(len(c) for c in col) for col in zip(head, *table)]
        for line in [head, *table]:
            print("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip())
        path = free_path(out / f"{templates.stem}_leakage.csv")   # stem_2.csv... if taken
        text = io.StringIO()
        csv.writer(text, lineterminator="\n").writerows([CSV_COLUMNS, *rows])
        try:
            atomic_write_text(path, text.getvalue())
        except OSError as exc:
            raise UserError(f"cannot write the result to '{path}' ({exc.strerror or exc}); choose another --out.") \
                from None
        print(f"written: {path}")
    return run_cli(body)

