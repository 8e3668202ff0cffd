"""A sharded index answers exactly as the unsharded one: same candidates, same picks, same texts."""

from __future__ import annotations

import numpy as np
import pytest
from typer.testing import CliRunner

from selection.index import CorpusIndex, IndexMismatchError
from selection.selector import SelectOptions, Selector
from selection.shards import ShardedIndex, load_index, merge_candidates, split_index
from serving.cli import app

PROMPTS = [
    "How do I read rows from a CSV file?",
    "priority queue with heappush",
    "split a shell command line into tokens",
    "match file names against a wildcard pattern",
    "insert into a sorted list keeping it sorted",
]


@pytest.fixture(scope="module", params=[2, 3])
def sharded(request, small_index, tmp_path_factory) -> ShardedIndex:
    out = split_index(small_index.directory, tmp_path_factory.mktemp("shards") / "idx", request.param, progress=False)
    index = load_index(out)
    yield index
    index.close()


def test_shards_partition_the_rows(sharded, small_index):
    assert len(sharded) == len(small_index) and sharded.dim == small_index.dim
    assert sum(len(s) for s in sharded.shards) == len(small_index)
    rows = list(range(len(small_index)))
    assert [c.text for c in sharded.chunks(rows)] == [c.text for c in small_index.chunks(rows)]
    assert [c.row for c in sharded.chunks([7, 3, 7])] == [7, 3, 7]


@pytest.mark.parametrize("k", [1, 17, 40, 10_000])
def test_merged_top_k_equals_unsharded(sharded, small_index, minilm, k):
    queries = minilm.embed(PROMPTS)
    whole, merged = small_index.search(queries, k), sharded.search(queries, k)
    np.testing.assert_array_equal(merged.rows, whole.rows)
    np.testing.assert_allclose(merged.scores, whole.scores, atol=1e-6)
    np.testing.assert_array_equal(merged.vectors, whole.vectors)


@pytest.mark.parametrize("method", ["sift", "nn", "nn_f"])
def test_selections_equal_unsharded(sharded, small_index, minilm, method):
    whole = Selector(small_index, minilm).select(PROMPTS, SelectOptions(8, method, candidates=40))
    split = Selector(sharded, minilm).select(PROMPTS, SelectOptions(8, method, candidates=40))
    for a, b in zip(whole, split, strict=True):
        assert [d.row for d in a.documents] == [d.row for d in b.documents]
        assert [d.text for d in a.documents] == [d.text for d in b.documents]
        assert a.stop_reason == b.stop_reason and a.candidates == b.candidates
        np.testing.assert_allclose(a.sigma2, b.sigma2, rtol=1e-5, atol=1e-7)


def test_merge_pads_short_shards():
    from selection.index import Candidates

    a = Candidates(rows=np.array([[0, -1]]), scores=np.array([[0.5, 0.0]], np.float32), vectors=np.ones((1, 2, 3)))
    b = Candidates(rows=np.array([[1, 3]]), scores=np.array([[0.9, 0.5]], np.float32), vectors=np.ones((1, 2, 3)))
    merged = merge_candidates([a, b], 4)
    assert merged.rows.tolist() == [[1, 0, 3, -1]] and merged.scores[0, -1] == 0


def test_sharded_index_is_not_opened_as_whole_and_bad_splits_are_refused(sharded, small_index, tmp_path):
    root = sharded.shards[0].index.directory.parent
    with pytest.raises(IndexMismatchError, match="sharded"):
        CorpusIndex.load(root)
    with pytest.raises(ValueError, match="already sharded"):
        split_index(root, tmp_path / "again", 2)
    with pytest.raises(ValueError, match="empty"):
        split_index(small_index.directory, tmp_path / "many", len(small_index) + 1)


def test_cli_shards_an_index(small_index, tmp_path):
    result = CliRunner().invoke(
        app, ["index", "shard", str(small_index.directory), "--out", str(tmp_path / "s"), "--shards", "2"]
    )
    assert result.exit_code == 0, result.output
    assert "2 shards" in result.output and (tmp_path / "s" / "shard-1" / "index.faiss").is_file()
    result = CliRunner().invoke(
        app, ["index", "shard", str(tmp_path / "nope"), "--out", str(tmp_path / "t"), "--shards", "2"]
    )
    assert result.exit_code != 0 and "not a sift-serve index" in result.output


async def test_a_hung_shard_costs_one_timeout_per_batch(small_index, tmp_path):
    """A shard that sleeps past `server.shard_timeout_s` fails the whole selection batch once (its requests
    are answered by the base model), instead of a retry per prompt that waits the timeout again each time."""
    import asyncio
    import time

    from selection.shards import LocalShard, ShardTimeoutError, shard_dir
    from serving.config import Settings
    from serving.contracts import SelectQuery
    from serving.services import SelectorService

    out = split_index(small_index.directory, tmp_path / "idx", 2, progress=False)

    class Sleepy(LocalShard):
        def search(self, queries, k):
            time.sleep(3.0)
            return super().search(queries, k)

    settings = Settings.model_validate({"index_path": str(out), "server": {"shard_timeout_s": 0.5}})
    service = SelectorService(settings, [LocalShard(shard_dir(out, 0)), Sleepy(shard_dir(out, 1))])
    options = SelectOptions(n=2, candidates=10)
    started = time.monotonic()
    results = await asyncio.gather(*(service.select(SelectQuery(p, options)) for p in PROMPTS), return_exceptions=True)
    elapsed = time.monotonic() - started
    assert all(isinstance(r, ShardTimeoutError) for r in results), results
    # At most two batches (the first prompt may go alone), each given up after one 0.5 s timeout: about 1 s.
    # A retry per prompt would wait 0.5 s more per prompt (3.5 s), and without a timeout the shard's 3 s.
    assert elapsed < 2.25, elapsed
    service.selector.index.close()
