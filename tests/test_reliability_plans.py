"""The plan runner keeps the reliability promise: a plan file's mistakes, a bad --paper-values file, a damaged result
file or a results/state path that is a file end in one error paragraph naming the file, never a traceback; the paper's
values are read once and matched in linear time; a seeded fuzzer over plan files accepts only success or that error."""
from __future__ import annotations

import ast
import json
import math
import random
from pathlib import Path

import pandas as pd
import pytest

from pipeline import reproduce, tables
from pipeline.paper_values import ID_COLUMNS, read_paper_values
from pipeline.plans import load_plan
from pipeline.results import StateStore
from utils.errors import UserError

METRICS = tables.METRICS
PLAN = '''
SET = {"num_epoch": 2, "batch_size": 16, "alpha": 20.0, "test_targets": ["lfw"]}
EXPERIMENTS = [
    {"backbone": "B", "setting": "OneDataset", "trained_on": "LFW", "method": "angular", "options": {"beta": 1.0}},
    {"backbone": "B", "setting": "CrossDataset", "trained_on": "LFW+AgeDB", "held_out": "CF",
     "options": {"data_dir": ["a", "b"], "seed": 3}},
]
'''


def run(tmp_path: Path, capsys, *argv: str) -> tuple[int, str]:
    code = reproduce.main([*argv, "--results", str(tmp_path / "results")])
    out = capsys.readouterr()
    return code, out.out + out.err


def refused(tmp_path: Path, capsys, text: str, *argv: str, name: str = "plan.py") -> str:
    """Run a plan file (a dry run unless other options are given); it must end in one error paragraph."""
    path = tmp_path / name
    path.write_text(text)
    code, out = run(tmp_path, capsys, str(path), *(argv or ("--dry-run",)))
    assert code == 2 and out.startswith("error: ") and "Traceback" not in out, out
    return out


@pytest.mark.parametrize("text, expected", [
    ("EXPERIMENTS = 5\n", "EXPERIMENTS is int"),
    ("def experiments(plan):\n    raise RuntimeError('boom')\n", "experiments(plan) failed at line 2"),
    ("def experiments(plan):\n    return 5\n", "experiments(plan) returned int"),
    ("experiments = 3\n", "experiments is int"),
    ('INCLUDE = "synthetic"\nSET = ["a"]\n', "SET is list"),
    ("INCLUDE = 5\nEXPERIMENTS = []\n", "INCLUDE is int"),
    ("EXPERIMENTS = [dict(options=['x'])]\n", "'options' is list"),
    ("EXPERIMENTS = [dict(options={5: 1})]\n", "options has the key 5"),
    ("EXPERIMENTS = [dict(backbone=['a'])]\n", "'backbone' is list"),
    ("import sys\nsys.exit(0)\n", "called sys.exit(0)"),
    ("def experiments(plan):\n    import sys\n    sys.exit(3)\n", "experiments(plan) called sys.exit(3)"),
    ("x = 1 +\n", "SyntaxError"),
    ("EXPERIMENTS = [dict(options={'alpha': 1.0}), dict(options={'alpha': 1.0})]\n", "experiments 1 and 2"),
])
def test_a_plan_files_mistakes_are_named(tmp_path, capsys, text, expected):
    out = refused(tmp_path, capsys, text)
    assert str(tmp_path / "plan.py") in out and expected in out, out


def test_an_unknown_method_in_a_plan_gets_a_suggestion(tmp_path, capsys):
    out = refused(tmp_path, capsys, "EXPERIMENTS = [dict(method='angualr')]\n")
    assert "angualr" in out and "angular" in out


def test_prepare_that_raises_is_named_before_any_compute(tmp_path, capsys):
    out = refused(tmp_path, capsys, 'INCLUDE = "synthetic"\ndef prepare(plan):\n    raise OSError("disk")\n',
                  "--set", "num_epoch=1")
    assert "prepare(plan) failed at line 3" in out and "OSError: disk" in out
    assert not (tmp_path / "results").exists()


def test_released_on_a_plan_without_backbones_is_named(tmp_path, capsys):
    (tmp_path / "layers").mkdir()
    out = refused(tmp_path, capsys, PLAN, "--dry-run", "--released", str(tmp_path / "layers"))
    assert "--released needs a plan that defines BACKBONES" in out and "has no BACKBONES" in out


def test_results_or_state_folder_that_is_a_file_is_named(tmp_path, capsys):
    plan = tmp_path / "plan.py"
    plan.write_text(PLAN)
    (tmp_path / "results").write_text("mine")
    code, out = run(tmp_path, capsys, str(plan), "--dry-run")
    assert code == 2 and "--results" in out and "is a file" in out
    assert (tmp_path / "results").read_text() == "mine"
    (tmp_path / "results").unlink()
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / ".experiments").write_text("mine too")
    code, out = run(tmp_path, capsys, str(plan), "--dry-run")
    assert code == 2 and "state folder" in out and (tmp_path / "results" / ".experiments").read_text() == "mine too"


# ---------------------------------------------------------------------------------------------------------------
# --paper-values
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("content, expected", [
    (None, "does not exist"),
    ("folder", "is a folder"),
    (b"", "is empty"),
    (b"\n \n", "is empty"),
    ("Metric,Value,Dataset\nEER,0.1,caf\xe9\n".encode("latin-1"), "not UTF-8"),
    (b"Metric,Value\n", "no values"),
    (b"Metric,Value\nEER,nan\n", "not a finite number"),
    (b"Metric,Value\nEER,inf\n", "not a finite number"),
    (b"Metric,Value\nEER,-Infinity\n", "not a finite number"),
    (b"Metric,Value\nEER,abc\n", "is not a number"),
    (b"Metric,Value\nEERR,0.1\n", "is not one of"),
    (b"Metric,Value,Dataset\nEER,0.1,lfw\nEER,0.2,LFW \n", "lines 2 and 3"),
    (b"Metric,Value,Color\nEER,0.1,red\n", "unknown column"),
    (b"Metric,Dataset\nEER,lfw\n", "needs Metric and Value"),
    (b"Metric,Value\nEER,0.1,extra\n", "has 3 cells"),
])
def test_paper_values_are_checked_before_any_compute(tmp_path, capsys, content, expected):
    values = tmp_path / "paper.csv"
    if content == "folder":
        values.mkdir()
    elif content is not None:
        values.write_bytes(content)
    plan = tmp_path / "plan.py"
    # a plan whose prepare() leaves a mark: the check must come first
    plan.write_text(PLAN + f"def prepare(plan):\n    open({str(tmp_path / 'prepared')!r}, 'w').close()\n")
    code, out = run(tmp_path, capsys, str(plan), "--paper-values", str(values))
    assert code == 2 and out.startswith("error: --paper-values") and expected in out, out
    assert not (tmp_path / "prepared").exists() and not (tmp_path / "results").exists()


class _Table:
    def __init__(self, frame: pd.DataFrame):
        self.frame, self.shown = frame, ["Dataset", "Method", "Checkpoint", "Step", *METRICS]


def _brute_force(frame: pd.DataFrame, paper: pd.DataFrame, metric: str) -> list[float]:
    """The paper's value of each row, matching every line against every row (the definition, written out)."""
    def same(a: object, b: str) -> bool:
        try:
            return float(a) == float(b)
        except (TypeError, ValueError):
            return str(a).strip().lower() == b.strip().lower()
    out = []
    for _, row in frame.iterrows():
        value = float("nan")
        for _, p in paper[paper["Metric"] == metric].iterrows():
            ok = all(same(row.get(c, ""), p[c]) for c in ID_COLUMNS if c in p and p[c] != "")
            if "Checkpoint" not in p or p["Checkpoint"] == "":
                ok = ok and row["Checkpoint"] in ("last", "")
            if ok:
                value = float(p["Value"])
        out.append(value)
    return out


def test_paper_values_match_rows_as_the_definition_says(tmp_path):
    rng = random.Random(4)
    rows = [{"Dataset": rng.choice(["lfw", "agedb_30"]), "Method": rng.choice(["angular", "leace"]),
             "Checkpoint": rng.choice(["last", "best PIC"]), "Step": rng.choice([10, 20, 30]),
             **{m: rng.random() for m in METRICS}} for _ in range(60)]
    frame = pd.DataFrame(rows)
    lines = ["Metric,Value,Dataset,Method,Checkpoint,Step", "EER,0.5,LFW,angular,,", "PIC,0.25,agedb_30,leace,,",
             "EER,0.75,agedb_30,,best PIC,20.0", "BACC-Gender-AVG,0.625,lfw,leace,best PIC,10"]
    (tmp_path / "p.csv").write_text("\n".join(lines) + "\n")
    values = read_paper_values(tmp_path / "p.csv", METRICS)
    expected = {m: _brute_force(frame, pd.read_csv(tmp_path / "p.csv", dtype=str, keep_default_na=False), m)
                for m in METRICS}
    table = _Table(frame.copy())
    matched = values.annotate({"t": table}, METRICS)
    assert matched == sum(not pd.isna(v) for vs in expected.values() for v in vs) > 0
    for m in ("EER", "PIC", "BACC-Gender-AVG"):
        got = table.frame[f"{m} (paper)"].tolist()
        assert [g if not pd.isna(g) else None for g in got] == [e if not pd.isna(e) else None for e in expected[m]]
        diff = (table.frame[m] - table.frame[f"{m} (paper)"]).tolist()
        assert table.frame[f"{m} diff"].fillna(-1).tolist() == pd.Series(diff).fillna(-1).tolist()
    assert table.shown.index("EER (paper)") == table.shown.index("EER") + 1


def test_paper_values_with_100000_rows_are_indexed_once(tmp_path):
    """Lines naming other rows cost a dictionary entry each (the run is linear; a quadratic match would not end)."""
    lines = ["Metric,Value,Dataset,Method,Step"]
    lines += [f"EER,0.{k % 97 + 1},set{k},angular,{k}" for k in range(100_000)]
    (tmp_path / "p.csv").write_text("\n".join(lines) + "\n")
    values = read_paper_values(tmp_path / "p.csv", METRICS)
    assert values.rows == 100_000
    frame = pd.DataFrame([{"Dataset": f"set{k}", "Method": "angular", "Checkpoint": "last", "Step": k,
                           **{m: 0.0 for m in METRICS}} for k in range(0, 100_000, 7)])
    table = _Table(frame)
    assert values.annotate({"t": table}, METRICS) == len(frame)
    assert table.frame["EER (paper)"].tolist() == [float(f"0.{k % 97 + 1}") for k in range(0, 100_000, 7)]


def test_two_lines_naming_one_row_through_different_columns_are_refused(tmp_path):
    (tmp_path / "p.csv").write_text("Metric,Value,Dataset,Method\nEER,0.1,lfw,\nEER,0.2,lfw,angular\n")
    values = read_paper_values(tmp_path / "p.csv", METRICS)
    frame = pd.DataFrame([{"Dataset": "lfw", "Method": "angular", "Checkpoint": "last", **{m: 0.0 for m in METRICS}}])
    with pytest.raises(UserError, match="lines 2 and 3"):
        values.annotate({"t": _Table(frame)}, METRICS)


# ---------------------------------------------------------------------------------------------------------------
# result files the tables read
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("content", [b"\x00\x01garbage\xff\xfe", b"a,b\n1,2\n", b"Step,Dataset\nx,lfw\n",
                                     b'"unterminated\n', "Step,Dataset,caf\xe9\n".encode("latin-1")])
def test_a_damaged_metrics_csv_is_named_by_the_tables(tmp_path, content):
    plan = tmp_path / "plan.py"
    plan.write_text(PLAN)
    loaded = load_plan(plan)
    results = tmp_path / "results"
    store = StateStore(results / ".experiments")
    (tmp_path / "run").mkdir()
    folder = tmp_path / "sweep"
    folder.mkdir()
    metrics = folder / "run_metrics.csv"
    metrics.write_bytes(content)
    exp = loaded.experiments[0]
    sweeps = {exp.sweep_key: {"folder": str(folder), "run": "run", "reference": None}}
    store.write(exp.key, exp.name, {"run": str(tmp_path / "run"), "trained": True, "sweeps": sweeps})
    with pytest.raises(UserError, match=str(metrics)):
        tables.write_outputs(loaded, results)
    assert metrics.read_bytes() == content


# ---------------------------------------------------------------------------------------------------------------
# fuzzer over plan files
# ---------------------------------------------------------------------------------------------------------------
POOL = ["5", "-1", "0", "2 ** 70", "1e300", "float('nan')", "float('inf')", "''", "'x' * 300", "None", "[]", "{}",
        "[1, 2]", "{'a': 1}", "True", "'angualr'", "('a', 'b')", "b'bytes'", "__import__('pathlib').Path('/x')",
        "{'num_epoch': 'ten'}", "['lfw', 'lfw']", "{'alpha': float('nan')}", "{'seed': 2 ** 70}",
        "{'test_targets': ['lfw', 'lfw']}", "[{'options': 5}]", "[{'setting': 'Bogus'}]", "[{'nope': 1}]"]


def _mutants(seed: int, count: int) -> list[tuple[str, bytes]]:
    """Seeded mutations of PLAN: a value, a key or an element replaced from POOL, removed or repeated (on the AST), or
    the file's bytes cut, flipped, re-encoded or given a NUL."""
    rng = random.Random(seed)
    out = []
    for k in range(count):
        tree = ast.parse(PLAN)
        kind = rng.choice(["value", "value", "value", "drop", "repeat", "cut", "flip", "latin1", "nul", "bom"])
        if kind in ("value", "drop", "repeat"):
            nodes = [n for n in ast.walk(tree) if isinstance(n, (ast.Constant, ast.List, ast.Dict))]
            target = rng.choice(nodes)
            if kind == "value":
                new = ast.parse(rng.choice(POOL), mode="eval").body
                for parent in ast.walk(tree):
                    for field, value in ast.iter_fields(parent):
                        if value is target:
                            setattr(parent, field, new)
                        elif isinstance(value, list):
                            value[:] = [new if v is target else v for v in value]
            elif isinstance(target, ast.List) and target.elts:
                i = rng.randrange(len(target.elts))
                if kind == "drop":
                    del target.elts[i]
                else:
                    target.elts.append(target.elts[i])
            elif isinstance(target, ast.Dict) and target.keys:
                i = rng.randrange(len(target.keys))
                if kind == "drop":
                    del target.keys[i], target.values[i]
                else:
                    target.keys.append(target.keys[i])
                    target.values.append(ast.Constant("repeated"))
            data = ast.unparse(ast.fix_missing_locations(tree)).encode()
        else:
            data = PLAN.encode()
            cut = rng.randrange(1, len(data))
            if kind == "cut":
                data = data[:cut]
            elif kind == "flip":
                data = data[:cut] + bytes([data[cut] ^ (1 << rng.randrange(8))]) + data[cut + 1:]
            elif kind == "latin1":
                data = data.replace(b'"B"', '"Caf\xe9"'.encode("latin-1"))
            elif kind == "nul":
                data = data[:cut] + b"\x00" + data[cut:]
            else:
                data = b"\xef\xbb\xbf" + data
        out.append((f"{kind}-{k}", data))
    return out


def test_fuzzed_plan_files_load_or_end_in_one_error(tmp_path):
    outcomes = {"loaded": 0, "refused": 0}
    for name, data in _mutants(seed=11, count=250):
        path = tmp_path / f"{name}.py"
        path.write_bytes(data)
        try:
            plan = load_plan(path)
        except UserError as exc:
            text = str(exc)
            assert text and "\n" not in text.strip() and "Traceback" not in text, (name, text)
            outcomes["refused"] += 1
            continue
        for exp in plan.experiments:   # what loaded is a valid configuration: finite numbers, distinct targets
            cfg = exp.cfg
            assert isinstance(cfg.alpha, (int, float)) and math.isfinite(cfg.alpha), name
            assert len(set(cfg.test_targets)) == len(cfg.test_targets), name
            json.dumps(exp.cfg.__dict__, default=str)
        outcomes["loaded"] += 1
    assert outcomes["loaded"] > 20 and outcomes["refused"] > 100, outcomes
