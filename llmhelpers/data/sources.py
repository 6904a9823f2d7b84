"""Dataset adapters (MathCodeInstruct, SciBench) and the honest training set builder.

Every row becomes an `Example` or raises `BadRow` with a short reason. `build_datasets`
counts every row it drops by reason, never trains on empty reasoning, drops (never
truncates) over-long examples, and returns tokenized train/eval sets plus a held-out
accuracy set of the SciBench problems that have no worked solution.
"""
from __future__ import annotations

import json
import math
import random
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from llmhelpers.data.answers import last_boxed
from llmhelpers.data.chat import encode
from llmhelpers.data.examples import BadRow, Example
from llmhelpers.paths import resolve

INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
MAX_ROW_CHARS = 200_000  # a row larger than this is malformed for our purposes (real rows are < 30k)

SCIBENCH_FIELDS = ("problem_text", "answer_number", "unit", "source")
# SciBench's own regex for a power of ten inside the unit, e.g. "$10^{-47} \mathrm{~kg}$".
_UNIT_POWER = re.compile(r"[\$]?\ *10\^[{]?\ *(-?[0-9]+)\ *[}]?\ *[\$]?")


class DataError(ValueError):
    """The data cannot give the run that was asked for (no usable rows, a source that yields nothing)."""


# --- MathCodeInstruct --------------------------------------------------------------------------------
def _block_text(block: Any) -> tuple[str, str]:
    if isinstance(block, str):
        return "text", block
    if not isinstance(block, dict):
        raise BadRow("wrong_type", f"content block is {type(block).__name__}")
    kind, content = block.get("type", "text"), block.get("content")
    if not isinstance(content, str):
        raise BadRow("non_string_content", f"{kind} block content is {type(content).__name__}")
    if kind not in ("text", "code", "execution"):
        raise BadRow("unknown_block_type", str(kind))
    return kind, content.replace("\r\n", "\n").replace("\r", "\n")


def _blocks(message: Any) -> list[tuple[str, str]]:
    if not isinstance(message, dict) or not isinstance(message.get("role"), str):
        raise BadRow("wrong_type", "message is not {role, content}")
    content = message.get("content")
    if isinstance(content, str):
        return [("text", content.replace("\r\n", "\n"))]
    if not isinstance(content, list):
        raise BadRow("non_string_content", f"content is {type(content).__name__}")
    return [_block_text(b) for b in content]


def _format_block(kind: str, text: str) -> str:
    # Code and its output stay visible as fenced blocks: that tool use is what the data teaches.
    if kind == "code":
        return f"```python\n{text.strip(chr(10))}\n```"
    if kind == "execution":
        return f"```output\n{text.strip(chr(10))}\n```"
    return text.strip()


def from_mathcodeinstruct(row: Any) -> Example:
    if not isinstance(row, dict):
        raise BadRow("wrong_type", f"row is {type(row).__name__}")
    messages = row.get("messages")
    if messages is None:
        raise BadRow("missing_field", "messages")
    if not isinstance(messages, list):
        raise BadRow("wrong_type", "messages is not a list")
    roles = [m.get("role") if isinstance(m, dict) else None for m in messages]
    if "user" not in roles:
        raise BadRow("no_user_turn")
    first_user = roles.index("user")
    question = "\n\n".join(t.strip() for k, t in _blocks(messages[first_user]) if t.strip())
    if not question:
        raise BadRow("empty_question")
    assistant_blocks = []
    for message, role in zip(messages[first_user + 1:], roles[first_user + 1:]):
        if role == "user":
            break  # a follow-up turn: keep the first exchange only
        if role == "assistant":
            assistant_blocks.extend(_blocks(message))
    if not assistant_blocks:
        raise BadRow("no_assistant_turn")

    boxed_at = [i for i, (k, t) in enumerate(assistant_blocks) if k == "text" and last_boxed(t) is not None]
    if not boxed_at:
        raise BadRow("no_final_answer", "no \\boxed{} in the assistant's text")
    cut = boxed_at[-1]
    reasoning = "\n\n".join(_format_block(k, t) for k, t in assistant_blocks[:cut] if t.strip())
    answer = "\n\n".join(_format_block(k, t) for k, t in assistant_blocks[cut:] if t.strip())
    if not reasoning:
        # A single text block: the paragraphs before the one with the final box are the reasoning.
        paragraphs = [p for p in answer.split("\n\n") if p.strip()]
        last = max(i for i, p in enumerate(paragraphs) if last_boxed(p) is not None) if any(
            last_boxed(p) is not None for p in paragraphs) else len(paragraphs) - 1
        reasoning = "\n\n".join(paragraphs[:last]).strip()
        answer = "\n\n".join(paragraphs[last:]).strip()
    gold = last_boxed(answer)
    if not gold:
        raise BadRow("no_final_answer", "empty \\boxed{}")
    if "\\boxed" not in question:
        question = f"{question}\n\n{INSTRUCTION}"
    return Example(question=question, reasoning=reasoning, answer=answer, gold=gold,
                   source="mathcodeinstruct", id=str(row.get("id", "")))


# --- SciBench ----------------------------------------------------------------------------------------
# Typographic minus signs and digit-group spaces that real SciBench rows use, e.g. "−2" (U+2212).
_MINUS = dict.fromkeys(map(ord, "\u2212\u2012\u2013\u2010\u2011\ufe63\uff0d"), "-")
_GROUP_SPACES = dict.fromkeys(map(ord, ", \u00a0\u2009\u202f\u2007"), None)


def plain_number(text: str) -> str:
    """'−2', '1 234.5' or '1,234.5' as a string float() reads: typographic minus signs become
    '-', and commas and (thin, no-break) spaces between digit groups go."""
    return text.strip().translate(_MINUS).translate(_GROUP_SPACES)


def split_unit(unit: str) -> tuple[str, int]:
    """('$10^{-47} \\mathrm{~kg}$') -> ('\\mathrm{~kg}', -47), as SciBench's own eval does."""
    m = _UNIT_POWER.search(unit)
    if not m:
        return unit.strip().strip("$").strip(), 0
    rest = unit[m.end():]
    return rest.strip().strip("$").strip(), int(m.group(1))


def is_answer_only(solution: str) -> bool:
    """True for a 'solution' that is only the final value with its unit, e.g. '$3.00 \\mathrm{~cm}$'.

    Worked solutions explain and calculate: they have several sentences or an '='. A short
    string with neither is a value, not reasoning.
    """
    s = solution.strip()
    return len(s.split()) < 12 and "=" not in s and "\n" not in s


def from_scibench(row: Any) -> Example:
    if not isinstance(row, dict):
        raise BadRow("wrong_type", f"row is {type(row).__name__}")
    values = {}
    for name in SCIBENCH_FIELDS:
        if name not in row or row[name] is None:
            if name == "unit":
                values[name] = ""
                continue
            raise BadRow("missing_field", name)
        if not isinstance(row[name], str):
            raise BadRow("non_string_content", f"{name} is {type(row[name]).__name__}")
        values[name] = row[name].strip()
    if not values["problem_text"]:
        raise BadRow("empty_question")
    gold = plain_number(values["answer_number"])
    try:
        value = float(gold)
    except ValueError:
        raise BadRow("bad_answer_number", repr(values["answer_number"])) from None
    if not math.isfinite(value):
        raise BadRow("bad_answer_number", f"{values['answer_number']!r} is not a finite number")
    unit, exponent = split_unit(values["unit"])
    solution = row.get("solution")
    if solution is not None and not isinstance(solution, str):
        raise BadRow("non_string_content", f"solution is {type(solution).__name__}")
    solution = (solution or "").strip()
    reasoning = "" if not solution or is_answer_only(solution) else solution

    question = values["problem_text"]
    if unit:
        question += f" The unit of the answer is {unit}."
    question += f"\n\n{INSTRUCTION}"
    value = gold if exponent == 0 else f"{gold} \\times 10^{{{exponent}}}"
    answer = f"The answer is therefore $\\boxed{{{value}}}$" + (f" ${unit}$." if unit else ".")
    subject = values["source"] or "unknown"
    return Example(question=question, reasoning=reasoning, answer=answer, gold=gold, source=f"scibench/{subject}",
                   unit=unit, unit_exponent=exponent, id=str(row.get("problemid", "")).strip())


# --- MATH-500 (HuggingFaceH4/MATH-500), the standard benchmark beside the held-out split --------------------
MATH500_FIELDS = ("problem", "answer")


def from_math500(row: Any) -> Example:
    """A MATH-500 row (problem, solution, answer, subject, level, unique_id) as an evaluation problem."""
    if not isinstance(row, dict):
        raise BadRow("wrong_type", f"row is {type(row).__name__}")
    for name in MATH500_FIELDS:
        if name not in row or row[name] is None:
            raise BadRow("missing_field", name)
        if not isinstance(row[name], str):
            raise BadRow("non_string_content", f"{name} is {type(row[name]).__name__}")
    problem, answer = row["problem"].strip(), row["answer"].strip()
    if not problem:
        raise BadRow("empty_question")
    if not answer:
        raise BadRow("no_final_answer", "empty answer")
    subject = row.get("subject") if isinstance(row.get("subject"), str) else "unknown"
    solution = row.get("solution") if isinstance(row.get("solution"), str) else ""
    return Example(question=f"{problem}\n\n{INSTRUCTION}", reasoning=solution.strip(),
                   answer=f"$\\boxed{{{answer}}}$", gold=answer, source=f"math500/{subject.lower()}",
                   id=str(row.get("unique_id", "")))


def load_math500(cfg) -> tuple[list[Example], DataReport]:
    """MATH-500's problems (its `test` split on the Hub, or a local .jsonl with the same fields), bad rows counted."""
    report = DataReport()
    counts = report.sources["math500"]
    examples = convert_rows(read_rows(cfg.math500_dataset, counts, cfg.dataset_revision, split="test"),
                            from_math500, counts)
    if not examples:
        raise DataError(f"no usable MATH-500 problems in {cfg.math500_dataset}\n{report}")
    return examples, report


def load_problem_file(path: str) -> tuple[list[Example], DataReport]:
    """Problems to grade from a local file in MathCodeInstruct's schema (the gold answer is the last \\boxed{} of
    the assistant's text), bad rows counted; e.g. the small profile's held-out sets."""
    report = DataReport()
    counts = report.sources["mathcodeinstruct"]
    from dataclasses import replace

    from llmhelpers.paths import resolve

    if not resolve(path).is_file():
        raise DataError(f"eval_set {path!r}: no such file (give a local .jsonl of problems)")
    examples = convert_rows(read_rows(str(resolve(path)), counts), from_mathcodeinstruct, counts)
    if not examples:
        raise DataError(f"no usable problems in {path}\n{report}")
    return [replace(ex, source=Path(path).stem) for ex in examples], report


# --- reading rows ------------------------------------------------------------------------------------

def percentile(xs, q: float):
    """The q-quantile of xs by nearest rank (0 for none): report lengths and thinking lengths."""
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * (len(xs) - 1) + 0.5))] if xs else 0

@dataclass
class SourceCounts:
    rows: int = 0
    bad: Counter = field(default_factory=Counter)
    empty_reasoning: int = 0
    too_long: int = 0
    tool_calls: int = 0  # examples whose reasoning runs code and shows its output
    train: int = 0
    eval: int = 0
    heldout: int = 0


@dataclass
class DataReport:
    sources: dict[str, SourceCounts] = field(default_factory=lambda: defaultdict(SourceCounts))
    lengths: list[int] = field(default_factory=list)  # token lengths of kept examples
    notes: list[str] = field(default_factory=list)
    split: bool = False  # True once build_datasets has made the train/eval/held-out split

    def percentiles(self) -> dict[str, int]:
        if not self.lengths:
            return {}
        return {"min": min(self.lengths), "p50": percentile(self.lengths, 0.5), "p90": percentile(self.lengths, 0.9),
                "p99": percentile(self.lengths, 0.99), "max": max(self.lengths)}

    def total(self, attr: str) -> int:
        return sum(getattr(c, attr) for c in self.sources.values())

    def __str__(self) -> str:
        if self.split:
            head = (f"{'source':<18}{'rows':>7}{'bad':>6}{'no-reason':>10}{'too-long':>9}{'train':>7}{'eval':>6}"
                    f"{'heldout':>8}")
        else:  # read and converted, not yet tokenized or split
            head = f"{'source':<18}{'rows':>7}{'bad':>6}{'usable':>8}"
        lines = [head, "-" * len(head)]
        for name, c in sorted(self.sources.items()):
            bad = sum(n for reason, n in c.bad.items() if reason not in FILE_REASONS)  # rows; a bad file is no row
            lines.append(f"{name:<18}{c.rows:>7}{bad:>6}" + (
                f"{c.empty_reasoning:>10}{c.too_long:>9}{c.train:>7}{c.eval:>6}{c.heldout:>8}" if self.split
                else f"{c.rows - bad:>8}"))
        for name, c in sorted(self.sources.items()):
            for reason, n in sorted(c.bad.items()):
                what = " (whole file)" if reason in FILE_REASONS else ""
                lines.append(f"  dropped from {name}: {n} x {reason}{what}")
        if self.lengths:
            lines.append("token lengths of kept examples: " +
                         ", ".join(f"{k} {v}" for k, v in self.percentiles().items()))
        lines.extend(self.notes)
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"sources": {k: {**v.__dict__, "bad": dict(v.bad)} for k, v in self.sources.items()},
                "length_percentiles": self.percentiles(), "notes": self.notes}


FILE_REASONS = frozenset({"unreadable_file", "undecodable_file", "not_json_file"})  # counted per file, not row
_BOMS = ((b"\xef\xbb\xbf", "utf-8"), (b"\xff\xfe", "utf-16"), (b"\xfe\xff", "utf-16"))


def _file_bytes(path: Path, counts: SourceCounts) -> bytes | None:
    """The file as UTF-8 bytes without a byte-order mark; a UTF-16 file (it starts with its BOM) is
    re-encoded, since editors on Windows write those."""
    try:
        raw = path.read_bytes()
    except OSError:
        counts.bad["unreadable_file"] += 1
        return None
    for bom, encoding in _BOMS:
        if raw.startswith(bom):
            if encoding == "utf-8":
                return raw[len(bom):]
            try:
                return raw.decode(encoding).encode("utf-8")
            except UnicodeDecodeError:
                counts.bad["undecodable_file"] += 1
                return None
    return raw


def _parse_row(line: bytes, counts: SourceCounts) -> tuple[bool, Any]:
    """(True, row) or (False, None) with the reason counted: one bad row never costs the others."""
    if len(line) > MAX_ROW_CHARS:
        reason = "row_too_large"
    else:
        try:
            return True, json.loads(line.decode("utf-8"))
        except UnicodeDecodeError:
            reason = "undecodable_row"
        except json.JSONDecodeError:
            reason = "invalid_json"
        except RecursionError:
            reason = "too_deeply_nested"
    counts.rows += 1
    counts.bad[reason] += 1
    return False, None


def _rows_from_file(path: Path, counts: SourceCounts) -> Iterator[Any]:
    """Rows of a .jsonl or .json file; bad rows and unusable files are counted, not raised.

    JSONL is split on b"\\n" only, as bytes: U+2028, U+2029 and U+0085 inside a string (which
    json.dumps(ensure_ascii=False) writes) are not line breaks, and a line that is not UTF-8 is one
    bad row, not a bad file.
    """
    raw = _file_bytes(path, counts)
    if raw is None:
        return
    if path.suffix == ".json":
        data = _load_json_file(raw, counts)
        if data is None:
            return
        if isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), list):
            data = next(iter(data.values()))  # {"train": [...]} or {"data": [...]}
        if not isinstance(data, list):
            counts.bad["not_json_file"] += 1
            return
        yield from data
        return
    for line in raw.split(b"\n"):
        line = line.rstrip(b"\r")
        if not line.strip():
            continue
        ok, row = _parse_row(line, counts)
        if ok:
            yield row


def _load_json_file(raw: bytes, counts: SourceCounts) -> Any:
    """A whole .json file: its rows cannot be told apart before it parses, so it is one unit."""
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        counts.bad["undecodable_file"] += 1
    except (json.JSONDecodeError, RecursionError):
        counts.bad["not_json_file"] += 1
    return None


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def read_rows(spec: str, counts: SourceCounts, revision: str | None = None, split: str = "train") -> Iterable[Any]:
    """Rows from a local .json/.jsonl file or folder of them, else the `train` split from the Hugging Face Hub
    (or `split`; returned as a datasets.Dataset, so that sampling 15k of 80k rows never materialises them all).

    Only `owner/name` whose first part is not a local folder is taken for a Hub id; anything else that
    does not exist is a missing file, and the error names it."""
    path = resolve(spec)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in (".json", ".jsonl") and p.is_file())
        if not files:
            raise FileNotFoundError(f"{path} holds no .json or .jsonl files")
        return (row for f in files for row in _rows_from_file(f, counts))
    if path.exists():
        if not path.is_file():  # a pipe or a device: reading it could block forever or never end
            raise DataError(f"data source {spec!r} is not a regular file ({path} is a pipe, socket or device): "
                            "give a .json or .jsonl file, a folder of them, or a Hub dataset id")
        if path.suffix not in (".json", ".jsonl"):
            counts.bad["not_json_file"] += 1
            return []
        return _rows_from_file(path, counts)
    if not _HUB_ID.match(spec) or spec.endswith((".json", ".jsonl")) or resolve(spec.split("/")[0]).exists():
        raise FileNotFoundError(f"data file {spec!r} does not exist (looked in {Path.cwd()} and the project folder)")
    from datasets import load_dataset

    try:
        return load_dataset(spec, split=split, revision=revision)
    except Exception as err:  # network, auth, or no such dataset: say both things it could have been
        raise FileNotFoundError(f"{spec!r} is not a local file (looked in {Path.cwd()}), and loading it as a Hub "
                                f"dataset failed: {type(err).__name__}: {err}") from err


def convert_rows(rows: Iterable[Any], convert: Callable[[Any], Example], counts: SourceCounts,
                 limit: int = 0) -> list[Example]:
    """Convert rows until `limit` good examples (0 = all), counting each bad row by reason."""
    out = []
    for row in rows:
        counts.rows += 1
        try:
            if len(json.dumps(row, default=str)) > MAX_ROW_CHARS:
                raise BadRow("row_too_large")
            out.append(convert(row))
        except BadRow as err:
            counts.bad[err.reason] += 1
        except RecursionError:
            counts.bad["too_deeply_nested"] += 1
        if limit and len(out) >= limit:
            break
    return out


# --- the training set ----------------------------------------------------------------------------------
@dataclass
class DataBundle:
    train: Any  # datasets.Dataset with input_ids, completion_mask
    eval: Any
    train_examples: list[Example]
    eval_examples: list[Example]
    heldout: list[Example]  # SciBench problems without a worked solution: accuracy only
    report: DataReport
    key: tuple | None = None  # data_key(cfg) of the config it was built with


def data_key(cfg) -> tuple:
    """The settings a DataBundle depends on: a config that differs here needs the data built again."""
    return (cfg.math_dataset, cfg.science_dataset, cfg.dataset_revision, cfg.math_samples, cfg.science_samples,
            cfg.max_example_tokens, cfg.eval_fraction, cfg.heldout_max, cfg.allow_one_source, cfg.seed, cfg.mask_tool_output)


def _shuffled(rows: Iterable[Any], seed: int) -> Iterable[Any]:
    if hasattr(rows, "shuffle") and hasattr(rows, "column_names"):  # a datasets.Dataset: lazy index shuffle
        return rows.shuffle(seed=seed)
    rows = list(rows)
    random.Random(seed).shuffle(rows)
    return rows


@dataclass
class LoadedExamples:
    math: list[Example]
    science: list[Example]
    report: DataReport
    key: tuple  # the settings they were loaded with


def _source_key(cfg) -> tuple:
    return (cfg.math_dataset, cfg.science_dataset, cfg.dataset_revision, cfg.math_samples, cfg.seed)


def load_examples(cfg) -> LoadedExamples:
    """Read and convert both sources, counting bad rows; no tokenizer or model needed.

    Raises a clear error when no row at all is usable, so bad data fails before anything heavy loads.
    """
    report = DataReport()
    math_counts, sci_counts = report.sources["mathcodeinstruct"], report.sources["scibench"]
    math = convert_rows(_shuffled(read_rows(cfg.math_dataset, math_counts, cfg.dataset_revision), cfg.seed),
                        from_mathcodeinstruct, math_counts, cfg.math_samples)
    sci = convert_rows(_shuffled(read_rows(cfg.science_dataset, sci_counts, cfg.dataset_revision), cfg.seed),
                       from_scibench, sci_counts)
    if not any(ex.reasoning.strip() for ex in math + sci):
        raise DataError(f"no usable training examples: every row is bad or has no reasoning\n{report}")
    for name, spec, kept in (("mathcodeinstruct", cfg.math_dataset, math), ("scibench", cfg.science_dataset, sci)):
        if not kept and not cfg.allow_one_source:
            raise DataError(
                f"the {name} source ({spec}) yielded no usable rows, so the run would train on the other source "
                f"alone. Fix the file, or set allow_one_source=True to do that on purpose.\n{report}")
        if not kept:
            report.notes.append(f"{name} ({spec}) yielded no usable rows; allow_one_source=True, so it is left out")
    return LoadedExamples(math, sci, report, _source_key(cfg))


def build_datasets(cfg, tokenizer, loaded: LoadedExamples | None = None) -> DataBundle:
    """Tokenized train/eval sets, the held-out set and the report. `loaded` (from load_examples) is
    reused if it was loaded with the same data settings, else the sources are read again."""
    import copy

    from datasets import Dataset

    if loaded is None or loaded.key != _source_key(cfg):
        loaded = load_examples(cfg)
    report = copy.deepcopy(loaded.report)
    math_counts, sci_counts = report.sources["mathcodeinstruct"], report.sources["scibench"]
    math, sci = loaded.math, loaded.science

    pool: list[tuple[Example, dict]] = []
    heldout: list[Example] = []
    for ex in math + sci:
        counts = math_counts if ex.source == "mathcodeinstruct" else sci_counts
        if not ex.reasoning.strip():
            counts.empty_reasoning += 1
            if ex.numeric:  # a SciBench problem without a worked solution: test it, don't train on it
                heldout.append(ex)
            continue
        features = encode(ex, tokenizer, cfg.mask_tool_output)
        if "```output" in ex.reasoning:
            counts.tool_calls += 1
        if len(features["input_ids"]) > cfg.max_example_tokens:
            counts.too_long += 1
            continue
        pool.append((ex, features))
    sci_pool = [p for p in pool if p[0].numeric]
    if cfg.science_samples and len(sci_pool) > cfg.science_samples:
        drop = {id(p[0]) for p in sci_pool[cfg.science_samples:]}
        pool = [p for p in pool if id(p[0]) not in drop]
        report.notes.append(f"science_samples={cfg.science_samples}: {len(drop)} SciBench examples not used")
    if cfg.heldout_max:
        heldout = heldout[:cfg.heldout_max]

    if len(pool) < 2:
        raise DataError(f"no usable training examples (need at least 2, got {len(pool)}):\n{report}")
    random.Random(cfg.seed).shuffle(pool)
    n_eval = max(1, round(len(pool) * cfg.eval_fraction))
    eval_part, train_part = pool[:n_eval], pool[n_eval:]
    for part, attr in ((train_part, "train"), (eval_part, "eval")):
        for ex, _ in part:
            counts = sci_counts if ex.numeric else math_counts
            setattr(counts, attr, getattr(counts, attr) + 1)
    sci_counts.heldout = len(heldout)
    tools = report.total("tool_calls")
    if tools:
        report.notes.append(f"{tools} examples run code and show its output; the output blocks are "
                            + ("masked from the loss (mask_tool_output=True)" if cfg.mask_tool_output
                               else "trained on (mask_tool_output=False)"))
    report.split = True
    report.lengths = [len(f["input_ids"]) for _, f in pool]

    def to_dataset(part):
        dataset = Dataset.from_dict({"input_ids": [f["input_ids"] for _, f in part],
                                     "completion_mask": [f["completion_mask"] for _, f in part]})
        dataset.llm_data_key = data_key(cfg)  # the trainer keeps it: TrainingRun can name the data cell as stale
        return dataset

    return DataBundle(train=to_dataset(train_part), eval=to_dataset(eval_part),
                      train_examples=[e for e, _ in train_part], eval_examples=[e for e, _ in eval_part],
                      heldout=heldout, report=report, key=data_key(cfg))


def demo_examples() -> list[Example]:
    """Three bundled problems for quick before/after looks: code-using math, a unit with a power
    of ten, and a plain science question."""
    from llmhelpers.paths import samples_dir

    def rows(name):
        return [json.loads(line) for line in (samples_dir() / name).read_text(encoding="utf-8").splitlines()]

    math = from_mathcodeinstruct(rows("mathcodeinstruct.jsonl")[0])
    sci = [from_scibench(r) for r in rows("scibench.jsonl")]
    powered = next(e for e in sci if e.unit_exponent != 0)
    plain = next(e for e in sci if e.unit_exponent == 0 and e.reasoning)
    return [math, powered, plain]
