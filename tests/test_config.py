from pathlib import Path

import pytest

from backbones import ARCHITECTURES
from eval.attackers import ATTACKERS
from helpers import registered
from losses import HEADERS
from privacy import METHODS, get_method
from privacy.runs import check_names, choose_run_folders
from config.loading import load_config
from utils.errors import UserError


def folders(cfg):
    return choose_run_folders(cfg, get_method(cfg.method)(cfg))


def test_defaults_match_the_authors_and_derive_paths():
    cfg = load_config()
    assert (cfg.embedding_size, cfg.lr, cfg.headid_lr, cfg.s, cfg.m, cfg.alpha, cfg.beta, cfg.batch_size,
            cfg.num_epoch, cfg.eval_step, cfg.loss) == (512, 0.01, 0.01, 64.0, 0.0, 20, 1, 128, 100, 1000, "ArcFace")
    assert cfg.val_targets == ["lfw", "agedb_30"]
    assert cfg.test_targets == ["vggface2", "lfw", "agedb_30", "colorferet"]
    run = folders(cfg)
    assert str(run.checkpoints) == "work_dirs/checkpoints/ArcFace/OneDataset/ColorFeret/20L1_1L2"
    assert str(run.logs) == "work_dirs/logs/ArcFace/OneDataset/ColorFeret/20L1_1L2"
    assert cfg.output_ori == "work_dirs/checkpoints/ArcFace/reference/backbone.pth"


def test_overrides_are_parsed_as_literals_and_paths_follow():
    cfg = load_config(None, ["alpha=10", "beta=0.5", "val_targets=['lfw']", "SE=True", "data=2024",
                             "checkpoint_root=/x", "output_ori=/w/b.pth"])
    assert cfg.alpha == 10 and cfg.beta == 0.5 and cfg.val_targets == ["lfw"] and cfg.SE is True
    assert cfg.data == "2024"
    assert str(folders(cfg).checkpoints) == "/x/ArcFace/OneDataset/2024/10L1_0.5L2"
    assert cfg.output_ori == "/w/b.pth"


def test_list_options_take_comma_separated_names():
    cfg = load_config(None, ["val_targets=lfw", "attackers=LogReg, SVM,RBF", "plugins=synthetic"])
    assert cfg.val_targets == ["lfw"] and cfg.attackers == ["LogReg", "SVM", "RBF"] and cfg.plugins == ["synthetic"]


def test_unknown_key_names_the_closest_option():
    with pytest.raises(UserError, match="unknown config option 'alhpa'.*Did you mean 'alpha'"):
        load_config(None, ["alhpa=3"])


@pytest.mark.parametrize("item, key", [("batch_size=0.5", "batch_size"), ("lr=fast", "lr"),
                                        ("val_targets=5", "val_targets"), ("SE=1", "SE")])
def test_wrong_types_are_named(item, key):
    with pytest.raises(UserError, match=f"config option '{key}'.*must be"):
        load_config(None, [item])


def test_bad_values_and_syntax():
    with pytest.raises(UserError, match="KEY=VALUE"):
        load_config(None, ["alpha"])
    with pytest.raises(UserError, match="'loss'.*ArcFace"):
        check_names(load_config(None, ["loss=SphereFace"]))
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


@pytest.mark.parametrize("item, allowed", [
    ("n_hidden=0", ">= 1"), ("lr=-1", "> 0"), ("lr=0", "> 0"), ("alpha=-5", ">= 0"), ("beta=-0.1", ">= 0"),
    ("batch_size=0", ">= 1"), ("num_epoch=0", ">= 1"), ("headid_lr=0.0", "> 0"), ("gender_folds=1", ">= 2"),
    ("grad_clip=0", "> 0"), ("s=-64", "> 0"), ("num_workers=-2", ">= -1"), ("eval_step=-5", ">= 0"),
    ("embedding_size=0", ">= 1"), ("lr=1e999", "> 0"), ("cache_dtype=float64", "float32, float16"),
    ("amp=fp8", "none, bf16, fp16")])
def test_bad_values_name_the_option_and_the_allowed_range(item, allowed):
    key = item.split("=")[0]
    with pytest.raises(UserError) as err:
        load_config(None, [item])
    assert f"'{key}'" in str(err.value) and allowed in str(err.value)


@pytest.mark.parametrize("item, key, closest", [("network=resnet50", "network", "iresnet50"),
                                                 ("method=lecae", "method", "leace"),
                                                 ("attackers=['LogReg','Oracle']", "attackers", None),
                                                 ("attackers=['LogReg','SVN']", "attackers", "SVM"),
                                                 ("loss=Softmax", "loss", None), ("loss=CosFac", "loss", "CosFace")])
def test_unknown_names_are_refused_with_the_known_ones(item, key, closest):
    with pytest.raises(UserError, match=f"config option '{key}'.*choose one of") as err:
        check_names(load_config(None, [item]))
    assert (f"Did you mean '{closest}'?" in str(err.value)) if closest else "Did you mean" not in str(err.value)


@pytest.mark.parametrize("option, registry", [("network", ARCHITECTURES), ("method", METHODS), ("loss", HEADERS),
                                              ("attackers", ATTACKERS)])
def test_every_registered_name_passes_the_name_check(option, registry):
    for name in [*registry.names(), *(["all"] if option == "attackers" else [])]:
        value = f"['{name}']" if option == "attackers" else name
        check_names(load_config(None, [f"{option}={value}"]))   # raises for a name it does not know


@pytest.mark.parametrize("item, problem", [
    ("seed=1180591620717411303424", "it must be >= 0 and <= 2147483647"),   # 2**70: beyond numpy's seeds
    ("seed=-1", "it must be >= 0"),
    ("test_targets=['synth_a','synth_a']", "'synth_a' more than once"),
    ("val_targets=lfw,agedb_30,lfw", "'lfw' more than once")])
def test_seeds_beyond_the_generators_and_targets_listed_twice_are_refused_by_name(item, problem):
    key = item.split("=")[0]
    with pytest.raises(UserError, match=f"config option '{key}'") as err:
        load_config(None, [item])
    assert problem in str(err.value)


def test_the_largest_allowed_seed_seeds_every_generator_the_run_derives_from_it():
    import numpy as np
    import torch
    from facedata.dataset import balanced_epoch
    seed = load_config(None, ["seed=2147483647"]).seed
    torch.manual_seed(seed)
    torch.Generator().manual_seed(seed + 1)
    np.random.RandomState(seed + 100)   # scikit-learn's random_state (attackers, IVE's seed + round)
    balanced_epoch(np.array([0, 1, 0, 1]), seed, 1000)


def test_bad_values_are_refused_before_any_compute(tmp_path):
    """finetune.train refuses n_hidden=0 at load time, before a data folder is even looked at."""
    from pipeline import train as finetune
    with pytest.raises(UserError, match="n_hidden"):
        finetune.train(load_config(None, ["n_hidden=0", f"data_dir={tmp_path / 'nowhere'}"]))
    with pytest.raises(UserError, match="'method'"):  # a name is checked before the (missing) data folder
        finetune.train(load_config(None, ["method=nope", f"data_dir={tmp_path / 'nowhere'}"]))


def test_copy_of_config_module_and_authors_only_option(tmp_path):
    from pathlib import Path
    copy = tmp_path / "copy.py"
    copy.write_text((Path(__file__).parent.parent / "config" / "config.py").read_text().replace(
        "alpha: float = option(20,", "alpha: float = option(7,"))
    assert load_config(copy).alpha == 7
    authors = tmp_path / "authors.py"
    authors.write_text("config = dict()\nconfig['warmup_epoch'] = -1\nconfig['alpha'] = 3\n")
    assert load_config(authors).alpha == 3


def test_plugins_register_entries(tmp_path):
    plugin = tmp_path / "my_attack.py"
    plugin.write_text("from eval.attackers import register_attacker\n"
                      "from sklearn.dummy import DummyClassifier\n"
                      "@register_attacker('Dummy_plugin_test')\n"
                      "def dummy(ctx):\n    return DummyClassifier()\n")
    with registered():
        cfg = load_config(None, [f"plugins=[{str(plugin)!r}]", "attackers=['Dummy_plugin_test']"])
        check_names(cfg)   # the plug-in's name is known while it is loaded
    assert "Dummy_plugin_test" not in ATTACKERS
    with pytest.raises(UserError, match="config option 'attackers' is 'Dummy_plugin_test'"):
        check_names(cfg)
    with pytest.raises(UserError, match="plug-in.*does not exist"):
        load_config(None, [f"plugins=[{str(tmp_path / 'none.py')!r}]"])
    with pytest.raises(UserError, match="plug-in 'no_such_module_xyz'"):
        load_config(None, ["plugins=['no_such_module_xyz']"])


@pytest.mark.parametrize("code", [0, 3])
def test_plugin_that_exits_at_import_is_an_error_not_a_silent_end(tmp_path, code):
    plugin = tmp_path / "exits.py"
    plugin.write_text(f"import sys\nsys.exit({code})\n")
    with pytest.raises(UserError, match=rf"plug-in '.*exits.py' .* called sys.exit\({code}\)"):
        load_config(None, [f"plugins=[{str(plugin)!r}]"])


@pytest.mark.subprocess
def test_finetune_with_an_exiting_plugin_exits_2_with_the_message(tmp_path):
    import subprocess
    import sys
    plugin = tmp_path / "exits.py"
    plugin.write_text("import sys\nsys.exit(0)\n")
    run = subprocess.run([sys.executable, "finetune.py", "--set", f"plugins=[{str(plugin)!r}]"],
                         capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent)
    assert run.returncode == 2 and "called sys.exit(0)" in run.stderr and "Traceback" not in run.stderr
