"""Near-duplicate removal: word n-gram Jaccard always, MiniLM embeddings when the package is installed."""

from __future__ import annotations

import pytest

from ralign.errors import RalignError
from ralign.runtime.dedupe import (
    EMBEDDING_PACKAGE,
    dedupe,
    dedupe_jaccard,
    embedding_available,
    features,
)

TEXTS = [
    "How do I bake bread?",
    "how do I bake bread",  # same words: Jaccard 1
    "How can I bake a loaf of bread?",
    "What is the capital of France?",
    "Explain photosynthesis simply.",
    "",
    "  ",  # no words either: same as the empty one
    "Name the capital city of France.",
]


def test_features_are_words_and_bigrams():
    assert features("The cat, the HAT.") == {"the", "cat", "hat", "the cat", "cat the", "the hat"}


def jaccard(a: str, b: str) -> float:
    fa, fb = features(a), features(b)
    return len(fa & fb) / len(fa | fb)


@pytest.mark.parametrize(
    "max_similarity, kept",
    [
        (1.0, [0, 1, 2, 3, 4, 5, 6, 7]),  # nothing exceeds 1: all kept
        (0.99, [0, 2, 3, 4, 5, 7]),  # exact word duplicates go
        (0.4, [0, 2, 3, 4, 5, 7]),
        (0.3, [0, 2, 3, 4, 5]),  # "capital city of France" (0.375) is now too close
        (0.2, [0, 3, 4, 5]),  # and "a loaf of bread" (0.263)
        (0.0, [0, 3, 4, 5]),  # anything sharing a word goes
    ],
)
def test_jaccard_greedy(max_similarity, kept):
    assert dedupe(TEXTS, max_similarity=max_similarity, method="jaccard") == (kept, "jaccard")


def test_known_similarities():
    # 9 and 15 features sharing how, i, bake, bread, "i bake"; 11 and 11 sharing 6.
    assert jaccard(TEXTS[0], TEXTS[2]) == pytest.approx(5 / 19)
    assert jaccard(TEXTS[3], TEXTS[7]) == pytest.approx(6 / 16)


def test_greedy_keeps_the_earlier_one():
    texts = ["alpha beta gamma", "alpha beta delta", "alpha beta gamma"]
    assert dedupe_jaccard(texts, 0.5) == [0, 1]
    assert dedupe_jaccard(list(reversed(texts)), 0.5) == [0, 1]


def test_chain_is_judged_against_kept_only():
    # b is dropped for being close to a; c is close to b but not to a, so c is kept.
    a, b, c = "one two three four", "one two three four five six", "three four five six seven eight"
    assert jaccard(a, b) > 0.5 and jaccard(b, c) > 0.3 and jaccard(a, c) < 0.3
    assert dedupe_jaccard([a, b, c], 0.5) == [0, 2]


def test_empty_input():
    assert dedupe([], max_similarity=0.5, method="jaccard") == ([], "jaccard")


def test_auto_reports_the_method_it_used():
    _, used = dedupe(TEXTS, max_similarity=0.9)
    assert used == ("embedding" if embedding_available() else "jaccard")


def test_unknown_method():
    with pytest.raises(RalignError, match="unknown dedupe method 'cosine'"):
        dedupe(TEXTS, max_similarity=0.9, method="cosine")


needs_minilm = pytest.mark.skipif(
    not embedding_available(), reason=f"the {EMBEDDING_PACKAGE!r} package is not installed"
)


@needs_minilm
@pytest.mark.parametrize(
    "max_similarity, kept",
    [
        (0.95, [0, 2, 3, 4, 5, 7]),  # near-identical wording and identical empties go
        (0.8, [0, 3, 4, 5]),  # paraphrases (cosine ~0.9) go too
        (0.5, [0, 3, 4, 5]),  # unrelated questions stay (cosine ~0.1)
    ],
)
def test_embedding_greedy(max_similarity, kept):
    assert dedupe(TEXTS, max_similarity=max_similarity, method="embedding") == (kept, "embedding")


@needs_minilm
def test_embeddings_are_unit_vectors_and_deterministic():
    from ralign.runtime.dedupe import embed

    a, b = embed(TEXTS), embed(TEXTS)
    assert a.shape == (len(TEXTS), 384)
    assert (a - b).abs().max().item() == 0.0
    assert a.norm(dim=1).sub(1).abs().max().item() < 1e-5


def test_embedding_without_the_package_is_a_clear_error(monkeypatch):
    import ralign.runtime.dedupe as dd

    monkeypatch.setattr(dd, "embedding_available", lambda: False)
    with pytest.raises(RalignError, match=EMBEDDING_PACKAGE):
        dedupe(TEXTS, max_similarity=0.9, method="embedding")
    assert dedupe(TEXTS, max_similarity=0.9) == ([0, 2, 3, 4, 5, 7], "jaccard")
