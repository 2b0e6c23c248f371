"""insightface record files (``train.rec`` + ``train.idx``) read and written without mxnet.

The layout is MXNet's RecordIO (dmlc-core). Each record is a uint32 magic number 0xced7230a, a uint32 ``lrecord``
(upper 3 bits ``cflag``, lower 29 bits the length), the payload and zero padding to a multiple of 4 bytes. A payload
holding the magic number at a 4-byte-aligned position is stored in parts cut at each such position (cflag 1 = first
part, 2 = middle, 3 = last; 0 = a whole record) with the magic number left out; a reader puts it back. An image
record's payload is an IRHeader (little-endian ``IfQQ``: flag, label, id, id2), then ``flag`` float32 labels when
flag > 0 (the header's own label field is then unused), then the encoded image. ``train.idx`` holds one
``key<TAB>offset`` line per record. insightface's training sets open with a header record (key 0, labels (a, b)):
keys 1 .. a-1 are the images and keys a .. b-1 identity records, the k-th of which has labels (s, e): the image
keys s .. e-1 of identity k, whose image records carry the label k.
"""
from __future__ import annotations

import array
import contextlib
import math
import numbers
import os
import struct
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from utils.errors import UserError
from utils.io import atomic_path

MAGIC = 0xCED7230A
_MAGIC_BYTES = struct.pack("<I", MAGIC)
_LENGTH_MASK = (1 << 29) - 1
_IR = struct.Struct("<IfQQ")      # flag, label, id, id2
_PEEK_LABELS = 16                 # labels read speculatively by read_head before falling back to a full read

Labels = tuple[float, ...]


def _padded(n: int) -> int:
    return (n + 3) & ~3


def pack_record(labels: float | Sequence[float], image: bytes, record_id: int = 0) -> bytes:
    """The payload of one record: IRHeader, extra labels when there are several (or none), image bytes."""
    if isinstance(labels, numbers.Real):
        return _IR.pack(0, float(labels), record_id, 0) + image
    extra = np.asarray(labels, dtype="<f4").reshape(-1)
    return _IR.pack(len(extra), 0.0, record_id, 0) + extra.tobytes() + image


def _split_payload(payload: bytes) -> list[bytes]:
    """Cut a payload at every 4-byte-aligned copy of the magic number, as dmlc's writer does (the copies dropped)."""
    parts, start, pos = [], 0, payload.find(_MAGIC_BYTES)
    while pos != -1:
        if pos % 4 == 0:
            parts.append(payload[start:pos])
            start = pos + 4
            pos = payload.find(_MAGIC_BYTES, start)
        else:
            pos = payload.find(_MAGIC_BYTES, pos + 1)
    parts.append(payload[start:])
    return parts


class RecordFile:
    """Random access to a ``.rec`` through its ``.idx``: positioned reads (os.pread), the file is never loaded.

    Safe to hand to DataLoader workers: the descriptor is opened lazily in each process and never pickled."""

    def __init__(self, rec_path: str | os.PathLike, idx_path: str | os.PathLike | None = None):
        self._fd: int | None = None
        self._pid: int | None = None
        self.rec_path = Path(rec_path)
        self.idx_path = Path(idx_path) if idx_path is not None else self.rec_path.with_suffix(".idx")
        if not self.rec_path.is_file():
            raise UserError(f"record file '{self.rec_path}' does not exist. Point to the train.rec of an insightface "
                            f"training set (its train.idx beside it).")
        if not self.idx_path.is_file():
            raise UserError(f"index file '{self.idx_path}' for record file '{self.rec_path}' does not exist: the "
                            f".idx (key<TAB>offset lines) locates the records and ships with the .rec; copy it there "
                            f"(by default the .rec's name with .idx).")
        self.size = self.rec_path.stat().st_size
        self.keys, self._offsets = self._read_index()
        self._order = np.argsort(self.keys, kind="stable")
        self._sorted_keys = self.keys[self._order]

    def _read_index(self) -> tuple[np.ndarray, np.ndarray]:
        keys, offsets = array.array("q"), array.array("q")
        with open(self.idx_path, "rb") as fh:
            for n, line in enumerate(fh, start=1):
                fields = line.split()
                if not fields:
                    continue
                try:
                    key, offset = (int(f) for f in fields)
                except ValueError:
                    raise UserError(f"index file '{self.idx_path}' line {n}: expected 'key<TAB>offset' (two "
                                    f"integers), got {line[:80]!r}. The file is damaged or not an .idx; copy it "
                                    f"again.") from None
                if not 0 <= offset < self.size:
                    raise UserError(f"index file '{self.idx_path}' line {n}: offset {offset} is outside record file "
                                    f"'{self.rec_path}' ({self.size} bytes). The .rec is truncated or belongs to "
                                    f"another .idx; copy both again.")
                keys.append(key)
                offsets.append(offset)
        if not keys:
            raise UserError(f"index file '{self.idx_path}' lists no records. Copy the .idx that came with "
                            f"'{self.rec_path}'.")
        keys_arr = np.frombuffer(keys, dtype=np.int64).copy()
        if len(np.unique(keys_arr)) != len(keys_arr):
            raise UserError(f"index file '{self.idx_path}' lists a key more than once; the file is damaged.")
        return keys_arr, np.frombuffer(offsets, dtype=np.int64).copy()

    def __len__(self) -> int:
        return len(self.keys)

    def __contains__(self, key: int) -> bool:
        i = np.searchsorted(self._sorted_keys, key)
        return bool(i < len(self._sorted_keys) and self._sorted_keys[i] == key)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_fd": None, "_pid": None}

    def __enter__(self) -> "RecordFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Close this process's descriptor (a later read opens it again)."""
        if self._fd is not None and self._pid == os.getpid():
            os.close(self._fd)
        self._fd = self._pid = None

    def __del__(self) -> None:
        self.close()

    def _offset(self, key: int) -> int:
        i = np.searchsorted(self._sorted_keys, key)
        if i >= len(self._sorted_keys) or self._sorted_keys[i] != key:
            raise UserError(f"record file '{self.rec_path}': key {key} is not in its index '{self.idx_path}'.")
        return int(self._offsets[self._order[i]])

    def _pread(self, offset: int, n: int) -> bytes:
        if self._fd is None or self._pid != os.getpid():
            self._fd, self._pid = os.open(self.rec_path, os.O_RDONLY), os.getpid()
        chunks, got = [], 0
        while got < n:
            chunk = os.pread(self._fd, n - got, offset + got)
            if not chunk:
                break
            chunks.append(chunk)
            got += len(chunk)
        return b"".join(chunks)

    def _part_header(self, key: int, pos: int) -> tuple[int, int]:
        head = self._pread(pos, 8)
        if len(head) < 8:
            raise self._truncated(key, pos)
        magic, lrec = struct.unpack("<II", head)
        if magic != MAGIC:
            raise UserError(f"record file '{self.rec_path}': no record at offset {pos} (key {key}): found "
                            f"0x{magic:08x} where the magic number 0x{MAGIC:08x} must be. The .rec is damaged or "
                            f"'{self.idx_path}' belongs to another .rec; copy both again.")
        return lrec >> 29, lrec & _LENGTH_MASK

    def _truncated(self, key: int, pos: int) -> UserError:
        return UserError(f"record file '{self.rec_path}' is truncated: record {key} runs past its end "
                         f"({self.size} bytes, record part at offset {pos}). The download or copy was interrupted; "
                         f"fetch the .rec again.")

    def raw(self, key: int) -> bytes:
        """The whole payload of record ``key``, its parts joined with the magic number put back."""
        pos = self._offset(key)
        parts, first = [], True
        while True:
            cflag, length = self._part_header(key, pos)
            if cflag not in ((0, 1) if first else (2, 3)):
                raise UserError(f"record file '{self.rec_path}': record {key} at offset {pos} has part flag {cflag} "
                                f"out of sequence; the .rec is damaged or its index points into a record.")
            data = self._pread(pos + 8, length)
            if len(data) < length:
                raise self._truncated(key, pos)
            parts.append(data)
            pos += 8 + _padded(length)
            first = False
            if cflag in (0, 3):
                return _MAGIC_BYTES.join(parts)

    def _unpack(self, key: int, payload: bytes) -> tuple[Labels, bytes]:
        if len(payload) < _IR.size:
            raise UserError(f"record file '{self.rec_path}': record {key} holds {len(payload)} bytes, fewer than "
                            f"its {_IR.size}-byte header; the .rec is damaged.")
        flag, label, _, _ = _IR.unpack_from(payload)
        if flag == 0:
            return (float(label),), payload[_IR.size:]
        end = _IR.size + 4 * flag
        if len(payload) < end:
            raise UserError(f"record file '{self.rec_path}': record {key} announces {flag} labels but holds "
                            f"{len(payload)} bytes; the .rec is damaged.")
        labels = tuple(float(v) for v in np.frombuffer(payload, dtype="<f4", count=flag, offset=_IR.size))
        return labels, payload[end:]

    def read(self, key: int) -> tuple[Labels, bytes]:
        """(labels, encoded image bytes) of record ``key``; header and identity records have no image bytes."""
        return self._unpack(key, self.raw(key))

    def read_head(self, key: int, n: int = 16) -> tuple[Labels, bytes]:
        """(labels, the first ``n`` image bytes) of record ``key`` with one small read (for scans over every record)."""
        pos = self._offset(key)
        cflag, length = self._part_header(key, pos)
        if cflag != 0:
            labels, image = self.read(key)
            return labels, image[:n]
        want = min(length, _IR.size + 4 * _PEEK_LABELS + n)
        head = self._pread(pos + 8, want)
        if len(head) < want:
            raise self._truncated(key, pos)
        if len(head) >= _IR.size and _IR.unpack_from(head)[0] > _PEEK_LABELS:
            labels, image = self.read(key)
            return labels, image[:n]
        labels, image = self._unpack(key, head)
        return labels, image[:n]

    def header(self) -> tuple[int, int] | None:
        """insightface's header record: (first identity record, end of identity records), or None without one."""
        if 0 not in self:
            return None
        labels, _ = self.read_head(0, 0)
        if len(labels) < 2:
            return None
        start, end = (_integral(v, self, 0, "header record") for v in labels[:2])
        if not 1 <= start <= end:
            raise UserError(f"record file '{self.rec_path}': header record 0 gives identity records {start}..{end - 1}"
                            f"; expected 1 <= start <= end. The file is not in insightface's layout.")
        return start, end

    def identity_ranges(self) -> list[tuple[int, list[int]]]:
        """(identity label, image keys) per identity: from the identity records if there is a header record (the
        k-th identity record is label k, as its images' labels), else by grouping every record by its first label."""
        header = self.header()
        if header is None:
            groups: dict[int, list[int]] = {}
            for key in self.keys.tolist():
                labels, _ = self.read_head(int(key), 0)
                groups.setdefault(_integral(labels[0], self, key), []).append(int(key))
            return sorted(groups.items())
        start, end = header
        identities = []
        for k, rec_key in enumerate(range(start, end)):
            if rec_key not in self:
                raise UserError(f"record file '{self.rec_path}': identity record {rec_key} (named by the header "
                                f"record) is not in its index '{self.idx_path}'; the files do not match.")
            labels, _ = self.read_head(rec_key, 0)
            first, end_key = (_integral(v, self, rec_key, "identity record") for v in labels[:2]) \
                if len(labels) >= 2 else (0, 0)
            if not 1 <= first <= end_key <= start:
                raise UserError(f"record file '{self.rec_path}': identity record {rec_key} has labels {labels}; "
                                f"expected (first image key, end image key) within 1..{start - 1}. The file is damaged "
                                f"or not in insightface's layout; copy it again.")
            listed = int(np.searchsorted(self._sorted_keys, end_key) - np.searchsorted(self._sorted_keys, first))
            if listed != end_key - first:
                raise UserError(f"record file '{self.rec_path}': identity record {rec_key} names image records "
                                f"{first}..{end_key - 1}, of which {end_key - first - listed} are not in its index "
                                f"'{self.idx_path}'; the files do not match or are damaged. Copy both again.")
            identities.append((k, list(range(first, end_key))))
        return identities


def _integral(value: float, rec: RecordFile, key: int, what: str = "record") -> int:
    """A label that must be a whole number (an identity number or a record key), or a UserError naming it."""
    if not math.isfinite(value) or not float(value).is_integer():
        raise UserError(f"record file '{rec.rec_path}': {what} {key} has label {value}, not a whole number (an "
                        f"identity number or record key). The file is damaged or not in insightface's layout; copy "
                        f"it again.")
    return int(value)


class RecordWriter:
    """Writes a ``.rec`` and its ``.idx`` (dmlc's layout, magic numbers in payloads split out); both files appear
    only when the block ends without an error."""

    def __init__(self, rec_path: str | os.PathLike, idx_path: str | os.PathLike | None = None):
        self.rec_path = Path(rec_path)
        self.idx_path = Path(idx_path) if idx_path is not None else self.rec_path.with_suffix(".idx")

    def __enter__(self) -> "RecordWriter":
        with contextlib.ExitStack() as stack:
            rec_tmp = stack.enter_context(atomic_path(self.rec_path))
            idx_tmp = stack.enter_context(atomic_path(self.idx_path))
            self._rec = stack.enter_context(open(rec_tmp, "wb"))
            self._idx = stack.enter_context(open(idx_tmp, "w", newline="\n"))
            self._stack = stack.pop_all()
        return self

    def __exit__(self, *exc) -> bool | None:
        return self._stack.__exit__(*exc)

    def write(self, key: int, labels: float | Sequence[float], image: bytes = b"") -> None:
        """Append record ``key`` with ``labels`` (one number: flag 0; a sequence: flag = its length)."""
        self._idx.write(f"{int(key)}\t{self._rec.tell()}\n")
        parts = _split_payload(pack_record(labels, image, record_id=int(key)))
        for i, part in enumerate(parts):
            cflag = 0 if len(parts) == 1 else 1 if i == 0 else 3 if i == len(parts) - 1 else 2
            self._rec.write(struct.pack("<II", MAGIC, (cflag << 29) | len(part)))
            self._rec.write(part + b"\0" * (_padded(len(part)) - len(part)))


def write_identity_records(rec_path: str | os.PathLike, identities: Iterable[Sequence[bytes]],
                           idx_path: str | os.PathLike | None = None) -> None:
    """Write insightface's training layout: header record, image records labelled by identity, identity records."""
    identities = [list(images) for images in identities]
    n_images = sum(len(images) for images in identities)
    start = 1 + n_images
    with RecordWriter(rec_path, idx_path) as out:
        out.write(0, (float(start), float(start + len(identities))))
        key, ranges = 1, []
        for label, images in enumerate(identities):
            ranges.append((key, key + len(images)))
            for image in images:
                out.write(key, float(label), image)
                key += 1
        for k, (first, end) in enumerate(ranges):
            out.write(start + k, (float(first), float(end)))
