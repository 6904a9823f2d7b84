"""Tool-integrated generation: the Python interpreter that MathCodeInstruct's solutions assume.

In the data, the model writes a ```python block and opens an output fence; the interpreter writes what follows (the
output and the closing fence). At inference the same happens here: when an answer's text ends with "```output\\n"
after a python block, its generation pauses, the block runs in that answer's own `Sandbox` (state persists across the
answer's blocks, as in MathCoder's inference), and the real output plus the closing fence are appended before the
model continues.

- **Concurrency.** Blocks run on a thread pool (`workers` threads, each waiting on its sandbox process), so
  several answers' code runs at once while the engine keeps decoding the other answers (`Engine.run`'s pause
  hook takes the Future).
- **Limits.** `max_calls` executions per answer (after that the output says so and nothing runs), the sandbox's
  timeout, CPU, memory and output limits, and at most `max_sandboxes` interpreter processes alive at once: the least
  recently used is closed and, if its answer runs code again, rebuilt by re-running that answer's earlier blocks
  (their outputs are discarded).
- **Records.** Per answer: the executed blocks (code, output, ok, timed out), calls, errors and timeouts.

`ToolRunner` plugs into the engine (`on_token`, `on_pause`, `on_finish`) and into rounds of `model.generate`
(`llmhelpers.inference.generation`, for 4-bit or adapter-wrapped models).
"""
from __future__ import annotations

import dataclasses

import os
import re
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

from llmhelpers.data.chat import clip_text
from llmhelpers.inference.scheduler import PAUSE
from llmhelpers.inference.generation import end_think_id, generation_record, hf_generate
from llmhelpers.inference.sandbox import Sandbox, safe_text, truncation_note

OUTPUT_FENCE = re.compile(r"```output[ \t]*\n\s*\Z")  # the model has just opened an output block
CODE_BEFORE_FENCE = re.compile(r"```python[ \t]*\n(.*?)```[ \t]*\n\s*```output[ \t]*\n\s*\Z", re.DOTALL)
BLOCK_START = re.compile(r"(?:^|(?<=\n))```python[ \t]*\n")  # a python block opens at the start of a line
CLOSING = "\n```"  # what the interpreter writes after the output (the data's format: see data._format_block)


@dataclass
class ToolRun:
    code: str
    output: str
    ok: bool
    timed_out: bool = False


@dataclass
class AnswerTools:
    """What the interpreter did for one answer."""
    runs: list[ToolRun] = field(default_factory=list)
    calls: int = 0
    errors: int = 0  # blocks that raised, timed out, had no code, or went past the call limit
    timeouts: int = 0


def code_to_run(text: str) -> str | None:
    """The python block to execute when `text` ends with an opened output fence: "" if no python block precedes the
    fence, None if the text does not end with one."""
    if not OUTPUT_FENCE.search(text):
        return None
    # the last python block, right before it: the last opener at the start of a line (code may contain the text
    # "```python" in a string), and, failing that, any opener
    starts = [m.start() for m in BLOCK_START.finditer(text)] or [max(0, text.rfind("```python"))]
    m = CODE_BEFORE_FENCE.match(text, starts[-1])
    return m.group(1) if m else ""


class ToolRunner:
    def __init__(self, tokenizer, timeout: float = 10.0, max_calls: int = 8, workers: int = 0,
                 max_sandboxes: int = 64, max_output_chars: int = 2000):
        self.tokenizer = tokenizer
        self.timeout, self.max_calls, self.max_output_chars = timeout, max_calls, max_output_chars
        self.max_output_tokens = max_output_chars  # a token is a character or more: the character cap binds first, mostly
        self.workers = workers or min(16, max(1, (os.cpu_count() or 2) - 1))  # a core stays with the decode loop
        self.max_sandboxes = max(1, max_sandboxes)
        # cache room per answer for appended outputs (engine path): an answer whose outputs need more stops early
        # and counts as having hit its budget
        self.reserve_tokens = 1024
        self.records: dict[int, AnswerTools] = {}  # id(request or row) -> record
        self._history: dict[int, list[str]] = {}  # blocks each answer ran, to rebuild an evicted sandbox
        self._live: OrderedDict[int, Sandbox] = OrderedDict()
        self._busy: set[int] = set()
        self._lock = threading.Lock()
        self._tokenizer_lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        # tokens whose text holds a newline: only after one of them can the text end with an opened output fence
        vocab = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
        self._newline_ids = {i for i, t in enumerate(vocab) if t and ("Ċ" in t or "\n" in t)}

    @classmethod
    def from_config(cls, tokenizer, cfg) -> "ToolRunner":
        return cls(tokenizer, timeout=cfg.tool_timeout, max_calls=cfg.tool_max_calls, workers=cfg.tool_workers,
                   max_sandboxes=cfg.tool_max_sandboxes)

    # --- lifecycle ---
    def __enter__(self) -> "ToolRunner":
        self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="tool")
        return self

    def __exit__(self, *exc) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        with self._lock:
            boxes = list(self._live.values())
            self._live.clear()
        for box in boxes:
            box.close()

    # --- engine hooks ---
    def on_token(self, request, tokens: list[int]):
        if tokens[-1] not in self._newline_ids:
            return None
        with self._tokenizer_lock:
            tail = self.tokenizer.decode(tokens[-8:], skip_special_tokens=True)
        return PAUSE if OUTPUT_FENCE.search(tail) else None

    def on_pause(self, request, tokens: list[int]) -> Future:
        with self._tokenizer_lock:
            text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        return self.submit(id(request), text)

    def on_finish(self, request) -> None:
        self.release(id(request))

    # --- running blocks ---
    def submit(self, key: int, text: str) -> Future:
        """Run the block that `text` ends with (in the answer `key`'s sandbox); a Future of the ids to append."""
        if self._pool is None:
            raise RuntimeError("use the ToolRunner as a context manager: `with ToolRunner(tokenizer) as tools:`")
        return self._pool.submit(self._execute, key, code_to_run(text))

    def execute(self, key: int, text: str) -> list[int]:
        return self.submit(key, text).result()

    def _execute(self, key: int, code: str | None) -> list[int]:
        """The ids to append; never raises: whatever goes wrong with one block is that answer's error, written
        into its output, and every other answer goes on."""
        try:
            return self._run_block(key, code)
        except Exception as err:
            self.release(key)
            record = self.records.setdefault(key, AnswerTools())
            run = ToolRun(code or "", f"Error: the tool call failed ({type(err).__name__}); its state is lost",
                          ok=False)
            record.runs.append(run)
            record.errors += 1
            return self._output_ids(run.output)

    def _tokenize(self, text: str) -> list[int]:
        # Special tokens are split: printed text that spells "<｜end▁of▁sentence｜>" is text, not an eos that would
        # end the answer. Lone surrogates are escaped (the tokenizer rejects them).
        with self._tokenizer_lock:  # a fast tokenizer's settings are mutable state: one thread at a time
            return self.tokenizer(safe_text(text), add_special_tokens=False,
                                  split_special_tokens=True)["input_ids"]

    def _run_block(self, key: int, code: str | None) -> list[int]:
        record = self.records.setdefault(key, AnswerTools())
        if code is None or not code.strip():
            run = ToolRun("", "Error: no ```python block before this output block: nothing was run", ok=False)
        elif record.calls >= self.max_calls:
            run = ToolRun(code, f"Error: the limit of {self.max_calls} code executions per answer was reached: "
                                "this block was not run", ok=False)
        else:
            record.calls += 1
            try:
                result = self._sandbox(key).run(code)
                run = ToolRun(code, result.output, result.ok, result.timed_out)
            except Exception as err:  # the interpreter broke its protocol (e.g. the code wrote to its reply pipe)
                self.release(key)
                run = ToolRun(code, f"Error: the interpreter failed ({type(err).__name__}: {err}); its state is lost",
                              ok=False)
                result = run
            finally:
                with self._lock:
                    self._busy.discard(key)
            if result.ok:
                self._history.setdefault(key, []).append(code)
        record.runs.append(run)
        record.errors += not run.ok
        record.timeouts += run.timed_out
        return self._output_ids(run.output)

    def _output_ids(self, output: str) -> list[int]:
        """The ids appended after the output fence: the output and the closing fence, tokenized together as in the
        training data, with the output cut at `max_output_tokens` (a cap on what the answer's context receives,
        whatever the interpreter replied)."""
        ids = self._tokenize(output + CLOSING)
        if len(ids) <= self.max_output_tokens + 8:
            return ids
        return (self._tokenize(output)[:self.max_output_tokens]
                + self._tokenize(truncation_note(self.max_output_tokens, "tokens") + CLOSING))

    def _sandbox(self, key: int) -> Sandbox:
        """The answer's sandbox (marked busy), started or rebuilt if needed; the least recently used idle one is
        closed when more than max_sandboxes are alive."""
        evicted = []
        with self._lock:
            self._busy.add(key)
            box = self._live.pop(key, None)
            fresh = box is None
            if fresh:
                box = Sandbox(timeout=self.timeout, cpu_seconds=int(self.timeout) + 2,
                              max_output_chars=self.max_output_chars)
            self._live[key] = box
            for other in list(self._live):
                if len(self._live) <= self.max_sandboxes:
                    break
                if other not in self._busy:
                    evicted.append(self._live.pop(other))
        for old in evicted:
            old.close()
        if fresh:
            for earlier in self._history.get(key, []):  # rebuild the state of an evicted sandbox
                box.run(earlier)
        return box

    def release(self, key: int) -> None:
        """The answer ended: close its sandbox (on the pool, so that the caller does not wait)."""
        self._history.pop(key, None)
        with self._lock:
            box = self._live.pop(key, None)
        if box is not None:
            try:
                self._pool.submit(box.close)
            except (AttributeError, RuntimeError):  # no pool, or it is shutting down: close here
                box.close()

    def generate_in_rounds(self, model, tokenizer, ids, sampling, batch_size, progress) -> list:
        """Tool use on the model.generate path (4-bit or adapter-wrapped models), in rounds: generate until eos, the
        budget or an opened output fence; run the fenced blocks of all paused answers concurrently; append their
        outputs and generate again from there (the context is prefilled again each round)."""
        new: list[list[int]] = [[] for _ in ids]
        keys = [(id(new), i) for i in range(len(ids))]  # unique per call: one runner may serve several calls
        appended = [0] * len(ids)
        spans: list[list[tuple[int, int]]] = [[] for _ in ids]
        hit = [False] * len(ids)
        live = list(range(len(ids)))
        while live:
            budgets = {i: sampling.max_new_tokens - (len(new[i]) - appended[i]) for i in live}
            this_round = dataclasses.replace(sampling, max_new_tokens=max(budgets.values()))
            rounds = hf_generate(model, tokenizer, [ids[i] + new[i] for i in live], this_round, batch_size, progress,
                                 stop_strings=["```output\n"], raw=True)
            paused = {}
            for i, (row, stopped) in zip(live, rounds):
                row = row[:budgets[i]]
                stopped = stopped and len(row) < budgets[i]
                text = tokenizer.decode(new[i] + row, skip_special_tokens=True)
                new[i] += row
                if OUTPUT_FENCE.search(text) and len(row) < budgets[i]:
                    paused[i] = self.submit(keys[i], text)
                elif stopped:
                    new[i].append(tokenizer.eos_token_id)
                else:
                    hit[i] = True
            for i, future in paused.items():
                extra = future.result()
                spans[i].append((len(new[i]), len(extra)))
                new[i] += extra
                appended[i] += len(extra)
            live = list(paused)
        for key in keys:
            self.release(key)
        end_think = end_think_id(tokenizer)
        return [generation_record(tokenizer, row, end_think, hit[i]).with_tools(self.record(keys[i]), appended[i],
                                                                                spans[i])
                for i, row in enumerate(new)]

    def record(self, key) -> AnswerTools:
        return self.records.get(key, AnswerTools())


def tool_runner(tokenizer, cfg, on: bool | None = None):
    """A context manager giving a ToolRunner built from cfg when tool execution is on (`on`, default
    cfg.tool_execution), else None: `with tool_runner(tok, cfg) as tools: generate(..., tools=tools)`."""
    from contextlib import nullcontext

    use = cfg.tool_execution if on is None else on
    return ToolRunner.from_config(tokenizer, cfg) if use else nullcontext()


EXECUTED = "[executed in the sandbox]"  # how displays mark output that the interpreter, not the model, wrote


def tool_runs_text(runs: list[ToolRun], width: int = 300) -> str:
    """The executed blocks of one answer, each code block followed by its real output, marked as executed."""
    if not runs:
        return "  (no code executed)"
    clip = lambda s: clip_text(s, width)
    lines = []
    for i, run in enumerate(runs, 1):
        status = "timed out" if run.timed_out else ("ok" if run.ok else "error")
        lines.append(f"  block {i} ({status}):\n" + "\n".join("    " + l for l in clip(run.code).splitlines()))
        lines.append(f"  {EXECUTED} output:\n" + "\n".join("    " + l for l in clip(run.output).splitlines()))
    return "\n".join(lines)


def replay_first_block(example, tools: ToolRunner) -> str:
    """What tool execution does, on a training example: its reasoning up to the first opened output fence, then the
    real output of the code before it (marked), beside the output the data itself recorded."""
    from llmhelpers.data.chat import TOOL_OUTPUT

    m = TOOL_OUTPUT.search(example.reasoning)
    if m is None:
        return "this example runs no code"
    upto = example.reasoning[:m.start(1)]
    ids = tools.execute(("replay", id(example)), upto)
    tools.release(("replay", id(example)))
    real = tools.tokenizer.decode(ids)
    recorded = m.group(1)[:-len("```")].rstrip("\n")
    return (f"{upto}{EXECUTED}\n{real}\n\n"
            f"(the data recorded: {recorded!r}; the sandbox printed: {real[:-len(CLOSING)]!r})")
