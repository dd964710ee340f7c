"""Turn scored responses into (chosen, rejected) preference pairs, counting every pair not made and why."""

from __future__ import annotations

import random
from collections.abc import Sequence

CHOOSERS = ("best", "random")
REJECTERS = ("worst", "random")
DROP_REASONS = ("too_few", "tie", "same_text", "low_margin", "low_score")


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
) -> tuple[list[dict], dict]:
    """At most one pair per prompt from its scored responses.

    The two selectors pick which two responses form the pair: a deterministic one ("best" or
    "worst") picks first, then the other picks from the remaining responses ("random" is uniform
    with a generator seeded by `seed`). The pair is then oriented by score, so `chosen` always has
    the higher score and `margin` = score(chosen) - score(rejected) >= 0.

    Args:
        prompts: N prompts.
        responses: N lists of responses.
        scores: N lists of scores, aligned with `responses` (higher is better).
        chosen: "best" or "random".
        rejected: "worst" or "random".
        min_margin: pairs whose margin is below this are dropped.
        min_score: pairs whose chosen answer scores below this are dropped: two bad answers make
            a pair that teaches the lesser evil (e.g. a more fluent compliance with a harmful
            request over a garbled one).
        seed: seeds the "random" selectors.
        finished: optional, aligned with `responses`: False for an answer cut off by the length
            limit; the pair then carries "chosen_finished" and "rejected_finished".
    Returns:
        (pairs, stats): pairs as dicts with prompt, chosen, rejected, margin; stats with
        "prompts", "pairs" and "dropped" (a count for every reason in DROP_REASONS: "too_few" =
        under two responses, "tie" = equal scores, "same_text" = identical text after stripping
        whitespace, "low_margin" = margin below `min_margin`, "low_score" = chosen below `min_score`).
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
    # Deterministic selectors go first so "random" draws from what is left.
    first, second = (rejected, chosen) if chosen == "random" else (chosen, rejected)

    pairs: list[dict] = []
    dropped = dict.fromkeys(DROP_REASONS, 0)
    ends = finished if finished is not None else [None] * len(prompts)
    if len(ends) != len(prompts):
        raise ValueError(f"finished has {len(ends)} entries for {len(prompts)} prompts")
    for prompt, texts, marks, done in zip(prompts, responses, scores, ends, strict=True):
        if len(texts) != len(marks):
            raise ValueError(
                f"{len(texts)} responses but {len(marks)} scores for prompt {prompt!r}"
            )
        if len(texts) < 2:
            dropped["too_few"] += 1
            continue
        everyone = list(range(len(texts)))
        a = _pick(first, everyone, marks, rng)
        b = _pick(second, [i for i in everyone if i != a], marks, rng)
        hi, lo = (a, b) if marks[a] >= marks[b] else (b, a)
        margin = float(marks[hi]) - float(marks[lo])
        if margin == 0:
            dropped["tie"] += 1
        elif texts[hi].strip() == texts[lo].strip():
            dropped["same_text"] += 1
        elif margin < min_margin:
            dropped["low_margin"] += 1
        elif min_score is not None and marks[hi] < min_score:
            dropped["low_score"] += 1
        else:
            pair = {"prompt": prompt, "chosen": texts[hi], "rejected": texts[lo], "margin": margin}
            if done is not None:
                pair.update(chosen_finished=bool(done[hi]), rejected_finished=bool(done[lo]))
            pairs.append(pair)
    return pairs, {"prompts": len(prompts), "pairs": len(pairs), "dropped": dropped}
