"""Reading sources row by row: one bad byte costs one row, never the file; a source that yields nothing
stops the run before the model loads; typographic numbers parse; non-finite golds and odd paths are caught."""
import json
import math

import pytest

from llmhelpers.config.profiles import make_config
from llmhelpers.data.sources import BadRow, DataError, SourceCounts, from_scibench, load_examples, read_rows
from llmhelpers.paths import samples_dir

MATH_ROWS = (samples_dir() / "mathcodeinstruct.jsonl").read_text(encoding="utf-8").splitlines()
SCI_ROWS = (samples_dir() / "scibench.jsonl").read_text(encoding="utf-8").splitlines()


def read(path) -> tuple[list, SourceCounts]:
    counts = SourceCounts()
    rows = list(read_rows(str(path), counts))
    return rows, counts


def test_line_separators_inside_strings_do_not_split_rows(tmp_path):
    rows = [json.loads(r) for r in SCI_ROWS[:3]]
    rows[1]["problem_text"] += " one\u2028two\u2029three\u0085four"
    path = tmp_path / "sci.jsonl"
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n", encoding="utf-8")
    got, counts = read(path)
    assert got == rows and not counts.bad


def test_a_byte_order_mark_keeps_the_first_row(tmp_path):
    path = tmp_path / "sci.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + "\n".join(SCI_ROWS[:3]).encode())
    got, counts = read(path)
    assert len(got) == 3 and not counts.bad


def test_one_bad_line_costs_one_row_not_the_file(tmp_path):
    path = tmp_path / "sci.jsonl"
    lines = [r.encode() for r in SCI_ROWS[:4]]
    lines.insert(1, b"\x00\xff\xfe binary junk \x80\x81")
    lines.insert(3, '{"problem_text": "caf\u00e9"}'.encode("latin-1"))  # Latin-1, not UTF-8
    lines.insert(4, b"[" * 100_000 + b"]" * 100_000)  # deeper than json can parse
    path.write_bytes(b"\r\n".join(lines) + b"\r\n")
    got, counts = read(path)
    assert len(got) == 4
    assert counts.bad == {"undecodable_row": 2, "too_deeply_nested": 1}


def test_a_utf16_file_is_read(tmp_path):
    path = tmp_path / "sci.jsonl"
    path.write_text("\n".join(SCI_ROWS[:3]), encoding="utf-16")
    got, counts = read(path)
    assert len(got) == 3 and not counts.bad


def test_deeply_nested_rows_in_a_json_array_file_are_counted_not_fatal(tmp_path):
    path = tmp_path / "sci.json"
    path.write_text("[" * 100_000 + "]" * 100_000)
    got, counts = read(path)
    assert got == [] and counts.bad == {"not_json_file": 1}


@pytest.mark.parametrize("content", ["", "problem_text,answer_number\nx,1\n", "{not json}\n{also not}\n", "utf16-junk"],
                         ids=["empty", "csv", "all-bad", "undecodable"])
def test_a_source_that_yields_nothing_stops_the_run_before_the_model(tmp_path, content):
    path = tmp_path / "science.jsonl"
    if content == "utf16-junk":
        path.write_bytes(b"\xff\xfe" + b"\x00\xd8" * 10)  # a BOM, then unpaired surrogates
    else:
        path.write_text(content)
    cfg = make_config("smoke", science_dataset=str(path))
    with pytest.raises(DataError, match=r"the scibench source \(.*science.jsonl\) yielded no usable rows"):
        load_examples(cfg)
    loaded = load_examples(make_config("smoke", science_dataset=str(path), allow_one_source=True))
    assert loaded.math and not loaded.science
    assert "allow_one_source=True, so it is left out" in str(loaded.report)


def test_report_before_the_split_shows_usable_rows_not_zeros():
    report = str(load_examples(make_config("smoke")).report)
    assert "usable" in report.splitlines()[0] and "train" not in report.splitlines()[0]


def sci_row(answer):
    return {"problem_text": "How far?", "answer_number": answer, "unit": "m", "source": "class"}


@pytest.mark.parametrize("written,value", [("\u22122", -2.0), ("\u2212 1.5", -1.5), ("1\u2009234.5", 1234.5),
                                           ("1,234", 1234.0), ("\u20130.25", -0.25), ("6.02e23", 6.02e23)])
def test_typographic_numbers_parse(written, value):
    assert from_scibench(sci_row(written)).gold_value == pytest.approx(value)


@pytest.mark.parametrize("written", ["nan", "inf", "-Infinity", "1e999"])
def test_non_finite_gold_answers_are_bad_rows(written):
    with pytest.raises(BadRow) as err:
        from_scibench(sci_row(written))
    assert err.value.reason == "bad_answer_number"


def test_a_path_without_extension_is_not_taken_for_a_hub_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "nope").mkdir()
    with pytest.raises(FileNotFoundError, match="nope/nothere"):
        read_rows("nope/nothere", SourceCounts())
    for spec in ("data/missing", "./x", "a/b/c", "missing.jsonl"):
        with pytest.raises(FileNotFoundError, match="does not exist"):
            read_rows(spec, SourceCounts())


def test_a_hub_id_that_fails_to_load_says_both_what_it_tried(tmp_path, monkeypatch):
    import datasets

    monkeypatch.chdir(tmp_path)

    def offline(*a, **k):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(FileNotFoundError, match="not a local file.*Hub dataset failed: ConnectionError"):
        read_rows("owner/name", SourceCounts())


# --- config values that passed but broke ---------------------------------------------------------------------
@pytest.mark.parametrize("key", ["learning_rate", "max_grad_norm", "weight_decay", "num_train_epochs",
                                 "eval_temperature"])
@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan])
def test_non_finite_floats_are_rejected(key, value):
    with pytest.raises(ValueError, match=f"{key}=.*finite"):
        make_config(**{key: value})


def test_comma_separated_target_modules_on_the_command_line_become_a_list():
    from llmhelpers.config.arguments import parse

    _, cfg = parse(["--profile", "smoke", "--target_modules", "q_proj, v_proj"])
    assert sorted(cfg.lora.target_modules) == ["q_proj", "v_proj"]  # peft would read one string as a regex


# --- findings of the adversarial run (issue #18) -------------------------------------------------------------------
def test_a_pipe_or_device_as_a_data_path_is_a_clear_error_not_a_hang(tmp_path):
    import os

    fifo = tmp_path / "data.jsonl"
    os.mkfifo(fifo)
    for path in (fifo, "/dev/zero"):
        with pytest.raises(DataError, match="not a regular file"):
            read(path)


def test_a_file_that_is_not_json_is_one_skipped_file_not_minus_one_usable_rows(tmp_path):
    from llmhelpers.data.sources import DataReport

    path = tmp_path / "science"  # no suffix
    path.write_text("problem_text,answer\n")
    rows, counts = read(path)
    report = DataReport()
    report.sources["scibench"] = counts
    table = str(report)
    assert rows == [] and "-1" not in table
    assert table.splitlines()[2].split() == ["scibench", "0", "0", "0"]
    assert "1 x not_json_file (whole file)" in table


def test_finding_the_last_box_is_linear_in_the_text():
    from llmhelpers.data.answers import last_boxed

    assert last_boxed("\\boxed{a} and \\boxed {b{c}}") == "b{c}"
    assert last_boxed("\\boxed{1} then \\boxed{cut off") == "1"
    assert last_boxed("\\fbox{x}") == "x" and last_boxed("\\boxedx{1}") is None and last_boxed("none") is None

    class Counted(str):  # counts character look-ups: the work, not the time, so the test is the same on any machine
        looks = 0

        def __getitem__(self, key):
            Counted.looks += 1
            return str.__getitem__(self, key)

    text = Counted("\\boxed{1}" + "\\boxed{" * 2_000)
    assert last_boxed(text) == "1"
    assert Counted.looks < len(text)  # one scan at most; the old search rescanned the rest of the text per box
