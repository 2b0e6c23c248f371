"""Training callbacks: periodic log lines and validation on .bin files (the evaluation's own functions)."""
from __future__ import annotations

import logging
import math
import time

from torch import nn

from utils.evaluate import EvalTemplates, evaluate_set


class CallBackLogging:
    """Every ``frequent`` steps: CE, P1 (degrees), P2, total loss, samples/s and single-gender batches so far."""

    def __init__(self, frequent: int, batch_size: int, logger: logging.Logger):
        self.frequent, self.batch_size, self.log = frequent, batch_size, logger
        self.tic = time.time()
        self.steps = 0
        self.sums = {"ce": 0.0, "p1": 0.0, "p2": 0.0, "loss": 0.0}

    def __call__(self, step: int, epoch: int, terms: dict[str, float], single_gender: int) -> None:
        for k in self.sums:
            self.sums[k] += terms[k]
        self.steps += 1
        if step % self.frequent:
            return
        elapsed = max(time.time() - self.tic, 1e-9)
        avg = {k: v / self.steps for k, v in self.sums.items()}
        self.log.info("step %d epoch %d: CE %.4f  P1 %.2f deg  P2 %.4f  loss %.4f  | %.0f samples/s  | "
                      "single-gender batches so far: %d", step, epoch, avg["ce"], math.degrees(avg["p1"]), avg["p2"],
                      avg["loss"], self.steps * self.batch_size / elapsed, single_gender)
        self.tic, self.steps = time.time(), 0
        self.sums = dict.fromkeys(self.sums, 0.0)


class CallBackVerification:
    """Every ``frequent`` steps: EER, TAR@FAR=0.1% and gender BACC on each validation set."""

    def __init__(self, frequent: int, sets: list[EvalTemplates], gender_folds: int, logger: logging.Logger):
        self.frequent, self.sets, self.gender_folds, self.log = frequent, sets, gender_folds, logger
        self.history: list[tuple[int, str, dict[str, float]]] = []

    def __call__(self, step: int, layer: nn.Module) -> None:
        if not self.frequent or not self.sets or step % self.frequent:
            return
        was_training = layer.training
        for ev in self.sets:
            m = evaluate_set(ev, layer, self.gender_folds)
            self.history.append((step, ev.name, m))
            self.log.info("[%s][%d] EER %.4f  TAR@FAR=0.1%% %.4f  BACC-Gender LogReg %.4f SVM %.4f RBF %.4f AVG %.4f",
                          ev.name, step, m["EER"], m["TAR@FAR=0.1%"], m["BACC-Gender-LogReg"], m["BACC-Gender-SVM"],
                          m["BACC-Gender-RBF"], m["BACC-Gender-AVG"])
        layer.train(was_training)
