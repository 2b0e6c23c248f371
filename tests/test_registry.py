"""The one registry helper (utils/registry.py): names, "did you mean", origins, and the duplicate rule (a plug-in
never silently replaces a built-in component; a plug-in replacing another plug-in's name is said)."""
import logging
from pathlib import Path

import pytest

from backbones import ARCHITECTURES
from config.loading import load_config
from eval.attackers import ATTACKERS, make_attacker
from facedata.align.detectors import DETECTORS
from helpers import registered
from losses import HEADERS
from privacy import METHODS, get_method
from privacy.runs import check_names
from utils.errors import UserError
from utils.registry import CHECKOUT, Registry

ALL_REGISTRIES = {"method": METHODS, "attacker": ATTACKERS, "backbone": ARCHITECTURES, "header": HEADERS,
                  "detector": DETECTORS}


@pytest.mark.parametrize("kind", ALL_REGISTRIES)
def test_every_entry_names_its_file_and_the_checkouts_own_are_built_in_with_a_help_line(kind):
    registry = ALL_REGISTRIES[kind]
    for name in registry.names():
        entry = registry.entry(name)
        assert Path(entry.origin).is_file()
        ours = Path(entry.origin).is_relative_to(CHECKOUT) and not Path(entry.origin).is_relative_to(CHECKOUT / "tests")
        assert entry.builtin == ours, f"{kind} '{name}' of {entry.origin}"
        assert not ours or entry.help.strip(), f"{kind} '{name}' has no help line"


def test_names_keep_registration_order_and_an_unknown_name_gets_the_closest_one():
    assert ATTACKERS.names()[:3] == ["LogReg", "SVM", "RBF"]
    assert METHODS.names()[0] == "angular"
    with pytest.raises(UserError, match=r"config option 'method' is 'angualr'.*Did you mean 'angular'"):
        get_method("angualr")
    with pytest.raises(UserError, match=r"unknown landmark source 'scrdf' \(--detector\).*Did you mean 'scrfd'"):
        DETECTORS.get("scrdf")


def plugin(tmp_path, name, code):
    path = tmp_path / name
    path.write_text(code)
    return path


ATTACKER_AS_LOGREG = ("from eval.attackers import register_attacker\n"
                      "from sklearn.dummy import DummyClassifier\n"
                      "@register_attacker('LogReg')\n"
                      "def fake(ctx):\n    return DummyClassifier()\n")
METHOD_AS_ANGULAR = ("from privacy import register_method\n"
                     "from privacy.angular import Angular\n"
                     "@register_method('angular')\n"
                     "class Mine(Angular):\n    pass\n")
OLD_STYLE_METHOD_AS_ANGULAR = ("from privacy import register_method\n"
                               "from privacy.angular import Angular\n"
                               "@register_method\n"
                               "class Mine(Angular):\n    name = 'angular'\n")


ANOTHER_BUILT_IN_AS_LOGREG = ("from eval.attackers import ATTACKERS\n"
                              "ATTACKERS.add('LogReg', ATTACKERS['RBF'])\n")


@pytest.mark.parametrize("code, registry, name, named", [
    (ATTACKER_AS_LOGREG, ATTACKERS, "LogReg", ["eval/attackers.py (_logreg)", "takeover.py (fake)"]),
    (ANOTHER_BUILT_IN_AS_LOGREG, ATTACKERS, "LogReg", ["eval/attackers.py (_logreg)", "eval/attackers.py (_rbf_svm)"]),
    (METHOD_AS_ANGULAR, METHODS, "angular", ["privacy/angular.py (Angular)", "takeover.py (Mine)"]),
    (OLD_STYLE_METHOD_AS_ANGULAR, METHODS, "angular", ["privacy/angular.py (Angular)", "takeover.py (Mine)"])])
def test_a_plugin_taking_a_built_in_name_is_refused_naming_both_files(tmp_path, code, registry, name, named):
    path = plugin(tmp_path, "takeover.py", code)
    before = registry[name]
    with registered(), pytest.raises(UserError) as err:
        load_config(None, [f"plugins=[{str(path)!r}]"])
    assert all(n in str(err.value) for n in named) and f"'{name}'" in str(err.value), str(err.value)
    assert registry[name] is before and registry.entry(name).builtin
    if registry is METHODS:
        assert before.name == "angular" and before.__name__ == "Angular"   # the refused class touched nothing


def test_a_plugin_replacing_another_plugins_name_wins_with_a_warning_naming_both(tmp_path, caplog):
    code = ("from eval.attackers import register_attacker\n"
            "from sklearn.dummy import DummyClassifier\n"
            "@register_attacker('Shared_test', help='{}')\n"
            "def make(ctx):\n    return DummyClassifier(strategy='{}')\n")
    first = plugin(tmp_path, "first.py", code.format("first", "most_frequent"))
    second = plugin(tmp_path, "second.py", code.format("second", "uniform"))
    with registered(), caplog.at_level(logging.WARNING):
        load_config(None, [f"plugins=[{str(first)!r}, {str(second)!r}]"])
        assert ATTACKERS.help("Shared_test") == "second" and ATTACKERS.origin("Shared_test") == str(second)
        assert make_attacker("Shared_test").strategy == "uniform"
    warned = [r.getMessage() for r in caplog.records if "Shared_test" in r.getMessage()]
    assert len(warned) == 1 and str(first) in warned[0] and str(second) in warned[0]
    assert "Shared_test" not in ATTACKERS


def test_the_same_file_registering_again_replaces_its_own_entry_silently(caplog):
    registry = Registry("thing", "thing")

    def one():
        return 1
    registry.register("x", help="first")(one)
    with caplog.at_level(logging.WARNING):
        registry.register("x", help="again")(one)   # a module imported twice
    assert registry.help("x") == "again" and not caplog.records


def test_a_plugin_entry_is_checked_and_forgotten_like_a_built_in_one(tmp_path):
    path = plugin(tmp_path, "extra.py", "from eval.attackers import register_attacker\n"
                                        "from sklearn.dummy import DummyClassifier\n"
                                        "@register_attacker('Extra_test', help='a plug-in attacker')\n"
                                        "def make(ctx):\n    return DummyClassifier()\n")
    with registered():
        cfg = load_config(None, [f"plugins=[{str(path)!r}]", "attackers=['Extra_test','LogReg']"])
        check_names(cfg)   # known while the plug-in is loaded
        assert not ATTACKERS.entry("Extra_test").builtin and ATTACKERS.origin("Extra_test") == str(path)
    with pytest.raises(UserError, match="config option 'attackers' is 'Extra_test'"):
        check_names(cfg)


def test_a_function_rebuilt_in_a_worker_process_is_the_same_definition(monkeypatch):
    """joblib sends a test's or plug-in's function to a worker by value: there its module is not imported and its code
    has no file ('<dynamic-code>'); registered again there, it is the same definition (same module and name) and
    never mistaken for a built-in one (a relative '<dynamic-code>' must not resolve inside the checkout)."""
    import types
    from utils.registry import Registry
    monkeypatch.chdir(Path(__file__).resolve().parent.parent)

    def toy(x):
        return x

    def rebuilt():
        f = types.FunctionType(toy.__code__.replace(co_filename="<dynamic-code>"), toy.__globals__, toy.__name__)
        f.__qualname__, f.__module__ = toy.__qualname__, "a_module_this_process_never_imported"
        return f
    reg = Registry("attacker")
    first, second = rebuilt(), rebuilt()
    reg.add("Toy", first)
    assert not reg.entry("Toy").builtin
    reg.add("Toy", second)   # the same definition sent again: replaces itself, no error
    assert reg.get("Toy") is second
