"""In-context self-ranking: a judge model scores responses from its next-token probabilities over answer labels.

Three modes, each one forward pass per judge text (no generation, no sampling of the judge):

- listwise: the K responses are listed under labels "A", "B", ...; the judge's next-token
  distribution over the K label tokens (softmax restricted to them) is the probability that each
  response is best.
- pairwise: every ordered pair (i, j), i != j, is shown as "A" = i, "B" = j; a response's score is
  its mean win probability over its 2(K-1) comparisons (both positions counted).
- pointwise: each response alone with a rubric; the next-token distribution over the digit
  tokens "0".."scale" gives an expected score E[d] / scale.

Two more read the judge's likelihood of each answer instead of a verdict (no labels, no positions):
`contrast` (a principle in context against none or its opposite, `rank_contrast`) and `implicit`
(the judge against a reference model on the same prompt, `rank_implicit`).

Scores are then min-max normalised per prompt to [0, 1] (all equal -> 0.5 each).

Position bias and `orders` (listwise): judges prefer some positions regardless of content.
`orders=1` scores the given order only. `orders=2` also scores the reversed order and averages each
response's probability over the two, so a response shown at position p scores
(f(p) + f(K-1-p)) / 2, where f is the judge's position preference. That cancels the part of the
bias that is antisymmetric about the middle (first vs last, second vs second-to-last): for K = 2
that is every position-only bias. For K > 2 it cannot cancel the symmetric part, ends vs middle:
a judge that likes the first *and* the last slot, or the middle one, still favours whichever
responses landed there; even a bias that is linear in the logits leaves one, because the softmax
makes f convex. `orders=k > 2` uses k cyclic rotations (response r at position (r - shift) mod K);
over a full cycle (k = K) every response visits every position exactly once, so any bias that
depends on position only is cancelled exactly; fewer rotations cancel it only partly. Rotations
beyond K would repeat, so at most K are used. Neither cancels a bias that interacts with content.
For orders >= 2 the result also reports how often the orders agree on the top response (a
position-consistency check).
Pairwise always scores both orders of every pair; its agreement is the fraction of unordered
pairs whose winner is the same in both orders. Pointwise has no order and no agreement.

Label tokens: the judge template's rendered text (after chat wrapping) decides how the answer
label continues it. If the text ends in whitespace the label is appended bare ("A"), else after a
space (" A"). The token is found by tokenising the text's tail with and without the label: the
label must add exactly one token and leave the tail's tokens unchanged, else a RalignError says so.
One exception (token healing): with tokenizers that glue a space to the next word, "Answer: "
ends in a lone space token that never precedes a letter in training, and "Answer: A" re-merges it;
then the trailing spaces are dropped and " A" is read after "Answer:" (see `resolve_labels`).

Batching: judge texts of one item repeat a long prefix (the chat preamble, the template's header
and the request; pairwise also the first answer; pointwise the whole rubric). With a model that
takes a KV cache, `plan_batches` groups texts by shared prefix and each batch computes its common
prefix once (`prefixed_next_token_logits`); it keeps length-sorted batches when sharing saves
little (listwise, whose texts share only the preamble and request). The log-probabilities equal
those without sharing up to float rounding (~1e-6).

`samples` (pointwise only): a forward pass gives the judge's whole digit distribution, so there is
nothing to sample. `samples=1` (default) uses the exact expectation E[d] — the value an average of
infinitely many sampled judgements converges to, and the lowest-variance choice. `samples=n > 1`
averages n digits drawn from that distribution with a generator seeded by `seed`, which reproduces
recipes written for a sampled judge (e.g. "average 3 judgements"); it costs no extra forward passes
but is never more accurate than `samples=1`.
"""

from __future__ import annotations

import contextlib
import inspect
import random
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ralign.errors import RalignError
from ralign.runtime.models import format_prompt
from ralign.runtime.torchutil import device_of, eval_mode, padded, padding_id

LETTERS = tuple(string.ascii_uppercase)
MAX_SCALE = 9  # digit labels must be single characters
TAIL_CHARS = 64  # how much of a judge text's end is re-tokenised to find the label tokens

Render = Callable[[str, list[str], list[str]], str]
Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class RankResult:
    """Scores for every item's responses.

    Args:
        scores: per item, one score in [0, 1] per response (min-max normalised per item).
        raw: per item, the scores before normalisation (mean best-probability, mean win
            probability, or expected rubric score / scale).
        agreement: fraction of items (listwise) or unordered pairs (pairwise) on which all orders
            pick the same top response; None when only one order was scored (or pointwise).
        forward_passes: judge texts scored (one forward pass each, batched together).
        label_mass: mean next-token probability the judge puts on the label tokens at all, before
            renormalising over them; a low value says the template does not make the judge answer
            with a label (None when nothing was scored).
    """

    scores: list[list[float]]
    raw: list[list[float]]
    agreement: float | None
    forward_passes: int
    label_mass: float | None = None


@dataclass(frozen=True)
class Judge:
    """A judge model with everything needed to score label tokens in batches."""

    model: object
    tokenizer: object
    batch_size: int = 8
    chat: bool = True
    progress: Progress | None = None

    def text(self, rendered: str) -> str:
        """The text the judge reads: the rendered template as a user turn, or as-is."""
        return format_prompt(self.tokenizer, rendered) if self.chat else rendered

    def mean_logprobs(self, requests: Sequence[tuple[str, str]]) -> list[float]:
        """Mean log-probability per token of each (context, answer)'s answer under the judge."""
        sums, counts = self.logprobs(requests)
        return [s / k for s, k in zip(sums, counts, strict=True)]

    def logprobs(self, requests: Sequence[tuple[str, str]]) -> tuple[list[float], list[int]]:
        """Summed log-probability of each (context, answer)'s answer under the judge, and its
        token count (at least 1).

        Tokens as lm-evaluation-harness splits them (`evaluate.encode_pair`). With a model that
        takes a KV cache each distinct context is computed once per batch and only the answers'
        tokens after it (`continuation_logprobs`); else, or when a request is empty or longer
        than the model's window, `evaluate.loglikelihood` reads the whole text.
        """
        from ralign.runtime.hhh import _max_length, encode_pair, loglikelihood

        pairs = [encode_pair(self.tokenizer, c, a) for c, a in requests]
        limit = _max_length(self.model) if _cache_arg(self.model) is not None else -1
        shared = [
            i for i, (ctx, cont) in enumerate(pairs) if cont and len(ctx) + len(cont) <= limit
        ]
        sums = [0.0] * len(requests)
        picked = continuation_logprobs(
            self.model, [pairs[i] for i in shared], self.batch_size, padding_id(self.tokenizer)
        )
        for i, value in zip(shared, picked, strict=True):
            sums[i] = value
        rest = sorted(set(range(len(requests))) - set(shared))
        if rest:
            with torch.no_grad():
                read = loglikelihood(
                    self.model,
                    self.tokenizer,
                    [requests[i] for i in rest],
                    batch_size=self.batch_size,
                )
            for i, (value, _) in zip(rest, read, strict=True):
                sums[i] = value
        counts = [max(1, len(cont)) for _, cont in pairs]
        if self.progress is not None:
            self.progress(len(requests), sum(counts))
        return sums, counts

    def label_logprobs(
        self, texts: list[str], labels: list[Sequence[str]]
    ) -> tuple[list[np.ndarray], list[float]]:
        """Next-token log-probabilities of each text's labels, renormalised over those labels.

        Args:
            texts: judge texts (already chat-wrapped if wanted).
            labels: per text, the label strings to read.
        Returns:
            (logps, masses): per text, a float64 array of len(labels[i]) log-probabilities
            (log-softmax over the labels), and the judge's total next-token probability on them.
        """
        # Texts from one template share their ending: resolve each distinct ending once.
        cache: dict[tuple[str, tuple[str, ...]], tuple[int, list[int]]] = {}
        encoded, label_ids = [], []
        for text, labs in zip(texts, labels, strict=True):
            key = (text[-TAIL_CHARS:], tuple(labs))
            if key not in cache:
                fed, ids = resolve_labels(self.tokenizer, text, labs)
                cache[key] = (len(text) - len(fed), ids)
            cut, ids = cache[key]
            label_ids.append(ids)
            encoded.append(_encode(self.tokenizer, text[: len(text) - cut], chat=self.chat))
        out: list[np.ndarray | None] = [None] * len(texts)
        masses = [0.0] * len(texts)
        pad = padding_id(self.tokenizer)
        share = _cache_arg(self.model) is not None
        for idx, shared in plan_batches(encoded, self.batch_size, share):
            if shared:
                logits = prefixed_next_token_logits(
                    self.model, encoded[idx[0]][:shared], [encoded[i][shared:] for i in idx], pad
                )
            else:
                logits = next_token_logits(self.model, [encoded[i] for i in idx], pad)
            for row, i in enumerate(idx):
                picked = logits[row, label_ids[i]].double()  # [n_labels]
                out[i] = torch.log_softmax(picked, dim=-1).cpu().numpy()
                full = torch.logsumexp(logits[row].double(), dim=-1)
                masses[i] = float(torch.exp(torch.logsumexp(picked, dim=-1) - full))
            if self.progress is not None:
                self.progress(len(idx), sum(len(encoded[i]) for i in idx))
        return out, masses  # type: ignore[return-value]


def _encode(tokenizer, text: str, *, chat: bool) -> list[int]:
    # A chat template writes its own special tokens (BOS included, when it has one); without a
    # template format_prompt gives plain text, which needs the tokenizer's usual ones.
    templated = chat and bool(getattr(tokenizer, "chat_template", None))
    ids = tokenizer(text, add_special_tokens=not templated)["input_ids"]
    if not ids:
        raise RalignError("a judge text tokenised to nothing")
    return list(ids)


def _clean_ids(tokenizer, tail: str, labels: Sequence[str], sep: str) -> list[int] | str:
    """Label ids if each `tail + sep + label` adds one token and keeps the tail's tokens; else why not."""
    base = tokenizer.encode(tail, add_special_tokens=False)
    ids = []
    for label in labels:
        full = tokenizer.encode(tail + sep + label, add_special_tokens=False)
        extra = full[len(base) :]
        if full[: len(base)] != base or len(extra) != 1:
            shown = extra if full[: len(base)] == base else full[-3:]
            return f"{sep + label!r} tokenises as {tokenizer.convert_ids_to_tokens(shown)}"
        ids.append(extra[0])
    return ids


def resolve_labels(tokenizer, text: str, labels: Sequence[str]) -> tuple[str, list[int]]:
    """The text the judge reads and the token id of each label as its next token.

    Text ending in whitespace: the bare label ("A") when it is a clean next token. With tokenizers
    that glue a space to the following word (GPT-2 / SentencePiece style) a trailing space is
    itself a token the model never sees before a letter, so then the trailing spaces are dropped
    from the text and the label read with its space (" A"), as token healing does. Any other text:
    the label after a space (" A").

    Args:
        tokenizer: the judge's tokenizer.
        text: the full judge text the labels continue.
        labels: label strings, e.g. ["A", "B"] or ["0", ..., "5"].
    Returns:
        (text to feed, one distinct token id per label).
    Raises:
        RalignError: when a label is not exactly one token there, or two labels share a token.
    """
    if text and text[-1].isspace():
        tries = [(text, "")]
        if text[-1] in " \t":
            tries.append((text.rstrip(" \t"), " "))
    else:
        tries = [(text, " ")]
    why = ""
    for fed, sep in tries:
        found = _clean_ids(tokenizer, fed[-TAIL_CHARS:], labels, sep)
        if isinstance(found, str):
            why = why or found
            continue
        if len(set(found)) != len(found):
            raise RalignError(f"judge labels {list(labels)} do not map to distinct tokens: {found}")
        return fed, found
    raise RalignError(
        f"judge labels are not single tokens after the judge text's ending {text[-24:]!r}: {why}; "
        f"end the judge template with a space or newline, or use a judge whose tokenizer has "
        f"single-token labels"
    )


def label_token_ids(tokenizer, text: str, labels: Sequence[str]) -> list[int]:
    """The label token ids of `resolve_labels` (for a text that needs no healing, the text as-is)."""
    return resolve_labels(tokenizer, text, labels)[1]


def _forward_params(model) -> set[str]:
    """Named parameters of the underlying model's forward (through a peft wrapper)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return set(inspect.signature(base.forward).parameters)


def next_token_logits(model, rows: list[list[int]], pad_id: int) -> torch.Tensor:
    """One forward pass over left-padded rows; the logits at each row's last position.

    Args:
        model: a causal LM returning `.logits` [B, T, V].
        rows: token id lists of any lengths.
        pad_id: the id written into padding (masked out, so its value does not matter).
    Returns:
        [B, V] logits for each row's next token.
    """
    input_ids, mask = padded(rows, pad_id, left=True)  # [B, T]
    device = device_of(model)
    kwargs: dict[str, object] = {
        "input_ids": input_ids.to(device),
        "attention_mask": mask.to(device),
    }
    params = _forward_params(model)
    if "position_ids" in params:
        # Left padding: count positions from each row's first real token, as generate() does.
        kwargs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0).to(device)
    if "logits_to_keep" in params:
        kwargs["logits_to_keep"] = 1  # only the last position: [B, 1, V] instead of [B, T, V]
    if "use_cache" in params:
        kwargs["use_cache"] = False
    with torch.no_grad():
        out = model(**kwargs)
    logits = out.logits if hasattr(out, "logits") else out[0]
    return logits[:, -1, :].float()  # [B, V]


MIN_SHARED = 16  # shortest common prefix worth a forward pass of its own (tokens)
CALL_TOKENS = 32  # the cost of one more forward call, in tokens, when planning batches
# Share prefixes only when the plan computes at most this fraction of the length-sorted plan's
# tokens: more, smaller batches have costs the token count misses (per-call overhead, smaller
# matrix products), so a marginal saving is not worth it.
SHARE_BELOW = 0.9


def _cache_arg(model) -> str | None:
    """The name under which the model's forward takes a KV cache (`cache` in Transformers 5,
    `past_key_values` before), or None when it takes none or no position ids."""
    params = _forward_params(model)
    if not {"use_cache", "position_ids"} <= params:
        return None
    return next((name for name in ("cache", "past_key_values") if name in params), None)


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens a and b share."""
    n = min(len(a), len(b))
    return next((i for i in range(n) if a[i] != b[i]), n)


def plan_batches(
    rows: list[list[int]], batch_size: int, share: bool
) -> list[tuple[list[int], int]]:
    """Batches of row indices, each with the prefix length its rows share and compute once (0: none).

    Without sharing: shortest first, so batches of similar length waste little on padding. With
    sharing (judge texts of one item repeat the chat preamble, the request and, pairwise, the first
    answer): rows sorted by token ids put shared prefixes next to each other, and batch boundaries
    are chosen by dynamic programming to minimise tokens computed (a shared prefix once, each row's
    rest padded to its batch's longest, plus CALL_TOKENS per forward call). That plan is used only
    when it is clearly cheaper (SHARE_BELOW), so texts with little in common keep the
    length-sorted batches.

    Args:
        rows: token ids per text (each non-empty).
        batch_size: the most rows per batch.
        share: whether shared prefixes may be computed once (the model takes a KV cache).
    Returns:
        [(indices, shared)], every row in exactly one batch.
    """
    by_length = sorted(range(len(rows)), key=lambda i: (len(rows[i]), i))
    plain = [(by_length[s : s + batch_size], 0) for s in range(0, len(by_length), batch_size)]
    if not share or len(rows) < 2:
        return plain
    plain_cost = sum(CALL_TOKENS + len(idx) * len(rows[idx[-1]]) for idx, _ in plain)
    order = sorted(range(len(rows)), key=lambda i: (rows[i], i))
    lcp = [0] + [common_prefix(rows[order[k - 1]], rows[order[k]]) for k in range(1, len(order))]
    n = len(order)
    best = [0.0] + [float("inf")] * n
    choice = [(0, 0)] * (n + 1)  # (start, shared) of the batch ending at j
    for j in range(1, n + 1):
        shared, longest, shortest = 1 << 30, 0, 1 << 30
        for i in range(j - 1, max(-1, j - 1 - batch_size), -1):  # batch = order[i:j]
            length = len(rows[order[i]])
            longest, shortest = max(longest, length), min(shortest, length)
            if i < j - 1:
                shared = min(shared, lcp[i + 1])
            p = min(shared, shortest - 1) if i < j - 1 else 0
            p = p if p >= MIN_SHARED else 0
            cost = CALL_TOKENS + (j - i) * (longest - p) + (p + CALL_TOKENS if p else 0)
            if best[i] + cost < best[j]:
                best[j], choice[j] = best[i] + cost, (i, p)
    if best[n] > SHARE_BELOW * plain_cost:
        return plain
    batches, j = [], n
    while j > 0:
        i, p = choice[j]
        batches.append((order[i:j], p))
        j = i
    return batches[::-1]


def prefixed_next_token_logits(
    model, prefix: list[int], rows: list[list[int]], pad_id: int
) -> torch.Tensor:
    """`next_token_logits` for rows that all continue `prefix`: the prefix is computed once.

    The prefix's KV cache is repeated for every row; the rows' own tokens follow it, left padded
    (the padding sits between prefix and row, masked out, with positions counted over real tokens
    only), so every row ends at the last position and only that position's logits are computed.

    Args:
        model: a causal LM taking a KV cache, position_ids and use_cache (see `_cache_arg`).
        prefix: the shared leading token ids.
        rows: per text, the token ids after the prefix (each at least one).
        pad_id: the id written into padding.
    Returns:
        [B, V] logits for each row's next token.
    """
    device = device_of(model)
    params = _forward_params(model)
    name = _cache_arg(model)
    if name is None:
        raise RalignError("prefix sharing needs a model whose forward takes a KV cache")
    extra: dict[str, object] = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)  # [B, S]
    mask = torch.zeros((len(rows), len(prefix) + width), dtype=torch.long)  # [B, P + S]
    mask[:, : len(prefix)] = 1
    for b, r in enumerate(rows):
        input_ids[b, width - len(r) :] = torch.tensor(r, dtype=torch.long)
        mask[b, len(prefix) + width - len(r) :] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, len(prefix) :]  # [B, S]
    with torch.no_grad():
        head = model(
            input_ids=torch.tensor([prefix], dtype=torch.long, device=device),
            use_cache=True,
            **extra,
        )
        cache = head[name] if name in head else head["past_key_values"]
        cache.batch_repeat_interleave(len(rows))
        extra[name] = cache
        out = model(
            input_ids=input_ids.to(device),
            attention_mask=mask.to(device),
            position_ids=positions.to(device),
            use_cache=True,
            **extra,
        )
    logits = out.logits if hasattr(out, "logits") else out[0]
    return logits[:, -1, :].float()  # [B, V]


def continuation_logprobs(
    model, pairs: Sequence[tuple[list[int], list[int]]], batch_size: int, pad_id: int
) -> list[float]:
    """Summed log-probability of each (context ids, continuation ids)'s continuation; every
    distinct context in a batch is computed once and only the continuations after it.

    A contrast judge reads K answers under each of a few contexts (chat preamble, principle,
    request): the context is most of the text, so computing it once per batch instead of once per
    answer cuts the tokens computed by about K times its share. Rows are sorted by context, then
    continuation length; each batch first runs its distinct contexts (left padded, one row each,
    with a KV cache), then gives every row a copy of its context's cache and runs the rows' own
    tokens after it (right padded; positions counted over real tokens only). The continuation's
    first token is read from the context's last position. Identical pairs are computed once. The
    values equal those of `evaluate.loglikelihood` up to float rounding (~1e-5).

    Args:
        model: a causal LM taking a KV cache, position_ids and use_cache (see `_cache_arg`).
        pairs: (context ids, continuation ids) per request, each non-empty.
        batch_size: continuation rows per forward pass.
        pad_id: the id written into padding.
    Returns:
        One summed log-probability per pair, in order.
    """
    unique = list(dict.fromkeys((tuple(c), tuple(a)) for c, a in pairs))
    order = sorted(range(len(unique)), key=lambda u: (unique[u][0], -len(unique[u][1])))
    sums = [0.0] * len(unique)
    for start in range(0, len(order), batch_size):
        batch = [unique[u] for u in order[start : start + batch_size]]
        picked = _continuation_batch(model, batch, pad_id)
        for u, value in zip(order[start : start + batch_size], picked, strict=True):
            sums[u] = value
    slot = {pair: u for u, pair in enumerate(unique)}
    return [sums[slot[(tuple(c), tuple(a))]] for c, a in pairs]


def _continuation_batch(model, batch: list[tuple[tuple[int, ...], tuple[int, ...]]], pad_id: int):
    """Summed continuation log-probabilities for one batch of `continuation_logprobs`."""
    device = device_of(model)
    name = _cache_arg(model)
    contexts = list(dict.fromkeys(ctx for ctx, _ in batch))
    of = {ctx: n for n, ctx in enumerate(contexts)}
    ids_c, mask_c = padded(contexts, pad_id, left=True)  # [C, P]
    width_c = ids_c.shape[1]
    rows = [of[ctx] for ctx, _ in batch]
    ids, mask = padded([cont for _, cont in batch], pad_id, left=False)  # [B, S]
    full_mask = torch.cat([mask_c[rows], mask], dim=1)  # [B, P + S]
    positions = (full_mask.cumsum(-1) - 1).clamp(min=0)[:, width_c:]  # [B, S]
    extra = {"logits_to_keep": 1} if "logits_to_keep" in _forward_params(model) else {}
    with torch.no_grad():
        head = model(
            input_ids=ids_c.to(device),
            attention_mask=mask_c.to(device),
            position_ids=(mask_c.cumsum(-1) - 1).clamp(min=0).to(device),
            use_cache=True,
            **extra,
        )
        cache = head[name] if name in head else head["past_key_values"]
        cache.batch_select_indices(torch.tensor(rows, device=device))
        out = model(
            input_ids=ids.to(device),
            attention_mask=full_mask.to(device),
            position_ids=positions.to(device),
            use_cache=True,
            **{name: cache},
        )
    first = torch.log_softmax(head.logits[:, -1, :].float(), dim=-1)[rows]  # [B, V]
    rest = torch.log_softmax(out.logits[:, :-1, :].float(), dim=-1)  # [B, S-1, V]
    sums = []
    for b, (_, cont) in enumerate(batch):
        target = torch.tensor(cont, device=rest.device)
        total = first[b, target[0]] + rest[b, : len(cont) - 1].gather(1, target[1:, None]).sum()
        sums.append(float(total))
    return sums


def normalise(values: Sequence[float]) -> list[float]:
    """Min-max to [0, 1]; all equal (or a single value) gives 0.5 each."""
    if not values:
        return []
    lo, hi = min(values), max(values)
    if hi - lo <= 1e-12:
        return [0.5] * len(values)
    return [(v - lo) / (hi - lo) for v in values]


RANKERS: dict[str, Callable[..., RankResult]] = {}


def ranker(mode: str) -> Callable:
    """Register a ranking function under `mode`."""

    def register(fn: Callable[..., RankResult]) -> Callable[..., RankResult]:
        RANKERS[mode] = fn
        return fn

    return register


def permutations(k: int, orders: int) -> list[list[int]]:
    """The response orders listwise scores: position p shows response perm[p].

    Args:
        k: number of responses.
        orders: 1 = as given, 2 = as given + reversed, n > 2 = min(n, k) cyclic rotations.
    Returns:
        Distinct permutations of range(k).
    """
    if orders < 1:
        raise RalignError(f"orders must be at least 1, got {orders}")
    identity = list(range(k))
    if orders == 1 or k < 2:
        return [identity]
    if orders == 2:
        return [identity, identity[::-1]]
    # Rotation by s shows response (p + s) mod k at position p, so response r sits at (r - s) mod k.
    return [[(p + s) % k for p in range(k)] for s in range(min(orders, k))]


def _finish(raw: list[list[float]], agreement: float | None, masses: list[float]) -> RankResult:
    mass = float(np.mean(masses)) if masses else None
    return RankResult([normalise(r) for r in raw], raw, agreement, len(masses), mass)


@ranker("listwise")
def rank_listwise(
    judge: Judge,
    items: Sequence[tuple[str, Sequence[str]]],
    render: Render,
    *,
    orders: int = 1,
    **_,
) -> RankResult:
    """Listwise: P(best) per response from one judge text per order, averaged over orders."""
    texts, labels, owners = [], [], []  # owners: (item, permutation, number of orders) per text
    for n, (prompt, responses) in enumerate(items):
        k = len(responses)
        if k > len(LETTERS):
            raise RalignError(f"listwise ranking takes at most {len(LETTERS)} responses, got {k}")
        if k < 2:
            continue
        labs = list(LETTERS[:k])
        perms = permutations(k, orders)
        for perm in perms:
            texts.append(judge.text(render(prompt, [responses[r] for r in perm], labs)))
            labels.append(labs)
            owners.append((n, perm, len(perms)))
    logps, masses = judge.label_logprobs(texts, labels)

    raw = [[0.0] * len(r) for _, r in items]
    tops: list[list[int]] = [[] for _ in items]
    for (n, perm, n_orders), logp in zip(owners, logps, strict=True):
        probs = np.exp(logp)  # [K] by position
        for pos, r in enumerate(perm):
            raw[n][r] += float(probs[pos]) / n_orders
        tops[n].append(perm[int(np.argmax(probs))])
    for n, (_, responses) in enumerate(items):
        if len(responses) == 1:
            raw[n] = [1.0]
    scored = [t for t in tops if t]
    agreement = None
    if orders >= 2 and scored:
        agreement = sum(len(set(t)) == 1 for t in scored) / len(scored)
    return _finish(raw, agreement, masses)


@ranker("pairwise")
def rank_pairwise(
    judge: Judge, items: Sequence[tuple[str, Sequence[str]]], render: Render, **_
) -> RankResult:
    """Pairwise: mean win probability over all ordered pairs, both positions counted."""
    texts, owners = [], []  # owners: (item, first response, second response)
    for n, (prompt, responses) in enumerate(items):
        for i in range(len(responses)):
            for j in range(len(responses)):
                if i != j:
                    texts.append(
                        judge.text(render(prompt, [responses[i], responses[j]], ["A", "B"]))
                    )
                    owners.append((n, i, j))
    logps, masses = judge.label_logprobs(texts, [("A", "B")] * len(texts))

    wins = [[0.0] * len(r) for _, r in items]
    p_first: dict[tuple[int, int, int], float] = {}
    for (n, i, j), logp in zip(owners, logps, strict=True):
        p_a = float(np.exp(logp[0]))  # P(first shown wins), renormalised over {A, B}
        wins[n][i] += p_a
        wins[n][j] += 1.0 - p_a
        p_first[(n, i, j)] = p_a
    raw = [
        [w / (2 * (len(r) - 1)) for w in row] if len(r) > 1 else [1.0] * len(r)
        for row, (_, r) in zip(wins, items, strict=True)
    ]
    # Position consistency: (i, j) and (j, i) name the same winner.
    same = total = 0
    for (n, i, j), p in p_first.items():
        if i < j:
            total += 1
            same += (p > 0.5) == (p_first[(n, j, i)] <= 0.5)
    return _finish(raw, same / total if total else None, masses)


@ranker("pointwise")
def rank_pointwise(
    judge: Judge,
    items: Sequence[tuple[str, Sequence[str]]],
    render: Render,
    *,
    samples: int = 1,
    scale: int = 5,
    seed: int = 0,
    **_,
) -> RankResult:
    """Pointwise: expected rubric digit / scale per response (or the mean of seeded draws)."""
    if not 1 <= scale <= MAX_SCALE:
        raise RalignError(
            f"pointwise scale must be 1..{MAX_SCALE} (single-digit labels), got {scale}"
        )
    if samples < 1:
        raise RalignError(f"samples must be at least 1, got {samples}")
    digits = [str(d) for d in range(scale + 1)]
    texts, owners = [], []
    for n, (prompt, responses) in enumerate(items):
        for r, response in enumerate(responses):
            texts.append(judge.text(render(prompt, [response], digits)))
            owners.append((n, r))
    if not texts:
        return _finish([[] for _ in items], None, [])
    logps, masses = judge.label_logprobs(texts, [digits] * len(texts))

    values = torch.arange(scale + 1, dtype=torch.float64)  # [D]
    probs = torch.tensor(np.exp(np.array(logps)), dtype=torch.float64).reshape(
        len(texts), scale + 1
    )
    if samples == 1:
        expected = probs @ values  # [Q]
    else:
        gen = torch.Generator().manual_seed(seed)
        draws = torch.multinomial(probs, samples, replacement=True, generator=gen)  # [Q, samples]
        expected = values[draws].mean(dim=1)  # [Q]
    raw = [[0.0] * len(r) for _, r in items]
    for (n, r), e in zip(owners, expected.tolist(), strict=True):
        raw[n][r] = e / scale
    return _finish(raw, None, masses)


@ranker("contrast")
def rank_contrast(
    judge: Judge,
    items: Sequence[tuple[str, Sequence[str]]],
    render: Callable[[str, str], str],
    *,
    principle: str,
    opposite: str | None = None,
    calibrate: int = 0,
    seed: int = 0,
    **_,
) -> RankResult:
    """Contrast: the judge's own likelihood of each answer, with a principle in context against
    without it (or against an opposite principle), instead of a verdict it writes.

    An answer's lift is its mean token log-probability after `render(prompt, principle)` minus
    after the bare prompt (or `render(prompt, opposite)`: RLCD, Yang et al. 2023; the context
    distillation view of a principle as context, Askell et al. 2021). No answer is shown beside
    another, so there is no position to be biased by. A principle can make some answers likelier
    for every prompt (a refusal, say); with `calibrate = R`, each answer is also scored under R
    other prompts (seeded) and its mean lift there is subtracted: what counts is how much more the
    principle favours this answer for this prompt than for others.

    Returns:
        RankResult: raw = calibrated lift per answer, scores = lifts normalised per prompt.
    """
    rng = random.Random(seed)
    with_principle = [judge.text(render(prompt, principle)) for prompt, _ in items]
    without = [
        judge.text(render(prompt, opposite)) if opposite is not None else judge.text(prompt)
        for prompt, _ in items
    ]
    others = [
        rng.sample([m for m in range(len(items)) if m != n], min(calibrate, len(items) - 1))
        for n in range(len(items))
    ]
    # One request per (answer, context it is read in): its own prompt, then its calibration ones.
    requests = [
        (ctx[c], answer)
        for n, (_, answers) in enumerate(items)
        for answer in answers
        for c in (n, *others[n])
        for ctx in (with_principle, without)
    ]
    means = judge.mean_logprobs(requests)
    raw, at = [], 0
    for n, (_, answers) in enumerate(items):
        lifts = []
        for _answer in answers:
            spans = 1 + len(others[n])
            lift = [means[at + 2 * k] - means[at + 2 * k + 1] for k in range(spans)]
            at += 2 * spans
            lifts.append(lift[0] - (sum(lift[1:]) / (spans - 1) if spans > 1 else 0.0))
        raw.append(lifts)
    return RankResult([normalise(r) for r in raw], raw, None, len(requests), None)


@ranker("implicit")
def rank_implicit(
    judge: Judge,
    items: Sequence[tuple[str, Sequence[str]]],
    render: Callable[[str], str],
    *,
    reference: Judge | None = None,
    **_,
) -> RankResult:
    """Implicit: how much likelier the judge finds each answer than a reference model does.

    An answer's score is log pi_judge(answer | prompt) - log pi_reference(answer | prompt), summed
    over its tokens, the prompt read as `render(prompt)` by both. With the policy as it began the
    round as judge and the declared model as reference, this is the reward DPO trained into the
    policy so far (Rafailov et al. 2023, eq. 5, up to beta; used between rounds by DICE, Chen et
    al. 2024), and, when a round trained the policy to answer without the instruction it sampled
    under (context distillation, Askell et al. 2021), the contrast judge with its principle in
    the weights instead of the context. No answer is shown beside another, so no position bias;
    with no reference (the judge is the reference, as in a first round) every score is 0.

    Returns:
        RankResult: raw = log-ratio per answer, scores = raw normalised per prompt.
    """
    contexts = [judge.text(render(prompt)) for prompt, _ in items]
    requests = [
        (ctx, a) for ctx, (_, answers) in zip(contexts, items, strict=True) for a in answers
    ]
    ratios, passes = [0.0] * len(requests), 0
    if reference is not None:
        mine, _ = judge.logprobs(requests)
        theirs, _ = reference.logprobs(requests)
        ratios, passes = [a - b for a, b in zip(mine, theirs, strict=True)], 2 * len(requests)
    raw, at = [], 0
    for _, answers in items:
        raw.append(ratios[at : at + len(answers)])
        at += len(answers)
    return RankResult([normalise(r) for r in raw], raw, None, passes, None)


def rank(
    mode: str,
    judge_model,
    tokenizer,
    items: Sequence[tuple[str, Sequence[str]]],
    render: Render,
    *,
    orders: int = 1,
    samples: int = 1,
    scale: int = 5,
    seed: int = 0,
    batch_size: int = 8,
    chat: bool = True,
    progress: Progress | None = None,
    reference_model=None,
    **contrast: Any,
) -> RankResult:
    """Score every item's responses with a judge model.

    Args:
        mode: a key of RANKERS ("listwise", "pairwise", "pointwise", "contrast", "implicit").
        judge_model: a causal LM (eval mode is the caller's business; no gradients are taken).
        tokenizer: its tokenizer.
        items: (prompt, responses) per item.
        render: `render(prompt, responses, labels) -> str`, the judge template; listwise gets all
            responses with labels "A", "B", ..., pairwise two with ["A", "B"], pointwise one with ["0".."scale"].
        orders: listwise only: 1, 2 (with reversed) or n cyclic rotations (see module docs).
        samples: pointwise only: 1 = exact expectation, n > 1 = mean of n seeded draws.
        scale: pointwise only: the highest digit of the rubric (1..9).
        seed: seeds the pointwise draws; the forward passes themselves are deterministic.
        batch_size: judge texts per forward pass.
        chat: wrap each rendered judge text as a user turn with the chat template.
        progress: called as progress(texts_done, tokens_read) after each forward pass.
        reference_model: implicit only: the model the judge's likelihoods are compared with
            (None: the judge itself, so every score is 0); `render` is then `render(prompt)`.
        contrast: contrast only: `principle`, `opposite`, `calibrate` (see `rank_contrast`);
            `render` is then `render(prompt, principle) -> str`.
    Returns:
        RankResult with per-response scores in [0, 1].
    """
    if mode not in RANKERS:
        raise RalignError(f"unknown ranking mode {mode!r}; choose one of {sorted(RANKERS)}")
    for name, value in (("orders", orders), ("samples", samples), ("batch_size", batch_size)):
        if value < 1:
            raise RalignError(f"{name} must be at least 1, got {value}")
    judge = Judge(judge_model, tokenizer, batch_size=batch_size, chat=chat, progress=progress)
    models = [judge_model]
    if reference_model is not None:
        contrast["reference"] = Judge(
            reference_model, tokenizer, batch_size=batch_size, chat=chat, progress=progress
        )
        models.append(reference_model)
    with contextlib.ExitStack() as stack:
        for model in models:
            stack.enter_context(eval_mode(model))
        return RANKERS[mode](
            judge, items, render, orders=orders, samples=samples, scale=scale, seed=seed, **contrast
        )
