"""Scale: the parallel sweep, extraction that keeps every finished row, extraction sharded over processes."""
import pytest

import finetune
from eval import evaluation
from helpers import demo_cfg, synthetic_world


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A synthetic world with one run of two checkpoints, two evaluation sets."""
    root = tmp_path_factory.mktemp("scale")
    synthetic_world(root, n_train_ids=24, imgs=3, n_test_ids=16, test_imgs=3, test_sets=("synth_a", "synth_b"),
                    pairs=80, gender=48)
    finetune.train(demo_cfg(root, "num_epoch=4", "checkpoint_every=2"))
    return root


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
                             *(f"Exp/Synth/20L1_1L2_{k}.csv" for k in ("metrics", "attackers"))}
    assert files[1] == files[2]
