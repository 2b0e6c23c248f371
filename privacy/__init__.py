"""Privacy methods: each one file, registered by name (config option ``method``) in the registry ``METHODS``.

A new method subclasses ``PrivacyMethod`` (privacy/base.py) and registers itself:

    @register_method("mine", options=MineOptions, help="one line for listings")
    class MyMethod(PrivacyMethod):
        def fit(self, ctx): ...                      # write checkpoints with self.save_checkpoint(...)
        def build_transform(self, state, path): ...  # a checkpoint's state dict -> nn.Module on templates

Its own options are a dataclass of ``config.options.option`` fields in its file (e.g. ``rounds: int = option(20,
"elimination rounds", ge=1)``); they are set with ``--set mine.rounds=5``, validated, recorded in run.json and
shown in the report; the method reads them as ``self.opts.rounds``.

It is then trained with ``python finetune.py --set method=mine`` and swept by eval/evaluation.py like the others;
a module outside the repository is loaded with ``--set plugins="['path/to/mine.py']"``. A built-in name cannot be
taken by a plug-in (utils/registry.py).
"""
from __future__ import annotations

from privacy.base import METHODS, FitContext, FitResult, PrivacyMethod, register_method

__all__ = ["METHODS", "register_method", "get_method", "PrivacyMethod", "FitContext", "FitResult"]


def get_method(name: str) -> type[PrivacyMethod]:
    """The method class registered as ``name`` (a UserError with the closest name for an unknown one)."""
    return METHODS.get(name)


# the built-in methods register themselves on import, in this order (the order of listings and of 'all')
from privacy.angular import Angular  # noqa: E402,F401
from privacy.ive import IVE  # noqa: E402,F401
from privacy.pe_miu import PEMIU  # noqa: E402,F401
from privacy.inlp import INLP  # noqa: E402,F401
from privacy.leace import LEACE  # noqa: E402,F401
from privacy.adversarial import Adversarial  # noqa: E402,F401
