"""Judge ranking: label probabilities, order averaging, the three modes, batching and real tiny models."""

from __future__ import annotations

import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from ralign.errors import RalignError
from ralign.runtime.rank import (
    RANKERS,
    label_token_ids,
    normalise,
    permutations,
    rank,
    resolve_labels,
)

LISTED = re.compile(r"^([A-Z])\) (.*)$", re.MULTILINE)


def render_list(prompt: str, responses: list[str], labels: list[str]) -> str:
    body = "\n".join(f"{label}) {text}" for label, text in zip(labels, responses, strict=True))
    return f"Question: {prompt}\n{body}\nWhich one is best? Answer:"


def render_point(prompt: str, responses: list[str], labels: list[str]) -> str:
    return f"Question: {prompt}\nReply: {responses[0]}\nRate the reply from 0 to 5. Score:"


class FakeJudge(torch.nn.Module):
    """A causal LM stand-in whose last-position logits come from a rule on the decoded text.

    `rule(text) -> {label: logit}`; labels it leaves out get logit 0. Counts rows and calls.
    """

    def __init__(self, tokenizer, rule):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # gives the module a device
        self.tokenizer, self.rule = tokenizer, rule
        self.rows = self.calls = 0

    def forward(self, input_ids, attention_mask):
        self.calls += 1
        self.rows += input_ids.shape[0]
        vocab = len(self.tokenizer)
        logits = torch.zeros(input_ids.shape[0], input_ids.shape[1], vocab)
        for b in range(input_ids.shape[0]):
            assert attention_mask[b, -1] == 1, "rows must be left padded"
            ids = input_ids[b][attention_mask[b].bool()].tolist()
            text = self.tokenizer.decode(ids)
            for label, value in self.rule(text).items():
                # The chat-wrapped text ends with a newline, so labels are their bare tokens.
                (tid,) = self.tokenizer.encode(label, add_special_tokens=False)
                logits[b, -1, tid] = value
        return SimpleNamespace(logits=logits)


def listed(text: str) -> dict[str, str]:
    return {label: body for label, body in LISTED.findall(text)}


def first_position(text: str) -> dict[str, float]:
    return {"A": 10.0}


def position_bias(bias: list[float]):
    def rule(text: str) -> dict[str, float]:
        return {label: bias[i] for i, label in enumerate(listed(text))}

    return rule


def prefers_correct(bias_a: float = 0.0):
    """Listwise/pairwise: +6 on the label beside "correct"; pointwise: high digit for "correct"."""

    def rule(text: str) -> dict[str, float]:
        if "Reply:" in text:
            return {"5": 6.0} if "correct" in text.split("Reply:")[1] else {"1": 6.0}
        out = {label: (6.0 if "correct" in body else 0.0) for label, body in listed(text).items()}
        out["A"] = out.get("A", 0.0) + bias_a
        return out

    return rule


@pytest.fixture(scope="module")
def tok(tiny_models):
    return tiny_models("llama")[1]


@pytest.mark.parametrize(
    "values, expected",
    [
        ([1.0, 2.0, 3.0], [0.0, 0.5, 1.0]),
        ([0.2, 0.2, 0.2], [0.5, 0.5, 0.5]),
        ([7.0], [0.5]),
        ([], []),
        ([-1.0, 1.0], [0.0, 1.0]),
    ],
)
def test_normalise(values, expected):
    assert normalise(values) == pytest.approx(expected)


@pytest.mark.parametrize(
    "k, orders, expected",
    [
        (3, 1, [[0, 1, 2]]),
        (3, 2, [[0, 1, 2], [2, 1, 0]]),
        (3, 3, [[0, 1, 2], [1, 2, 0], [2, 0, 1]]),
        (2, 5, [[0, 1], [1, 0]]),  # rotations beyond K would repeat
        (1, 2, [[0]]),
    ],
)
def test_permutations(k, orders, expected):
    assert permutations(k, orders) == expected


def test_registry_has_every_mode():
    assert set(RANKERS) == {"listwise", "pairwise", "pointwise", "contrast", "implicit"}


def test_two_orders_cancel_first_position_preference(tok):
    judge = FakeJudge(tok, first_position)
    one = rank("listwise", judge, tok, [("q", ["x", "y"])], render_list, orders=1)
    two = rank("listwise", judge, tok, [("q", ["x", "y"])], render_list, orders=2)
    assert one.raw[0][0] > 0.99 and one.agreement is None
    assert two.raw[0] == pytest.approx([0.5, 0.5])
    assert two.scores[0] == [0.5, 0.5]
    assert two.agreement == 0.0  # each order picks whatever sits first


@pytest.mark.parametrize(
    "bias, orders, groups",
    [
        # A full cycle of rotations cancels any position-only bias.
        ([3.0, 0.0, 5.0, 1.0], 4, [[0, 1, 2, 3]]),
        ([1.0, 0.0, 0.0], 3, [[0, 1, 2]]),
        # With two responses, reversal is a full cycle.
        ([5.0, 0.0], 2, [[0, 1]]),
        # With K > 2 reversal only makes mirror positions equal: ends vs middle stays.
        ([2.0, 0.0, 0.0, -2.0], 2, [[0, 3], [1, 2]]),
        ([0.0, 4.0, 0.0, 0.0], 2, [[0, 3], [1, 2]]),
        ([0.0, 4.0, 0.0, 0.0], 1, [[0, 2, 3], [1]]),
    ],
)
def test_which_orders_cancel_which_position_bias(tok, bias, orders, groups):
    """Responses with equal scores form exactly `groups` (content is irrelevant to this judge)."""
    judge = FakeJudge(tok, position_bias(bias))
    responses = ["w", "x", "y", "z"][: len(bias)]
    raw = rank("listwise", judge, tok, [("q", responses)], render_list, orders=orders).raw[0]
    found = []
    for r, score in enumerate(raw):
        group = next((g for g in found if abs(raw[g[0]] - score) < 1e-9), None)
        if group is None:
            found.append([r])
        else:
            group.append(r)
    assert found == groups


@pytest.mark.parametrize("mode", ["listwise", "pairwise", "pointwise"])
@pytest.mark.parametrize("position", [0, 2, 3])
def test_judge_that_knows_the_answer_ranks_it_first(tok, mode, position):
    responses = ["wrong one", "also wrong", "not it", "nope"]
    responses[position] = "the correct one"
    judge = FakeJudge(tok, prefers_correct(bias_a=2.0))
    render = render_point if mode == "pointwise" else render_list
    result = rank(mode, judge, tok, [("q", responses)], render, orders=2)
    assert result.scores[0][position] == 1.0
    assert int(np.argmax(result.raw[0])) == position
    assert all(0.0 <= s <= 1.0 for s in result.scores[0])
    if mode == "listwise":
        assert result.agreement == 1.0  # content outweighs the bias for A in both orders
    if mode == "pairwise":
        # The 3 pairs with the correct answer agree; the 3 wrong-vs-wrong pairs go to position A.
        assert result.agreement == 0.5


def test_pointwise_expected_score_is_known(tok):
    # Logit 6 on "5" against 0 on the five other digits: E[d] = (5 e^6 + 0+1+2+3+4) / (e^6 + 5).
    judge = FakeJudge(tok, prefers_correct())
    result = rank("pointwise", judge, tok, [("q", ["correct", "bad"])], render_point)
    e6 = np.exp(6.0)
    good = (5 * e6 + 10) / (e6 + 5) / 5
    bad = (1 * e6 + 0 + 2 + 3 + 4 + 5) / (e6 + 5) / 5
    assert result.raw[0] == pytest.approx([good, bad])
    assert result.scores[0] == [1.0, 0.0]


def test_pointwise_samples_are_seeded_draws(tok):
    judge = FakeJudge(tok, prefers_correct())
    items = [("q", ["correct", "bad", "correct too"])]
    a = rank("pointwise", judge, tok, items, render_point, samples=50, seed=3)
    b = rank("pointwise", judge, tok, items, render_point, samples=50, seed=3)
    exact = rank("pointwise", judge, tok, items, render_point)
    assert a.raw == b.raw
    assert a.forward_passes == exact.forward_passes == 3  # drawing costs no forward passes
    # Draws are multiples of 1/(50*5), near the expectation.
    assert a.raw[0] == pytest.approx(exact.raw[0], abs=0.1)


@pytest.mark.parametrize(
    "mode, orders, per_prompt",
    [
        ("listwise", 1, 1),
        ("listwise", 2, 2),
        ("listwise", 4, 4),
        ("pairwise", 1, 12),
        ("pointwise", 1, 4),
    ],
)
def test_forward_pass_counts(tok, mode, orders, per_prompt):
    judge = FakeJudge(tok, first_position)
    items = [
        ("q1", ["a", "b", "c", "d"]),
        ("q2", ["e", "f", "g", "h"]),
        ("q3", ["i", "j", "k", "l"]),
    ]
    render = render_point if mode == "pointwise" else render_list
    result = rank(mode, judge, tok, items, render, orders=orders, batch_size=5)
    assert result.forward_passes == 3 * per_prompt == judge.rows
    assert judge.calls == -(-3 * per_prompt // 5)  # batched: ceil(texts / batch_size) calls


def test_single_and_empty_response_lists(tok):
    judge = FakeJudge(tok, first_position)
    result = rank("listwise", judge, tok, [("q", ["only"]), ("q", [])], render_list, orders=2)
    assert result.scores == [[0.5], []]
    assert result.forward_passes == 0
    assert result.label_mass is None


@pytest.mark.parametrize("mode, n_labels", [("listwise", 2), ("pairwise", 2), ("pointwise", 6)])
def test_label_mass_is_the_probability_on_label_tokens(tok, mode, n_labels):
    # Every logit 0 except 10 on "A" (absent from the pointwise digits): known softmax masses.
    judge = FakeJudge(tok, first_position)
    render = render_point if mode == "pointwise" else render_list
    result = rank(mode, judge, tok, [("q", ["x", "y"])], render)
    vocab, e10 = len(tok), np.exp(10.0)
    if mode == "pointwise":
        expected = n_labels / (vocab - 1 + e10)
    else:
        expected = (e10 + n_labels - 1) / (vocab - 1 + e10)
    assert result.label_mass == pytest.approx(expected)


def test_progress_reports_every_text(tok):
    seen = []
    judge = FakeJudge(tok, first_position)
    rank(
        "pairwise",
        judge,
        tok,
        [("q", ["a", "b", "c"])],
        render_list,
        batch_size=4,
        progress=lambda n, t: seen.append((n, t)),
    )
    assert [n for n, _ in seen] == [4, 2]
    assert all(t > 0 for _, t in seen)


@pytest.mark.parametrize(
    "text, fed, expected",
    [
        ("Answer:", "Answer:", ["ĠA", "ĠB"]),
        ("Answer:\n", "Answer:\n", ["A", "B"]),
        # "Answer: A" re-merges the space into "ĠA": the lone trailing space is healed away.
        ("Answer: ", "Answer:", ["ĠA", "ĠB"]),
        ("Answer:   ", "Answer:", ["ĠA", "ĠB"]),
    ],
)
def test_label_tokens_follow_the_text_ending(tok, text, fed, expected):
    got_text, ids = resolve_labels(tok, text, ["A", "B"])
    assert got_text == fed
    assert tok.convert_ids_to_tokens(ids) == expected
    assert label_token_ids(tok, text, ["A", "B"]) == ids


def test_multi_token_label_is_a_clear_error(tiny_models):
    # Qwen2's split puts a space and a digit in separate tokens, so " 3" is two tokens.
    _, tok = tiny_models("qwen2")
    with pytest.raises(RalignError, match="not single tokens"):
        label_token_ids(tok, "Score:", ["3"])
    # After a trailing space the bare digit is clean (Qwen2 always splits " 3" as " ", "3").
    assert resolve_labels(tok, "Score: ", ["3", "4"])[0] == "Score: "
    assert tok.convert_ids_to_tokens(label_token_ids(tok, "Score: ", ["3"])) == ["3"]


def test_unknown_mode(tok):
    with pytest.raises(RalignError, match="unknown ranking mode 'listwize'"):
        rank("listwize", None, tok, [], render_list)


@pytest.mark.parametrize("option", ["orders", "samples", "batch_size"])
def test_counts_below_one_are_refused(tok, option):
    with pytest.raises(RalignError, match=f"{option} must be at least 1"):
        rank("listwise", None, tok, [], render_list, **{option: 0})


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2"])
@pytest.mark.parametrize("mode", ["listwise", "pairwise", "pointwise"])
def test_real_tiny_model_end_to_end(tiny_models, arch, mode):
    model, tok = tiny_models(arch)
    items = [
        ("What is 2 plus 3?", ["5", "6", "The cat reads the book at home.", "7"]),
        ("Hi", ["Hello there, how are you today?", "Bye"]),
    ]
    render = render_point if mode == "pointwise" else render_list
    kwargs = dict(orders=2, seed=0)
    batched = rank(mode, model, tok, items, render, batch_size=8, **kwargs)
    single = rank(mode, model, tok, items, render, batch_size=1, **kwargs)
    assert [len(s) for s in batched.scores] == [4, 2]
    assert all(0.0 <= s <= 1.0 for row in batched.scores for s in row)
    # Left padding with position ids: batching texts of different lengths changes nothing.
    np.testing.assert_allclose(sum(batched.raw, []), sum(single.raw, []), atol=1e-5)
    if mode == "listwise":
        assert batched.forward_passes == 4
        assert sum(batched.raw[0]) == pytest.approx(1.0)  # P(best) over the K responses


def test_dropout_is_off_while_judging_and_mode_restored(tiny_models):
    model, tok = tiny_models("gpt2")  # GPT-2 has dropout 0.1 by default
    items = [("What is 2 plus 3?", ["5", "6", "7"])]
    expected = rank("listwise", model, tok, items, render_list).raw
    model.train()
    try:
        assert rank("listwise", model, tok, items, render_list).raw == expected
        assert model.training
    finally:
        model.eval()


# ---- contrast ---------------------------------------------------------------------------------


def _mean_logprob(model, tok, context: str, answer: str) -> float:
    """The answer's mean token log-probability after `context`, computed directly (the oracle)."""
    from ralign.runtime.hhh import encode_pair

    ctx, cont = encode_pair(tok, context, answer)
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logps = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), dim=-1)
    picked = logps[len(ctx) - 1 :].gather(1, torch.tensor(cont)[:, None])
    return float(picked.mean())


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_contrast_scores_the_principles_lift_and_calibrates_it(tiny_models, arch):
    from ralign.runtime.models import format_prompt
    from ralign.runtime.rank import rank

    model, tok = tiny_models(arch)
    items = [
        ("How do I bake bread?", ["Mix and knead.", "I can't help."]),
        ("Name a river.", ["The Nile.", "No."]),
    ]

    def render(prompt: str, principle: str) -> str:
        return f"{principle}\n\n{prompt}"

    def lift(n: int, answer: str, prompt_of: int) -> float:
        prompt = items[prompt_of][0]
        with_p = _mean_logprob(model, tok, format_prompt(tok, render(prompt, "Be kind.")), answer)
        bare = _mean_logprob(model, tok, format_prompt(tok, prompt), answer)
        return with_p - bare

    plain = rank("contrast", model, tok, items, render, principle="Be kind.")
    want = [[lift(n, a, n) for a in answers] for n, (_, answers) in enumerate(items)]
    np.testing.assert_allclose(plain.raw, want, atol=1e-4)
    assert plain.agreement is None and all(sorted(s) == [0.0, 1.0] for s in plain.scores)
    # With one other prompt to calibrate against (two items: the other one), the lift there is subtracted.
    calibrated = rank("contrast", model, tok, items, render, principle="Be kind.", calibrate=1)
    want = [
        [lift(n, a, n) - lift(n, a, 1 - n) for a in answers] for n, (_, answers) in enumerate(items)
    ]
    np.testing.assert_allclose(calibrated.raw, want, atol=1e-4)
    # Against an opposite principle instead of the bare prompt.
    opposed = rank("contrast", model, tok, items, render, principle="Be kind.", opposite="Be rude.")
    first = _mean_logprob(
        model, tok, format_prompt(tok, render(items[0][0], "Be kind.")), "Mix and knead."
    )
    first -= _mean_logprob(
        model, tok, format_prompt(tok, render(items[0][0], "Be rude.")), "Mix and knead."
    )
    assert opposed.raw[0][0] == pytest.approx(first, abs=1e-4)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_implicit_scores_the_judges_log_ratio_to_its_reference(tiny_models, arch):
    import copy

    from ralign.runtime.models import format_prompt
    from ralign.runtime.rank import rank

    reference, tok = tiny_models(arch)
    judge = copy.deepcopy(reference)
    with torch.no_grad():  # the judge: the reference after some "training"
        for p in judge.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(3)))
    items = [
        ("How do I bake bread?", ["Mix and knead.", "I can't help.", "Bake it."]),
        ("Name a river.", ["The Nile.", "No."]),
    ]

    def summed(model, prompt: str, answer: str) -> float:
        from ralign.runtime.hhh import encode_pair

        n = len(encode_pair(tok, format_prompt(tok, prompt), answer)[1])
        return n * _mean_logprob(model, tok, format_prompt(tok, prompt), answer)

    got = rank("implicit", judge, tok, items, lambda prompt: prompt, reference_model=reference)
    want = [[summed(judge, q, a) - summed(reference, q, a) for a in ans] for q, ans in items]
    for raw, expected in zip(got.raw, want, strict=True):
        np.testing.assert_allclose(raw, expected, atol=1e-3)
    assert all(sorted(s)[0] == 0.0 and sorted(s)[-1] == 1.0 for s in got.scores)
    assert got.forward_passes == 2 * 5 and got.agreement is None
    # The judge is its own reference (a first round): every answer scores 0, so 0.5 each.
    same = rank("implicit", judge, tok, items, lambda prompt: prompt)
    assert same.raw == [[0.0] * 3, [0.0] * 2] and same.scores == [[0.5] * 3, [0.5] * 2]
    assert same.forward_passes == 0
    # What both read can be a template of the prompt: then the prompt is read through it.
    framed = rank("implicit", judge, tok, items[:1], lambda q: f"Q: {q}", reference_model=reference)
    framed_prompt = "Q: " + items[0][0]
    want = [
        summed(judge, framed_prompt, a) - summed(reference, framed_prompt, a) for a in items[0][1]
    ]
    np.testing.assert_allclose(framed.raw[0], want, atol=1e-3)
