"""Read tensors from checkpoint files into numpy, without PyTorch and without running code.

- `.safetensors`: an 8-byte header length, a JSON header, raw little-endian data.
- `.ckpt` / `.bin`: PyTorch's zip format, whose `data.pkl` is a pickle. Pickles can call any
  function; `RestrictedUnpickler` resolves only the names a state dict needs (tensor rebuilders,
  storage types, plain containers) to our own numpy implementations, and refuses every other name.
"""
import json
import os
import pickle
import zipfile

import numpy as np


class CheckpointError(ValueError):
    """A weights file that cannot be read; the message names the file and what to do."""


SAFETENSORS_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": "bfloat16",
                      "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
                      "BOOL": np.bool_}
TORCH_STORAGE_DTYPES = {"DoubleStorage": np.float64, "FloatStorage": np.float32, "HalfStorage": np.float16,
                        "BFloat16Storage": "bfloat16", "LongStorage": np.int64, "IntStorage": np.int32,
                        "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8,
                        "BoolStorage": np.bool_}


def bfloat16_to_float32(raw_uint16):
    return (raw_uint16.astype(np.uint32) << 16).view(np.float32)


def _from_buffer(buffer, dtype, offset=0, count=-1):
    if dtype == "bfloat16":
        return bfloat16_to_float32(np.frombuffer(buffer, np.uint16, count, offset))
    return np.frombuffer(buffer, dtype, count, offset)


def read_safetensors(path):
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path} is empty or truncated: re-download it")
        header_len = int.from_bytes(head, "little")
        if header_len > size - 8:
            raise CheckpointError(f"{path} is truncated or not a safetensors file "
                                  f"(header of {header_len} bytes, file of {size}): re-download it")
        try:
            header = json.loads(f.read(header_len))
        except ValueError as err:
            raise CheckpointError(f"{path} has a corrupt safetensors header ({err}): re-download it") from None
        data = np.memmap(path, np.uint8, "r", offset=8 + header_len) if size > 8 + header_len else b""
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        if end > len(data) or info["dtype"] not in SAFETENSORS_DTYPES:
            raise CheckpointError(f"{path} is truncated or corrupt at tensor {name!r}: re-download it")
        dtype = SAFETENSORS_DTYPES[info["dtype"]]
        tensors[name] = _from_buffer(data[start:end], dtype).reshape(info["shape"])
    return tensors


def read_safetensors_metadata(path):
    """The `__metadata__` strings of a .safetensors file's header ({} when it has none)."""
    with open(path, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        try:
            header = json.loads(f.read(header_len))
        except ValueError as err:
            raise CheckpointError(f"{path} has a corrupt safetensors header ({err}): re-download it") from None
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    return metadata if isinstance(metadata, dict) else {}


class _StorageType:
    def __init__(self, dtype):
        self.dtype = dtype


class _Ignored:
    """Stands in for harmless training-time objects (a Lightning callback); keeps no state."""

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass


def _rebuild_tensor(storage, offset, shape, stride, *unused):
    itemsize = storage.dtype.itemsize
    return np.lib.stride_tricks.as_strided(storage[offset:], shape, [s * itemsize for s in stride]).copy()


def _rebuild_parameter(data, *unused):
    return data


def _ordered_dict(*args):
    from collections import OrderedDict
    return OrderedDict(*args)


def _encode_latin1(text, encoding="latin1"):
    return text.encode(encoding)


ALLOWED_GLOBALS = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("collections", "OrderedDict"): _ordered_dict,
    ("builtins", "set"): set,
    ("__builtin__", "set"): set,
    ("_codecs", "encode"): _encode_latin1,
    ("torch", "Size"): tuple,
    ("pytorch_lightning.callbacks.model_checkpoint", "ModelCheckpoint"): _Ignored,
}
ALLOWED_GLOBALS.update({("torch", name): _StorageType(dtype) for name, dtype in TORCH_STORAGE_DTYPES.items()})


class RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, archive, prefix, path):
        super().__init__(file)
        self.archive, self.prefix, self.path = archive, prefix, path
        self.storages = {}

    def find_class(self, module, name):
        if (module, name) in ALLOWED_GLOBALS:
            return ALLOWED_GLOBALS[(module, name)]
        raise CheckpointError(
            f"{self.path} asks to run '{module}.{name}' when loaded, which a weights file never needs; "
            "refusing to load it. Use a .safetensors version of this model, or one from a source you trust.")

    def persistent_load(self, pid):
        kind, storage_type, key, _location, numel = pid
        if kind != "storage" or not isinstance(storage_type, _StorageType):
            raise CheckpointError(f"{self.path} holds an unknown storage record {pid[:2]!r}")
        if key not in self.storages:
            try:
                raw = self.archive.read(f"{self.prefix}/data/{key}")
            except (KeyError, zipfile.BadZipFile, OSError) as err:
                raise CheckpointError(f"{self.path} is truncated or corrupt ({err}): re-download it") from None
            storage = _from_buffer(raw, storage_type.dtype)
            self.storages[key] = storage.astype(np.float32) if storage_type.dtype == "bfloat16" else storage
        return self.storages[key]


def read_torch_pickle(path):
    """A PyTorch zip checkpoint (`.ckpt`, `.bin`, `.pt`) as nested containers of numpy arrays."""
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        raise CheckpointError(
            f"{path} is not a PyTorch zip checkpoint: it is truncated or corrupt, or in the legacy "
            "pre-1.6 format. Re-download it, or convert it to .safetensors.") from None
    with archive:
        pickles = [n for n in archive.namelist() if n.endswith("data.pkl")]
        if not pickles:
            raise CheckpointError(f"{path} holds no data.pkl: not a PyTorch checkpoint")
        prefix = pickles[0][: -len("/data.pkl")]
        try:
            with archive.open(pickles[0]) as f:
                return RestrictedUnpickler(f, archive, prefix, path).load()
        except CheckpointError:
            raise
        except (pickle.UnpicklingError, EOFError, zipfile.BadZipFile, OSError, ValueError) as err:
            raise CheckpointError(f"{path} is truncated or corrupt ({err}): re-download it") from None


def read_state_dict(path, extras=None):
    """Flat {name: numpy array} from a .safetensors, .ckpt, .bin or .pt file. `extras`, a dict, gets
    a training checkpoint's `global_step` when it has one."""
    if not os.path.isfile(path):
        raise CheckpointError(f"weights file {path} does not exist")
    if path.endswith(".safetensors"):
        return read_safetensors(path)
    state = read_torch_pickle(path)
    if extras is not None and isinstance(state, dict) and isinstance(state.get("global_step"), int):
        extras["global_step"] = state["global_step"]
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} does not hold a state dict")
    return {k: v for k, v in state.items() if isinstance(v, np.ndarray)}
