"""A saved graph's weights file, mapped into memory and lent to its Paddle Inference predictor.

A predictor loads its own copy of the weights, and oneDNN makes a second one, reordered to its blocked
layout, on the first run at each input shape: two copies of the UNet (3.4 GB each for SD v1.5) where
diffusers holds one. Here the predictor's weight tensors are pointed at the weights file mapped into
memory, and its own copy is freed. oneDNN reads the mapped pages once per input shape, to make its
copy; the pages are dropped as it goes (they come back from the file, through the OS's page cache, if
a new input shape needs them again), so one copy of the weights stays resident: oneDNN's.

Paddle's weights file (`model.pdiparams`) is a run of records: uint32 version, uint64 LoD level
(0 here), uint32 version, int32 size of a TensorDesc protobuf, the TensorDesc, the raw data. The data
is not aligned: on export the file is rewritten once with each TensorDesc padded by a protobuf field
that Paddle's TensorDesc does not have (parsers skip unknown fields), so that every tensor starts at
a multiple of 64 bytes.
"""
import ctypes
import ctypes.util
import json
import mmap
import os
import shutil
import struct
import time

import numpy as np
import paddle
from paddle.base import core

ALIGNMENT = 64
# Paddle's VarType codes -> numpy types: the ones a graph of ours can hold.
DTYPES = {5: np.float32, 4: np.float16, 6: np.float64, 2: np.int32, 3: np.int64, 0: np.bool_}
FLOAT32 = 5
PADDING_TAG = b"\xfa\x3e"  # field number 1007, length-delimited
RECORD_HEAD = struct.Struct("<IQIi")  # version, LoD level, version, TensorDesc size
DROP_INTERVAL_S = 0.05
LENDABLE_FILE = "lendable.json"


def read_varint(data, pos):
    value, shift = 0, 0
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, pos


def write_varint(value):
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def parse_tensor_desc(desc):
    """(VarType code, dims) from a TensorDesc: field 1 the data type, field 2 the dims (packed or not);
    other fields (our padding) are skipped."""
    dtype, dims, pos = None, [], 0
    while pos < len(desc):
        key, pos = read_varint(desc, pos)
        field, wire_type = key >> 3, key & 7
        if wire_type == 0:
            value, pos = read_varint(desc, pos)
            if field == 1:
                dtype = value
            elif field == 2:
                dims.append(value)
        elif wire_type == 2:
            length, pos = read_varint(desc, pos)
            end = pos + length
            while field == 2 and pos < end:
                value, pos = read_varint(desc, pos)
                dims.append(value)
            pos = end
        else:
            raise ValueError(f"unexpected protobuf wire type {wire_type} in a TensorDesc")
    if dtype not in DTYPES:
        raise ValueError(f"unsupported tensor data type {dtype} in a weights file")
    return dtype, dims


def records(f, size):
    """(record head, TensorDesc, data offset, data bytes, VarType code, dims) for each tensor in the file."""
    while f.tell() < size:
        head = f.read(RECORD_HEAD.size)
        _, lod_level, _, desc_size = RECORD_HEAD.unpack(head)
        if lod_level != 0:
            raise ValueError("weights with LoD information cannot be mapped")
        desc = f.read(desc_size)
        dtype, dims = parse_tensor_desc(desc)
        nbytes = int(np.prod(dims, dtype=np.int64)) * np.dtype(DTYPES[dtype]).itemsize
        if f.tell() + nbytes > size:
            raise ValueError("the file ends inside a tensor")
        yield head, desc, f.tell(), nbytes, dtype, dims
        f.seek(nbytes, os.SEEK_CUR)


def align_tensor_data(path):
    """Rewrite the weights file at `path` (through a temporary name) so that each tensor's data starts at
    a multiple of ALIGNMENT bytes."""
    scratch = path + ".aligning"
    with open(path, "rb") as source, open(scratch, "wb") as target:
        for head, desc, offset, nbytes, _, _ in records(source, os.path.getsize(path)):
            data_start = target.tell() + RECORD_HEAD.size + len(desc) + len(PADDING_TAG) + 1
            padding = -data_start % ALIGNMENT  # < 128, so its length is one varint byte
            padded = desc + PADDING_TAG + write_varint(padding) + bytes(padding)
            target.write(head[:-4] + struct.pack("<i", len(padded)) + padded)
            source.seek(offset)
            shutil.copyfileobj(_limited(source, nbytes), target)
            source.seek(offset)
    os.replace(scratch, path)


class _limited:
    """A file's next `nbytes`, for copyfileobj."""

    def __init__(self, f, nbytes):
        self.f, self.left = f, nbytes

    def read(self, size=-1):
        size = self.left if size < 0 else min(size, self.left)
        data = self.f.read(size)
        self.left -= len(data)
        return data


def parameter_names(program_path):
    """The graph's weight names in the order of its weights file (Paddle saves them sorted by name)."""
    program = paddle.pir.Program()
    core.deserialize_pir_program(program_path, program)
    return sorted(op.attrs()["parameter_name"] for op in program.global_block().ops
                  if op.name() == "builtin.parameter")


def release_freed_heap():
    """Give the C heap's free pages back to the OS (glibc keeps them; the predictor's weights live there)."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    if hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


class MappedWeights:
    def __init__(self, folder, program_path):
        params_path = os.path.join(folder, "model.pdiparams")
        self.lendable_path = os.path.join(folder, LENDABLE_FILE)
        self.next_drop = 0.0
        self.mapping, self.arrays = None, {}
        if not os.path.isfile(params_path):  # a graph without weights (bench/ops.py times single ops)
            return
        with open(params_path, "rb") as f:
            try:
                layout = [(offset, dtype, dims)
                          for _, _, offset, _, dtype, dims in records(f, os.path.getsize(params_path))]
            except (ValueError, struct.error, IndexError) as error:
                raise ValueError(f"the cached graph's weights file {params_path} is damaged ({error}): delete "
                                 f"{folder} and it will be exported again") from error
            self.mapping = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)  # writable, never written
        # A program saved in the older format (.pdmodel) is not read here: its predictor keeps its own weights.
        names = parameter_names(program_path) if program_path.endswith(".json") else []
        if names and len(names) != len(layout):
            raise ValueError(f"{params_path} holds {len(layout)} tensors, its graph names {len(names)}")
        # Files saved before alignment are read by the predictor alone.
        self.arrays = {name: np.ndarray(dims, np.float32, buffer=self.mapping, offset=offset)
                       for name, (offset, dtype, dims) in zip(names, layout)
                       if dtype == FLOAT32 and offset % ALIGNMENT == 0}

    def lendable(self, predictor):
        """The weights the predictor holds unchanged, by name. Its optimization passes fold some weights
        into new ones (a bias into its convolution, a slice of a weight); the others must hold the
        file's values. Checked once per graph and remembered beside it."""
        if os.path.isfile(self.lendable_path):
            with open(self.lendable_path) as f:
                return json.load(f)
        names = []
        for name, array in self.arrays.items():
            try:
                held = predictor.get_input_handle(name).copy_to_cpu()
            except RuntimeError:  # folded away
                continue
            if held.shape == array.shape and np.array_equal(held, array):
                names.append(name)
        self.drop_pages()
        scratch = self.lendable_path + ".partial"
        try:
            with open(scratch, "w") as f:
                json.dump(names, f)
            os.replace(scratch, self.lendable_path)
        except OSError:  # a read-only cache: check again next time
            pass
        return names

    def lend_to(self, predictor, overrides=None):
        """Point the predictor's weights at the mapped file, before its first run (oneDNN keeps pointers
        to weights it does not copy); `overrides` {name: array} lends other values for some (a LoRA's
        merged weights; the caller keeps them alive). Returns how many were lent."""
        names = self.lendable(predictor)
        overrides = overrides or {}
        for name in names:
            array = overrides.get(name, self.arrays[name])
            tensor = paddle.utils.dlpack.from_dlpack(array.__dlpack__())
            predictor.get_input_handle(name).share_external_data(tensor)
        release_freed_heap()
        return len(names)

    def drop_pages(self):
        """Unmap the pages read so far from this process; the file's data is unchanged."""
        if self.mapping is not None:
            self.mapping.madvise(mmap.MADV_DONTNEED)

    def drop_pages_while_reading(self, *unused_op_output):
        """A predictor's output hook (called after each operator): oneDNN reads the weights it reorders on
        a run at a new input shape, and matmuls read theirs on every run; keep the pages read from
        piling up during the run."""
        now = time.monotonic()
        if now >= self.next_drop:
            self.drop_pages()
            self.next_drop = now + DROP_INTERVAL_S
