"""Texts tokenised once into fixed-width arrays on disk, shared by training workers through the page cache.

``ids`` int32 [N, max_length] holds each text's tokens (no special tokens; the prompt template adds those),
truncated to ``max_length`` and right-padded with 0; ``lengths`` int32 [N] the number of real tokens. A directory
holds ``ids.npy``, ``lengths.npy`` and ``tokens.json`` (count, width, tokenizer) and is published atomically;
:func:`load_tokens` memory-maps the arrays.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from vixml_ray import storage

IDS_FILE, LENGTHS_FILE, META_FILE = "ids.npy", "lengths.npy", "tokens.json"


@dataclass
class TokenArrays:
    ids: np.ndarray  # int32 [N, max_length]
    lengths: np.ndarray  # int32 [N]

    def __len__(self) -> int:
        return len(self.lengths)

    @property
    def max_length(self) -> int:
        return self.ids.shape[1]

    def take(self, rows: np.ndarray | Sequence[int]) -> "TokenArrays":
        """The arrays of ``rows``, trimmed to the longest of them (dynamic padding)."""
        rows = np.asarray(rows)
        lengths = np.asarray(self.lengths[rows])
        width = max(int(lengths.max(initial=0)), 1)
        return TokenArrays(np.asarray(self.ids[rows, :width]), lengths)


def tokenize(tokenizer: PreTrainedTokenizerBase, texts: Iterable[str], max_length: int,
             chunk_size: int = 8192, progress: bool = False) -> TokenArrays:
    """Tokenises ``texts`` (no special tokens, truncated to ``max_length``) into fixed-width arrays.

    Works in chunks through the tokenizer's batch call (Rust, for fast tokenizers), so 10^6 texts take seconds to
    minutes and memory stays at one chunk of Python lists.
    """
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    id_chunks, length_chunks = [], []
    iterator = iter(texts)
    with tqdm(desc="tokenize", unit="text", disable=not progress) as bar:
        while chunk := list(itertools.islice(iterator, chunk_size)):
            encoded = tokenizer(chunk, add_special_tokens=False, truncation=True, max_length=max_length,
                                return_attention_mask=False, return_token_type_ids=False)["input_ids"]
            id_chunks.append(_pack(encoded, max_length))
            length_chunks.append(np.fromiter(map(len, encoded), dtype=np.int32, count=len(encoded)))
            bar.update(len(chunk))
    if not id_chunks:
        return TokenArrays(np.zeros((0, max_length), np.int32), np.zeros(0, np.int32))
    return TokenArrays(np.concatenate(id_chunks), np.concatenate(length_chunks))


def _pack(sequences: list[list[int]], width: int) -> np.ndarray:
    """Right-pads variable-length id lists with 0 into an int32 [n, width] array, by index arithmetic."""
    lengths = np.fromiter(map(len, sequences), dtype=np.int64, count=len(sequences))
    flat = np.fromiter(itertools.chain.from_iterable(sequences), dtype=np.int32, count=int(lengths.sum()))
    rows = np.repeat(np.arange(len(sequences)), lengths)
    starts = np.cumsum(lengths) - lengths
    cols = np.arange(len(flat)) - np.repeat(starts, lengths)
    out = np.zeros((len(sequences), width), dtype=np.int32)
    out[rows, cols] = flat
    return out


def save_tokens(arrays: TokenArrays, directory: str | Path, tokenizer_name: str = "",
                overwrite: bool = False) -> None:
    """Publishes ``arrays`` as a token directory (local disk: the arrays are memory-mapped when read)."""
    uri = str(directory)
    if not storage.is_local(uri):
        raise ValueError(f"token arrays are memory-mapped and must live on local disk, got {uri}")
    with storage.publish(uri, overwrite=overwrite) as staging:
        np.save(os.path.join(staging, IDS_FILE), np.ascontiguousarray(arrays.ids, dtype=np.int32))
        np.save(os.path.join(staging, LENGTHS_FILE), np.ascontiguousarray(arrays.lengths, dtype=np.int32))
        meta = {"count": len(arrays), "max_length": arrays.max_length, "tokenizer": tokenizer_name}
        storage.write_json(os.path.join(staging, META_FILE), meta)


def load_tokens(directory: str | Path, mmap: bool = True) -> TokenArrays:
    """The token arrays of a directory written by :func:`save_tokens` (read-only memory maps by default)."""
    root = Path(storage.resolve(str(directory)))
    missing = [name for name in (IDS_FILE, LENGTHS_FILE) if not (root / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{root}: not a token directory (missing {', '.join(missing)})")
    mode = "r" if mmap else None
    ids = np.load(root / IDS_FILE, mmap_mode=mode, allow_pickle=False)
    lengths = np.load(root / LENGTHS_FILE, mmap_mode=mode, allow_pickle=False)
    if ids.ndim != 2 or lengths.shape != (ids.shape[0],):
        raise ValueError(f"{root}: inconsistent token arrays: ids {ids.shape}, lengths {lengths.shape}")
    return TokenArrays(ids, lengths)
