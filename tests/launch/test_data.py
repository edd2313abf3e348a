"""Data: the byte tokenizer, packing with document boundaries, data-parallel shards, and a
reading position that resumes exactly (shuffled, streaming, across epochs)."""

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from lasp.launch.config import DataConfig
from lasp.launch.data import (ByteTokenizer, DatasetDocuments, PackedSequences, SyntheticDocuments, build_data,
                              local_files, stdlib_files)


def test_byte_tokenizer():
    tok = ByteTokenizer()
    text = "def f(x):\n    return 'ä→𝔼'\n"
    ids = tok.encode(text)
    assert ids.dtype == np.int64 and ids.max() < 256 and len(ids) == len(text.encode())
    assert tok.decode(list(ids) + [tok.eos_id]) == text
    assert (tok.vocab_size, tok.eos_id) == (257, 256)


def test_packing_keeps_document_boundaries():
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 256, n) for n in (5, 0, 17, 3, 40, 9)]  # an empty document is skipped

    def documents(epoch, start):
        return iter(docs[start:])

    packed = PackedSequences(documents, eos_id=256, seq_len=16)
    stream = np.concatenate([np.append(d, 256) for d in docs if len(d)])  # 78 tokens an epoch
    ends = np.cumsum([len(d) + 1 for d in docs if len(d)])
    for i in range(7):  # across the end of the first epoch
        tokens, cu = next(packed)
        assert tokens.shape == (1, 16) and tokens.dtype == torch.int64 and cu.dtype == torch.int32
        start = 16 * i
        expected = np.concatenate([stream, stream])[start:start + 16]
        assert np.array_equal(tokens[0].numpy(), expected)
        cuts = sorted({0, 16} | {e - start for e in np.concatenate([ends, ends + len(stream)]) if start < e < start + 16})
        assert cu.tolist() == cuts
    assert packed.position.epoch == 1


@pytest.mark.parametrize("streaming", [False, True])
def test_resume_continues_exactly(corpus, streaming):
    config = DataConfig(dataset=corpus, seq_len=64, streaming=streaming)
    uninterrupted = build_data(config, ByteTokenizer(), seed=3, dp_rank=1, dp_size=2)
    sequences = [next(uninterrupted) for _ in range(24)]  # a shard is ~16 sequences: crosses an epoch
    assert uninterrupted.position.epoch >= 1
    first = build_data(config, ByteTokenizer(), seed=3, dp_rank=1, dp_size=2)
    for _ in range(13):
        next(first)
    state = json.loads(json.dumps(first.state_dict()))  # plain data
    resumed = build_data(config, ByteTokenizer(), seed=3, dp_rank=1, dp_size=2)
    resumed.load_state_dict(state)
    for expected in sequences[13:]:
        tokens, cu = next(resumed)
        assert torch.equal(tokens, expected[0]) and torch.equal(cu, expected[1])


def _texts(documents):
    tok = ByteTokenizer()
    return [tok.decode(ids) for ids in documents(0, 0)]


def test_data_parallel_ranks_read_disjoint_shards(corpus):
    config = DataConfig(dataset=corpus)
    everything = _texts(DatasetDocuments(config, ByteTokenizer(), 0, 0, 1))
    shards = [_texts(DatasetDocuments(config, ByteTokenizer(), 0, r, 2)) for r in range(2)]
    assert sorted(shards[0] + shards[1]) == sorted(everything) and len(everything) == 60
    assert abs(len(shards[0]) - len(shards[1])) <= 1
    with open(corpus) as f:
        in_file = [json.loads(line)["text"] for line in f]
    assert sorted(everything) == sorted(in_file)
    assert everything != in_file  # shuffled
    assert _texts(DatasetDocuments(replace(config, shuffle=False), ByteTokenizer(), 0, 0, 1)) == in_file
    assert _texts(DatasetDocuments(config, ByteTokenizer(), 1, 0, 1)) != everything  # another seed


def test_local_files_text_and_parquet(tmp_path):
    import pandas as pd
    (tmp_path / "texts").mkdir()
    for i in range(3):
        (tmp_path / "texts" / f"{i}.txt").write_text(f"document {i}\nwith two lines\n")
    config = DataConfig(dataset=str(tmp_path / "texts"), shuffle=False)
    assert _texts(DatasetDocuments(config, ByteTokenizer(), 0, 0, 1)) == \
        [f"document {i}\nwith two lines\n" for i in range(3)]  # one document per file
    pd.DataFrame({"content": ["alpha", "beta"], "n": [1, 2]}).to_parquet(tmp_path / "d.parquet")
    config = DataConfig(dataset=str(tmp_path / "d.parquet"), text_field="content", shuffle=False)
    assert _texts(DatasetDocuments(config, ByteTokenizer(), 0, 0, 1)) == ["alpha", "beta"]
    with pytest.raises(ValueError, match="--text-field 'body' is not a column"):
        DatasetDocuments(replace(config, text_field="body"), ByteTokenizer(), 0, 0, 1)


def test_local_file_names(tmp_path):
    (tmp_path / "a.jsonl").write_text("{}\n")
    (tmp_path / "b.jsonl").write_text("{}\n")
    (tmp_path / "c.txt").write_text("x")
    assert local_files(str(tmp_path / "*.jsonl")) == [str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")]
    assert local_files("HuggingFaceFW/fineweb") is None  # a hub name
    with pytest.raises(ValueError, match="no such data file: .*missing.parquet"):
        local_files(f"{tmp_path}/a.jsonl,{tmp_path}/missing.parquet")
    with pytest.raises(ValueError, match="must be all text"):
        local_files(f"{tmp_path}/a.jsonl,{tmp_path}/c.txt")


def test_stdlib_corpus():
    files = stdlib_files()
    assert len(files) > 500 and not any("site-packages" in f for f in files)
    assert sum(len(open(f, "rb").read()) for f in files[:200]) > 100_000


def test_synthetic_documents():
    tok = ByteTokenizer()
    docs = SyntheticDocuments(tok, seed=0, dp_rank=0)
    first = [d for _, d in zip(range(5), docs(0, 0))]
    assert all(64 <= len(d) < 8192 and d.max() < tok.eos_id for d in first)
    assert np.array_equal(next(docs(0, 3)), first[3])  # any position at once
    assert not np.array_equal(next(SyntheticDocuments(tok, 0, 1)(0, 0)), first[0])  # per rank


def test_hugging_face_tokenizer_from_a_path(tmp_path, corpus):
    """--tokenizer PATH: a tokenizer saved with save_pretrained (trained here: no download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from lasp.launch.data import HFTokenizer, build_tokenizer
    with open(corpus) as f:
        texts = [json.loads(line)["text"] for line in f]
    raw = Tokenizer(models.BPE(unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    raw.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=80, special_tokens=["<unk>", "</s>"]))
    PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="</s>", unk_token="<unk>").save_pretrained(tmp_path)
    tok = build_tokenizer(str(tmp_path))
    assert isinstance(tok, HFTokenizer) and tok.vocab_size == len(raw.get_vocab())
    assert tok.eos_id == raw.token_to_id("</s>")
    packed = build_data(DataConfig(dataset=corpus, tokenizer=str(tmp_path), seq_len=32), tok, 0, 0, 1)
    tokens, cu = next(packed)
    assert tokens.max() < tok.vocab_size and (tokens[0, cu[1:] - 1] == tok.eos_id).sum() >= 1
