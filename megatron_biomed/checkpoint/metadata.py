"""DCP's `.metadata` is a pickle, which torch reads with `pickle.load` (able to run any code a
crafted file names). We read it with an unpickler that only builds DCP's own metadata classes;
tensors themselves are read by DCP with `torch.load(weights_only=True)`."""
import pickle

import torch
from torch.distributed.checkpoint import FileSystemReader

from megatron_biomed.errors import UserError


class CheckpointFormatError(UserError, ValueError):
    """A checkpoint that cannot be read or converted; the message names the file or tensor."""


_DCP_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.planner",
                "torch.distributed.checkpoint.filesystem")
_ALLOWED = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
            ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"), ("pathlib", "WindowsPath"),
            ("pathlib", "PureWindowsPath"), ("builtins", "set"), ("builtins", "frozenset")}


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, f, path):
        super().__init__(f)
        self.path = path

    def find_class(self, module, name):
        obj = None
        if (module, name) in _ALLOWED or (module in _DCP_MODULES and not name.startswith("__")):
            obj = super().find_class(module, name)
        elif module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            obj = getattr(torch, name)
        if obj is None or (module in _DCP_MODULES and not isinstance(obj, (type, dict))):
            raise CheckpointFormatError(f"{self.path}: refusing to unpickle {module}.{name} "
                                        f"(not part of a checkpoint's metadata)")
        return obj


def read_dcp_metadata(path):
    """The Metadata of a DCP directory, unpickled with the allowlist above; a truncated or
    foreign file is a CheckpointFormatError naming it."""
    try:
        with open(path, "rb") as f:
            return _MetadataUnpickler(f, path).load()
    except CheckpointFormatError:
        raise
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, IndexError, TypeError,
            ValueError) as e:
        raise CheckpointFormatError(f"{path}: unreadable checkpoint metadata ({type(e).__name__}: {e}); "
                                    f"the file is truncated or not a checkpoint's .metadata") from None


class SafeFileSystemReader(FileSystemReader):
    """FileSystemReader whose metadata read cannot run code."""

    def read_metadata(self, *args, **kwargs):
        rank = kwargs.get("rank")
        metadata = read_dcp_metadata(str(self._get_metadata_path(rank)))
        if getattr(metadata, "storage_meta", None) is None:
            from torch.distributed.checkpoint.metadata import StorageMeta
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def storage_problems(directory, metadata):
    """Shard files the metadata needs that are missing or shorter than the bytes it places in
    them (a truncated or partial copy), as messages naming each file; checks sizes only."""
    import os
    needed = {}
    for info in (getattr(metadata, "storage_data", None) or {}).values():
        name = str(info.relative_path)
        needed[name] = max(needed.get(name, 0), int(info.offset) + int(info.length))
    problems = []
    for name, size in sorted(needed.items()):
        path = os.path.join(directory, name)
        try:
            have = os.path.getsize(path)
        except FileNotFoundError:
            problems.append(f"{path}: missing (an incomplete copy of the checkpoint?)")
            continue
        if have < size:
            problems.append(f"{path}: {have} bytes, the checkpoint's .metadata places {size} in it (truncated)")
    return problems
