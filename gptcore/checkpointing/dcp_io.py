"""torch.distributed.checkpoint (DCP) for gptcore's sharded checkpoints: writing a model's and
optimizer's shards, and reading them back without trusting the checkpoint's metadata. Imported
only by a run or command that touches a sharded checkpoint: DCP takes a second and a half to
import, which every other process is spared."""

from __future__ import annotations

import pickle
import re
from pathlib import Path, PosixPath

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from gptcore.errors import UserInputError

SHARD_FILE = re.compile(r"__\d+_\d+\.distcp")
WRITE_ERRORS = (OSError, CheckpointException)  # a failed write: a local one, or any rank's, gathered by DCP
# A failed read: DCP gathers its errors into a CheckpointException, which is a BaseException.
READ_ERRORS = (Exception, CheckpointException)


class MetadataUnpickler(pickle.Unpickler):
    """Builds DCP's metadata records (and the torch sizes, dtypes and layouts they name); any other
    name, the way a pickle runs code, is refused before it is looked up."""

    ALLOWED = {
        ("torch.distributed.checkpoint.metadata", name) for name in (
            "Metadata", "TensorStorageMetadata", "TensorProperties", "ChunkStorageMetadata",
            "BytesStorageMetadata", "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING")
    } | {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
         ("torch.serialization", "_get_layout"), ("collections", "OrderedDict")}
    # The checkpoint's own path, which Python 3.13 and later pickle as pathlib._local's class:
    # either name builds a plain path, whichever Python wrote or reads the file.
    PATH_NAMES = {("pathlib", "PosixPath"), ("pathlib._local", "PosixPath")}

    def __init__(self, handle, source: Path):
        super().__init__(handle)
        self.source = source

    def find_class(self, module: str, name: str):
        if (module, name) in self.PATH_NAMES:
            return PosixPath
        if (module, name) in self.ALLOWED or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise UserInputError(f"checkpoint {self.source} wants to run code when loaded (its metadata names "
                             f"{module}.{name}); gptcore loads only plain tensors and values, so it is refused")


class SafeReader(dcp.FileSystemReader):
    """DCP's file reader with a metadata reader that builds only DCP's own records. Read it once
    before dcp.load (as load_shards does): inside, DCP would take a refusal for a missing file."""

    metadata = None

    def read_metadata(self, *args, **kwargs):
        if self.metadata is None:
            self.metadata = self._read_metadata()
        return self.metadata

    def _read_metadata(self):
        path = Path(self.path) / ".metadata"
        try:
            with open(path, "rb") as handle:
                metadata = MetadataUnpickler(handle, Path(self.path)).load()
        except UserInputError:
            raise
        except Exception as err:  # a damaged pickle raises anything from EOFError to ValueError
            raise UserInputError(f"checkpoint {self.path} has unreadable metadata ({type(err).__name__}); use "
                                 "another checkpoint or retrain") from None
        if not isinstance(metadata, dcp.metadata.Metadata) or not isinstance(metadata.storage_data, dict):
            raise UserInputError(f"checkpoint {self.path} has no DCP metadata; use another checkpoint or retrain")
        # Shards are read from files the metadata names: only the shard files in this directory.
        names = {getattr(info, "relative_path", None) for info in metadata.storage_data.values()}
        if outside := sorted(str(name) for name in names if not SHARD_FILE.fullmatch(str(name))):
            raise UserInputError(f"checkpoint {self.path} names files that are not its shards ({outside[0][:80]}); "
                                 "it is refused: use another checkpoint or retrain")
        metadata.storage_meta = dcp.metadata.StorageMeta(load_id=self.load_id)
        return metadata


def load_shards(directory: Path, model: torch.nn.Module, optimizer, no_dist: bool = False) -> None:
    """Fill model and optimizer (sharded or whole) from a sharded checkpoint: collective unless no_dist."""
    model_state, optimizer_state = get_state_dict(model, optimizer)
    target = {"model": model_state, "optimizer": optimizer_state}
    reader = SafeReader(directory)
    reader.read_metadata()
    dcp.load(target, storage_reader=reader, no_dist=no_dist)
    set_state_dict(model, optimizer, model_state_dict=target["model"], optim_state_dict=target["optimizer"])


def save_shards(directory: Path, model: torch.nn.Module, optimizer) -> None:
    """This rank's shards of the model and optimizer into directory (collective; fsynced)."""
    model_state, optimizer_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optimizer_state},
             storage_writer=dcp.FileSystemWriter(directory, sync_files=True))
