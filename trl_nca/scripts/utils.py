"""Loading datasets by hub id or local path, as the `trl-nca` commands accept them."""

from __future__ import annotations

import os
from pathlib import Path

from datasets import Dataset, DatasetDict, load_dataset, load_from_disk

# File suffixes -> the `datasets` builder that reads them
FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


def looks_local(name: str) -> bool:
    """Whether `name` is meant as a local path rather than a hub id (hub ids are `owner/name`)."""
    return os.path.exists(name) or name.startswith((".", "/", "~")) or Path(name).suffix.lower() in FILE_BUILDERS


def load_any_dataset(name: str, config: str | None = None, streaming: bool = False) -> DatasetDict:
    """A `DatasetDict` from a `save_to_disk` folder, a JSON/JSONL/Parquet/CSV file or folder of them, or a hub id.

    A single file or a folder of files becomes the `train` split; a missing local path raises `FileNotFoundError`.
    """
    path = Path(name).expanduser()
    if looks_local(name):
        if not path.exists():
            raise FileNotFoundError(f"Dataset not found: {name} (no such file or folder)")
        if path.is_dir() and ((path / "dataset_dict.json").exists() or (path / "state.json").exists()):
            loaded = load_from_disk(str(path))
            return loaded if isinstance(loaded, DatasetDict) else DatasetDict({"train": loaded})
        if path.is_file():
            builder = FILE_BUILDERS.get(path.suffix.lower())
            if builder is None:
                raise ValueError(
                    f"Cannot read {name}: expected one of {sorted(FILE_BUILDERS)} or a save_to_disk folder"
                )
            return load_dataset(builder, data_files={"train": str(path)}, streaming=streaming)
        return load_dataset(str(path), name=config, streaming=streaming)
    return load_dataset(name, name=config, streaming=streaming)


def first_split(dataset: DatasetDict | Dataset) -> Dataset:
    return dataset if isinstance(dataset, Dataset) else dataset[next(iter(dataset))]
