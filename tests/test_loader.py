import json

import numpy as np
import pytest

from data_pipeline.loader import Source, SourceReader, TokenLoader, merge_states, read_manifest_fingerprints
from data_pipeline.shards import ShardWriter, iter_samples, npy_bytes
from conftest import copy_with_fingerprint
from data_pipeline.vocab import IGNORE, IMAGE, TEXT, VISUAL_STRUCTURE


@pytest.fixture(scope="module")
def source(world):
    src = Source.open("shapes", world / "tokens", 1.0)
    return src, read_manifest_fingerprints([src])[1]


def global_rows(loaders, steps):
    """Per step: the rows of every data-parallel rank, concatenated in rank order."""
    out = []
    for _ in range(steps):
        rows = {k: [] for k in ("tokens", "targets", "doc_ids", "positions", "horizon", "loss_kind")}
        for loader in loaders:
            for mb in loader.next_step():
                for k in rows:
                    rows[k].append(mb[k])
        out.append({k: np.concatenate(v) for k, v in rows.items()})
    return out


def make(source, dp, mbs, global_batch=8, seq_len=48, seed=3, sources=None, caption_dropout=0.0):
    src, vocabulary = source
    return [TokenLoader(sources or [src], vocabulary, seq_len=seq_len, global_batch_size=global_batch,
                        micro_batch_size=mbs, dp_rank=rank, dp_size=dp, seed=seed, caption_dropout=caption_dropout)
            for rank in range(dp)]


def test_global_batches_do_not_depend_on_the_layout(source):
    reference = global_rows(make(source, dp=1, mbs=8), 5)
    for dp, mbs in ((1, 2), (2, 4), (2, 1), (4, 2), (8, 1)):
        other = global_rows(make(source, dp=dp, mbs=mbs), 5)
        for a, b in zip(reference, other):
            for k in a:
                assert np.array_equal(a[k], b[k]), (dp, mbs, k)


def test_rows_are_full_and_each_stream_chains_with_an_overlap_of_one(source):
    steps = global_rows(make(source, dp=1, mbs=4), 4)
    for step in steps:
        assert step["tokens"].shape == (8, 48)
        assert (step["tokens"][:, 1:] == step["targets"][:, :-1]).all()
    for prev, nxt in zip(steps, steps[1:]):
        assert (nxt["tokens"][:, 0] == prev["targets"][:, -1]).all()  # row r of step n+1 continues row r


def test_a_stream_reproduces_its_documents_exactly(source):
    """Stream 0's rows, joined, are documents 0, P, 2P, ... of the source with nothing lost or added."""
    src, vocabulary = source
    steps = global_rows(make(source, dp=1, mbs=8), 6)
    stream = [int(steps[0]["tokens"][0, 0])]
    for step in steps:
        stream += step["targets"][0].tolist()
    reader, docs = SourceReader(src, vocabulary, seed=3), []
    while sum(map(len, docs)) < len(stream):
        docs.append(reader.read(8 * len(docs))[0].tolist())
    assert stream == sum(docs, [])[:len(stream)]


def test_every_document_once_per_epoch_in_a_shuffled_shard_order(source):
    src, vocabulary = source
    reader = SourceReader(src, vocabulary, seed=0)
    n = reader.docs_per_epoch
    assert n == 160
    for epoch in (0, 1):
        places = {reader._locate(epoch * n + k) for k in range(n)}
        assert len(places) == n
    first_shard = [reader._locate(e * n)[0] for e in range(6)]
    assert len(set(first_shard)) > 1  # epochs visit shards in different orders


def test_loss_kinds_and_document_boundaries(source):
    src, vocabulary = source
    b = make(source, dp=1, mbs=8, seq_len=256)[0].next_step()[0]
    doc_ids, kinds, targets = b["doc_ids"], b["loss_kind"], b["targets"]
    boundary = doc_ids[:, 1:] != doc_ids[:, :-1]
    assert boundary.any()
    assert (kinds[:, :-1][boundary] == IGNORE).all()            # no loss across documents
    assert (targets[kinds == IMAGE] >= vocabulary.visual_offset).all()
    assert (targets[kinds == TEXT] < vocabulary.visual_offset).all()
    assert (kinds == VISUAL_STRUCTURE).any()
    for row_doc, row_pos in zip(doc_ids, b["positions"]):       # positions restart at each document
        starts = np.r_[0, np.nonzero(np.diff(row_doc.numpy()))[0] + 1]
        assert (row_pos[starts] == 0).all()


def test_resume_under_another_data_parallel_size_continues_exactly(source):
    src, vocabulary = source
    two = [Source("a", src.path, 1.0, src.shards), Source("b", src.path, 0.5, src.shards)]
    saved = make(source, dp=2, mbs=2, sources=two)
    global_rows(saved, 3)
    state = json.loads(json.dumps(merge_states([loader.state_dict() for loader in saved])))  # JSON round trip
    expected = global_rows(saved, 4)
    for dp, mbs in ((1, 4), (2, 2), (4, 1)):
        resumed = make(source, dp=dp, mbs=mbs, sources=two)
        for loader in resumed:
            loader.load_state_dict(state)
        for a, b in zip(expected, global_rows(resumed, 4)):
            for k in a:
                assert np.array_equal(a[k], b[k]), (dp, k)


def test_caption_dropout_is_decided_per_document_under_every_layout_and_resume(source):
    """Pairs (one image or video after text) lose their caption at rate p over 10^4 document draws (within 1%);
    other documents never; a dropped pair is BOS + its image or video; the same documents are dropped under every
    data-parallel size and micro-batch and after a resume under another one."""
    src, vocabulary = source
    reader, plain = SourceReader(src, vocabulary, seed=3, caption_dropout=0.1), SourceReader(src, vocabulary, seed=3)
    media = [vocabulary.special("<|image start|>"), vocabulary.special("<|video start|>")]
    pairs = dropped = 0
    for g in range(10_000):
        document = plain.read(g)
        tokens, kinds = document[:2]
        starts = np.flatnonzero(np.isin(tokens, media))
        is_pair = len(starts) == 1 and starts[0] > 1
        pairs += is_pair
        cut = reader.without_caption(g, document)
        if cut is not None:
            assert is_pair
            dropped += 1
            assert cut[0].tolist() == [vocabulary.bos, *tokens[starts[0]:]]
            assert cut[1].tolist() == [kinds[0], *kinds[starts[0]:]]
    assert pairs > 3000 and abs(dropped / pairs - 0.1) < 0.01, (pairs, dropped)

    reference = make(source, dp=1, mbs=8, caption_dropout=0.5)
    expected = global_rows(reference, 6)
    assert not all(np.array_equal(a["tokens"], b["tokens"]) for a, b in zip(expected, global_rows(
        make(source, dp=1, mbs=8), 6)))
    for dp, mbs in ((2, 2), (4, 1)):
        other = make(source, dp=dp, mbs=mbs, caption_dropout=0.5)
        for a, b in zip(expected, global_rows(other, 6)):
            assert all(np.array_equal(a[k], b[k]) for k in a), (dp, mbs)
        assert sum(loader.captions_dropped() for loader in other) == reference[0].captions_dropped() > 0
    saved = make(source, dp=2, mbs=2, caption_dropout=0.5)
    global_rows(saved, 3)
    state = json.loads(json.dumps(merge_states([loader.state_dict() for loader in saved])))
    resumed = make(source, dp=4, mbs=1, caption_dropout=0.5)
    for loader in resumed:
        loader.load_state_dict(state)
    for a, b in zip(expected[3:], global_rows(resumed, 3)):
        assert all(np.array_equal(a[k], b[k]) for k in a)
    assert sum(loader.captions_dropped() for loader in resumed) == reference[0].captions_dropped()


def test_resume_refuses_another_global_batch(source):
    loader = make(source, dp=1, mbs=4)[0]
    other = make(source, dp=1, mbs=4, global_batch=16)[0]
    with pytest.raises(ValueError, match="Keep data.global_batch_size and data.seq_len"):
        other.load_state_dict(loader.state_dict())


def token_source(path, name, vocabulary, docs, per_shard, weight=1.0):
    """A token-shard source of the given documents (lists of text ids; bos and eos are added)."""
    shards = []
    for k in range(0, len(docs), per_shard):
        with ShardWriter(path, f"tokens-{k // per_shard:03d}", max_count=None) as w:
            for i, doc in enumerate(docs[k:k + per_shard]):
                tokens = np.array([vocabulary.bos, *doc, vocabulary.eos], np.uint32)
                w.write({"__key__": f"{k + i:06d}", "tokens.npy": npy_bytes(tokens),
                         "spans.json": json.dumps([[1, len(tokens) - 1, "text"]]).encode()})
        shards.append(f"tokens-{k // per_shard:03d}.tar")
    return Source(name, path, weight, [path / s for s in shards], vocabulary=vocabulary)


def test_mixing_shares_are_token_weights_within_2_percent(source, tmp_path):
    """Weights 0.3/0.7 over sources of 20-token and 50-250-token documents: shares of 10^5 trained tokens."""
    vocabulary = source[1]
    rng = np.random.default_rng(0)
    short = token_source(tmp_path / "short", "short", vocabulary, [[7] * 18] * 200, 50, weight=0.3)
    lengths = rng.integers(50, 250, 200)
    long = token_source(tmp_path / "long", "long", vocabulary, [[9] * int(n) for n in lengths], 50, weight=0.7)
    loader = TokenLoader([short, long], vocabulary, seq_len=255, global_batch_size=8, micro_batch_size=8, seed=1)
    counts = {7: 0, 9: 0}
    while sum(counts.values()) < 100_000:
        targets = loader.next_step()[0]["targets"]
        counts = {t: counts[t] + int((targets == t).sum()) for t in counts}
    # each source's tokens, from its filler tokens (its documents' bos and eos carry no mark)
    short_tokens, long_tokens = counts[7] * 20 / 18, counts[9] * (lengths + 2).sum() / lengths.sum()
    share = short_tokens / (short_tokens + long_tokens)
    assert abs(share - 0.3) < 0.02 * 0.3, share  # within 2% of the weight (relative)


def documents_of(loaders, steps):
    """Per stream: the ids (tokens 1-2 of each document) of the documents its rows hold, in order."""
    streams = {}
    for _ in range(steps):
        for loader in loaders:
            for stream, row in zip(loader.owned, (r for mb in loader.next_step() for r in zip(mb["tokens"],
                                                                                                mb["targets"]))):
                seq = streams.setdefault(stream, [int(row[0][0])])
                seq += row[1].tolist()
    vocabulary = loaders[0].readers[0].vocabulary
    out = {}
    for stream, seq in streams.items():
        starts = [i for i, t in enumerate(seq) if t == vocabulary.bos]
        out[stream] = [(seq[i + 1], seq[i + 2]) for i in starts if i + 2 < len(seq)]
    return out


def test_every_document_exactly_once_per_epoch_across_two_data_parallel_ranks(source, tmp_path):
    """96 documents of 16 tokens in 4 shards, 8 streams on 2 ranks, 16-token rows: an epoch is 12 steps."""
    vocabulary = source[1]
    docs = [[1 + d // 50, 1 + d % 50] + [5] * 12 for d in range(96)]
    src = token_source(tmp_path, "ids", vocabulary, docs, 24)
    loaders = [TokenLoader([src], vocabulary, seq_len=16, global_batch_size=8, micro_batch_size=2, dp_rank=rank,
                           dp_size=2, seed=5) for rank in (0, 1)]
    streams = documents_of(loaders, 24)
    assert sorted(streams) == list(range(8)) and set(loaders[0].owned).isdisjoint(loaders[1].owned)
    epochs = [[d for s in sorted(streams) for d in streams[s][12 * e:12 * (e + 1)]] for e in (0, 1)]
    everything = sorted((1 + d // 50, 1 + d % 50) for d in range(96))
    assert sorted(epochs[0]) == everything and sorted(epochs[1]) == everything  # each exactly once
    assert epochs[0] != epochs[1]  # the second epoch visits the shards in another order


def test_bad_token_samples_and_shards_are_skipped_and_counted(source, tmp_path, capsys):
    src, vocabulary = source
    good = [s for s in iter_samples(src.shards[0])][:8]
    with ShardWriter(tmp_path, "tokens-a", max_count=None) as w:
        for i, sample in enumerate(good):
            sample = {k: v for k, v in sample.items() if k != "__shard__"}
            if i == 1:
                sample["tokens.npy"] = b"not npy"
            if i == 2:
                sample["tokens.npy"] = npy_bytes(np.array([vocabulary.size + 5, 1], np.uint32))  # id out of range
            if i == 3:
                del sample["spans.json"]
            w.write(sample)
    broken = tmp_path / "tokens-b.tar"
    broken.write_bytes((tmp_path / "tokens-a.tar").read_bytes()[:5000])  # cut inside the shard
    bad = Source("bad", tmp_path, 1.0, [tmp_path / "tokens-a.tar", broken])
    loader = TokenLoader([bad], vocabulary, seq_len=32, global_batch_size=1, micro_batch_size=1)
    for _ in range(30):
        loader.next_step()
    assert loader.skipped() >= 3
    err = capsys.readouterr().err
    assert "tokens-a.tar" in err and "tokens-b.tar: truncated" in err


def test_sources_of_different_vocabularies_are_refused(world, tmp_path):
    other = copy_with_fingerprint(world / "tokens", tmp_path / "other", "manifest.json", "f" * 16)
    with pytest.raises(ValueError, match="different vocabularies"):
        read_manifest_fingerprints([Source.open("a", world / "tokens", 1), Source.open("b", other, 1)])


def legacy_copy(world, dst):
    """The world's token shards as written before shard indexes: no .idx.npy files, no per-shard counts."""
    import shutil

    shutil.copytree(world / "tokens", dst, ignore=shutil.ignore_patterns("*.idx.npy"))
    manifest = json.loads((dst / "manifest.json").read_text())
    del manifest["shard_documents"], manifest["shard_bytes"]
    (dst / "manifest.json").write_text(json.dumps(manifest))
    return dst


def rows_of(loader, steps):
    return [np.concatenate([mb["tokens"].numpy() for mb in loader.next_step()]).tobytes() for _ in range(steps)]


def test_lazy_indexed_loading_gives_the_batches_of_the_tar_header_index(source, world, tmp_path, monkeypatch,
                                                                         capsys):
    """The tokenize job's indexes and counts, opened lazily with one shard open at a time, against shards indexed
    from their tar headers at start (the loader before indexes): the same rows for 50 steps and after a resume."""
    from data_pipeline import loader as loader_module
    from data_pipeline.loader import OPEN_SHARDS

    src, vocabulary = source
    assert src.shard_documents and all((s.parent / (s.name + ".idx.npy")).exists() for s in src.shards)
    legacy = Source.open("shapes", legacy_copy(world, tmp_path / "legacy"), 1.0)
    args = dict(seq_len=48, global_batch_size=8, micro_batch_size=4, seed=3)
    reference = TokenLoader([legacy], vocabulary, **args)
    assert "indexing its 4 shards now" in capsys.readouterr().err  # and says how to avoid it
    monkeypatch.setattr(loader_module, "OPEN_SHARDS", 1)
    lazy = TokenLoader([src], vocabulary, **args)
    assert not lazy.readers[0]._open  # start-up opened no shard
    assert rows_of(lazy, 50) == rows_of(reference, 50)
    assert len(lazy.readers[0]._open) == 1 < OPEN_SHARDS
    resumed = TokenLoader([src], vocabulary, **args)
    resumed.load_state_dict(lazy.state_dict())
    assert rows_of(resumed, 10) == rows_of(reference, 10)
    assert capsys.readouterr().err == ""  # nothing rebuilt, nothing skipped


def test_a_rewritten_shard_is_named_and_its_index_rebuilt(source, world, tmp_path, capsys):
    """A shard replaced by a shorter one after its manifest and index were written, and another deleted: the
    loader names both, reads the first through a rebuilt index, and skips and counts the documents they no longer
    hold; the run goes on."""
    import shutil

    src, vocabulary = source
    folder = tmp_path / "tokens"
    shutil.copytree(world / "tokens", folder)
    shard = folder / src.shards[0].name
    samples = [{k: v for k, v in s.items() if k != "__shard__"} for s in iter_samples(shard)][:5]
    shard.unlink()
    with ShardWriter(folder, shard.stem, max_count=None) as w:
        for sample in samples:
            w.write(sample)
    (folder / src.shards[1].name).unlink()
    loader = TokenLoader([Source.open("shapes", folder, 1.0)], vocabulary, seq_len=48, global_batch_size=8,
                         micro_batch_size=8, seed=3)
    for _ in range(60):  # more than an epoch (160 documents)
        loader.next_step()
    err = capsys.readouterr().err
    assert f"{shard} has " in err and "its index is rebuilt" in err
    assert "document #5 is missing" in err and loader.skipped() > 0
    assert f"{folder / src.shards[1].name} is missing: its documents are skipped" in err


def test_loom_data_index_writes_the_indexes_and_counts_of_old_shards(source, world, tmp_path, capsys):
    from conftest import run_loom

    folder = legacy_copy(world, tmp_path / "legacy")
    result = run_loom("data", "index", folder)
    assert result.returncode == 0, result.stderr
    assert "indexed" in result.stdout and "4 shards, 160 documents" in result.stdout
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["shard_documents"] == source[0].shard_documents
    assert all((folder / (name + ".idx.npy")).exists() for name in manifest["shards"])
    TokenLoader([Source.open("shapes", folder, 1.0)], source[1], seq_len=48, global_batch_size=8,
                micro_batch_size=8).next_step()
    assert capsys.readouterr().err == ""  # started from the counts, read through the indexes
