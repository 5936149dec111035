"""Data pipeline: `prepare` text into webdataset token shards, then stream them resumably.

    prepare_corpus(out_dir, corpus=..., tokenizer=..., seq_len=256, ...) -> manifest
    read_manifest(path) -> manifest
    build_train_loader(cfg, micro_batch_size=, dp_rank=, dp_size=, seed=) -> TrainLoader
    build_val_loader(cfg, micro_batch_size=, dp_rank=, dp_size=) -> ValLoader
"""

from titanforge.data.config import DataConfig
from titanforge.data.loader import TrainLoader, ValLoader, build_train_loader, build_val_loader
from titanforge.data.prepare import prepare_corpus
from titanforge.data.shards import CorruptShardError, DataError, read_manifest
from titanforge.data.sources import SourceError
from titanforge.data.tokenizer import Tokenizer, load_tokenizer

__all__ = [
    "CorruptShardError", "DataConfig", "DataError", "SourceError", "Tokenizer", "TrainLoader", "ValLoader",
    "build_train_loader", "build_val_loader", "load_tokenizer", "prepare_corpus", "read_manifest",
]
