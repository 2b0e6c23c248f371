"""Evaluation ``.bin`` files: the authors' 5-item format and insightface's 2-item format, read safely.

5 items: (bins, issame_list, bins_gender, id_labels, gender_labels): 2P encoded images forming P consecutive
pairs, P same/different flags, and G encoded images with their identity and gender labels for the leakage
test. 2 items (insightface's lfw.bin etc.): verification only. Pickles are read by a restricted unpickler that
builds only builtin containers, bytes, numbers, booleans and numpy arrays; anything else is refused unrun.
"""
from __future__ import annotations

import hashlib
import io
import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from utils.errors import UserError
from utils.io import atomic_path
from utils.logs import get_logger

log = get_logger(__name__)

_np_core = getattr(np, "_core", None) or np.core  # numpy 2: numpy._core; numpy 1: numpy.core
_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"): _np_core.multiarray._reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _np_core.multiarray._reconstruct,
    ("numpy.core.multiarray", "scalar"): _np_core.multiarray.scalar,
    ("numpy._core.multiarray", "scalar"): _np_core.multiarray.scalar,
    ("numpy.core.numeric", "_frombuffer"): _np_core.numeric._frombuffer,   # protocol 5
    ("numpy._core.numeric", "_frombuffer"): _np_core.numeric._frombuffer,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): __import__("_codecs").encode,   # how protocol-2 pickles store raw bytes
    ("builtins", "set"): set, ("builtins", "frozenset"): frozenset, ("builtins", "bytearray"): bytearray,
    ("__builtin__", "set"): set, ("__builtin__", "frozenset"): frozenset, ("__builtin__", "bytearray"): bytearray,
}


class UnsafePickleError(pickle.UnpicklingError):
    pass


class RestrictedUnpickler(pickle.Unpickler):
    """Resolves only the globals listed in ``_ALLOWED``; everything else is refused before it can run."""

    def find_class(self, module: str, name: str):
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise UnsafePickleError(f"{module}.{name}") from None


def restricted_loads(data: bytes, encoding: str = "ASCII"):
    return RestrictedUnpickler(io.BytesIO(data), encoding=encoding).load()


@dataclass
class EvalSet:
    """The decoded structure of a .bin (images still encoded)."""
    name: str
    pair_images: list[bytes]
    issame: np.ndarray          # (P,) bool
    gender_images: list[bytes]
    id_labels: np.ndarray       # (G,) int
    gender_labels: np.ndarray   # (G,) int
    sha256: str = ""            # content hash of the file (the template cache's key)

    @property
    def has_gender(self) -> bool:
        return len(self.gender_images) > 0


def _as_bytes(x, path: Path, what: str) -> bytes:
    if isinstance(x, (bytes, bytearray)):
        return bytes(x)
    if isinstance(x, np.ndarray) and x.dtype == np.uint8:
        return x.tobytes()
    if isinstance(x, str):
        return x.encode("latin1")
    raise UserError(f"evaluation file '{path}': {what} holds a {type(x).__name__}, expected encoded image bytes. "
                    f"Rebuild the file with tools/make_bin.py.")


def load_bin(path: str | os.PathLike, option: str = "rec") -> EvalSet:
    """Read and check a .bin; every structural problem is a UserError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"evaluation file '{path}' does not exist. Put <name>.bin in the folder given by '{option}' "
                        f"(or change val_targets/test_targets), or build one with tools/make_bin.py.")
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    obj = None
    for encoding in ("bytes", "latin1"):
        try:
            obj = restricted_loads(data, encoding=encoding)
            break
        except UnsafePickleError as exc:
            raise UserError(f"evaluation file '{path}' was refused: its pickle asks for '{exc}', which a data file "
                            f"never needs (it could run code). Nothing of it was executed. Use a .bin from a trusted "
                            f"source or rebuild it with tools/make_bin.py.") from None
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError,
                UnicodeDecodeError, MemoryError) as exc:
            err = exc
    if obj is None:
        raise UserError(f"evaluation file '{path}' could not be read as a pickle ({type(err).__name__}: "
                        f"{str(err)[:150]}); it is truncated or not a .bin. Download or build it again.")
    if not isinstance(obj, (tuple, list)) or len(obj) not in (2, 5):
        kind = f"a {len(obj)}-item {type(obj).__name__}" if isinstance(obj, (tuple, list)) else type(obj).__name__
        raise UserError(f"evaluation file '{path}' holds {kind}; expected the authors' 5 items (bins, issame_list, "
                        f"bins_gender, id_labels, gender_labels) or insightface's 2 (bins, issame_list).")
    bins, issame = obj[0], obj[1]
    if not hasattr(bins, "__len__") or not hasattr(issame, "__len__"):
        raise UserError(f"evaluation file '{path}': bins and issame_list must be sequences.")
    if len(bins) != 2 * len(issame) or len(issame) == 0:
        raise UserError(f"evaluation file '{path}': {len(bins)} pair images for {len(issame)} pair flags; there must "
                        f"be exactly two images per flag (and at least one pair). The file is damaged or mis-built.")
    pair_images = [_as_bytes(b, path, "bins") for b in bins]
    issame_arr = np.asarray([bool(v) for v in issame])
    if len(obj) == 2:
        log.warning("'%s' is a 2-item .bin (verification only): no gender-leakage metrics for it", path)
        return EvalSet(path.stem, pair_images, issame_arr, [], np.zeros(0, np.int64), np.zeros(0, np.int64), digest)
    gbins, ids, genders = obj[2], obj[3], obj[4]
    if not (len(gbins) == len(ids) == len(genders)):
        raise UserError(f"evaluation file '{path}': {len(gbins)} gender images, {len(ids)} identity labels and "
                        f"{len(genders)} gender labels; the three must have the same length. Rebuild the file.")
    try:
        ids_arr = np.asarray(ids).astype(np.int64).reshape(-1)
        gen_arr = np.asarray(genders).astype(np.int64).reshape(-1)
    except (TypeError, ValueError):
        raise UserError(f"evaluation file '{path}': identity and gender labels must be integers.") from None
    if len(gen_arr) and not set(np.unique(gen_arr)) <= {0, 1}:
        raise UserError(f"evaluation file '{path}': gender labels must be 0 or 1, found {sorted(set(gen_arr))[:5]}.")
    return EvalSet(path.stem, pair_images, issame_arr, [_as_bytes(b, path, "bins_gender") for b in gbins],
                   ids_arr, gen_arr, digest)


def write_bin(path: str | os.PathLike, pair_images: list[bytes], issame: list[bool], gender_images: list[bytes],
              id_labels: list[int], gender_labels: list[int], two_item: bool = False) -> None:
    """Write a .bin atomically: the authors' 5 items, or insightface's 2 (verification only) with ``two_item``."""
    obj: tuple[list, ...] = (list(pair_images), [bool(v) for v in issame], list(gender_images),
                             [int(v) for v in id_labels], [int(v) for v in gender_labels])
    if two_item:
        obj = obj[:2]
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            pickle.dump(obj, fh, protocol=4)
