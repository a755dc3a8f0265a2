"""TFRecord files read record by record, each record's checksums verified, corrupt ones skipped and counted.

``tf.data.TFRecordDataset`` stops a file at its first corrupt record (everything after it is lost, even under
``ignore_errors``). Here each record is framed by hand (``uint64 length, masked crc32c(length), data,
masked crc32c(data)``): a record whose data checksum fails is skipped alone (its length is trusted, so the next
record is found); a record whose length header fails is skipped by scanning forward to the next valid header.
Record positions stay exact either way: after a resync the position is counted back from the end of the file
when the file's record count is known. The data checksum is verified by TensorFlow's own reader (C++).

``tf.data.Dataset.from_generator`` sets glibc's M_TRIM_THRESHOLD to 128 KiB for the whole process when its iterator
starts, which also switches off glibc's adaptive mmap threshold: every tensor over 128 KiB is then mmapped and
unmapped on each allocation, and a CPU training step that shares the process ran 2x slower (fine-tuning `tiny`:
4.6 against 10 steps/s). ``restore_malloc_thresholds`` puts back what glibc's adaptive thresholds grow to; the
record generator calls it as each file starts.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import struct
from dataclasses import dataclass, field
from pathlib import Path

_HEADER = 12  # uint64 length + uint32 masked crc of the length
_FOOTER = 4  # uint32 masked crc of the data
_CRC32C_TABLE: list[int] = []


def _crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli) in pure Python: used on 8-byte length headers only."""
    if not _CRC32C_TABLE:
        for n in range(256):
            c = n
            for _ in range(8):
                c = (c >> 1) ^ (0x82F63B78 if c & 1 else 0)
            _CRC32C_TABLE.append(c)
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _CRC32C_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    """TFRecord's masked CRC-32C."""
    crc = _crc32c(data)
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF


def _length_at(f, offset: int, size: int) -> int | None:
    """The record length whose header starts at ``offset`` if the header verifies and fits the file, else None."""
    f.seek(offset)
    header = f.read(_HEADER)
    if len(header) < _HEADER:
        return None
    (length,) = struct.unpack("<Q", header[:8])
    if offset + _HEADER + length + _FOOTER > size:
        return None
    (crc,) = struct.unpack("<I", header[8:])
    return length if crc == masked_crc32c(header[:8]) else None


@dataclass
class CorruptRecords:
    """What the verified readers skipped: file -> indices of the records lost (for the pass's warning)."""

    per_file: dict[str, list[int]] = field(default_factory=dict)

    def add(self, path: str, indices) -> None:
        self.per_file.setdefault(path, []).extend(int(i) for i in indices)

    @property
    def indices(self) -> set[int]:
        return {i for lost in self.per_file.values() for i in lost}

    def describe(self, among=None) -> str:
        """"<count> in <file>; ..." (only the indices in ``among`` when given)."""
        counts = {p: sum(1 for i in lost if among is None or i in among) for p, lost in sorted(self.per_file.items())}
        return "; ".join(f"{n} in {p}" for p, n in counts.items() if n)


def verified_records(path: str | Path, expected: int | None = None, corrupt: CorruptRecords | None = None,
                     start: int = 0):
    """Yield (start + position in the file, record bytes) for every record whose checksums verify.

    expected: the file's record count when known (dataset_info's shard length): positions after a resync are
    then exact, and records missing at the end (a truncated file) are counted. Skipped records go into ``corrupt``
    (as start + position).
    """
    from tensorflow.python.lib.io import _pywrap_record_io  # the C++ reader: verifies the data crc at an offset

    path = str(path)
    corrupt = corrupt if corrupt is not None else CorruptRecords()
    size = Path(path).stat().st_size
    reader = _pywrap_record_io.RandomRecordReader(path)
    position, offset = 0, 0
    try:
        with open(path, "rb") as f:
            while offset < size:
                length = _length_at(f, offset, size)
                if length is None:  # a damaged header: resync at the next offset holding a valid one
                    offset = _resync(f, reader, offset + 1, size)
                    if offset is None:
                        break
                    found = position + 1
                    if expected is not None:
                        found = max(found, expected - _count_records(f, offset, size))
                    corrupt.add(path, range(start + position, start + found))
                    position = found
                    continue
                try:
                    record, _ = reader.read(offset)
                except Exception:  # noqa: BLE001 - DataLossError: the data crc failed; its length is trusted
                    corrupt.add(path, [start + position])
                else:
                    yield start + position, record
                position += 1
                offset += _HEADER + length + _FOOTER
    finally:
        reader.close()
    if expected is not None and position < expected:  # a truncated or damaged tail
        corrupt.add(path, range(start + position, start + expected))


def _resync(f, reader, start: int, size: int) -> int | None:
    """The first offset >= start holding a record that verifies completely (header and data), or None."""
    for offset in range(start, size - _HEADER - _FOOTER + 1):
        if _length_at(f, offset, size) is not None:
            try:
                reader.read(offset)
            except Exception:  # noqa: BLE001 - a coincidental header inside the damaged bytes
                continue
            return offset
    return None


def _count_records(f, offset: int, size: int) -> int:
    """Records from ``offset`` to the end, walking the (verified) length headers."""
    count = 0
    while offset < size:
        length = _length_at(f, offset, size)
        if length is None:
            break
        count += 1
        offset += _HEADER + length + _FOOTER
    return count


def shard_starts(lengths: list[int]) -> list[int]:
    """Index of each shard's first record in the split: the running sum of the shard lengths before it."""
    return [sum(lengths[:i]) for i in range(len(lengths))]


def record_dataset(tf, paths: list[str], lengths: list[int], corrupt: CorruptRecords,
                   first_index: list[int] | None = None, shuffle_seed: int | None = None, cycle_length: int = 4):
    """tf.data.Dataset of (episode index int64, record string) over ``paths`` (index = first_index[f] + position;
    default: the files are a whole split, ``shard_starts(lengths)``), files interleaved; corrupt records are skipped
    and counted in ``corrupt`` (the Python process iterating it)."""
    first_index = shard_starts(lengths) if first_index is None else first_index

    def generate(path, start, length):
        path = path.decode() if isinstance(path, bytes) else str(path)
        for i, record in enumerate(verified_records(path, int(length), corrupt, int(start))):
            if i == 0:  # TF has set its malloc patch by now (the generator's iterator has started)
                restore_malloc_thresholds()
            yield record

    signature = (tf.TensorSpec((), tf.int64), tf.TensorSpec((), tf.string))
    files = tf.data.Dataset.from_tensor_slices((tf.constant(paths, tf.string), tf.constant(first_index, tf.int64),
                                                tf.constant(lengths, tf.int64)))
    if shuffle_seed is not None:
        files = files.shuffle(max(len(paths), 1), seed=shuffle_seed)
    return files.interleave(
        lambda p, s, n: tf.data.Dataset.from_generator(generate, output_signature=signature, args=(p, s, n)),
        cycle_length=min(cycle_length, max(len(paths), 1)), num_parallel_calls=1, deterministic=True)


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters (malloc.h)
MMAP_THRESHOLD_MAX = 32 * 1024 * 1024  # glibc's DEFAULT_MMAP_THRESHOLD_MAX on 64-bit: where the adaptive one ends


def restore_malloc_thresholds() -> bool:
    """Undo tf.data's process-wide M_TRIM_THRESHOLD=128 KiB (see the module docstring): mmap threshold 32 MiB, trim
    threshold 64 MiB, what glibc's adaptive thresholds reach. Returns False where libc has no mallopt (not glibc)."""
    name = ctypes.util.find_library("c")
    mallopt = getattr(ctypes.CDLL(name), "mallopt", None) if name else None
    if mallopt is None:
        return False
    mmap_ok = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)
    return bool(mmap_ok) and bool(mallopt(M_TRIM_THRESHOLD, 2 * MMAP_THRESHOLD_MAX))
