"""Corpus readers, chunking, the Faiss index + document store, and the Selector on real text and MiniLM."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from selection.corpus import CorpusError, Document, chunk_documents, read_corpus
from selection.index import CorpusIndex, IndexMismatchError, search_abs
from selection.rules import Method
from selection.selector import SelectOptions, Selector


def test_jsonl_and_parquet_readers(tmp_path):
    records = [{"id": "a", "text": "alpha text", "source": "s1", "title": "A"}, {"id": 2, "text": "beta"}]
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in records) + "\n\n")
    docs = list(read_corpus(jsonl))
    assert [d.id for d in docs] == ["a", "2"] and docs[0].source == "s1" and docs[0].title == "A"
    assert docs[1].source == "c.jsonl"
    parquet = tmp_path / "c.parquet"
    pq.write_table(pa.Table.from_pylist([{"id": "x", "text": "gamma", "lang": "en"}]), parquet)
    (doc,) = read_corpus(parquet)
    assert doc.id == "x" and doc.meta == {"lang": "en"}


def test_folder_reader(small_corpus):
    docs = list(read_corpus(small_corpus))
    assert "csv.py" in {d.id for d in docs} and all(d.text for d in docs)


@pytest.mark.parametrize(
    "content,message",
    [
        ('{"id": 1}\n', "needs 'id' and 'text'"),
        ("not json\n", "not valid JSON"),
        ('{"id": 1, "text": 5}', "string"),
    ],
)
def test_bad_jsonl_is_a_clear_error(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(CorpusError, match=message):
        list(read_corpus(path))


def test_unreadable_inputs(tmp_path):
    with pytest.raises(CorpusError, match="does not exist"):
        read_corpus(tmp_path / "missing.jsonl")
    (tmp_path / "c.csv2").write_text("x")
    with pytest.raises(CorpusError, match="unsupported"):
        read_corpus(tmp_path / "c.csv2")
    (tmp_path / "bad.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(CorpusError, match="Parquet"):
        list(read_corpus(tmp_path / "bad.parquet"))


def test_chunks_are_exact_substrings_with_stable_ids(tokenizer, small_corpus):
    docs = list(read_corpus(small_corpus))
    chunks = list(chunk_documents(docs, tokenizer, 64, overlap=8))
    again = list(chunk_documents(read_corpus(small_corpus), tokenizer, 64, overlap=8))
    assert [c.id for c in chunks] == [c.id for c in again]
    texts = {d.id: d.text for d in docs}
    for c in chunks:
        assert c.text in texts[c.doc_id]
        assert len(tokenizer(c.text, add_special_tokens=False).input_ids) <= 64 + 2
    first = [c for c in chunks if c.doc_id == "glob.py"]
    assert first[0].id == "glob.py#0" and first[1].id == "glob.py#1"
    with pytest.raises(CorpusError, match="duplicate document id"):
        list(chunk_documents([Document("a", "x", "s"), Document("a", "y", "s")], tokenizer, 16))


def test_empty_corpus_is_refused(tmp_path, minilm, tokenizer):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(CorpusError, match="no documents"):
        CorpusIndex.build(
            chunk_documents(read_corpus(tmp_path / "empty.jsonl"), tokenizer, 64),
            tmp_path / "i",
            minilm,
            tokenizer_name="t",
            chunk_tokens=64,
            chunk_overlap=0,
            progress=False,
        )
    assert not (tmp_path / "i").exists() and not (tmp_path / "i.building").exists()


def test_index_round_trip_and_abs_cos_search(small_index, minilm):
    loaded = CorpusIndex.load(small_index.directory, minilm)
    assert len(loaded) == len(small_index) == len(loaded.store) > 20
    query = minilm.embed(["parse a comma separated values file"])
    found = loaded.search(query, 10)
    assert found.rows.shape == (1, 10) and (found.rows >= 0).all()
    exact = np.abs(np.asarray(loaded.embeddings) @ query[0])
    assert np.allclose(np.sort(exact)[::-1][:10], found.scores[0], atol=1e-5)
    assert np.allclose(found.vectors[0], np.asarray(loaded.embeddings)[found.rows[0]])
    assert {c.doc_id for c in loaded.store.get(found.rows[0][:3])} & {"csv.py", "copy_of_csv.py"}
    loaded.close()


def test_abs_search_finds_negatively_correlated_vectors():
    import faiss

    vectors = np.eye(4, dtype=np.float32)
    vectors[3] = -vectors[0]
    index = faiss.IndexFlatIP(4)
    index.add(vectors)
    rows, scores = search_abs(index, vectors[:1], 2)
    assert sorted(rows[0].tolist()) == [0, 3] and np.allclose(scores, 1)


def test_index_built_with_another_embedder_is_refused(small_index, tmp_path):
    from selection.embed import LMEmbedder
    from tests.conftest import tiny_llama_dir

    other = LMEmbedder(tiny_llama_dir(tmp_path / "tiny"))
    with pytest.raises(IndexMismatchError, match="built with embedder"):
        CorpusIndex.load(small_index.directory, other)
    with pytest.raises(ValueError, match="-d"):
        Selector(small_index, other)


def test_same_name_different_weights_is_refused(small_corpus, tokenizer, tmp_path):
    from selection.embed import LMEmbedder
    from tests.conftest import tiny_llama_dir

    a = LMEmbedder(tiny_llama_dir(tmp_path / "a" / "tiny", seed=1))
    index = CorpusIndex.build(
        chunk_documents(read_corpus(small_corpus), tokenizer, 256),
        tmp_path / "idx",
        a,
        tokenizer_name="t",
        chunk_tokens=256,
        chunk_overlap=0,
        progress=False,
    )
    index.close()
    b = LMEmbedder(tiny_llama_dir(tmp_path / "b" / "tiny", seed=2))
    assert a.name == b.name
    with pytest.raises(IndexMismatchError, match="different vectors"):
        CorpusIndex.load(tmp_path / "idx", b)


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_approximate_index_kinds(small_corpus, tokenizer, minilm, tmp_path, kind):
    chunks = chunk_documents(read_corpus(small_corpus), tokenizer, 128)
    index = CorpusIndex.build(
        chunks,
        tmp_path / kind,
        minilm,
        tokenizer_name="t",
        chunk_tokens=128,
        chunk_overlap=0,
        kind=kind,
        progress=False,
    )
    query = minilm.embed(["binary search in a sorted list"])
    found = index.search(query, 5)
    assert (found.rows >= 0).all() and found.scores[0, 0] > 0.3
    index.close()


def test_selector_end_to_end(small_index, minilm):
    selector = Selector(small_index, minilm)
    prompts = ["How do I read rows from a CSV file?", "priority queue with heappush"]
    results = selector.select(prompts, SelectOptions(6, candidates=40))
    assert len(results) == 2
    for result in results:
        assert len(result.documents) == 6 and len(result.sigma2) == 7
        assert all(a >= b - 1e-9 for a, b in zip(result.sigma2, result.sigma2[1:], strict=False))
    assert "heapq.py" in {d.doc_id for d in results[1].documents}
    nn = selector.select(prompts[:1], SelectOptions(6, Method.NN, candidates=40))[0]
    nn_f = selector.select(prompts[:1], SelectOptions(6, Method.NN_F, candidates=40))[0]
    texts_nn_f = [d.text for d in nn_f.documents]
    assert len(set(texts_nn_f)) == len(texts_nn_f)
    # The corpus holds csv.py twice: NN takes both copies of the best chunk, SIFT and NN-F don't.
    texts_nn = [d.text for d in nn.documents]
    assert len(set(texts_nn)) < len(texts_nn)
    texts_sift = [d.text for d in results[0].documents]
    assert len(set(texts_sift)) == len(texts_sift)
    with pytest.raises(ValueError, match="non-empty"):
        selector.select([""], SelectOptions(3))
    assert torch.tensor(results[0].sigma2).isfinite().all()


def test_selector_matches_activeft_retriever(small_index, minilm):
    """The full path (|cos| top-K from Faiss, then SIFT) picks the rows activeft's Retriever picks."""
    from activeft.sift import Retriever

    query = minilm.embed(["split a shell command line into tokens"])
    retriever = Retriever(small_index.index, llambda=0.01, device=torch.device("cpu"))
    _, theirs, _, _ = retriever.search(query, N=8, K=30)
    prompt = "split a shell command line into tokens"
    ours = Selector(small_index, minilm).select([prompt], SelectOptions(8, candidates=30))[0]
    store = small_index.store
    assert [c.hash for c in store.get(r.row for r in ours.documents)] == [c.hash for c in store.get(theirs)]


def test_building_from_a_list_shows_a_total(small_corpus, tokenizer, minilm, tmp_path, capsys):
    """The embedding bar knows how many chunks there are, so a long build shows an ETA."""
    chunks = list(chunk_documents(read_corpus(small_corpus), tokenizer, 128))
    CorpusIndex.build(chunks, tmp_path / "idx", minilm, tokenizer_name="t", chunk_tokens=128, chunk_overlap=0).close()
    assert f"{len(chunks)}/{len(chunks)}" in capsys.readouterr().err
