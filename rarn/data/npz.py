"""Reading ``.npz`` archives defensively: no pickle, and every failure a DataError naming the file.

``numpy.load`` raises zipfile or EOF errors that do not name the file on a truncated or damaged
archive, trusts an array header's shape (an absurd one asks for terabytes before failing), and
answers a file that is no archive by advising ``allow_pickle=True``, which would let the file run
code. Here each member's ``.npy`` header is checked against the bytes the member really holds
before anything is allocated, the zip CRC is verified as the data are read, and the messages say
what is wrong in our words.
"""

from __future__ import annotations

import io
import math
import zipfile
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from numpy.lib import format as npy_format

from rarn.data.tensors import DataError

__all__ = ["read_npz"]

MAX_MEMBER_BYTES = 1 << 34  # 16 GiB: above any dataset this library trains on in memory
_HEADER_READERS = {
    (1, 0): npy_format.read_array_header_1_0,
    (2, 0): npy_format.read_array_header_2_0,
}


def read_npz(path: Path, raw: bytes, names: Sequence[str]) -> dict[str, np.ndarray]:
    """The arrays ``names`` of the ``.npz`` archive ``raw`` (the bytes of ``path``).

    Raises:
        DataError: naming ``path``: not a zip archive, truncated or corrupt (CRC), a missing
            array, an object array (which only pickle could load), or a header that disagrees
            with the data.
    """
    if not raw.startswith(b"PK"):
        raise _error(path, "not a zip archive (numpy.savez writes one); is it a text or .npy file?")
    try:
        archive = zipfile.ZipFile(io.BytesIO(raw))
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, OSError, EOFError) as e:
        raise _error(path, f"truncated or damaged zip archive ({e})") from None
    with archive:
        members = {n.removesuffix(".npy"): n for n in archive.namelist()}
        missing = [k for k in names if k not in members]
        if missing:
            raise DataError(f"{path}: missing array(s) {missing}; found {sorted(members)}")
        return {k: _read_member(path, archive, k, members[k]) for k in names}


def _error(path: Path, problem: str) -> DataError:
    return DataError(f"{path}: cannot read as .npz: {problem}")


def _read_member(path: Path, archive: zipfile.ZipFile, key: str, name: str) -> np.ndarray:
    """One array, its header checked against the member's size before the data are read."""
    info = archive.getinfo(name)
    if info.file_size > MAX_MEMBER_BYTES:
        raise _error(path, f"array {key!r} claims {info.file_size} bytes (at most 16 GiB)")
    try:
        with archive.open(info) as fh:
            try:
                version = npy_format.read_magic(fh)
                shape, fortran, dtype = _HEADER_READERS[version](fh)
            except (ValueError, KeyError, EOFError):  # numpy's text may advise allow_pickle
                raise _error(path, f"array {key!r} has no valid .npy header") from None
            if dtype.hasobject:
                raise _error(
                    path,
                    f"array {key!r} holds Python objects, which only pickle can load; rarn reads "
                    ".npz files without pickle (save numeric arrays)",
                )
            if any(d < 0 for d in shape):
                raise _error(path, f"array {key!r} has a negative dimension in its header {shape}")
            expected = math.prod(shape) * dtype.itemsize
            available = info.file_size - fh.tell()
            if expected != available:
                raise _error(
                    path,
                    f"the header of array {key!r} declares shape {shape} of {dtype} "
                    f"({expected} bytes) but {available} bytes follow",
                )
            data = fh.read()  # to the end of the member, where zipfile checks the CRC
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as e:
        raise _error(path, f"array {key!r} is corrupt or truncated ({e})") from None
    if len(data) != expected:
        raise _error(path, f"array {key!r} is truncated: {len(data)} of {expected} bytes")
    array = np.frombuffer(data, dtype=dtype)
    return array.reshape(shape[::-1]).transpose() if fortran else array.reshape(shape)
