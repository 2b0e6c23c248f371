"""Scale: the parallel sweep, extraction that keeps every finished row, extraction sharded over processes."""
from collections import Counter

import numpy as np
import pytest

from pipeline import train as finetune
import backbones
from pipeline import sweep as evaluation
from helpers import demo_cfg, synthetic_world
from synthetic.backbone import demo_decoder
from templates.entry import open_entry
from utils.errors import UserError


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A synthetic world with one run of two checkpoints, two evaluation sets."""
    root = tmp_path_factory.mktemp("scale")
    synthetic_world(root, n_train_ids=24, imgs=3, n_test_ids=16, test_imgs=3, test_sets=("synth_a", "synth_b"),
                    pairs=80, gender=48)
    finetune.train(demo_cfg(root, "num_epoch=4", "checkpoint_every=2"))
    return root


@pytest.mark.subprocess
def test_parallel_sweep_writes_the_same_bytes_as_one_job(world, tmp_path):
    files = {}
    for jobs in (1, 2):
        out = tmp_path / f"jobs{jobs}"
        cfg = demo_cfg(world, "test_targets=['synth_a','synth_b']", "attackers=LogReg,SVM,RBF,kNN", "bootstrap=50",
                       f"n_jobs={jobs}")
        folder = evaluation.evaluate(cfg, out, world / "ckpt" / "Demo", "Exp/Synth", out / "reference.csv")
        files[jobs] = {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*.csv"))}
        assert (folder / "report.md").is_file()
    assert set(files[1]) == {"reference.csv", "Exp/Synth/bare_backbone_attackers.csv",
                             "Exp/Synth/bare_backbone_diagnostics.csv",
                             "Exp/Synth/bare_backbone_verification.csv", "Exp/Synth/protocol.csv",
                             *(f"Exp/Synth/20L1_1L2_{k}.csv" for k in ("metrics", "attackers", "diagnostics",
                                                                         "verification")),
                             *(f"Exp/Synth/scores/bare_backbone/{s}.csv" for s in ("synth_a", "synth_b")),
                             *(f"Exp/Synth/scores/20L1_1L2/{s}_step{k}.csv" for s in ("synth_a", "synth_b")
                               for k in (4, 8))}
    assert files[1] == files[2]


def counting_decoder(**kw):
    """The demo decoder, recording every image row it is run on (bytes of the normalised input)."""
    net = demo_decoder(**kw)
    plain = net.forward

    def forward(x):
        SEEN.extend(row.numpy().tobytes() for row in x)
        return plain(x)
    net.forward = forward
    return net


SEEN: list[bytes] = []


@pytest.fixture
def counting(monkeypatch):
    """The counting decoder registered for this test only."""
    monkeypatch.setitem(backbones.ARCHITECTURES, "counting_decoder", counting_decoder)


def test_an_undecodable_file_is_reported_and_no_image_is_extracted_twice(tmp_path, counting):
    synthetic_world(tmp_path, n_train_ids=20, imgs=3, n_test_ids=12, test_imgs=3, pairs=40, gender=24)
    folder = sorted((tmp_path / "train").iterdir())[3]
    bad = folder / "broken.png"
    bad.write_bytes(b"not an image at all")
    overrides = ("network=counting_decoder", "num_epoch=1", "extract_batch_size=8", "n_jobs=1")
    SEEN.clear()
    with pytest.raises(UserError) as err:
        finetune.train(demo_cfg(tmp_path, *overrides))
    assert "broken.png" in str(err.value) and "not extracted again" in str(err.value)
    first = len(SEEN)
    bad.unlink()
    finetune.train(demo_cfg(tmp_path, *overrides))
    undecodable = np.full((3, 112, 112), -1, np.float32).tobytes()   # its placeholder (and its flip) were run
    assert len(SEEN) == first == 2 * 61 and [r for r, c in Counter(SEEN).items() if c > 1] == [undecodable]
    entry = open_entry(next((tmp_path / "cache").glob("train-*")))
    SEEN.clear()
    finetune.train(demo_cfg(tmp_path, *overrides, f"cache_dir={tmp_path / 'fresh'}", "extract_batch_size=5"))
    fresh = open_entry(next((tmp_path / "fresh").glob("train-*")))
    assert len(entry) == 60 and np.array_equal(entry.templates, fresh.templates)
    assert np.array_equal(entry.norms, fresh.norms)


def test_auto_decoding_workers_share_the_cores_among_torchrun_processes(monkeypatch):
    from utils.device import MAX_AUTO_WORKERS, decode_workers
    assert decode_workers(0) == 0 and decode_workers(5) == 5                 # an explicit number is kept
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(16)), raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert decode_workers(-1) == MAX_AUTO_WORKERS == 8                        # 16 cores, one process: capped
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert decode_workers(-1) == 3                                            # 4 cores each, less the process
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "16")
    assert decode_workers(-1) == 2                                            # never fewer than 2
