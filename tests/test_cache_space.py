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
    folder = cache / f".building-{name}"
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
