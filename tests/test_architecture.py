"""The plug-in architecture: layers import only downwards, a method and an attacker added from a test (one registry
entry each) train and sweep end to end, and run folders written before the restructure sweep to the same numbers."""
import ast
import csv
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from sklearn.neighbors import NearestCentroid
from torch import nn

from pipeline import train as finetune
from pipeline import sweep as evaluation
from eval.attackers import expand_attackers, register_attacker
from config import options
from config.loading import load_config
from config.options import OPTION_GROUPS
from helpers import demo_cfg, registered, synthetic_world
from utils.errors import UserError
from privacy import FitResult, PrivacyMethod, register_method
from synthetic.data import save_demo_backbone

REPO = Path(__file__).resolve().parent.parent
LEGACY = Path(__file__).parent / "data" / "legacy_runs"
AUTHORS_COLUMNS = ["Step", "Dataset", "EER", "TAR@FAR=0.1%", "BACC-Gender-LogReg", "BACC-Gender-SVM",
                   "BACC-Gender-RBF", "BACC-Gender-AVG", "PIC"]

# Each package's rank, lowest first: a module imports its own package and lower-ranked ones only; two packages of
# one rank never import each other (so there is no cycle).
RANKS = {"utils": 0, "config": 1, "facedata": 2, "backbones": 3, "losses": 3, "synthetic": 4, "templates": 4,
         "eval": 5, "privacy": 6, "pipeline": 7}
# command lines: thin files at the top that call a library's main()
ENTRY_POINTS = ["finetune.py", "eval/evaluation.py", "eval/leakage.py", "eval/verify.py", "reproduce.py",
                *sorted(str(p.relative_to(REPO)) for p in (REPO / "tools").glob("*.py"))]
SCAFFOLDING = ("synthetic", "demo", "bench", "tests", "helpers")


def package_of(module: str) -> str:
    return module.split(".")[0]


def runtime_imports(path: Path) -> list[str]:
    """Modules a file imports when it runs (imports under `if TYPE_CHECKING:` are for type checkers only)."""
    tree = ast.parse(path.read_text())
    skip = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
            for n in ast.walk(node)}
    out = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append(node.module)
    return out


def library_files() -> dict[str, Path]:
    """Every module of every ranked package, by its dotted name (eval/evaluation.py, the authors' command path, is
    an entry point that lives in a package folder, not a module of it)."""
    out = {}
    for package in RANKS:
        for path in sorted((REPO / package).rglob("*.py")):
            if str(path.relative_to(REPO)) in ENTRY_POINTS:
                continue
            out[".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")] = path
    return out


DESIGN_CARD = ["config", "backbones", "losses", "utils", "eval", "finetune.py", "requirements.txt", "README.md",
               "LICENSE"]
PROJECT_NAMES = sorted(RANKS) + ["plans", "tools", "bench", "tests", "helpers", "demo", "finetune", "reproduce"]


def test_the_design_cards_top_level_and_every_package_has_a_rank():
    missing = [name for name in DESIGN_CARD if not (REPO / name).exists()]
    assert not missing, f"the design card's top level lacks {missing}"
    top = {p.name for p in REPO.iterdir() if (p / "__init__.py").is_file()} - {"tests", "bench"}
    assert top == set(RANKS), f"packages without a rank, or ranks without a package: {top ^ set(RANKS)}"
    assert min(RANKS, key=RANKS.get) == "utils" and list(RANKS.values()).count(0) == 1


def test_requirements_install_dependencies_only():
    """No editable or path install: nothing of the checkout lands in site-packages (requirement lines are
    ``name==version`` of third-party packages, or ``-r`` of another requirements file of the checkout)."""
    for req in sorted(REPO.glob("requirements*.txt")):
        for number, line in enumerate(req.read_text().splitlines(), 1):
            line = line.split("#", 1)[0].strip()
            if not line or line.startswith("-r "):
                continue
            name, _, version = line.partition("==")
            assert version and name.replace("-", "").replace("_", "").replace(".", "").isalnum(), \
                f"{req.name}:{number}: {line!r} is not a pinned third-party requirement"
            assert name.lower() not in {n.lower() for n in PROJECT_NAMES} and not name.startswith("gender-privacy")
    assert "[project]" not in (REPO / "pyproject.toml").read_text() and not (REPO / "setup.py").exists()


@pytest.mark.subprocess
def test_no_project_package_importable_from_another_folder(tmp_path):
    """From a folder outside the checkout (and without PYTHONPATH) none of the project's packages resolves to this
    checkout: nothing was installed into the environment."""
    script = ("import importlib.util, json, sys\n"
              f"names = {PROJECT_NAMES!r}\n"
              "found = {}\n"
              "for n in names:\n"
              "    try:\n"
              "        spec = importlib.util.find_spec(n)\n"
              "    except (ImportError, ValueError):\n"
              "        spec = None\n"
              "    found[n] = spec.origin if spec is not None and spec.origin else None\n"
              "print(json.dumps(found))\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                         check=True, timeout=120)
    found = json.loads(out.stdout)
    ours = {n: o for n, o in found.items() if o and str(REPO) in str(Path(o).resolve())}
    assert not ours, f"installed into the environment: {ours}"


@pytest.mark.parametrize("entry", ["finetune.py", "reproduce.py", "eval/evaluation.py", "tools/cache.py"])
@pytest.mark.subprocess
def test_entry_scripts_run_from_any_folder(tmp_path, entry):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, str(REPO / entry), "--help"], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0 and "usage" in out.stdout.lower(), out.stderr[-2000:]


def test_packages_import_only_lower_ranks_and_never_the_scaffolding():
    checked = 0
    for module, path in library_files().items():
        own = package_of(module)
        for imported in runtime_imports(path):
            other = package_of(imported)
            if own != "synthetic":
                assert other not in SCAFFOLDING, f"{module} imports {imported}"
            if other in RANKS and other != own:
                checked += 1
                assert RANKS[other] < RANKS[own], \
                    f"{module} ({own}, rank {RANKS[own]}) imports {imported} ({other}, rank {RANKS[other]})"
    assert checked > 60


BOOTSTRAP = "sys.path[0] = str(Path(__file__).resolve().parents[1])"


def test_no_library_module_manipulates_sys_path():
    """Only the scripts in subfolders touch the import path, with the one line that puts the checkout's root first
    (so they run from any folder without installing the project)."""
    offenders = [m for m, p in library_files().items() if "sys.path" in p.read_text()]
    for entry in ENTRY_POINTS:
        lines = [ln.strip() for ln in (REPO / entry).read_text().splitlines() if "sys.path" in ln and
                 not ln.strip().startswith("#")]
        expected = [BOOTSTRAP] if "/" in entry else []
        if lines != expected:
            offenders.append(entry)
    assert not offenders


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_entry_points_are_thin_command_lines(entry):
    """A command line only calls its library's main(); the code lives in the packages."""
    tree = ast.parse((REPO / entry).read_text())
    imports = [n for n in tree.body if isinstance(n, ast.ImportFrom) and n.module != "pathlib"]
    assert len(imports) == 1 and imports[0].names[0].name == "main" and package_of(imports[0].module) in RANKS
    assert len([n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))]) == 0


# ---------------------------------------------------------------------------------------------------------------
# a toy method and a toy attacker, registered from here only
# ---------------------------------------------------------------------------------------------------------------
class DropFirst(nn.Module):
    """Zero the first ``k`` components (a transform with a buffer and no parameters)."""

    def __init__(self, dim: int, k: int):
        super().__init__()
        self.register_buffer("mask", (torch.arange(dim) >= k).float())

    def forward(self, x):
        return x * self.mask


class ToyDrop(PrivacyMethod):
    name = "toy_drop"

    def run_name(self) -> str:
        return "toy"

    def fit(self, ctx):
        dim = ctx.templates.templates.shape[2]
        paths = [self.save_checkpoint(ctx.checkpoint_dir, k, DropFirst(dim, 8 * k)) for k in (1, 2)]
        return FitResult(step=2, checkpoints=paths)

    def build_transform(self, state, path):
        t = DropFirst(state["mask"].numel(), 0)
        t.load_state_dict(state)
        return t


@pytest.fixture
def toy_plugins():
    with registered():
        register_method(ToyDrop)
        register_attacker("ToyCentroid")(lambda ctx: NearestCentroid())
        yield


@pytest.mark.filterwarnings("ignore:self.within_class_std_dev_")  # the toy transform zeroes components
@pytest.mark.subprocess
def test_toy_method_and_attacker_train_and_sweep(tmp_path, toy_plugins):
    synthetic_world(tmp_path, n_train_ids=16, imgs=3, n_test_ids=24, pairs=200, gender=96)
    res = finetune.train(demo_cfg(tmp_path, "method=toy_drop"))
    assert [p.name for p in res.checkpoints] == ["1transform.pth", "2transform.pth"]
    described = json.loads((res.checkpoint_dir / "run.json").read_text())
    assert described["method"] == "toy_drop" and described["config"]["method"] == "toy_drop"
    paper = finetune.train(demo_cfg(tmp_path, "num_epoch=1", "checkpoint_every=1"))   # the paper's method beside it
    # every registered attacker, the toy one included, on two workers: registrations reach the sweep's processes
    cfg = demo_cfg(tmp_path, "attackers=all", "bootstrap=200", "n_jobs=2")
    every = [*expand_attackers(["all"])]
    assert "ToyCentroid" in every and "MLP" in every
    out = evaluation.evaluate(cfg, tmp_path / "res", tmp_path / "ckpt" / "Demo", "Exp/Synth", tmp_path / "ref.csv")
    paper_steps = [p.name.split("ftn")[0] for p in paper.checkpoints]
    for run, steps in (("toy", ["1", "2"]), ("20L1_1L2", paper_steps)):
        with open(out / f"{run}_metrics.csv", newline="") as fh:
            reader = csv.DictReader(fh)
            rows = list(reader)
        assert reader.fieldnames == AUTHORS_COLUMNS and [r["Step"] for r in rows] == steps
        with open(out / f"{run}_attackers.csv", newline="") as fh:
            extra = list(csv.DictReader(fh))
        assert [(r["Step"], r["Attacker"]) for r in extra] == [(s, a) for s in steps for a in (*every, "worst-case")]
        assert all(0 <= float(r["CI-Low"]) <= float(r["BACC"]) <= float(r["CI-High"]) <= 1 for r in extra)
        for s in steps:   # the worst case is the maximum and names its attacker
            by = {r["Attacker"]: r for r in extra if r["Step"] == s}
            best = max(every, key=lambda a: float(by[a]["BACC"]))
            assert by["worst-case"]["BACC"] == by[best]["BACC"] and by["worst-case"]["Reached-By"] == best
    report = (out / "report.md").read_text()
    assert "toy_drop" in report and "angular (alpha=20, beta=1" in report and "Worst-case BACC" in report
    assert (out / "worst_case.png").is_file() and (out / "bare_backbone_attackers.csv").is_file()


def test_run_description_is_what_the_sweep_reads(tmp_path, toy_plugins):
    """A run's settings come from its run.json, not from its folder name or the sweep's config."""
    synthetic_world(tmp_path, n_train_ids=16, imgs=3, n_test_ids=24, pairs=200, gender=96)
    res = finetune.train(demo_cfg(tmp_path, "alpha=3", "n_hidden=1", "num_epoch=2", "checkpoint_every=2",
                                  "run_name=plainly_named"))
    cfg = demo_cfg(tmp_path)   # n_hidden=2 here: only the run's description says 1
    out = evaluation.evaluate(cfg, tmp_path / "res", tmp_path / "ckpt" / "Demo", "Exp/Synth", tmp_path / "ref.csv")
    assert (out / "plainly_named_metrics.csv").is_file()
    assert "alpha=3" in (out / "report.md").read_text() and "n_hidden=1" in (out / "report.md").read_text()
    assert res.checkpoint_dir.name == "plainly_named"


PLUGIN_WITH_OPTIONS = """
from dataclasses import dataclass

import torch
from torch import nn

from config.options import option
from privacy import FitResult, PrivacyMethod, register_method


class Scale(nn.Module):
    def __init__(self, dim, keep):
        super().__init__()
        self.register_buffer("mask", (torch.arange(dim) < keep).float())

    def forward(self, x):
        return x * self.mask


@dataclass
class KeepOptions:
    keep: int = option(64, "leading template components kept", ge=1, le=512)
    steps: int = option(2, "checkpoints written, keeping keep/step components at step", ge=1)


@register_method
class KeepLeading(PrivacyMethod):
    name = "keep_leading"
    Options = KeepOptions

    def run_name(self):
        return f"keep{self.opts.keep}"

    def fit(self, ctx):
        dim = ctx.templates.templates.shape[2]
        paths = [self.save_checkpoint(ctx.checkpoint_dir, k, Scale(dim, self.opts.keep // k))
                 for k in range(1, self.opts.steps + 1)]
        return FitResult(step=self.opts.steps, checkpoints=paths)

    def build_transform(self, state, path):
        t = Scale(state["mask"].numel(), 0)
        t.load_state_dict(state)
        return t
"""


def test_plugin_method_declares_its_own_options(tmp_path):
    """A method from a file outside the repository, with two options of its own: validated by name and range,
    trained with them, recorded in run.json and shown in the report; the flat old-style name is an alias."""
    plugin = tmp_path / "elsewhere" / "keep_leading.py"
    plugin.parent.mkdir()
    plugin.write_text(PLUGIN_WITH_OPTIONS)
    synthetic_world(tmp_path, n_train_ids=16, imgs=3, n_test_ids=24, pairs=200, gender=96)
    plugins = f"plugins=['synthetic', {str(plugin)!r}]"
    with registered():
        with pytest.raises(UserError, match=r"'keep_leading.keep' is 0; it must be >= 1 and <= 512"):
            demo_cfg(tmp_path, plugins, "method=keep_leading", "keep_leading.keep=0")
        with pytest.raises(UserError, match=r"'keep_leading.steps' .* must be int"):
            demo_cfg(tmp_path, plugins, "method=keep_leading", "keep_leading.steps=two")
        with pytest.raises(UserError, match=r"Did you mean 'keep_leading.keep'"):
            demo_cfg(tmp_path, plugins, "method=keep_leading", "keep_leading.kep=3")
        cfg = demo_cfg(tmp_path, plugins, "method=keep_leading", "keep_leading.keep=48", "keep_leading_steps=3")
        assert (cfg.group("keep_leading").keep, cfg.group("keep_leading").steps) == (48, 3)
        res = finetune.train(cfg)
        assert res.checkpoint_dir.name == "keep48" and len(res.checkpoints) == 3
        recorded = json.loads((res.checkpoint_dir / "run.json").read_text())["config"]
        assert recorded["groups"] == {"keep_leading": {"keep": 48, "steps": 3}}
        sweep_cfg = demo_cfg(tmp_path, plugins, "n_jobs=1")      # the sweep's own config has the defaults
        out = evaluation.evaluate(sweep_cfg, tmp_path / "res", tmp_path / "ckpt" / "Demo", "Exp/Synth",
                                  tmp_path / "ref.csv")
        assert "keep_leading (keep_leading.keep=48, keep_leading.steps=3)" in (out / "report.md").read_text()
        with open(out / "keep48_metrics.csv", newline="") as fh:
            assert [r["Step"] for r in csv.DictReader(fh)] == ["1", "2", "3"]
    assert "keep_leading" not in OPTION_GROUPS


def test_settings_leave_out_runtime_options_and_follow_component_options():
    base = load_config(None, ["method=ive"])
    same = load_config(None, ["method=ive", "n_jobs=1", "device=cpu", "num_workers=0", "log_every=7",
                              "cache_dir=elsewhere"])
    assert options.settings_hash(base) == options.settings_hash(same)
    assert options.settings(base)["ive.rounds"] == 20 and "n_jobs" not in options.settings(base)
    for changed in (["method=ive", "ive.rounds=5"], ["method=ive", "seed=1"], ["method=inlp"]):
        assert options.settings_hash(load_config(None, changed)) != options.settings_hash(base)
    # an inactive method's options do not count
    assert options.settings_hash(load_config(None, ["ive.rounds=5"])) == options.settings_hash(load_config(None))


# ---------------------------------------------------------------------------------------------------------------
# run folders written before the restructure
# ---------------------------------------------------------------------------------------------------------------
def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def legacy_world(tmp_path_factory):
    root = tmp_path_factory.mktemp("legacy")
    synthetic_world(root, n_train_ids=24, imgs=4, n_test_ids=24, test_imgs=4, pairs=200, gender=96, seed=3)
    save_demo_backbone(root / "b128" / "backbone.pth", 128)
    hashes = json.loads((LEGACY / "hashes.json").read_text())
    assert sha(root / "rec" / "synth_a.bin") == hashes["synth_a.bin"], "the synthetic generator changed"
    assert sha(root / "b128" / "backbone.pth") == hashes["backbone128"]
    assert sha(root / "ckpt" / "Demo" / "reference" / "backbone.pth") == hashes["backbone512"]
    return root


def test_run_folder_of_the_old_code_sweeps_to_the_same_numbers(legacy_world, tmp_path):
    models = tmp_path / "models"
    shutil.copytree(LEGACY / "checkpoints" / "20L1_1L2", models / "Exp" / "Synth" / "20L1_1L2")
    assert not (models / "Exp" / "Synth" / "20L1_1L2" / "run.json").exists()
    cfg = demo_cfg(legacy_world, "embedding_size=128", f"output_ori={legacy_world / 'b128' / 'backbone.pth'}")
    out = evaluation.evaluate(cfg, tmp_path / "res", models, "Exp/Synth", tmp_path / "ref.csv")
    assert (out / "20L1_1L2_metrics.csv").read_text() == (LEGACY / "expected" / "legacy_metrics.csv").read_text()
    assert (tmp_path / "ref.csv").read_text() == (LEGACY / "expected" / "legacy_reference.csv").read_text()
    assert not (out / "20L1_1L2_attackers.csv").exists()   # the paper's attackers only: no second CSV


def test_authors_released_layer_sweeps_to_the_same_numbers(legacy_world, tmp_path):
    run = tmp_path / "models" / "Released" / "Synth" / "20L1_1L2"
    run.mkdir(parents=True)
    torch.manual_seed(123)
    from backbones import ProjectionLayer
    torch.save(ProjectionLayer(512, 512, 2).state_dict(), run / "1000ftn_layers.pth")
    assert sha(run / "1000ftn_layers.pth") == json.loads((LEGACY / "hashes.json").read_text())["released_layer"]
    cfg = demo_cfg(legacy_world)
    out = evaluation.evaluate(cfg, tmp_path / "res", tmp_path / "models", "Released/Synth", tmp_path / "ref.csv")
    assert (out / "20L1_1L2_metrics.csv").read_text() == (LEGACY / "expected" / "released_metrics.csv").read_text()
    assert (tmp_path / "ref.csv").read_text() == (LEGACY / "expected" / "released_reference.csv").read_text()


def test_an_old_run_is_not_resumed_and_its_folder_is_left_alone(legacy_world, tmp_path):
    """resume=True on a run of the old code: a clear error before anything is written into its folders."""
    from utils.errors import UserError
    ckpt = tmp_path / "ckpt" / "Demo" / "Exp" / "Synth" / "20L1_1L2"
    logs = tmp_path / "logs" / "Demo" / "Exp" / "Synth" / "20L1_1L2"
    shutil.copytree(LEGACY / "checkpoints" / "20L1_1L2", ckpt)
    shutil.copytree(LEGACY / "logs" / "20L1_1L2", logs)
    before = {p.name: p.read_bytes() for p in [*ckpt.iterdir(), *logs.iterdir()]}
    args = ("embedding_size=128", f"output_ori={legacy_world / 'b128' / 'backbone.pth'}",
            f"data_dir={legacy_world / 'train'}", f"rec={legacy_world / 'rec'}", f"cache_dir={legacy_world / 'cache'}",
            f"checkpoint_root={tmp_path / 'ckpt'}",
            f"log_dir={tmp_path / 'logs'}", "batch_size=16", "num_epoch=1", "checkpoint_every=1")
    with pytest.raises(UserError, match="older version.*resume=False"):
        finetune.train(demo_cfg(legacy_world, *args, "resume=True"))
    assert {p.name: p.read_bytes() for p in [*ckpt.iterdir(), *logs.iterdir()]} == before
    # the record of a run resumed across versions keeps every value under its name (the union of the columns)
    from privacy.runs import append_config_row
    with open(logs / "config.csv", newline="") as fh:
        old = next(csv.DictReader(fh))
    append_config_row(logs / "config.csv", demo_cfg(legacy_world, *args), {"resumed": True})
    with open(logs / "config.csv", newline="") as fh:
        reader = csv.DictReader(fh)
        rows = list(reader)
    assert len(rows) == 2 and "method" in reader.fieldnames and rows[0]["method"] == ""
    assert {k: rows[0][k] for k in old} == old and rows[1]["alpha"] == "20" and rows[1]["s"] == "64.0"


def package_cycles() -> list[list[str]]:
    """Import cycles between the files of one package (function-level imports count: they only hide a cycle), each
    as the modules around it."""
    files = library_files()
    edges: dict[str, set[str]] = {m: set() for m in files}
    for module, path in files.items():
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # `from pkg import mod` names the module mod; `from mod import name` the module mod
                targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in files else node.module
                           for a in node.names]
            else:
                continue
            skip = {id(n) for n in ast.walk(tree) if isinstance(n, ast.If) and "TYPE_CHECKING" in ast.unparse(n.test)
                    for n in ast.walk(n)}
            if id(node) in skip:
                continue
            edges[module] |= {t for t in targets if t in files and t != module
                              and package_of(t) == package_of(module)}
    cycles, state = [], {}

    def visit(m: str, stack: list[str]) -> None:
        state[m] = "open"
        for n in sorted(edges[m]):
            if state.get(n) == "open":
                cycles.append(stack[stack.index(n):] + [n])
            elif n not in state:
                visit(n, [*stack, n])
        state[m] = "done"
    for m in sorted(edges):
        if m not in state:
            visit(m, [m])
    return cycles


def test_no_package_has_an_import_cycle_between_its_files():
    cycles = {tuple(c[:-1]) for c in package_cycles()}
    assert cycles == set()
