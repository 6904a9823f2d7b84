"""Dataset adapters and build_datasets: real schemas, \\r\\n in code, answer-only SciBench solutions,
powers of ten in units, malformed rows counted by reason, no empty reasoning trained, length drops."""
import json

import pytest

from llmhelpers.data.answers import last_boxed
from llmhelpers.config.profiles import make_config
from llmhelpers.data.sources import (BadRow, INSTRUCTION, build_datasets, from_mathcodeinstruct, from_scibench,
                             is_answer_only, split_unit)
from llmhelpers.paths import samples_dir


def mci_row(blocks, system=None):
    msgs = [{"role": "system", "content": [{"type": "text", "content": system}]}] if system else []
    return {"messages": msgs + [{"role": "user", "content": [{"type": "text", "content": "Compute 2**10."}]},
                                {"role": "assistant", "content": blocks}]}


def test_mathcodeinstruct_keeps_code_and_output_readable():
    row = mci_row([{"type": "text", "content": "Use Python."},
                   {"type": "code", "content": "x = 2**10\r\nprint(x)\r\n"},
                   {"type": "execution", "content": "1024\r\n"},
                   {"type": "text", "content": "So the result is $\\boxed{1024}$."}], system="Be terse.")
    ex = from_mathcodeinstruct(row)
    assert ex.reasoning == "Use Python.\n\n```python\nx = 2**10\nprint(x)\n```\n\n```output\n1024\n```"
    assert "\r" not in ex.reasoning
    assert ex.answer == "So the result is $\\boxed{1024}$." and ex.gold == "1024"
    assert ex.question == f"Compute 2**10.\n\n{INSTRUCTION}"
    assert "Be terse" not in ex.question  # no system prompt, as the model's authors recommend
    assert ex.source == "mathcodeinstruct" and not ex.numeric


def test_mathcodeinstruct_single_block_splits_paragraphs():
    ex = from_mathcodeinstruct(mci_row([{"type": "text", "content": "2^10 = 1024.\n\nHence $\\boxed{1024}$."}]))
    assert (ex.reasoning, ex.answer) == ("2^10 = 1024.", "Hence $\\boxed{1024}$.")


def test_mathcodeinstruct_one_paragraph_gives_empty_reasoning():
    ex = from_mathcodeinstruct(mci_row([{"type": "text", "content": "$\\boxed{1024}$"}]))
    assert ex.reasoning == "" and ex.gold == "1024"


@pytest.mark.parametrize("row,reason", [
    ("not a dict", "wrong_type"),
    ({"text": "x"}, "missing_field"),
    ({"messages": "x"}, "wrong_type"),
    ({"messages": [{"role": "assistant", "content": [{"type": "text", "content": "\\boxed{1}"}]}]}, "no_user_turn"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "content": "q"}]}]}, "no_assistant_turn"),
    (mci_row([{"type": "text", "content": "no box here"}]), "no_final_answer"),
    (mci_row([{"type": "text", "content": "\\boxed{}"}]), "no_final_answer"),
    (mci_row([{"type": "code", "content": 5}, {"type": "text", "content": "\\boxed{5}"}]), "non_string_content"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "content": "  "}]},
                   {"role": "assistant", "content": "\\boxed{1}"}]}, "empty_question"),
])
def test_mathcodeinstruct_bad_rows(row, reason):
    with pytest.raises(BadRow) as err:
        from_mathcodeinstruct(row)
    assert err.value.reason == reason


def sci_row(**kw):
    row = {"problem_text": " A ball falls for 2 s. How far? ", "answer_number": " 19.6 ", "unit": " $\\mathrm{~m}$ ",
           "source": " fund ", "problemid": " 1.1 ", "comment": "", "answer_latex": "19.6"}
    row.update(kw)
    return row


def test_scibench_strips_spaces_and_keeps_worked_solutions():
    ex = from_scibench(sci_row(solution=" Using $d = g t^2 / 2 = 9.8 \\times 4 / 2 = 19.6$ m. "))
    assert ex.question.startswith("A ball falls for 2 s. How far? The unit of the answer is \\mathrm{~m}.")
    assert ex.question.endswith(INSTRUCTION)
    assert ex.reasoning == "Using $d = g t^2 / 2 = 9.8 \\times 4 / 2 = 19.6$ m."
    assert ex.gold == "19.6" and ex.unit_exponent == 0 and ex.source == "scibench/fund" and ex.id == "1.1"
    assert last_boxed(ex.answer) == "19.6"
    assert ex.numeric and ex.gold_value == pytest.approx(19.6)


@pytest.mark.parametrize("solution", [" $3.00 \\mathrm{~cm}$ ", "$19.6 \\mathrm{~m}$", "", None])
def test_scibench_answer_only_or_missing_solution_gives_empty_reasoning(solution):
    row = sci_row() if solution is None else sci_row(solution=solution)
    assert from_scibench(row).reasoning == ""


def test_is_answer_only():
    assert is_answer_only("$3.00 \\mathrm{~cm}$")
    assert not is_answer_only("The energy is $E = h c / \\lambda$, so E = 3.97e-19 J.")


def test_scibench_power_of_ten_in_unit():
    ex = from_scibench(sci_row(answer_number="1.91", unit="$10^{-47} \\mathrm{~kg} \\mathrm{~m}^2$"))
    assert ex.unit == "\\mathrm{~kg} \\mathrm{~m}^2" and ex.unit_exponent == -47
    assert "10^{-47}" not in ex.question.split("\n\n")[0]
    assert ex.gold_value == pytest.approx(1.91e-47)
    assert last_boxed(ex.answer) == "1.91 \\times 10^{-47}"


@pytest.mark.parametrize("unit,expected", [
    ("$10^{-47} \\mathrm{~kg} \\mathrm{~m}^2$", ("\\mathrm{~kg} \\mathrm{~m}^2", -47)),
    (" $10^5 \\mathrm{~Pa}$", ("\\mathrm{~Pa}", 5)),
    ("$10^{23}$", ("", 23)),
    ("$\\mathrm{~J}$", ("\\mathrm{~J}", 0)),
    ("", ("", 0)),
])
def test_split_unit(unit, expected):
    assert split_unit(unit) == expected


@pytest.mark.parametrize("row,reason", [
    ({"problem_text": "q", "unit": "m", "source": "fund"}, "missing_field"),
    (sci_row(answer_number="about five"), "bad_answer_number"),
    (sci_row(problem_text=3.14), "non_string_content"),
    (sci_row(problem_text="   "), "empty_question"),
    (sci_row(solution=12), "non_string_content"),
    ([1, 2], "wrong_type"),
])
def test_scibench_bad_rows(row, reason):
    with pytest.raises(BadRow) as err:
        from_scibench(row)
    assert err.value.reason == reason


@pytest.mark.parametrize("text,expected", [
    ("x \\boxed{1} then \\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
    ("\\boxed{a{b}c}", "a{b}c"),
    ("\\fbox{7}", "7"),
    ("\\boxed{12} and a cut-off \\boxed{3", "12"),
    ("nothing", None),
])
def test_last_boxed(text, expected):
    assert last_boxed(text) == expected


# --- build_datasets ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bundle(tok_current):
    return build_datasets(make_config("smoke"), tok_current)


def test_bundle_counts_match_the_samples(bundle):
    r = bundle.report
    math, sci = r.sources["mathcodeinstruct"], r.sources["scibench"]
    n_math = len((samples_dir() / "mathcodeinstruct.jsonl").read_text().splitlines())
    n_sci = len((samples_dir() / "scibench.jsonl").read_text().splitlines())
    assert (math.rows, sci.rows) == (n_math, n_sci)
    assert math.train + math.eval + sum(math.bad.values()) + math.empty_reasoning + math.too_long == math.rows
    assert sci.train + sci.eval + sum(sci.bad.values()) + sci.too_long + sci.heldout == sci.rows
    assert len(bundle.train) == math.train + sci.train and len(bundle.eval) == math.eval + sci.eval
    assert len(bundle.eval) == round((len(bundle.train) + len(bundle.eval)) * 0.1)
    assert "mathcodeinstruct" in str(r) and "p50" in str(r)


def test_no_empty_reasoning_is_trained_and_heldout_is_scibench_without_solutions(bundle):
    assert all(ex.reasoning.strip() for ex in bundle.train_examples + bundle.eval_examples)
    assert bundle.heldout and all(ex.numeric and not ex.reasoning for ex in bundle.heldout)
    trained = {ex.question for ex in bundle.train_examples}
    assert not trained & {ex.question for ex in bundle.heldout}
    assert not trained & {ex.question for ex in bundle.eval_examples}
    fund_answer_only = [ex for ex in bundle.heldout if ex.source == "scibench/fund" and "cart" in ex.question]
    assert len(fund_answer_only) == 3


def test_features_are_encode_output(bundle, tok_current):
    from llmhelpers.data.chat import encode

    assert bundle.train[0] == encode(bundle.train_examples[0], tok_current)
    assert all(len(ids) <= 1024 for ids in bundle.train["input_ids"])


def test_same_seed_same_split_other_seed_other_split(bundle, tok_current):
    again = build_datasets(make_config("smoke"), tok_current)
    assert [e.question for e in again.train_examples] == [e.question for e in bundle.train_examples]
    other = build_datasets(make_config("smoke", seed=7), tok_current)
    assert [e.question for e in other.train_examples] != [e.question for e in bundle.train_examples]


def test_long_examples_are_dropped_and_counted(tok_current, bundle):
    cfg = make_config("smoke", max_example_tokens=130)
    small = build_datasets(cfg, tok_current)
    dropped = small.report.total("too_long")
    assert dropped > 0
    assert all(len(ids) <= 130 for ids in list(small.train["input_ids"]) + list(small.eval["input_ids"]))
    assert len(small.train) + len(small.eval) + dropped == len(bundle.train) + len(bundle.eval)


def test_math_samples_limits_the_math_rows(tok_current):
    b = build_datasets(make_config("smoke", math_samples=5), tok_current)
    m = b.report.sources["mathcodeinstruct"]
    assert m.train + m.eval == 5


def test_malformed_files_are_counted_by_reason(tok_current):
    cfg = make_config("smoke", math_dataset=str(samples_dir() / "malformed_mathcodeinstruct.jsonl"),
                      allow_one_source=True)
    b = build_datasets(cfg, tok_current)  # SciBench samples still give a training set, on purpose
    bad = b.report.sources["mathcodeinstruct"].bad
    assert bad == {"no_user_turn": 1, "no_final_answer": 1, "non_string_content": 1, "missing_field": 1,
                   "no_assistant_turn": 1, "empty_question": 1, "invalid_json": 1}
    assert "invalid_json" in str(b.report)


def test_all_bad_rows_is_a_clear_error(tok_current):
    cfg = make_config("smoke", math_dataset=str(samples_dir() / "malformed_mathcodeinstruct.jsonl"),
                      science_dataset=str(samples_dir() / "malformed_scibench.jsonl"))
    with pytest.raises(ValueError, match="no usable training examples"):
        build_datasets(cfg, tok_current)


def test_non_json_files_and_huge_rows_are_counted(tmp_path, tok_current):
    (tmp_path / "notes.txt").write_text("hello")
    huge = tmp_path / "huge.jsonl"
    good = (samples_dir() / "mathcodeinstruct.jsonl").read_text().splitlines()
    huge.write_text("\n".join(good + [json.dumps({"messages": "x" * 300_000})]) + "\n")
    b = build_datasets(make_config("smoke", math_dataset=str(huge)), tok_current)
    assert b.report.sources["mathcodeinstruct"].bad["row_too_large"] == 1
    b = build_datasets(make_config("smoke", math_dataset=str(tmp_path / "notes.txt"), allow_one_source=True),
                       tok_current)
    assert b.report.sources["mathcodeinstruct"].bad["not_json_file"] == 1
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    b = build_datasets(make_config("smoke", math_dataset=str(broken), allow_one_source=True), tok_current)
    assert b.report.sources["mathcodeinstruct"].bad["not_json_file"] == 1


def test_json_array_files_load(tmp_path, tok_current):
    rows = [json.loads(x) for x in (samples_dir() / "scibench.jsonl").read_text().splitlines()]
    (tmp_path / "sci.json").write_text(json.dumps(rows))
    b = build_datasets(make_config("smoke", science_dataset=str(tmp_path / "sci.json")), tok_current)
    assert b.report.sources["scibench"].rows == len(rows)


def test_missing_local_file_is_a_clear_error(tok_current):
    with pytest.raises(FileNotFoundError, match="does_not_exist.jsonl"):
        build_datasets(make_config("smoke", math_dataset="does_not_exist.jsonl"), tok_current)


def test_load_examples_fails_fast_without_a_tokenizer():
    from llmhelpers.data.sources import load_examples

    cfg = make_config("smoke", math_dataset=str(samples_dir() / "malformed_mathcodeinstruct.jsonl"),
                      science_dataset=str(samples_dir() / "malformed_scibench.jsonl"))
    with pytest.raises(ValueError, match="every row is bad"):
        load_examples(cfg)


def test_loaded_examples_are_reused_only_for_the_same_sources(tok_current):
    from llmhelpers.data.sources import load_examples

    loaded = load_examples(make_config("smoke"))
    same = build_datasets(make_config("smoke", max_example_tokens=200), tok_current, loaded)
    assert same.report.sources["mathcodeinstruct"].rows == loaded.report.sources["mathcodeinstruct"].rows
    other = build_datasets(make_config("smoke", math_samples=5), tok_current, loaded)  # settings changed: re-read
    m = other.report.sources["mathcodeinstruct"]
    assert m.train + m.eval == 5


def test_hub_sources_are_sampled_lazily_and_reproducibly(monkeypatch, tok_current):
    """A Hub id goes through datasets.load_dataset (here a local stand-in); the seed fixes the sample."""
    import datasets

    rows = [json.loads(l) for l in (samples_dir() / "mathcodeinstruct.jsonl").read_text().splitlines()]
    calls = []

    def fake_load_dataset(name, split, revision):
        calls.append((name, split, revision))
        return datasets.Dataset.from_list(rows)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    cfg = make_config("smoke", math_dataset="MathLLMs/MathCodeInstruct", math_samples=6, dataset_revision="abc")
    a = build_datasets(cfg, tok_current)
    b = build_datasets(cfg, tok_current)
    assert calls[0] == ("MathLLMs/MathCodeInstruct", "train", "abc")
    m = a.report.sources["mathcodeinstruct"]
    assert m.rows == 6 and m.train + m.eval == 6  # stopped after 6 good rows, did not read all
    assert sorted(e.question for e in a.train_examples) == sorted(e.question for e in b.train_examples)


def test_the_small_profiles_problem_files_are_what_the_generator_writes_and_grpo_practises_apart():
    """data/small/ as `python -m llmhelpers.data.synthetic` writes it (seeded), and GRPO's practice problems are the
    held-out templates with other numbers: never a problem that heldout_templates.jsonl grades."""
    import json

    from llmhelpers.data.synthetic import build
    from llmhelpers.paths import REPO_ROOT

    built = build()
    for name, rows in built.items():
        committed = (REPO_ROOT / "data/small" / f"{name}.jsonl").read_text(encoding="utf-8").splitlines()
        assert [json.loads(line) for line in committed] == rows, name
    question = lambda row: row["messages"][0]["content"][0]["content"]
    graded = {question(r) for r in built["heldout_templates"]}
    practice = [question(r) for r in built["practice_templates"]]
    assert len(practice) == 400 and not graded & set(practice)
    assert {r["id"].split("-")[0] for r in built["practice_templates"]} == \
        {r["id"].split("-")[0] for r in built["heldout_templates"]}
