"""Training data: documents through Hugging Face `datasets`, tokenized, packed into sequences.

Each data-parallel rank reads only its shard of the documents (`split_dataset_by_node`);
the ranks of one SP group read the same shard, so they see the same sequence and each
keeps its part of it (`lasp.shard_batch`). Documents, each followed by an end-of-document
token, are concatenated and cut into sequences of `seq_len` tokens; `cu_seqlens` keeps
the boundaries of the document pieces, so no token attends across documents. The reading
position (epoch, document, token) is small, exact, and part of every checkpoint (resuming
a streamed dataset reads its shard up to the position again; a prepared one seeks).
"""

from __future__ import annotations

import glob
import itertools
import os
import sysconfig
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

# builders of `datasets` by file suffix
DATA_SUFFIXES = {".txt": "text", ".py": "text", ".md": "text", ".jsonl": "json", ".json": "json",
                 ".parquet": "parquet"}
SHUFFLE_BUFFER = 10_000


class ByteTokenizer:
    """UTF-8 bytes (ids 0-255) and an end-of-document token (256): no vocabulary, no download."""

    vocab_size = 257
    eos_id = 256

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8", "replace"), dtype=np.uint8).astype(np.int64)

    def decode(self, ids) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", "replace")


class HFTokenizer:
    """A Hugging Face tokenizer (name or path); its EOS token ends each document."""

    def __init__(self, name: str):
        from transformers import AutoTokenizer
        self.tokenizer = AutoTokenizer.from_pretrained(name)
        self.tokenizer.model_max_length = 1 << 62  # sequences are packed here, not truncated
        if self.tokenizer.eos_token_id is None:
            raise ValueError(f"--tokenizer {name!r} has no EOS token to separate documents")
        self.eos_id = self.tokenizer.eos_token_id
        self.vocab_size = len(self.tokenizer)

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self.tokenizer(text, add_special_tokens=False)["input_ids"], dtype=np.int64)


def build_tokenizer(name: str):
    return ByteTokenizer() if name == "byte" else HFTokenizer(name)


def stdlib_files() -> list[str]:
    """This Python's standard-library source files: ~30 MB of real text on every machine."""
    root = sysconfig.get_paths()["stdlib"]
    return sorted(f for f in glob.glob(os.path.join(root, "**", "*.py"), recursive=True)
                  if "site-packages" not in f and "dist-packages" not in f)


def local_files(spec: str) -> list[str] | None:
    """The files that --dataset names (comma-separated files, directories or globs), or None
    for a hub dataset name. Raises ValueError for a named file that does not exist."""
    parts = [p.strip() for p in spec.split(",") if p.strip()]
    looks_local = [os.path.exists(os.path.expanduser(p)) or glob.has_magic(p) or Path(p).suffix in DATA_SUFFIXES
                   or p.startswith((".", "/", "~")) for p in parts]
    if not any(looks_local):
        return None
    files = []
    for part in parts:
        path = os.path.expanduser(part)
        if os.path.isdir(path):
            found = [f for f in glob.glob(os.path.join(path, "**", "*"), recursive=True)
                     if Path(f).suffix in DATA_SUFFIXES]
        else:
            found = [f for f in glob.glob(path, recursive=True) if os.path.isfile(f)]
        if not found:
            raise ValueError(f"--dataset: no such data file: {part}")
        files.extend(sorted(found))
    builders = {DATA_SUFFIXES.get(Path(f).suffix) for f in files}
    if None in builders or len(builders) > 1:
        raise ValueError(f"--dataset {spec!r}: the files must be all text (.txt, .py, .md), all JSON lines "
                         "(.jsonl, .json) or all parquet")
    return files


def too_few_documents(spec: str, n_docs: int, dp_size: int) -> ValueError:
    return ValueError(f"--dataset {spec}: {n_docs} document(s) for {dp_size} data-parallel ranks (each "
                      ".txt/.py/.md file is one document, each line of a .jsonl file one): every rank needs "
                      f"at least one, so give at least {dp_size} text files, or JSON lines")


def check_dataset(config, dp_size: int | None = None) -> None:
    """Fail fast on a local data file that does not exist (hub names are checked when loaded),
    on fewer text files (documents) than data-parallel ranks, or a missing `datasets` package."""
    if config.dataset == "synthetic":
        return
    if config.dataset != "stdlib":
        files = local_files(config.dataset)
        if files and dp_size and DATA_SUFFIXES[Path(files[0]).suffix] == "text" and len(files) < dp_size:
            raise too_few_documents(config.dataset, len(files), dp_size)
    try:
        import datasets  # noqa: F401
    except ImportError:
        raise ValueError(f"--dataset {config.dataset}: reading data needs Hugging Face datasets: pip install "
                         "'lasp[launch]' (or use --dataset synthetic)") from None


def load_documents(config):
    """The whole corpus as a `datasets` Dataset (an IterableDataset when streaming) of one column, "text"."""
    import datasets
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    files = stdlib_files() if config.dataset == "stdlib" else local_files(config.dataset)
    if files is None:
        builder = None
        ds = datasets.load_dataset(config.dataset, config.dataset_config, split=config.split,
                                   streaming=config.streaming)
    else:
        builder = DATA_SUFFIXES[Path(files[0]).suffix]
        options = dict(sample_by="document", encoding_errors="replace") if builder == "text" else {}
        ds = datasets.load_dataset(builder, data_files=files, split="train", streaming=config.streaming,
                                   **options)
    column = "text" if builder == "text" else config.text_field
    if ds.column_names is not None and column not in ds.column_names:
        raise ValueError(f"--text-field {column!r} is not a column of --dataset {config.dataset!r} "
                         f"(columns: {ds.column_names})")
    ds = ds.select_columns([column])
    return ds if column == "text" else ds.rename_column(column, "text")


class DatasetDocuments:
    """This data-parallel rank's documents of an epoch, from a document index, as token ids."""

    def __init__(self, config, tokenizer, seed: int, dp_rank: int, dp_size: int):
        import datasets
        self.dataset = load_documents(config)
        if not isinstance(self.dataset, datasets.IterableDataset) and len(self.dataset) < dp_size:
            raise too_few_documents(config.dataset, len(self.dataset), dp_size)  # (the same on every rank)
        self.tokenizer, self.shuffle, self.seed = tokenizer, config.shuffle, seed
        self.dp_rank, self.dp_size = dp_rank, dp_size

    def __call__(self, epoch: int, start: int) -> Iterator[np.ndarray]:
        from datasets import IterableDataset
        from datasets.distributed import split_dataset_by_node
        ds = self.dataset
        streaming = isinstance(ds, IterableDataset)
        if self.shuffle:
            ds = ds.shuffle(seed=self.seed, buffer_size=SHUFFLE_BUFFER) if streaming else \
                ds.shuffle(seed=self.seed + epoch, keep_in_memory=True)
        if streaming:
            ds.set_epoch(epoch)
        ds = split_dataset_by_node(ds, rank=self.dp_rank, world_size=self.dp_size)
        # streaming: read up to the position (IterableDataset.skip would change the shuffle order)
        rows = itertools.islice(ds, start, None) if streaming else ds.select(range(start, len(ds)))
        for row in rows:
            yield self.tokenizer.encode(row["text"])


class SyntheticDocuments:
    """Random token documents (64 to 8K tokens) for benchmarks: nothing to read or download.
    Document i of a rank is drawn from its own seed, so any position is reached at once."""

    def __init__(self, tokenizer, seed: int, dp_rank: int):
        self.vocab, self.eos_id, self.seed, self.dp_rank = tokenizer.vocab_size, tokenizer.eos_id, seed, dp_rank

    def __call__(self, epoch: int, start: int) -> Iterator[np.ndarray]:
        for index in range(start, 1 << 62):
            rng = np.random.default_rng([self.seed, self.dp_rank, epoch, index])
            tokens = rng.integers(0, self.vocab - 1, int(rng.integers(64, 8192)))
            yield np.where(tokens >= self.eos_id, tokens + 1, tokens)  # every id but EOS


@dataclass
class DataPosition:
    """The next token to read: token `offset` of document `document` of epoch `epoch` (of this
    rank's shard)."""

    epoch: int = 0
    document: int = 0
    offset: int = 0


class PackedSequences:
    """Documents, each followed by EOS, packed into sequences of `seq_len` tokens.

    Each item is (tokens [1, seq_len] int64, cu_seqlens [N+1] int32): B = 1 packed, with the
    offsets of the N document pieces in the sequence (a document cut by the sequence end
    continues, as a new piece, in the next sequence).
    """

    def __init__(self, documents: Callable[[int, int], Iterator[np.ndarray]], eos_id: int, seq_len: int):
        self.documents, self.eos_id, self.seq_len = documents, eos_id, seq_len
        self.position = DataPosition()
        self._reader = None
        self._doc = None

    def state_dict(self) -> dict:
        return asdict(self.position)

    def load_state_dict(self, state: dict) -> None:
        self.position = DataPosition(**state)
        self._reader = self._doc = None

    def _open(self, epoch: int, document: int) -> None:
        self.position = DataPosition(epoch, document, self.position.offset)
        self._reader = self.documents(epoch, document)
        self._doc = self._read()

    def _read(self):
        """The next non-empty document of the reader with its EOS, or None at the end of the epoch."""
        for tokens in self._reader:
            if len(tokens):
                return np.append(tokens, self.eos_id)
            self.position.document += 1
        return None

    def _next_document(self) -> None:
        """Move to the next document, to the next epoch after the last one."""
        self.position = DataPosition(self.position.epoch, self.position.document + 1, 0)
        self._doc = self._read()
        if self._doc is None:
            self.position = DataPosition(self.position.epoch + 1, 0, 0)
            self._open(self.position.epoch, 0)
            if self._doc is None:
                raise ValueError("--dataset: this rank's shard of the dataset has no text")

    def __iter__(self):
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._reader is None:
            self._open(self.position.epoch, self.position.document)
            if self._doc is None:
                self._next_document()
        pieces, filled = [], 0
        while filled < self.seq_len:
            if self.position.offset == len(self._doc):
                self._next_document()
            start = self.position.offset
            take = min(self.seq_len - filled, len(self._doc) - start)
            pieces.append(self._doc[start:start + take])
            self.position.offset += take
            filled += take
        lengths = np.cumsum([0] + [len(p) for p in pieces])
        tokens = torch.from_numpy(np.concatenate(pieces)).view(1, -1)
        cu_seqlens = torch.from_numpy(lengths.astype(np.int32))
        if torch.cuda.is_available():  # pinned: the copy to the GPU does not wait
            tokens, cu_seqlens = tokens.pin_memory(), cu_seqlens.pin_memory()
        return tokens, cu_seqlens


def build_data(config, tokenizer, seed: int, dp_rank: int, dp_size: int) -> PackedSequences:
    """This data-parallel rank's packed sequences, as --dataset and --seq-len say."""
    if config.dataset == "synthetic":
        documents = SyntheticDocuments(tokenizer, seed, dp_rank)
    else:
        documents = DatasetDocuments(config, tokenizer, seed, dp_rank, dp_size)
    return PackedSequences(documents, tokenizer.eos_id, config.seq_len)
