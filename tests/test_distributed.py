"""Template extraction shared by torchrun's processes (gloo on the CPU): the same cache and checkpoints as one
process, and a process killed mid-extraction leaves only finished rows, which the rerun does not extract again."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import synthetic_world
from templates.entry import open_entry

REPO = Path(__file__).resolve().parent.parent

# a plug-in, imported by every process: the demo decoder, counting the images each process runs it on and killing
# its own process at a chosen forward call; rows go to the store every 8 images so that a killed process has some
PLUGIN = '''
import os, signal
import backbones, templates.rowstore
from synthetic.backbone import demo_decoder

templates.rowstore.CHUNK_ROWS = 8
CALLS = [0]


def counting_decoder(**kw):
    net = demo_decoder(**kw)
    plain = net.forward

    def forward(x):
        CALLS[0] += 1
        rank = os.environ.get("RANK", "0")
        if os.environ.get("KILL_RANK") == rank and CALLS[0] > int(os.environ["KILL_AT_CALL"]):
            os.kill(os.getpid(), signal.SIGKILL)
        with open(os.path.join(os.environ["COUNT_DIR"], "rank" + rank), "a") as fh:
            fh.write(f"{len(x)}\\n")
        return plain(x)
    net.forward = forward
    return net


backbones.register_architecture("counting_decoder", counting_decoder)
'''

N_TRAIN = 72   # 24 identities x 3 images


RENDEZVOUS_TROUBLE = ("Address already in use", "EADDRINUSE", "RendezvousConnectionError", "RendezvousTimeoutError")


def launch(cmd: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    """Run a command (one process or torchrun); once more if torchrun could not set up its rendezvous on this
    machine (a port taken between its choice and its use), which says nothing about the code under test."""
    for _ in range(2):
        out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        if out.returncode == 0 or not any(t in out.stderr for t in RENDEZVOUS_TROUBLE):
            return out
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("torchrun")
    synthetic_world(root, n_train_ids=24, imgs=3, n_test_ids=16, test_imgs=3, pairs=80, gender=48)
    (root / "counting_plugin.py").write_text(PLUGIN)
    return root


def run(world: Path, name: str, procs: int, counts: str = "counts", data: str = "train",
        **env: str) -> subprocess.CompletedProcess:
    """finetune.py on the synthetic world, writing under world/name: one process, or ``procs`` under torchrun;
    each process counts its backbone passes in world/name/<counts>."""
    out = world / name
    (out / counts).mkdir(parents=True, exist_ok=True)
    overrides = [f"plugins=['synthetic','{world / 'counting_plugin.py'}']", "network=counting_decoder",
                 "pretrained=Demo", "experiment=Exp", "data=Synth", f"checkpoint_root={out / 'ckpt'}",
                 f"log_dir={out / 'logs'}", f"data_dir={world / data}", f"rec={world / 'rec'}",
                 f"cache_dir={out / 'cache'}", f"output_ori={world / 'ckpt/Demo/reference/backbone.pth'}",
                 "batch_size=16", "num_epoch=2", "checkpoint_every=1", "eval_step=1000", "val_targets=['synth_a']",
                 "num_workers=0", "device=cpu", "extract_batch_size=8", "log_every=5"]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}"] \
        if procs > 1 else [sys.executable]
    environ = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    environ.update(OMP_NUM_THREADS="1", COUNT_DIR=str(out / counts), **env)
    return launch([*launcher, str(REPO / "finetune.py"), "--set", *overrides], environ)


@pytest.fixture(scope="module")
def one_process_run(world) -> Path:
    """The one-process run (world/one) that the torchrun runs are compared with."""
    out = run(world, "one", 1)
    assert out.returncode == 0, out.stderr[-3000:]
    return world / "one"


def extracted(world: Path, name: str, counts: str = "counts") -> dict[str, int]:
    """Images each process ran the backbone on (every image is run twice: as it is and flipped)."""
    files = sorted((world / name / counts).glob("rank*"))
    return {f.name: sum(int(n) for n in f.read_text().split()) // 2 for f in files}


def entries(world: Path, name: str) -> dict[str, object]:
    return {p.name.split("-")[0] + "-" + p.name.split("-")[1]: open_entry(p)
            for p in (world / name / "cache").iterdir() if not p.name.startswith(".")}


def store_keys(world: Path, name: str) -> list[bytes]:
    keys = []
    for chunk in (world / name / "cache" / ".rows").glob("*/chunk-*.npz"):
        with np.load(chunk) as z:
            keys += z["keys"].tolist()
    return keys


def checkpoints(world: Path, name: str) -> dict[str, dict[str, torch.Tensor]]:
    folder = world / name / "ckpt" / "Demo" / "Exp" / "Synth" / "20L1_1L2"
    return {p.name: torch.load(p, weights_only=True) for p in sorted(folder.glob("*.pth")) if p.name != "resume.pth"}


def same_cache(world: Path, a: str, b: str) -> None:
    ea, eb = entries(world, a), entries(world, b)
    assert set(ea) == set(eb) == {"train-train", "bin-synth_a"}
    for name in ea:
        assert ea[name] is not None and eb[name] is not None
        assert np.array_equal(ea[name].templates, eb[name].templates), name
        assert np.array_equal(ea[name].norms, eb[name].norms), name


@pytest.mark.subprocess
@pytest.mark.slow
def test_two_processes_give_the_one_process_cache_and_checkpoints(world, one_process_run):
    two = run(world, "two", 2)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "2 processes share the template extraction" in two.stderr
    counts = extracted(world, "two")
    assert set(counts) == {"rank0", "rank1"} and min(counts.values()) > 0        # both did a share
    assert sum(counts.values()) == sum(extracted(world, "one").values())         # and together exactly the work
    same_cache(world, "one", "two")
    ca, cb = checkpoints(world, "one"), checkpoints(world, "two")
    assert set(ca) == set(cb) == {"4ftn_layers.pth", "4header.pth", "8ftn_layers.pth", "8header.pth"}
    for f in ca:
        assert ca[f].keys() == cb[f].keys() and all(torch.equal(ca[f][k], cb[f][k]) for k in ca[f]), f


@pytest.mark.subprocess
@pytest.mark.slow
def test_a_killed_process_leaves_rows_the_rerun_does_not_extract_again(world, one_process_run):
    killed = run(world, "killed", 2, KILL_RANK="1", KILL_AT_CALL="3")   # process 1 dies in its second batch
    assert killed.returncode != 0
    cache = world / "killed" / "cache"
    assert [p for p in cache.iterdir() if not p.name.startswith(".")] == []     # no entry anyone would read
    before = store_keys(world, "killed")
    assert 8 <= len(before) < N_TRAIN                                            # process 1's first batch is kept
    rerun = run(world, "killed", 2, counts="rerun-counts")
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    after = store_keys(world, "killed")
    assert len(after) == len(set(after))                                         # no image in the store twice
    assert set(before) <= set(after)
    # the rerun ran the backbone on exactly the images the killed run had not stored: none twice
    assert sum(extracted(world, "killed", "rerun-counts").values()) == len(after) - len(before)
    same_cache(world, "one", "killed")


@pytest.mark.subprocess
def test_cache_false_under_torchrun_is_refused(world):
    r = launch([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        str(REPO / "finetune.py"), "--set", "plugins=['synthetic']", "network=demo_decoder",
                        f"data_dir={world / 'train'}", f"rec={world / 'rec'}", "cache=False", "eval_step=0",
                        f"checkpoint_root={world / 'nocache'}", f"log_dir={world / 'nocache'}", "batch_size=16",
                        f"output_ori={world / 'ckpt/Demo/reference/backbone.pth'}", "device=cpu"],
                       {**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode != 0
    assert "cache=False has none" in r.stderr
    assert not (world / "nocache").exists()


def sweep(world: Path, name: str, procs: int) -> subprocess.CompletedProcess:
    """eval/evaluation.py over the one-process run's checkpoints, with its own cache: one process or torchrun."""
    out = world / name
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}"] \
        if procs > 1 else [sys.executable]
    return launch(
        [*launcher, str(REPO / "eval" / "evaluation.py"), "--log-root", str(out / "results"), "--model-root",
         str(world / "one" / "ckpt" / "Demo"), "--experiment-name", "Exp/Synth", "--reference-pth",
         str(out / "reference.csv"), "--set", f"plugins=['synthetic','{world / 'counting_plugin.py'}']",
         "network=counting_decoder", f"rec={world / 'rec'}", f"cache_dir={out / 'cache'}", "test_targets=['synth_a']",
         f"output_ori={world / 'ckpt/Demo/reference/backbone.pth'}", "device=cpu", "num_workers=0",
         "extract_batch_size=8", "n_jobs=1"],
        {**os.environ, "OMP_NUM_THREADS": "1", "COUNT_DIR": str(out)})


@pytest.mark.subprocess
@pytest.mark.slow
def test_the_sweep_under_torchrun_writes_the_one_process_results(world, one_process_run):
    one, two = sweep(world, "sweep1", 1), sweep(world, "sweep2", 2)
    assert one.returncode == 0, one.stderr[-3000:]
    assert two.returncode == 0, two.stderr[-3000:]
    assert "2 processes share the template extraction" in (world / "sweep2/results/Exp/Synth/evaluate.log").read_text()
    assert extracted(world, "sweep2", ".").keys() == {"rank0", "rank1"}
    files = {}
    for name in ("sweep1", "sweep2"):
        out = world / name
        files[name] = {p.relative_to(out).as_posix(): p.read_bytes() for p in [out / "reference.csv",
                                                                             *sorted(out.rglob("*_metrics.csv"))]}
    assert len(files["sweep1"]) == 2 and files["sweep1"] == files["sweep2"]


@pytest.mark.subprocess
@pytest.mark.slow
def test_an_undecodable_file_in_one_share_is_reported_and_nothing_is_extracted_twice(world):
    shutil.copytree(world / "train", world / "bad_train")
    folder = sorted(p for p in (world / "bad_train").iterdir() if p.is_dir())[-1]   # in process 1's share
    bad = folder / "zz_truncated.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    failed = run(world, "bad", 2, data="bad_train")
    assert failed.returncode != 0
    assert str(bad) in failed.stderr and "do not decode" in failed.stderr
    assert [p for p in (world / "bad" / "cache").iterdir() if not p.name.startswith(".")] == []
    before = store_keys(world, "bad")
    assert len(before) == N_TRAIN                      # every other image's rows are kept
    bad.unlink()
    rerun = run(world, "bad", 2, counts="rerun-counts", data="bad_train")
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    after = store_keys(world, "bad")
    assert len(after) == len(set(after)) and set(before) <= set(after)
    assert sum(extracted(world, "bad", "rerun-counts").values()) == len(after) - len(before)   # the .bin's only


class Peers:
    """What the other processes report at a step (stands in for torch.distributed's all_gather_object)."""

    def __init__(self, rank: int, reports: list):
        self.rank, self.reports = rank, reports

    def __call__(self, obj):
        out = list(self.reports)
        out[self.rank] = obj
        return out


def test_processes_agree_on_a_failure_anywhere(monkeypatch):
    from utils.distributed import Processes
    from utils.errors import UserError
    procs = Processes(rank=0, world=3)
    monkeypatch.setattr(Processes, "gather", lambda self, obj: Peers(0, [None, ("b", None), ("c", None)])(obj))
    assert procs.agree("a", None, "extracting") == ["a", "b", "c"]            # nobody failed: every value
    monkeypatch.setattr(Processes, "gather",
                        lambda self, obj: Peers(0, [None, ("b", None), (None, "OSError: disk full")])(obj))
    with pytest.raises(UserError, match=r"process 2 failed while extracting, so process 0 stops too\. Process 2's "
                                        r"error: OSError: disk full"):
        procs.agree("a", None, "extracting")
    own = RuntimeError("CUDA out of memory")
    with pytest.raises(RuntimeError, match="CUDA out of memory"):              # the failed one keeps its own error
        procs.agree(None, own, "extracting")
    monkeypatch.undo()
    assert Processes().agree(7, None, "anything") == [7]                       # one process: no collective


def test_process_0s_failure_reaches_every_process(monkeypatch):
    import torch.distributed as dist
    from utils.distributed import Processes
    from utils.errors import UserError

    def broadcast(box, src):   # what process 0 sent
        box[0] = ("plan", "OSError: cache_dir is full")
    monkeypatch.setattr(dist, "broadcast_object_list", broadcast)
    with pytest.raises(UserError, match=r"process 0 failed while planning, so process 1 stops too\. Process 0's "
                                        r"error: OSError: cache_dir is full"):
        Processes(rank=1, world=2).from_main(None, None, "planning")
    monkeypatch.setattr(dist, "broadcast_object_list", lambda box, src: None)
    assert Processes(rank=0, world=2).from_main("plan", None, "planning") == "plan"
    with pytest.raises(OSError, match="full"):
        Processes(rank=0, world=2).from_main(None, OSError("full"), "planning")
