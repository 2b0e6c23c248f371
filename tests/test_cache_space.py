"""The template cache's space: a full disk in cache_dir, checkpoint_root or log_dir gives one clear message, keeps
what was complete and leaves nothing partial; tools/cache.py reports and reclaims leftovers, never what is in use."""
import contextlib
import errno
import json
import logging
import os
import resource
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import backbones
import templates.rowstore
from config.loading import load_config
from facedata.dataset import scan_dataset
from helpers import TinyNet, template_cache, tiny_backbone_file, write_png
from utils.errors import UserError
from utils.io import atomic_torch_save
from templates import space
from templates.cache import folder_inputs
from templates.entry import open_entry, write_entry
from templates.rowstore import RowStore

REPO = Path(__file__).resolve().parent.parent


@contextlib.contextmanager
def file_size_limit(limit: int):
    """Files this process writes stop growing at ``limit`` bytes (EFBIG, as a full disk gives ENOSPC)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)


@pytest.fixture
def world(tmp_path, monkeypatch):
    """24 images in 6 identities, the tiny backbone, rows stored 4 at a time (each chunk about 17 KB)."""
    monkeypatch.setitem(backbones.ARCHITECTURES, "tiny", TinyNet)
    monkeypatch.setattr(templates.rowstore, "CHUNK_ROWS", 4)
    rng = np.random.default_rng(0)
    for k in range(6):
        for j in range(4):
            write_png(tmp_path / "d" / f"{k}_{k % 2}" / f"{j}.png", rng.integers(0, 256, (112, 112, 3), np.uint8))
    weights = tiny_backbone_file(tmp_path / "w.pth")
    cfg = load_config(None, ["network=tiny", f"output_ori={weights}", f"cache_dir={tmp_path / 'cache'}",
                             "num_workers=0", "extract_batch_size=4"])
    paths = scan_dataset(tmp_path / "d").paths
    assert len(paths) == 24

    def get(name: str, items):
        return template_cache(cfg).get(name, folder_inputs(tmp_path / "d", items), items)
    return tmp_path / "cache", paths, get


def leftovers(cache: Path) -> list[str]:
    return sorted(p.name for p in cache.rglob("*") if p.suffix == ".tmp" or p.name.startswith(".building-"))


def test_a_full_cache_dir_is_named_keeps_entries_and_rows_and_leaves_no_partial_file(world, caplog):
    cache, paths, get = world
    small = np.array(get("small", paths[:8]).templates)
    with file_size_limit(8_000), pytest.raises(UserError) as err:   # no chunk of rows fits
        get("all", paths)
    assert f"'{cache}' (cache_dir)" in str(err.value) and "full" in str(err.value)
    assert leftovers(cache) == [] and not list(cache.glob("all-*"))
    with file_size_limit(40_000), pytest.raises(UserError, match="cache_dir"):   # the rows fit, the entry does not
        get("all", paths)
    assert leftovers(cache) == [] and not list(cache.glob("all-*"))
    with caplog.at_level(logging.INFO):
        entry = get("all", paths)      # every row was kept: nothing is extracted again
    assert "24 of 24 distinct images already extracted" in caplog.text
    np.testing.assert_array_equal(entry.templates[:8], small)
    np.testing.assert_array_equal(open_entry(next(cache.glob("small-*"))).templates, small)


def test_no_space_left_while_writing_rows_removes_the_partial_chunk(world, monkeypatch):
    cache, paths, get = world
    real = np.savez

    def savez(fh, **arrays):   # half a chunk reaches the disk, then it is full
        fh.write(b"\0" * 1000)
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(np, "savez", savez)
    with pytest.raises(UserError, match="No space left on device") as err:
        get("all", paths)
    assert str(cache) in str(err.value)
    assert leftovers(cache) == [] and not list(cache.glob("all-*"))
    monkeypatch.setattr(np, "savez", real)
    assert len(get("all", paths)) == 24


def test_a_full_checkpoint_folder_keeps_the_previous_checkpoint_and_no_temporary_file(tmp_path):
    path = tmp_path / "ckpt" / "resume.pth"
    atomic_torch_save({"w": torch.zeros(10)}, path)
    before = path.read_bytes()
    with file_size_limit(64_000), pytest.raises(UserError) as err:   # torch itself says "unexpected pos"
        atomic_torch_save({"w": torch.randn(100_000)}, path)
    assert f"'{path.parent}' (checkpoint_root)" in str(err.value) and "File too large" in str(err.value)
    assert path.read_bytes() == before and [p.name for p in path.parent.iterdir()] == ["resume.pth"]


LOG_SCRIPT = """
import resource, signal, sys
from pathlib import Path
from utils.logs import log_to
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
with log_to(Path(sys.argv[1]) / "training.log") as log:
    for i in range(200):
        log.info("step %d %s", i, "x" * 80)
"""


@pytest.mark.subprocess
def test_a_full_log_folder_is_said_once_and_the_log_goes_on_on_stderr(tmp_path):
    out = subprocess.run([sys.executable, "-c", LOG_SCRIPT, str(tmp_path)], capture_output=True, text=True,
                         cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "Logging error" not in out.stderr and "Traceback" not in out.stderr
    assert out.stderr.count(f"cannot write the log file '{tmp_path / 'training.log'}'") == 1
    assert out.stderr.count(" INFO step ") == 200
    assert 0 < (tmp_path / "training.log").stat().st_size <= 4096


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def fake_build(cache: Path, name: str, **owner) -> Path:
    """A build folder as templates.cache names it (.building-<entry>-<pid>-<6 hex>), with its owner.json."""
    folder = cache / f".building-{name}-0f1e2d3c-{owner.get('pid', 0)}-a1b2c3"
    folder.mkdir()
    (folder / "templates.npy").write_bytes(b"\0" * 5000)   # a half-assembled entry
    (folder / "owner.json").write_text(json.dumps(owner))
    return folder


def the_store(cache: Path) -> RowStore:
    (folder,) = [p for p in (cache / ".rows").iterdir() if p.is_dir()]
    return RowStore(folder)


def store_keys(store: RowStore) -> set[bytes]:
    return set(store.find())


@pytest.mark.subprocess
def test_status_and_prune_reclaim_leftovers_and_never_what_is_in_use(world, capsys):
    cache, paths, get = world
    kept = get("kept", paths[:8])
    kept_templates = np.array(kept.templates)
    gone = get("gone", paths[8:16]).path          # an entry the user then deletes: its rows are no one's
    for f in gone.iterdir():
        f.unlink()
    gone.rmdir()
    store = the_store(cache)
    (store.path / "chunk-killed.tmp").write_bytes(b"\0" * 3000)        # a killed run's half-written chunk
    here = socket.gethostname()
    dead = fake_build(cache, "dead", host=here, pid=dead_pid(), rows=store.name)
    live = fake_build(cache, "live", host=here, pid=os.getpid(), rows=store.name)
    remote = fake_build(cache, "remote", host="another-machine", pid=1, rows="another-store")

    assert space.main(["--status", "--cache-dir", str(cache)]) == 0
    report = capsys.readouterr().out
    assert "entries: 1" in report and "kept-" in report and "8 images  in use" in report   # ``kept`` is open
    assert "has ended" in report and "is running" in report and "within the 24 h grace" in report
    assert "16 rows in 4 chunks, 8 held by no entry, 1 temporary chunk(s)" in report
    # a build in progress on this machine protects its row store: only the dead build goes
    assert space.main(["--prune", "--cache-dir", str(cache)]) == 0
    assert not dead.exists() and live.exists() and remote.exists()
    assert (store.path / "chunk-killed.tmp").exists() and len(store_keys(store)) == 16
    live_files = sorted(p.name for p in live.iterdir())
    # a command building from the store (its lock held) protects it as well
    for f in live.iterdir():
        f.unlink()
    live.rmdir()
    with store.in_use():
        done = space.prune(cache)
    assert done.rows == 0 and (store.path / "chunk-killed.tmp").exists()
    # nothing in use: the leftovers and the rows no entry holds go; the entry and its rows stay
    done = space.prune(cache, grace_hours=0)
    assert not remote.exists() and done.rows == 8 and done.tmp == 1 and done.freed > 0
    assert leftovers(cache) == [] and live_files == ["owner.json", "templates.npy"]
    assert store_keys(store) == set(np.load(kept.path / "keys.npy").tolist()) and len(store_keys(store)) == 8
    np.testing.assert_array_equal(open_entry(kept.path).templates, kept_templates)
    # the pruned store still serves: the kept rows are not extracted again
    assert np.array_equal(get("more", paths[:12]).templates[:8], kept_templates)


def test_prune_keeps_every_row_while_an_entry_does_not_say_which_it_holds(world):
    cache, paths, get = world
    get("a", paths[:8])
    write_entry(cache / "legacy-0123", np.ones((3, 2, 512), np.float32))   # no keys.npy: its store is unknown
    store = the_store(cache)
    (store.path / "chunk-x.tmp").write_bytes(b"\0" * 100)
    for f in next(cache.glob("a-*")).iterdir():   # its rows are no one's now, but the legacy entry's might be
        f.unlink()
    done = space.prune(cache)
    assert done.rows == 0 and done.tmp == 1 and len(store_keys(store)) == 8
    assert "--prune keeps every row" in space.describe(space.survey(cache))


def test_status_of_a_missing_folder_is_a_clear_error(tmp_path, capsys):
    assert space.main(["--status", "--cache-dir", str(tmp_path / "nowhere")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_a_plot_over_a_file_size_limit_names_the_results_folder_and_leaves_no_file(tmp_path, monkeypatch):
    import errno
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.figure import Figure
    from pipeline.report import _save

    def too_large(self, *a, **k):
        raise OSError(errno.EFBIG, "File too large")
    monkeypatch.setattr(Figure, "savefig", too_large)
    fig = plt.figure()
    with pytest.raises(UserError, match=str(tmp_path)):
        _save(fig, tmp_path / "tradeoff.png")
    assert list(tmp_path.iterdir()) == []


def tree_bytes(root: Path) -> dict[str, tuple]:
    """Every entry under ``root`` (links not followed): kind, size and content or link target, byte for byte."""
    state = {".": ("dir",)}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            kind = "link" if p.is_symlink() else "dir" if p.is_dir() else "file"
            state[str(p.relative_to(root))] = (kind, os.readlink(p) if kind == "link" else
                                               p.read_bytes() if kind == "file" else None)
    return state


def test_prune_removes_only_the_caches_build_folders_and_a_users_stay_byte_for_byte(world, tmp_path, capsys):
    cache, paths, get = world
    get("kept", paths[:4])
    store = the_store(cache)
    dead = fake_build(cache, "dead", host=socket.gethostname(), pid=dead_pid(), rows=store.name)
    users = {}
    mine = cache / ".building-x"                   # a user's folder with the prefix, no owner.json
    (mine / "sub").mkdir(parents=True)
    (mine / "notes.txt").write_bytes(b"my notes\n")
    (mine / "sub" / "data.bin").write_bytes(bytes(range(256)))
    users[mine] = None
    lookalike = cache / ".building-plan-7-abcdef"   # the cache's name pattern, but no owner.json
    lookalike.mkdir()
    (lookalike / "draft.md").write_text("draft")
    elsewhere = tmp_path / "precious"
    elsewhere.mkdir()
    (elsewhere / "owner.json").write_text("{}")
    (elsewhere / "thesis.tex").write_text("chapter 1")
    link = cache / ".building-link-7-abcdef"       # a link to a user's folder that even holds an owner.json
    link.symlink_to(elsewhere, target_is_directory=True)
    before = {p: tree_bytes(p) for p in (mine, lookalike, elsewhere)}

    assert space.main(["--status", "--cache-dir", str(cache)]) == 0
    report = capsys.readouterr().out
    assert "not made by the cache" in report and ".building-x" in report and ".building-link-7-abcdef" in report
    assert space.main(["--prune", "--cache-dir", str(cache), "--grace-hours", "0"]) == 0
    out = capsys.readouterr().out
    assert "kept .building-x: not a build folder of the cache" in out
    assert not dead.exists()
    assert link.is_symlink() and os.readlink(link) == str(elsewhere)
    assert {p: tree_bytes(p) for p in (mine, lookalike, elsewhere)} == before


def test_a_build_folder_the_cache_really_leaves_is_recognised(world, monkeypatch):
    """The name pattern matches what templates.cache writes (an extraction killed before publishing)."""
    cache, paths, get = world
    from templates import cache as cache_module

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    def close_as_a_killed_process(plan):   # the lock goes with the process; the build folder stays
        plan.lock.close()
    monkeypatch.setattr(cache_module.TemplateCache, "_publish", killed)
    monkeypatch.setattr(cache_module._Build, "close", close_as_a_killed_process)
    with pytest.raises(KeyboardInterrupt):
        get("killed", paths[:4])
    left = space.survey(cache)
    assert len(left.builds) == 1 and not left.foreign
    assert left.builds[0].in_use and "is running" in left.builds[0].why   # this process made it


@pytest.mark.parametrize("grace", ["nan", "inf", "-1", "-inf"])
def test_a_grace_that_is_not_a_finite_non_negative_number_is_refused(world, grace, capsys):
    cache, paths, get = world
    get("kept", paths[:4])
    remote = fake_build(cache, "remote", host="another-machine", pid=1, rows="another-store")
    before = tree_bytes(remote)
    assert space.main(["--prune", "--cache-dir", str(cache), f"--grace-hours={grace}"]) == 2
    assert "--grace-hours" in capsys.readouterr().err
    assert tree_bytes(remote) == before
    with pytest.raises(UserError, match="finite"):
        space.prune(cache, float(grace))


def test_damaged_chunks_and_broken_links_are_reported_never_a_traceback(world, tmp_path, capsys):
    cache, paths, get = world
    kept = get("kept", paths[:8])
    kept_templates = np.array(kept.templates)
    gone = get("gone", paths[8:12]).path
    for f in gone.iterdir():
        f.unlink()
    gone.rmdir()
    store = the_store(cache)
    (store.path / "chunk-zero.npz").write_bytes(b"")
    (store.path / "chunk-garbage.npz").write_bytes(b"PK\x03\x04 this is not a zip archive" * 10)
    (store.path / "chunk-dangling.npz").symlink_to(tmp_path / "nowhere.npz")
    np.savez(store.path / "chunk-partial.npz", keys=np.array([b"k"]))   # a zip without the templates
    precious = tmp_path / "precious.txt"
    precious.write_text("keep me")
    dead = fake_build(cache, "dead", host=socket.gethostname(), pid=dead_pid(), rows=store.name)
    (dead / "broken").symlink_to(tmp_path / "nothing-here")
    (dead / "to-a-users-file").symlink_to(precious)
    odd = fake_build(cache, "odd", host=socket.gethostname(), pid=10 ** 30, rows=[1])
    empty = fake_build(cache, "empty")
    (empty / "owner.json").write_bytes(b"")
    store_before = tree_bytes(store.path)

    assert space.main(["--status", "--cache-dir", str(cache)]) == 0
    report = capsys.readouterr().out
    for line in ("damaged: chunk-zero.npz: empty (0 bytes)", "damaged: chunk-dangling.npz: a broken symbolic link",
                 "damaged: chunk-garbage.npz: not a readable row chunk", "damaged: chunk-partial.npz: not a readable",
                 "damaged: broken: a broken symbolic link", "4 damaged chunk(s)"):
        assert line in report
    assert report.count("damaged: owner.json: not the cache's owner record") == 2
    assert f"process {10 ** 30} of this machine has ended" in report
    # --prune without the flag: the leftover build goes, the damaged store is left as it is and named
    assert space.main(["--prune", "--cache-dir", str(cache)]) == 0
    out = capsys.readouterr().out
    assert "4 damaged chunk(s)" in out and "--remove-damaged" in out
    assert not dead.exists() and not odd.exists() and precious.read_text() == "keep me"
    assert empty.exists()   # no recorded process: kept within the grace
    assert tree_bytes(store.path) == store_before
    # with it: the damaged chunks go, then the store is pruned as usual; the entry's rows stay
    # (a build naming no store protects every store while within the grace: grace 0 lets it go too)
    assert space.main(["--prune", "--remove-damaged", "--cache-dir", str(cache), "--grace-hours", "0"]) == 0
    assert "4 damaged chunk(s)" in capsys.readouterr().out
    assert sorted(p.name for p in store.path.iterdir() if "chunk-" in p.name and not p.name[6:7].isdigit()) == []
    assert store_keys(store) == set(np.load(kept.path / "keys.npy").tolist())
    np.testing.assert_array_equal(open_entry(kept.path).templates, kept_templates)
    assert space.main(["--status", "--remove-damaged", "--cache-dir", str(cache)]) == 2


def test_a_chunk_damaged_after_it_was_written_stops_a_run_by_name_and_the_tool_repairs_it(world, capsys):
    """A run that meets a damaged row chunk (here cut short, as by a copy) stops with one paragraph naming the chunk
    and the cache tool's --remove-damaged, never a traceback; after the tool removed it, the run extracts the lost
    images again and gives the templates of a store that was never damaged."""
    cache, paths, get = world
    first = np.array(get("first", paths[:8]).templates)
    store = the_store(cache)
    chunk = store.chunks()[0]
    chunk.write_bytes(chunk.read_bytes()[:300])   # a zip cut short: its directory is lost
    with pytest.raises(UserError) as exc:
        get("second", paths[:12])   # a new entry of the same store: every chunk is read
    msg = str(exc.value)
    assert f"row chunk '{chunk}'" in msg and "--remove-damaged" in msg and str(cache) in msg and "\n" not in msg
    assert space.main(["--prune", "--remove-damaged", "--cache-dir", str(cache), "--grace-hours", "0"]) == 0
    capsys.readouterr()
    assert not chunk.exists()
    again = np.array(get("second", paths[:12]).templates)
    assert np.array_equal(again[:8], first)   # the lost rows extracted again: the same templates
