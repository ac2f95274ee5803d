import json
import shutil

import numpy as np
import pytest

from data_pipeline.loader import Source, SourceCursor, TokenLoader, read_manifest_fingerprints
from data_pipeline.shards import iter_samples, npy_load
from data_pipeline.vocab import IGNORE, IMAGE, TEXT, VISUAL_STRUCTURE


@pytest.fixture(scope="module")
def source(world):
    src = Source.open("shapes", world / "tokens", 1.0)
    return src, read_manifest_fingerprints([src])[1]


def take(loader, n):
    return [next(loader) for _ in range(n)]


def test_rows_are_full_and_chain_with_an_overlap_of_one(source):
    src, layout = source
    loader = TokenLoader([src], layout, seq_len=64, micro_batch_size=3)
    batches = take(loader, 4)
    rows = [(b["tokens"][i], b["targets"][i]) for b in batches for i in range(3)]
    for tokens, targets in rows:
        assert tokens.shape == (64,) and targets.shape == (64,)
        assert (tokens[1:] == targets[:-1]).all()
    for (_, prev_targets), (next_tokens, _) in zip(rows, rows[1:]):
        assert next_tokens[0] == prev_targets[-1]


def test_stream_reproduces_the_documents_exactly(source):
    """Concatenating the rows gives back the documents, in order, with nothing lost or added."""
    src, layout = source
    loader = TokenLoader([src], layout, seq_len=50, micro_batch_size=2)
    stream = []
    for b in take(loader, 10):
        for tokens, targets in zip(b["tokens"], b["targets"]):
            stream += ([int(tokens[0])] if not stream else []) + targets.tolist()
    docs = []
    cursor = SourceCursor(src, seed=0, consumer=0, consumers=1, state=None)
    while sum(map(len, docs)) < len(stream):
        docs.append(cursor.next_document(layout)[0].tolist())
    assert stream == sum(docs, [])[:len(stream)]


def test_loss_kinds_and_document_boundaries(source):
    src, layout = source
    b = next(TokenLoader([src], layout, seq_len=256, micro_batch_size=4))
    doc_ids, kinds, targets = b["doc_ids"], b["loss_kind"], b["targets"]
    boundary = doc_ids[:, 1:] != doc_ids[:, :-1]
    assert boundary.any()
    assert (kinds[:, :-1][boundary] == IGNORE).all()            # no loss across documents
    assert (targets[kinds == IMAGE] >= layout.visual_offset).all()
    assert (targets[kinds == TEXT] < layout.visual_offset).all()
    assert (kinds == VISUAL_STRUCTURE).any()
    for row_doc, row_pos in zip(doc_ids, b["positions"]):       # positions restart at each document
        starts = np.r_[0, np.nonzero(np.diff(row_doc.numpy()))[0] + 1]
        assert (row_pos[starts] == 0).all()


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_continues_exactly(source, workers):
    src, layout = source
    a = TokenLoader([src, Source("again", src.path, 0.5, src.shards)], layout, 48, 2, dp_rank=1, dp_size=2,
                    seed=5, num_workers=workers)
    take(a, 5)
    state = json.loads(json.dumps(a.state_dict()))  # survives a JSON round trip
    expected = take(a, 6)
    b = TokenLoader([src, Source("again", src.path, 0.5, src.shards)], layout, 48, 2, dp_rank=1, dp_size=2,
                    seed=5, num_workers=workers)
    b.load_state_dict(state)
    for x, y in zip(expected, take(b, 6)):
        for key in x:
            assert (x[key] == y[key]).all(), key


def test_resume_refuses_another_worker_count(source):
    src, layout = source
    a = TokenLoader([src], layout, 32, 1, num_workers=0)
    take(a, 1)
    b = TokenLoader([src], layout, 32, 1, num_workers=2)
    with pytest.raises(ValueError, match="data.num_workers=0"):
        b.load_state_dict(a.state_dict())


def test_each_document_once_per_epoch_across_ranks_and_workers(source):
    src, layout = source
    keys = [s["__key__"] for shard in src.shards for s in iter_samples(shard)]
    consumers = 2 * 3  # dp 2 x workers 3
    seen = []
    for c in range(consumers):
        cursor = SourceCursor(src, seed=0, consumer=c, consumers=consumers, state=None)
        stream = cursor._samples()
        for sample in stream:
            if cursor.epoch > 0:  # the first document of the next epoch
                break
            seen.append(sample["__key__"])
    assert sorted(seen) == sorted(keys)


def test_mixing_weights_are_respected(source):
    src, layout = source
    heavy, light = Source("heavy", src.path, 3.0, src.shards), Source("light", src.path, 1.0, src.shards)
    loader = TokenLoader([heavy, light], layout, 128, 4, seed=1)
    take(loader, 40)
    sources = loader.state_dict()["worker_states"][0]["sources"]
    drawn = {name: s["k"] + s["epoch"] * 160 for name, s in sources.items()}
    assert 0.65 < drawn["heavy"] / (drawn["heavy"] + drawn["light"]) < 0.85


def test_sources_of_different_vocabularies_are_refused(world, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(world / "tokens", other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["fingerprint"] = "f" * 16
    (other / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="different vocabularies"):
        read_manifest_fingerprints([Source.open("a", world / "tokens", 1), Source.open("b", other, 1)])


def test_bad_token_samples_and_shards_are_skipped_and_counted(source, tmp_path, capsys):
    from data_pipeline.shards import ShardWriter, npy_bytes

    src, layout = source
    good = [s for s in iter_samples(src.shards[0])][:6]
    with ShardWriter(tmp_path, "tokens-a", max_count=None) as w:
        for i, sample in enumerate(good):
            sample = {k: v for k, v in sample.items() if k != "__shard__"}
            if i == 1:
                sample["tokens.npy"] = b"not npy"
            if i == 2:
                sample["tokens.npy"] = npy_bytes(np.array([layout.size + 5, 1], np.uint32))  # id out of range
            if i == 3:
                del sample["spans.json"]
            w.write(sample)
    broken = tmp_path / "tokens-b.tar"
    broken.write_bytes((tmp_path / "tokens-a.tar").read_bytes()[:3000])  # cut inside the shard
    bad = Source("bad", tmp_path, 1.0, [tmp_path / "tokens-a.tar", broken])
    loader = TokenLoader([bad], layout, 32, 2)
    take(loader, 8)
    skipped = loader.state_dict()["worker_states"][0]["sources"]["bad"]["skipped"]
    assert skipped["bad_token_sample"] >= 3 and skipped["unreadable_shard"] >= 1
    assert loader.skipped() == sum(skipped.values())
    assert "tokens-a.tar" in capsys.readouterr().err
