"""Suite-wide checks and options.

``--shuffle-seed N`` runs the test files in an order shuffled with ``random.Random(N)``, and the tests of each file
in a shuffled order too (files stay whole, so a file's module-scoped fixtures are built once): a test that needs
another to run first, or that a shared fixture it mutated breaks for the next, fails. CI runs one fixed seed
(.ci/run); any failing seed reproduces with the same option.

Every test must leave the working directory as it found it (a test that changes it fails at its tear-down).

The suite's processes, and the ones its tests start, compute with one thread each (OMP_NUM_THREADS=1, set here before
torch or numpy is imported): the tests' tensors are so small that handing work between threads costs more than it
gains (the plan-runner tests took 1.6 times as long with two threads on 2 cores), and the numbers are then those of
one thread on every machine, whatever its core count.
"""
from __future__ import annotations

import os
import random
import sys
from collections import defaultdict
from typing import Iterator

os.environ["OMP_NUM_THREADS"] = "1"   # read by torch's and the BLAS libraries' thread pools when they start
if "torch" in sys.modules:   # imported already (by a plugin): its pool is set
    sys.modules["torch"].set_num_threads(1)

import pytest  # noqa: E402


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--shuffle-seed", type=int, default=None, metavar="N",
                     help="run the test files, and the tests within each, in an order shuffled with seed N")


def pytest_report_header(config: pytest.Config) -> str | None:
    seed = config.getoption("shuffle_seed")
    return None if seed is None else f"test order shuffled with --shuffle-seed {seed}"


def shuffled(items: list[pytest.Item], seed: int) -> list[pytest.Item]:
    """The items, their files in a random order and each file's items in a random order (seeded)."""
    rng = random.Random(seed)
    by_file: dict[str, list[pytest.Item]] = defaultdict(list)
    for item in items:
        by_file[item.nodeid.split("::")[0]].append(item)
    files = list(by_file)
    rng.shuffle(files)
    out = []
    for name in files:
        group = by_file[name]
        rng.shuffle(group)
        out += group
    return out


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    seed = config.getoption("shuffle_seed")
    if seed is not None:
        items[:] = shuffled(items, seed)


@pytest.fixture(autouse=True)
def _same_working_directory() -> Iterator[None]:
    """Fail a test that leaves the working directory changed (and restore it, so that later tests run where
    they expect); a test that needs another folder uses ``monkeypatch.chdir``, which restores it."""
    before = os.getcwd()
    yield
    after = os.getcwd()
    if after != before:
        os.chdir(before)
        pytest.fail(f"the test changed the working directory to {after} and did not restore it "
                    f"(use monkeypatch.chdir)", pytrace=False)
