"""Training callbacks: periodic log lines of the method's own loss terms, validation on .bin files with the
evaluation's own functions, and the interface of the callbacks a caller passes to training (benchmarks, research
code)."""
from __future__ import annotations

import logging
import time
from typing import Callable, Protocol, Sequence

from torch import nn

from eval.attackers import PAPER_ATTACKERS
from eval.evalset import EvalTemplates, bare_scores, evaluate_set, warn_if_below_grid, warn_if_collapsed


class TrainingCallback(Protocol):
    """What a callback passed to ``finetune.train(cfg, callbacks=[...])`` defines: called as each epoch of a layer
    method's training starts and ends (epochs counted from 0). A hook with nothing to do is ``pass``."""

    def on_epoch_start(self, epoch: int) -> None: ...

    def on_epoch_end(self, epoch: int) -> None: ...


class CallBackLogging:
    """Every ``frequent`` steps: the mean of each loss term since the last line, and samples/s.

    The training loop keeps the terms on the device and hands them over only when it fetches them (every
    ``frequent`` steps, at epoch ends, before validation): each call brings the terms summed over the ``steps``
    steps since the previous call; a line is written when ``step`` is a multiple of ``frequent``."""

    def __init__(self, frequent: int, batch_size: int, logger: logging.Logger,
                 describe: Callable[[dict[str, float]], str]):
        self.frequent, self.batch_size, self.log, self.describe = frequent, batch_size, logger, describe
        self.tic = time.time()
        self.sums: dict[str, float] = {}
        self.steps = 0

    def __call__(self, step: int, epoch: int, sums: dict[str, float], steps: int) -> None:
        for k, v in sums.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.steps += steps
        if step % self.frequent or not self.steps:
            return
        elapsed = max(time.time() - self.tic, 1e-9)
        avg = {k: v / self.steps for k, v in self.sums.items()}
        self.log.info("step %d epoch %d: %s | %.0f samples/s", step, epoch, self.describe(avg),
                      self.steps * self.batch_size / elapsed)
        self.tic, self.steps, self.sums = time.time(), 0, {}


class CallBackVerification:
    """Every ``frequent`` steps: EER, TAR@FAR=0.1% and gender BACC on each validation set."""

    def __init__(self, frequent: int, sets: list[EvalTemplates], gender_folds: int, logger: logging.Logger,
                 attackers: Sequence[str] = PAPER_ATTACKERS, seed: int = 0):
        self.frequent, self.sets, self.gender_folds, self.log = frequent, sets, gender_folds, logger
        self.attackers, self.seed = tuple(attackers), seed
        self.history: list[dict[str, float | str]] = []
        self.bare_angle: dict[str, float] = {}   # the bare backbone's spread per set, computed on first use

    def due(self, step: int) -> bool:
        """Whether ``step`` validates (the loop checks its loss terms first)."""
        return bool(self.sets) and bool(self.frequent) and step % self.frequent == 0

    def __call__(self, step: int, transform: nn.Module, force: bool = False) -> None:
        if not self.sets or not (force or self.due(step)):
            return
        was_training = transform.training
        for ev in self.sets:
            res = evaluate_set(ev, transform, self.gender_folds, self.attackers, self.seed)   # as the sweep does
            self.history.append({"step": step, "dataset": ev.name, **res.metrics,
                                 **{f"BACC-Gender-{k}": v for k, v in res.attacks.items()}})
            baccs = "  ".join(f"{k} {v:.4f}" for k, v in res.attacks.items())
            self.log.info("[%s][%d] EER %.4f  TAR@FAR=0.1%% %.4f  BACC-Gender %s", ev.name, step, res["EER"],
                          res["TAR@FAR=0.1%"], baccs or "n/a")
            if ev.name not in self.bare_angle:
                self.bare_angle[ev.name] = bare_scores(ev).impostor_angle
            sc = res.scores
            assert sc is not None, "evaluate_set always computes the score diagnostics"
            self.log.info("[%s][%d] spread: median impostor angle %.1f degrees (bare backbone %.1f); threshold-free "
                          "EER %.4f, AUC %.4f", ev.name, step, sc.impostor_angle, self.bare_angle[ev.name],
                          sc.eer_exact, sc.auc)
            where = f"validation on '{ev.name}' at step {step}"
            warn_if_collapsed(where, sc.impostor_angle, self.bare_angle[ev.name], self.log)
            warn_if_below_grid(where, res["EER"], sc, self.log)
        transform.train(was_training)
