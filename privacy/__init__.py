"""Privacy methods: each one file, registered here by name (config option ``method``).

A new method subclasses ``PrivacyMethod`` (privacy/base.py) and registers itself:

    @register_method
    class MyMethod(PrivacyMethod):
        name = "mine"
        def fit(self, ctx): ...                      # write checkpoints with self.save_checkpoint(...)
        def build_transform(self, state, path): ...  # a checkpoint's state dict -> nn.Module on templates

Its own options are a dataclass of ``config.options.option`` fields in its file, named by ``Options = ...``
(e.g. ``rounds: int = option(20, "elimination rounds", ge=1)``); they are set with ``--set mine.rounds=5``,
validated, recorded in run.json and shown in the report; the method reads them as ``self.opts.rounds``.

It is then trained with ``python finetune.py --set method=mine`` and swept by eval/evaluation.py like the others;
a module outside the repository is loaded with ``--set plugins="['path/to/mine.py']"``.
"""
from __future__ import annotations

from config.options import register_options
from privacy.base import FitContext, FitResult, PrivacyMethod

__all__ = ["METHODS", "register_method", "get_method", "PrivacyMethod", "FitContext", "FitResult"]

METHODS: dict[str, type[PrivacyMethod]] = {}


def register_method(cls: type[PrivacyMethod]) -> type[PrivacyMethod]:
    """Class decorator: make ``cls`` available as config.method ``cls.name``, and its ``Options`` (if any) as the
    options ``--set NAME.OPTION=VALUE`` reaches."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} needs a class attribute 'name'")
    if cls.Options is not None:
        register_options(cls.name, cls.Options)
    METHODS[cls.name] = cls
    return cls


def get_method(name: str) -> type[PrivacyMethod]:
    return METHODS[name]


from privacy.angular import Angular

register_method(Angular)

from privacy.ive import IVE
from privacy.pe_miu import PEMIU
from privacy.inlp import INLP
from privacy.leace import LEACE
from privacy.adversarial import Adversarial

register_method(IVE)
register_method(PEMIU)
register_method(INLP)
register_method(LEACE)
register_method(Adversarial)
