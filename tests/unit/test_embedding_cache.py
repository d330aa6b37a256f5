"""The offline embedder's vectors survive across runs: a second run neither encodes nor loads the model."""

from __future__ import annotations

import numpy as np
import pytest

from stablealign.llm.backends import embeddings
from stablealign.llm.backends.embeddings import MiniLMEmbedder, VectorStore, embed_cached, vector_store

TEXTS = ["How do I pick a lock?", "What is the capital of France?", "How do I pick a lock?", "Is lying ever ok?"]


def fake_encoder(calls: list[list[str]]):
    """A stand-in for the model: a deterministic unit vector per text, counting what it encodes."""

    def encode(texts: list[str]) -> np.ndarray:
        calls.append(list(texts))
        rows = np.stack([np.random.default_rng(abs(hash(t)) % 2**32).normal(size=384) for t in texts])
        return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)

    return encode


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("STABLEALIGN_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(embeddings, "_STORES", {})  # a fresh process: nothing read from disk yet
    return tmp_path


async def test_second_run_reads_the_disk_and_never_constructs_the_model(cache, monkeypatch):
    calls: list[list[str]] = []
    first = MiniLMEmbedder()
    first._encode = fake_encoder(calls)
    vectors = await embed_cached(first, TEXTS)
    assert vectors.shape == (4, 384) and np.array_equal(vectors[0], vectors[2])
    assert sorted(calls[0]) == sorted(set(TEXTS))  # each distinct text encoded once
    files = list((cache / "embeddings").glob("*.vec"))
    assert len(files) == 1 and first.model_id in files[0].name

    # The next run: a new process (no store read yet), a new embedder, and a model that cannot load.
    monkeypatch.setattr(embeddings, "_STORES", {})

    def no_model(*args, **kwargs):
        raise AssertionError("the model must not be loaded when every text is cached")

    monkeypatch.setattr(embeddings, "load_minilm", no_model)
    second = MiniLMEmbedder()
    again = await embed_cached(second, TEXTS)
    assert np.array_equal(again, vectors)
    # The vectors are in the embedder's memory too: a later one-question embed needs no model either.
    assert np.array_equal((await second.embed([TEXTS[1]]))[0], vectors[1])
    # Something new does need the model, and says so.
    with pytest.raises(AssertionError, match="must not be loaded"):
        await embed_cached(second, ["A question never seen before?"])


async def test_only_missing_texts_are_encoded_and_appended(cache):
    calls: list[list[str]] = []
    embedder = MiniLMEmbedder()
    embedder._encode = fake_encoder(calls)
    await embed_cached(embedder, TEXTS[:2])
    fresh = MiniLMEmbedder()
    fresh._encode = fake_encoder(calls)
    await embed_cached(fresh, TEXTS)
    assert calls == [sorted(TEXTS[:2]), [TEXTS[3]]]
    store = vector_store(fresh.model_id, 384)
    assert len(store) == 3


def test_store_shares_appends_between_processes_and_survives_a_torn_write(tmp_path):
    path = tmp_path / "m.vec"
    rng = np.random.default_rng(0)
    rows = rng.normal(size=(3, 8)).astype(np.float32)
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    a, b = VectorStore(path, 8), VectorStore(path, 8)
    assert a.put_many(["x", "y"], rows[:2]) == 2
    assert set(b.get_many(["x", "y", "z"])) == {"x", "y"}  # b reads what a appended
    assert a.put_many(["x"], rows[:1]) == 0  # never twice
    with open(path, "ab") as handle:  # a writer that died mid-record
        handle.write(b"\x01" * 17)
    c = VectorStore(path, 8)
    assert set(c.get_many(["x", "y"])) == {"x", "y"}
    assert c.put_many(["z"], rows[2:]) == 1  # cuts the torn tail off first
    assert path.stat().st_size == 3 * (32 + 8 * 4)
    assert np.array_equal(VectorStore(path, 8).get_many(["z"])["z"], rows[2])
    # Not unit vectors (or not finite): never stored, never served.
    assert c.put_many(["nan"], np.full((1, 8), np.nan, dtype=np.float32)) == 0


def test_cache_location_and_switch(monkeypatch, tmp_path):
    monkeypatch.setenv("STABLEALIGN_CACHE_DIR", "off")
    assert vector_store("m", 8) is None
    monkeypatch.delenv("STABLEALIGN_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert embeddings.cache_dir() == tmp_path / "stablealign"


async def test_a_world_embeds_its_questions_up_front_once(cache):
    """The world's questions are embedded in one batch before its rounds, so each interaction's embedding is an
    in-memory hit; a hashing embedder (no disk cache) is left alone."""
    from services.world import grid
    from services.world.prior import prepare_questions, world_questions
    from stablealign.llm.backends.embeddings import HashingEmbedder
    from stablealign.v1 import world_pb2

    pool = tuple(f"question {i}?" for i in range(50))
    spec = world_pb2.WorldSpec(world_id="w", size=3, rounds=2, seed=4)
    asked = [grid.pick_question(pool, seed=4, round_=r, agent=a) for r in range(2) for a in range(9)]
    assert world_questions(spec, pool) == list(dict.fromkeys(asked))
    calls: list[list[str]] = []
    embedder = MiniLMEmbedder()
    embedder._encode = fake_encoder(calls)
    await prepare_questions(embedder, spec, pool)
    assert len(calls) == 1 and sorted(calls[0]) == sorted(set(asked))
    for question in asked:  # what each interaction then asks for
        await embedder.embed([question])
    assert len(calls) == 1
    assert await prepare_questions(HashingEmbedder(), spec, pool) == 0.0
