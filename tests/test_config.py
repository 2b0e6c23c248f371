import pytest

from utils.config import load_config
from utils.errors import UserError


def test_defaults_match_the_authors_and_derive_paths():
    cfg = load_config()
    assert (cfg.embedding_size, cfg.lr, cfg.headid_lr, cfg.s, cfg.m, cfg.alpha, cfg.beta, cfg.batch_size,
            cfg.num_epoch, cfg.eval_step, cfg.loss) == (512, 0.01, 0.01, 64.0, 0.0, 20, 1, 128, 100, 1000, "ArcFace")
    assert cfg.val_targets == ["lfw", "agedb_30"]
    assert cfg.test_targets == ["vggface2", "lfw", "agedb_30", "colorferet"]
    assert cfg.output == "work_dirs/checkpoints/ArcFace/OneDataset/ColorFeret/20L1_1L2"
    assert cfg.log_output == "work_dirs/logs/ArcFace/OneDataset/ColorFeret/20L1_1L2"
    assert cfg.output_ori == "work_dirs/checkpoints/ArcFace/reference/backbone.pth"


def test_overrides_are_parsed_as_literals_and_paths_follow():
    cfg = load_config(None, ["alpha=10", "beta=0.5", "val_targets=['lfw']", "SE=True", "data=2024",
                             "checkpoint_root=/x", "output_ori=/w/b.pth"])
    assert cfg.alpha == 10 and cfg.beta == 0.5 and cfg.val_targets == ["lfw"] and cfg.SE is True
    assert cfg.data == "2024"
    assert cfg.output == "/x/ArcFace/OneDataset/2024/10L1_0.5L2"
    assert cfg.output_ori == "/w/b.pth"


def test_unknown_key_names_the_closest_option():
    with pytest.raises(UserError, match="unknown config option 'alhpa'.*Did you mean 'alpha'"):
        load_config(None, ["alhpa=3"])


@pytest.mark.parametrize("item, key", [("batch_size=0.5", "batch_size"), ("lr=fast", "lr"),
                                        ("val_targets=lfw", "val_targets"), ("SE=1", "SE")])
def test_wrong_types_are_named(item, key):
    with pytest.raises(UserError, match=f"config option '{key}'.*must be"):
        load_config(None, [item])


def test_bad_values_and_syntax():
    with pytest.raises(UserError, match="KEY=VALUE"):
        load_config(None, ["alpha"])
    with pytest.raises(UserError, match="'loss'"):
        load_config(None, ["loss=SphereFace"])
    with pytest.raises(UserError, match="batch_size"):
        load_config(None, ["batch_size=0"])


def test_config_module_of_the_same_form(tmp_path):
    mod = tmp_path / "my_config.py"
    mod.write_text("alpha = 5\nnum_epoch = 3\ndata = 'LFW'\n")
    cfg = load_config(mod, ["num_epoch=7"])
    assert cfg.alpha == 5 and cfg.num_epoch == 7 and cfg.data == "LFW" and cfg.lr == 0.01
    authors = tmp_path / "authors_style.py"
    authors.write_text("config = dict()\nconfig['beta'] = 2\nconfig['lr'] = 0.1\n")
    cfg = load_config(authors)
    assert cfg.beta == 2 and cfg.lr == 0.1
    bad = tmp_path / "bad.py"
    bad.write_text("alpah = 5\n")
    with pytest.raises(UserError, match=f"unknown config option 'alpah'.*{bad.name}.*'alpha'"):
        load_config(bad)
    with pytest.raises(UserError, match="does not exist"):
        load_config(tmp_path / "missing.py")
