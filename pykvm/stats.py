"""KVM's binary statistics (``KVM_GET_STATS_FD``): the schema and the values, for a VM or a vCPU.

The file a stats fd reads is a ``struct kvm_stats_header``, ``num_desc`` descriptors (each a
``struct kvm_stats_desc`` followed by a ``name_size``-byte name) and the data block of u64 values
(Documentation/virt/kvm/api.rst, "KVM_GET_STATS_FD").
"""

from __future__ import annotations

import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from ._ffi import ffi

STAT_TYPES = {0: "cumulative", 1: "instant", 2: "peak", 3: "linear_hist", 4: "log_hist"}
STAT_UNITS = {0: "none", 1: "bytes", 2: "seconds", 3: "cycles", 4: "boolean"}
STAT_BASES = {0: "pow10", 1: "pow2"}
_TYPE_SHIFT, _UNIT_SHIFT, _BASE_SHIFT = 0, 4, 8


def _plain(obj: Any) -> dict[str, Any]:
    return {f.name: getattr(obj, f.name) for f in fields(obj)}


@dataclass(frozen=True)
class StatDescriptor:
    """One ``struct kvm_stats_desc`` with the value(s) read at ``data_offset + offset``."""

    name: str
    flags: int
    type: str  # cumulative, instant, peak, linear_hist, log_hist (or "unknown(N)")
    unit: str  # none, bytes, seconds, cycles, boolean
    base: str  # pow10, pow2
    exponent: int  # value * base ** exponent is in `unit`
    size: int  # number of u64 values (buckets for a histogram)
    bucket_size: int  # linear histograms only
    offset: int
    values: tuple[int, ...]

    @property
    def value(self) -> int:
        """The value of a scalar statistic (the first bucket of a histogram)."""
        return self.values[0]

    def to_json(self) -> dict[str, Any]:
        return {**_plain(self), "values": list(self.values)}


@dataclass(frozen=True)
class Stats:
    """A VM's or vCPU's binary statistics: the id string and every descriptor with its values."""

    id: str
    flags: int
    descriptors: tuple[StatDescriptor, ...]

    def names(self) -> tuple[str, ...]:
        return tuple(d.name for d in self.descriptors)

    def get(self, name: str) -> StatDescriptor | None:
        return next((d for d in self.descriptors if d.name == name), None)

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "flags": self.flags, "descriptors": [d.to_json() for d in self.descriptors]}


def _field(flags: int, shift: int, names: Mapping[int, str]) -> str:
    code = (flags >> shift) & 0xF
    return names.get(code, f"unknown({code})")


def _pread_exact(fd: int, size: int, offset: int) -> bytes:
    data = os.pread(fd, size, offset)
    if len(data) != size:
        raise ValueError(f"stats fd: read {len(data)} of {size} bytes at offset {offset}")
    return data


def _text(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("ascii", errors="replace")


def read_stats(fd: int) -> Stats:
    """Parse a ``KVM_GET_STATS_FD`` file descriptor (read with pread; the fd is left open)."""
    header_size = ffi.sizeof("struct kvm_stats_header")
    header = ffi.new("struct kvm_stats_header *")
    ffi.memmove(header, _pread_exact(fd, header_size, 0), header_size)
    desc_size = ffi.sizeof("struct kvm_stats_desc")
    stride = desc_size + header.name_size
    block = _pread_exact(fd, header.num_desc * stride, header.desc_offset)
    descs = []
    for n in range(header.num_desc):
        start = n * stride
        desc = ffi.new("struct kvm_stats_desc *")
        ffi.memmove(desc, block[start : start + desc_size], desc_size)
        descs.append((desc, _text(block[start + desc_size : start + stride])))
    data_size = max((d.offset + 8 * d.size for d, _ in descs), default=0)
    data = _pread_exact(fd, data_size, header.data_offset) if data_size else b""
    descriptors = tuple(
        StatDescriptor(
            name=name,
            flags=d.flags,
            type=_field(d.flags, _TYPE_SHIFT, STAT_TYPES),
            unit=_field(d.flags, _UNIT_SHIFT, STAT_UNITS),
            base=_field(d.flags, _BASE_SHIFT, STAT_BASES),
            exponent=d.exponent,
            size=d.size,
            bucket_size=d.bucket_size,
            offset=d.offset,
            values=tuple(
                int.from_bytes(data[d.offset + 8 * i : d.offset + 8 * i + 8], "little") for i in range(d.size)
            ),
        )
        for d, name in descs
    )
    name_id = _text(_pread_exact(fd, header.name_size, header.id_offset)) if header.name_size else ""
    return Stats(id=name_id, flags=header.flags, descriptors=descriptors)


def read_stats_of(obj) -> Stats:
    """The statistics of a ``Vm`` or ``Vcpu`` (its stats fd is opened and closed here)."""
    with open(obj.get_stats_fd(), "rb", buffering=0) as f:
        return read_stats(f.fileno())


_HEADER = struct.Struct("<6I")  # struct kvm_stats_header: flags, name_size, num_desc, id/desc/data offsets
_DESC = struct.Struct("<IhHII")  # struct kvm_stats_desc before its name: flags, exponent, size, offset, bucket_size
_CUMULATIVE = 0

#: (name_size, descriptor block) -> (data block size, ((name, u64 index), ...)): every vCPU of a
#: host, and every VM, has the same schema, so a new Machine's counters cost no parse.
_SCHEMAS: dict[tuple[int, bytes], tuple[int, tuple[tuple[str, int], ...]]] = {}


def _counter_schema(name_size: int, block: bytes, num_desc: int) -> tuple[int, tuple[tuple[str, int], ...]]:
    key = (name_size, block)
    schema = _SCHEMAS.get(key)
    if schema is None:
        stride = _DESC.size + name_size
        data_size, counters = 0, []
        for n in range(num_desc):
            flags, _exponent, size, offset, _bucket = _DESC.unpack_from(block, n * stride)
            data_size = max(data_size, offset + 8 * size)
            if (flags >> _TYPE_SHIFT) & 0xF == _CUMULATIVE and size == 1 and offset % 8 == 0:
                name = _text(block[n * stride + _DESC.size : (n + 1) * stride])
                counters.append((name, offset // 8))
        schema = _SCHEMAS[key] = (data_size, tuple(counters))
    return schema


class Counters:
    """The cumulative scalar statistics of a ``Vm`` or ``Vcpu`` (``halt_exits``, ``irq_injections``,
    ...), read often and cheaply: the stats fd is opened once and kept, the schema parsed once per
    distinct schema, and each :meth:`read` is one pread of the data block. :func:`read_stats_of`
    gives everything else (histograms, units, the id)."""

    def __init__(self, obj) -> None:
        self.fd = obj.get_stats_fd()
        try:
            _flags, name_size, num_desc, _id, desc_offset, self._data_offset = _HEADER.unpack(
                _pread_exact(self.fd, _HEADER.size, 0))
            block = _pread_exact(self.fd, num_desc * (_DESC.size + name_size), desc_offset)
            self._data_size, self._counters = _counter_schema(name_size, block, num_desc)
        except BaseException:
            self.close()
            raise

    def read(self) -> dict[str, int]:
        """Each counter's value now."""
        if not self._data_size:
            return {}
        values = memoryview(_pread_exact(self.fd, self._data_size, self._data_offset)).cast("Q")
        return {name: values[i] for name, i in self._counters}

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
