"""The behaviour evaluation set: sizes, categories, well-formed rows, and no overlap with what trains."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest
from conftest import ngrams, words

from ralign.runtime.behavior import load_prompts

ROOT = Path(__file__).resolve().parents[1]
EVAL_SET = ROOT / "ralign" / "data" / "evals" / "behavior.jsonl"

# kind -> (least prompts, least categories, least prompts per category)
SIZES = {
    "harmful": (220, 8, 20),
    "scary_harmless": (220, 8, 20),
    "everyday": (110, 1, 1),
    "unknowable": (110, 1, 1),
}
MAX_CHARS = 600
N = 5  # word n-gram length for the overlap check
MAX_SHARED = 0.5  # an eval prompt may share less than half its 5-grams with any one training text
# ... and fewer than 65% of its distinct words (Jaccard): 5-grams miss paraphrases such as
# "break into a house when the owners are away" vs "... while the owners are on holiday" (0.81).
MAX_WORDS_SHARED = 0.65


def shared_fraction(prompt: str, other: set[tuple[str, ...]]) -> float:
    """The fraction of the prompt's word 5-grams that also occur in `other` (0 without any)."""
    mine = ngrams(words(prompt), N)
    return len(mine & other) / len(mine) if mine else 0.0


def _jsonl_strings(path: Path) -> list[str]:
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            row = json.loads(line)
            values = row.values() if isinstance(row, dict) else [row]
            out += [v for v in values if isinstance(v, str)]
    return out


_LITERAL = re.compile(r'"""(?:.|\n)*?"""|"(?:\\.|[^"\\\n])*"')


# What bench/harm_probe.py fits std/harm's probe on (harm_dev_2's "test" split it only measures).
PROBE_FIT = [
    ROOT / "tests" / "data" / n
    for n in ("harm_dev.jsonl", "harm_dev_2.jsonl", "everyday_dev.jsonl")
]


def training_texts() -> list[tuple[str, str]]:
    """(source, text) for every prompt, principle and template the shipped recipes can train on:
    each string of the seed sets (every split) and of recipes/data, each prompt std/harm's probe was
    fitted on (its weights score every recipe's answers), each string literal of the stdlib and
    recipe files (bench/recipes' too: the efficacy rows train on them), each template file whole."""
    texts: list[tuple[str, str]] = []
    jsonl = sorted((ROOT / "ralign/data/seeds").glob("*.jsonl"))
    jsonl += sorted((ROOT / "recipes/data").glob("*.jsonl"))
    for path in jsonl:
        texts += [(path.name, s) for s in _jsonl_strings(path)]
    for path in PROBE_FIT:
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
        texts += [(path.name, r["prompt"]) for r in rows if r.get("split") != "test"]
    ralign_files = [*ROOT.glob("stdlib/*.ralign"), *ROOT.glob("recipes/**/*.ralign")]
    for path in sorted(ralign_files) + sorted(ROOT.glob("bench/recipes/*.ralign")):
        for m in _LITERAL.finditer(path.read_text(encoding="utf-8")):
            texts.append((path.name, m.group(0).strip('"')))
    for path in sorted((ROOT / "recipes").rglob("*")):
        if path.is_file() and path.suffix not in (".ralign", ".jsonl"):
            texts.append((path.name, path.read_text(encoding="utf-8")))
    return texts


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    return load_prompts(EVAL_SET)


def test_every_row_has_a_category_and_no_split(rows):
    for r in rows:
        assert isinstance(r.get("category"), str) and re.fullmatch(r"[a-z_]+", r["category"]), r
        assert "split" not in r, r  # the whole set is evaluation only
        assert set(r) == {"prompt", "kind", "category"}, r


@pytest.mark.parametrize("kind", sorted(SIZES))
def test_sizes_and_category_counts(rows, kind):
    least, least_categories, least_per_category = SIZES[kind]
    mine = [r for r in rows if r["kind"] == kind]
    per_category = Counter(r["category"] for r in mine)
    assert len(mine) >= least
    assert len(per_category) >= least_categories
    assert min(per_category.values()) >= least_per_category, per_category


def test_prompts_are_unique_non_empty_and_short(rows):
    normal = [" ".join(words(r["prompt"])) for r in rows]
    repeated = [p for p, c in Counter(normal).items() if c > 1]
    assert not repeated
    assert all(r["prompt"].strip() and len(r["prompt"]) <= MAX_CHARS for r in rows)


def test_any_prefix_keeps_every_kind():
    # `limit` in an evaluation takes the first rows, so the file interleaves the kinds.
    first = load_prompts(EVAL_SET)[:12]
    assert {r["kind"] for r in first} == set(SIZES)


@pytest.mark.parametrize(
    "prompt, other, want",
    [
        ("one two three four five six", "one two three four five", 0.5),
        ("One, two three four five!", "xx one two three four five yy", 1.0),
        ("one two three four", "one two three four", 0.0),  # no 5-grams: only the duplicate check
        ("a b c d e f g h", "z z z", 0.0),
    ],
)
def test_shared_fraction_by_hand(prompt, other, want):
    assert shared_fraction(prompt, ngrams(words(other), N)) == want


# Held out, but written apart from the training prompts as the evaluation was: `calibrate`'s
# refusal bound must see prompts unlike those the policy was trained to answer.
APART = ROOT / "ralign" / "data" / "seeds" / "calibration_apart.jsonl"


def written_apart(name: str) -> tuple[list[str], list[tuple[str, str]]]:
    """The prompts of the set `name`, and the training texts they must not overlap (not their own)."""
    if name == "evals/behavior":
        return [r["prompt"] for r in load_prompts(EVAL_SET)], training_texts()
    own = [r["prompt"] for r in load_prompts(APART)]
    return own, [(src, t) for src, t in training_texts() if src != APART.name]


@pytest.mark.parametrize("name", ["evals/behavior", "seeds/calibration_apart"])
def test_no_prompt_written_apart_overlaps_a_training_text(name):
    prompts, texts = written_apart(name)
    assert len(texts) > 500  # the seed sets alone hold 784 prompts: the sources were found
    exact = {" ".join(words(t)) for _, t in texts}
    # 5-gram -> the training texts holding it, so each prompt meets only the texts it shares with.
    index: dict[tuple[str, ...], set[int]] = {}
    for i, (_, t) in enumerate(texts):
        for g in ngrams(words(t), N):
            index.setdefault(g, set()).add(i)
    worst = (0.0, "", "")
    duplicates, too_close = [], []
    for prompt in prompts:
        if " ".join(words(prompt)) in exact:
            duplicates.append(prompt)
        mine = ngrams(words(prompt), N)
        shared = Counter(i for g in mine for i in index.get(g, ()))
        for i, count in shared.items():
            f = count / len(mine)
            worst = max(worst, (f, prompt, texts[i][0]))
            if f >= MAX_SHARED:
                too_close.append((round(f, 2), texts[i][0], prompt))
    print(f"largest 5-gram overlap: {worst[0]:.3f} ({worst[1]!r} vs a text of {worst[2]})")
    assert not duplicates
    assert not too_close


def jaccard(a: set[str], b: set[str]) -> float:
    return len(a & b) / len(a | b) if a | b else 0.0


@pytest.mark.parametrize(
    "a, b, want",
    [("kill the mould", "kill the mould now", 0.75), ("a b", "c d", 0.0), ("A, b!", "b a", 1.0)],
)
def test_jaccard_by_hand(a, b, want):
    assert jaccard(set(words(a)), set(words(b))) == want


@pytest.mark.parametrize("name", ["evals/behavior", "seeds/calibration_apart"])
def test_no_prompt_written_apart_paraphrases_a_training_prompt(name):
    """Word-set overlap against every training text short enough to be one prompt (a long template
    shares many words with anything)."""
    prompts, texts = written_apart(name)
    short = [(src, set(words(t))) for src, t in texts if len(words(t)) <= 40]
    assert len(short) > 300
    close = []
    for prompt in prompts:
        mine = set(words(prompt))
        for src, theirs in short:
            if jaccard(mine, theirs) >= MAX_WORDS_SHARED:
                close.append((round(jaccard(mine, theirs), 2), src, prompt))
    assert not close
