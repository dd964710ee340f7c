"""Turn scored responses into (chosen, rejected) preference pairs, counting every pair not made and why."""

from __future__ import annotations

import random
from collections.abc import Sequence

CHOOSERS = ("best", "random")
REJECTERS = ("worst", "random", "all", "each_source")
DROP_REASONS = (
    "too_few",
    "tie",
    "same_text",
    "low_margin",
    "low_score",
    "low_grade",
    "unchoosable",
    "unrejectable",
)


def _pick(how: str, candidates: list[int], scores: Sequence[float], rng: random.Random) -> int:
    """One index from `candidates` by `how`; ties in best/worst go to the earliest response."""
    if how == "best":
        return max(candidates, key=lambda i: (scores[i], -i))
    if how == "worst":
        return min(candidates, key=lambda i: (scores[i], i))
    return rng.choice(candidates)


def make_pairs(
    prompts: Sequence[str],
    responses: Sequence[Sequence[str]],
    scores: Sequence[Sequence[float]],
    *,
    chosen: str = "best",
    rejected: str = "worst",
    min_margin: float = 0.0,
    min_score: float | None = None,
    seed: int = 0,
    finished: Sequence[Sequence[bool]] | None = None,
    choosable: Sequence[Sequence[bool]] | None = None,
    rejectable: Sequence[Sequence[bool]] | None = None,
    grades: Sequence[Sequence[float]] | None = None,
    min_grade: float | None = None,
    sources: Sequence[Sequence[int]] | None = None,
) -> tuple[list[dict], dict]:
    """Preference pairs from scored responses: at most one per prompt, or with rejected = "all"
    one for each answer the chosen one beats.

    The two selectors pick which two responses form the pair: a deterministic one ("best" or
    "worst") picks first, then the other picks from the remaining responses ("random" is uniform
    with a generator seeded by `seed`). The pair is then oriented by score, so `chosen` always has
    the higher score and `margin` = score(chosen) - score(rejected) >= 0. With rejected = "all"
    the chosen answer is paired with every other answer that may be rejected, each pair kept or
    dropped on its own: a prompt with two bad answers (a refusal and a needless hedge) then
    teaches against both, where "worst" would teach against the lower-scored one alone. Each of
    a prompt's k pairs then carries "weight" 1/k, which DPO's loss uses, so a prompt with more
    pairs does not weigh more (a harmful request beaten by its refusal three ways would
    otherwise push three times as hard towards refusing as a harmless one pushes back).
    With rejected = "each_source" the chosen answer is paired with the lowest-scored answer of
    each source (`sources`: 0 for the policy's own samples, 1, 2, ... for each forced opening of
    a negative context), each pair weighing 1, and two answers that both come from a negative
    context never make a pair: every pair then has the policy's own answer on one side, a
    harmful request teaches refusing once (its refusal over its samples), and a harmless one
    teaches against each kind of bad answer once (the forced refusal, the forced hedge).

    Args:
        prompts, responses, scores: N prompts, their responses and scores (higher is better).
        chosen, rejected: "best"/"random" and "worst"/"random"/"all"/"each_source".
        min_margin, min_score, min_grade: floors; a pair below one is dropped (a chosen answer
            that is still bad teaches the lesser evil, e.g. fluent compliance over garbled).
        seed: seeds the "random" selectors.
        finished, grades: optional, aligned with `responses`: whether each answer ended on its
            own, and a pointwise judge's raw grades; pairs then carry them for both answers.
        choosable: optional, aligned with `responses`: whether each answer may be the chosen
            one (RLCD's negative-context answers may only be rejected). "best" and "random"
            choose among these; a pair whose rejected answer outscores its chosen one is dropped.
        rejectable: the same for the rejected side ("worst" and "random" reject among these);
            a pair whose chosen answer scores below an answer that may not be rejected is dropped.
        sources: optional, aligned with `responses`: where each answer came from, for
            rejected = "each_source" (without it every answer is the policy's own).
    Returns:
        (pairs, stats): pairs {prompt, chosen, rejected, margin, ...}; stats with "prompts",
        "pairs" and "dropped", a count for each of DROP_REASONS (per prompt, or with rejected =
        "all"/"each_source" per candidate pair; "too_few": under two answers,
        "tie", "same_text" after stripping, "low_margin", "low_score", "low_grade", "unchoosable":
        the higher-scored answer of the two may not be chosen, "unrejectable": the lower may not
        be rejected).
    """
    if chosen not in CHOOSERS:
        raise ValueError(f"chosen must be one of {CHOOSERS}, got {chosen!r}")
    if rejected not in REJECTERS:
        raise ValueError(f"rejected must be one of {REJECTERS}, got {rejected!r}")
    if not len(prompts) == len(responses) == len(scores):
        raise ValueError(
            f"prompts, responses and scores differ in length: "
            f"{len(prompts)}, {len(responses)}, {len(scores)}"
        )
    rng = random.Random(seed)

    pairs: list[dict] = []
    dropped = dict.fromkeys(DROP_REASONS, 0)
    ends = finished if finished is not None else [None] * len(prompts)
    if len(ends) != len(prompts):
        raise ValueError(f"finished has {len(ends)} entries for {len(prompts)} prompts")
    graded = grades if grades is not None else [None] * len(prompts)
    allowed = _flags("choosable", choosable, prompts, responses)
    losers = _flags("rejectable", rejectable, prompts, responses)
    origins = sources if sources is not None else [[0] * len(texts) for texts in responses]
    if len(origins) != len(prompts):
        raise ValueError(f"sources has {len(origins)} entries for {len(prompts)} prompts")
    floors = (min_margin, min_score, min_grade)
    for prompt, texts, marks, done, grade, may, may_lose, origin in zip(
        prompts, responses, scores, ends, graded, allowed, losers, origins, strict=True
    ):
        if len(texts) != len(marks):
            raise ValueError(
                f"{len(texts)} responses but {len(marks)} scores for prompt {prompt!r}"
            )
        roles = (may, may_lose)
        if rejected in ("all", "each_source"):
            by = origin if rejected == "each_source" else None
            picks = _pick_all(texts, marks, grade, roles, chosen, floors, rng, by)
        else:
            picks = [_pick_pair(texts, marks, grade, roles, (chosen, rejected), floors, rng)]
        kept = []
        for picked in picks:
            if isinstance(picked, str):
                dropped[picked] += 1
                continue
            hi, lo = picked
            pair = {
                "prompt": prompt,
                "chosen": texts[hi],
                "rejected": texts[lo],
                "margin": float(marks[hi]) - float(marks[lo]),
            }
            if done is not None:
                pair.update(chosen_finished=bool(done[hi]), rejected_finished=bool(done[lo]))
            if grade is not None:
                pair.update(chosen_grade=float(grade[hi]), rejected_grade=float(grade[lo]))
            kept.append(pair)
        if rejected == "all":  # each prompt weighs 1 in DPO's loss, however many pairs it made
            for pair in kept:
                pair["weight"] = 1 / len(kept)
        pairs += kept
    return pairs, {"prompts": len(prompts), "pairs": len(pairs), "dropped": dropped}


def _flags(
    name: str,
    flags: Sequence[Sequence[bool]] | None,
    prompts: Sequence[str],
    responses: Sequence[Sequence[str]],
) -> list[Sequence[bool]]:
    """Per prompt, one flag per response (all True without `flags`), lengths checked."""
    if flags is None:
        return [[True] * len(texts) for texts in responses]
    if len(flags) != len(prompts):
        raise ValueError(f"{name} has {len(flags)} entries for {len(prompts)} prompts")
    for prompt, texts, row in zip(prompts, responses, flags, strict=True):
        if len(row) != len(texts):
            raise ValueError(
                f"{len(texts)} responses but {len(row)} {name} flags for prompt {prompt!r}"
            )
    return list(flags)


def _pick_pair(
    texts: Sequence[str],
    marks: Sequence[float],
    grade: Sequence[float] | None,
    roles: tuple[Sequence[bool], Sequence[bool]],
    how: tuple[str, str],
    floors: tuple[float, float | None, float | None],
    rng: random.Random,
) -> tuple[int, int] | str:
    """(chosen, rejected) indices of one prompt's pair, oriented by score, or why there is none."""
    may, may_lose = roles
    eligible = [i for i in range(len(texts)) if may[i]]
    losers = [i for i in range(len(texts)) if may_lose[i]]
    if len(texts) < 2 or not eligible or not losers:
        return "too_few"
    # The chooser picks among the answers that may be chosen, the rejecter among those that may
    # be rejected; the deterministic one goes first so "random" draws from what is left.
    chosen, rejected = how
    if chosen == "random":
        b = _pick(rejected, losers, marks, rng)
        rest = [i for i in eligible if i != b]
        if not rest:
            return "too_few"
        a = _pick(chosen, rest, marks, rng)
    else:
        a = _pick(chosen, eligible, marks, rng)
        rest = [i for i in losers if i != a]
        if not rest:
            return "too_few"
        b = _pick(rejected, rest, marks, rng)
    return _checked(a, b, texts, marks, grade, roles, floors)


def _pick_all(
    texts: Sequence[str],
    marks: Sequence[float],
    grade: Sequence[float] | None,
    roles: tuple[Sequence[bool], Sequence[bool]],
    how: str,
    floors: tuple[float, float | None, float | None],
    rng: random.Random,
    origin: Sequence[int] | None = None,
) -> list[tuple[int, int] | str]:
    """One prompt's pairs of its chosen answer with every other answer that may be rejected, in
    answer order, each oriented by score and checked on its own (or the reason it is dropped).
    With `origin` (rejected = "each_source"), with the lowest-scored answer of each source
    instead, in source order, and never two answers that both come from a negative context."""
    may, may_lose = roles
    eligible = [i for i in range(len(texts)) if may[i]]
    if len(texts) < 2 or not eligible or not any(may_lose):
        return ["too_few"]
    a = _pick(how, eligible, marks, rng)
    rest = [i for i in range(len(texts)) if may_lose[i] and i != a]
    if origin is not None:
        if len(origin) != len(texts):
            raise ValueError(f"{len(texts)} responses but {len(origin)} sources")
        # two forced answers say nothing about the policy's own: a forced chosen answer is
        # paired with the policy's samples alone
        groups = [
            [i for i in rest if origin[i] == s]
            for s in sorted(set(origin))
            if not (origin[a] and s)
        ]
        rest = [_pick("worst", group, marks, rng) for group in groups if group]
    if not rest:
        return ["too_few"]
    return [_checked(a, b, texts, marks, grade, roles, floors) for b in rest]


def _checked(
    a: int,
    b: int,
    texts: Sequence[str],
    marks: Sequence[float],
    grade: Sequence[float] | None,
    roles: tuple[Sequence[bool], Sequence[bool]],
    floors: tuple[float, float | None, float | None],
) -> tuple[int, int] | str:
    """Answers a and b as (chosen, rejected) by score, or why they make no pair."""
    min_margin, min_score, min_grade = floors
    may, may_lose = roles
    hi, lo = (a, b) if marks[a] >= marks[b] else (b, a)
    margin = float(marks[hi]) - float(marks[lo])
    if margin == 0:
        return "tie"
    if not may[hi]:
        return "unchoosable"
    if not may_lose[lo]:
        return "unrejectable"
    if texts[hi].strip() == texts[lo].strip():
        return "same_text"
    if margin < min_margin:
        return "low_margin"
    if min_score is not None and marks[hi] < min_score:
        return "low_score"
    if min_grade is not None and grade is not None and grade[hi] < min_grade:
        return "low_grade"
    return hi, lo
