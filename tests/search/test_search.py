"""Searching an index: text and image queries, bad queries, exact vs approximate search and its recall."""

from __future__ import annotations

import json

import pytest
import torch

from ldmclip.cli import main
from ldmclip.search import ExactSearch, QueryError, SearchEngine, make_searcher, measure_recall, recall_at_k
from ldmclip.search import neighbors

from .conftest import load


@pytest.fixture(scope="module")
def engine(built_index) -> SearchEngine:
    return SearchEngine.open(built_index)


def test_text_search_ranks_by_the_models_cosine_similarity(engine, model_name):
    hits = engine.search_text("a photo of a red disc", k=5)
    assert [h.rank for h in hits] == [1, 2, 3, 4, 5]
    # The same ranking, computed here from the model directly.
    model, _ = load(model_name)
    import ldmclip
    with torch.no_grad():
        text = model.encode_text(ldmclip.get_tokenizer(model_name)(["a photo of a red disc"]), normalize=True)
    scores = (engine.index.embeddings @ text[0]).tolist()
    expected = sorted(range(len(scores)), key=lambda i: -scores[i])[:5]
    assert [h.id for h in hits] == expected
    assert [round(h.score, 5) for h in hits] == [round(scores[i], 5) for i in expected]


def test_image_query_finds_itself_first(engine):
    path = engine.index.file(engine.index.id_of("green/1.png"))
    hits = engine.search_image(path, k=3)
    assert hits[0].path == "green/1.png" and hits[0].score == pytest.approx(1.0, abs=1e-4)
    similar = engine.similar(engine.index.id_of("green/1.png"), k=3)
    assert [h.id for h in similar] == [h.id for h in hits]


def test_bad_queries_are_clear_errors(engine, tmp_path):
    for query, message in [("", "empty"), ("   ", "empty"), ("\x00\x01\x7f", "no words the tokenizer can read"),
                           ("x" * 5000, "characters long")]:
        with pytest.raises(QueryError, match=message):
            engine.search_text(query)
    (tmp_path / "fake.png").write_bytes(b"nope")
    with pytest.raises(QueryError, match="cannot read the query image"):
        engine.search_image(tmp_path / "fake.png")
    with pytest.raises(QueryError, match="no image with id 99"):
        engine.similar(99)
    with pytest.raises(QueryError, match="k must be"):
        engine.search_text("a dog", k=0)


def test_search_command_prints_ranked_paths_and_scores(built_index, capsys):
    assert main(["search", str(built_index), "a blue disc", "-k", "3"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "3 nearest of 8 images to the text 'a blue disc'" in out[0] and "exact search" in out[0]
    rows = [line.split() for line in out[2:]]
    assert [r[0] for r in rows] == ["1", "2", "3"]
    scores = [float(r[1]) for r in rows]
    assert scores == sorted(scores, reverse=True)
    # An existing image path as the query: image -> image search, the image itself first.
    image = built_index.parent / "images" / "yellow" / "0.png"
    assert main(["search", str(built_index), str(image), "-k", "2", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["kind"] == "image" and result["results"][0]["path"] == "yellow/0.png"
    assert main(["search", str(built_index), "\x01\x02"]) == 2
    assert "no words the tokenizer can read" in capsys.readouterr().err


def test_recall_at_k():
    truth = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    assert recall_at_k(truth, truth) == 1.0
    assert recall_at_k(torch.tensor([[4, 3, 9, 9], [5, 6, 7, 8]]), truth) == 0.75


def test_approximate_search_has_high_recall_against_exact_search():
    faiss = pytest.importorskip("faiss")
    faiss.omp_set_num_threads(1)  # a small, reproducible graph; the machine's cores are shared
    generator = torch.Generator().manual_seed(0)
    vectors = torch.nn.functional.normalize(torch.randn(5000, 64, generator=generator), dim=1)
    searcher = make_searcher(vectors, mode="auto", threshold=1000)
    assert searcher.kind == "approximate"
    assert searcher.recall >= 0.95, searcher.note
    assert f"recall@10 {searcher.recall:.3f}" in searcher.note
    # Independent queries (not near indexed vectors: the hardest case for a graph).
    queries = torch.nn.functional.normalize(torch.randn(100, 64, generator=generator), dim=1)
    exact = ExactSearch(vectors)
    found, truth = searcher.search(queries, 10)[1], exact.search(queries, 10)[1]
    assert recall_at_k(found, truth) >= 0.9
    assert measure_recall(exact, exact) == 1.0
    # Scores are the same cosine similarities as exact search's, for the neighbours both find.
    scores, ids = searcher.search(queries[:1], 5)
    assert torch.allclose(scores[0], (vectors[ids[0]] @ queries[0]), atol=1e-5)


def test_small_indexes_and_missing_faiss_use_exact_search(monkeypatch):
    vectors = torch.nn.functional.normalize(torch.randn(50, 8), dim=1)
    small = make_searcher(vectors, mode="auto", threshold=100)
    assert small.kind == "exact" and "under the 100-image threshold" in small.note
    monkeypatch.setattr(neighbors, "faiss_available", lambda: False)
    fallback = make_searcher(vectors, mode="approximate")
    assert fallback.kind == "exact" and "pip install faiss-cpu" in fallback.note
    with pytest.raises(ValueError, match="search mode"):
        make_searcher(vectors, mode="fast")


def test_search_command_reports_recall_of_approximate_search(built_index, capsys):
    pytest.importorskip("faiss")
    assert main(["search", str(built_index), "a red disc", "--search", "approximate", "-k", "8", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["search"] == "approximate" and result["recall"] == 1.0  # 8 images: the graph is exact
    assert "recall@10" in result["note"]
