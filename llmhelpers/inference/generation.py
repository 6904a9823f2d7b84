"""Batched generation from rendered prompts, with thinking and answer shown apart."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from llmhelpers.data.chat import END_THINK
from llmhelpers.inference.sampling import SamplingParams


@dataclass
class Generation:
    text: str  # the new text, special tokens removed (<think> and </think> are kept)
    new_tokens: int  # tokens generated up to and including eos
    hit_budget: bool  # stopped by max_new_tokens rather than by eos
    thinking_tokens: int = 0  # tokens before </think>, or all of them if it never came
    tool_runs: list = field(default_factory=list)  # ToolRun per executed block (tool_use), in order
    tool_calls: int = 0
    tool_errors: int = 0
    tool_timeouts: int = 0
    appended_tokens: int = 0  # interpreter output inside new_tokens (written by the tool, not the model)
    ids: list = field(default_factory=list)  # the new token ids (new_tokens of them), eos included when it came
    appended_spans: list = field(default_factory=list)  # (start, length) in ids of each interpreter output

    def with_tools(self, record, appended: int, spans=()) -> "Generation":
        self.tool_runs, self.tool_calls = list(record.runs), record.calls
        self.tool_errors, self.tool_timeouts, self.appended_tokens = record.errors, record.timeouts, appended
        self.appended_spans = [(start, length) for start, length in spans if start < self.new_tokens]
        return self

    def model_token_mask(self) -> list[int]:
        """1 for each id the model generated, 0 for the interpreter's output (left out of a policy loss)."""
        mask = [1] * len(self.ids)
        for start, length in self.appended_spans:
            mask[start:start + length] = [0] * len(mask[start:start + length])
        return mask


def _raw_row(tokenizer, row: list[int]) -> tuple[list[int], bool]:
    """A batch row's new ids before the first eos or pad, and whether one came (a row that stopped early is padded,
    and for R1 the pad id is eos: a stop-string stop and an eos look alike here)."""
    ends = [row.index(t) for t in {tokenizer.eos_token_id, tokenizer.pad_token_id} if t is not None and t in row]
    return (row[:min(ends)], True) if ends else (row, False)


def end_think_id(tokenizer) -> int | None:
    """The id of `</think>` when it is one token (R1's tokenizer); None where it is text of several tokens (a
    tokenizer without R1's markers, e.g. SmolLM2's: the project keeps the markers as text there)."""
    i = tokenizer.convert_tokens_to_ids(END_THINK)
    return i if isinstance(i, int) and i != tokenizer.unk_token_id and tokenizer.convert_ids_to_tokens(i) == END_THINK \
        else None


def thinking_length(tokenizer, row: list[int], end_think: int | None) -> int:
    """Tokens before `</think>` in `row`, or len(row) when it never came."""
    if end_think is not None:
        return row.index(end_think) if end_think in row else len(row)
    pieces = tokenizer.convert_ids_to_tokens(row)  # the marker has no space or byte that a tokenizer would rewrite
    at = "".join(pieces).find(END_THINK)
    if at < 0:
        return len(row)
    for i, piece in enumerate(pieces):
        at -= len(piece)
        if at < 0:
            return i  # the token in which the marker starts
    return len(row)


def generation_record(tokenizer, row: list[int], end_think: int | None, hit: bool | None = None) -> Generation:
    """One answer's record from its new token ids (cut after eos when the row runs on past it)."""
    if tokenizer.eos_token_id in row:
        n, stopped = row.index(tokenizer.eos_token_id) + 1, True
    else:
        n, stopped = len(row), False
    think = thinking_length(tokenizer, row[:n], end_think)
    return Generation(tokenizer.decode(row[:n], skip_special_tokens=True), n,
                      (not stopped) if hit is None else hit, think, ids=list(row[:n]))


def generate(model, tokenizer, prompts: list[str], sampling: SamplingParams, batch_size: int = 0,
             progress: bool = False, samples: int = 1, tools=None, kv_cache_dtype: str = "auto",
             decode_kernels: bool = True) -> list[Generation]:
    """Generate `samples` answers for every prompt (prompt-major order: all samples of prompt 0 first), drawn with
    `sampling` (budget, temperature, top-p, seed).

    With `tools` (an open `llmhelpers.inference.tool_use.ToolRunner`), python blocks followed by an output fence are executed
    and their real output is appended before generation continues; each Generation records its tool runs.

    Qwen2 and Llama models with plain weights (bf16/fp32, base or merged) run on the continuous-batching engine
    (`llmhelpers.inference.engine`): finished answers free their slot at once, and on a GPU the decode step is a CUDA
    graph. Other models (4-bit, adapters attached: the training model) use `model.generate` in batches of
    prompts of similar length. batch_size 0 sizes the batch (or the engine's slots) to free GPU memory.
    `kv_cache_dtype="fp8"` keeps the engine's KV cache in float8 (about half the bytes: twice the slots); the
    model.generate path keeps its own cache and says so. `decode_kernels=False` runs the engine's decode steps through
    the model's own modules instead of its fused kernels (which run on a GPU only).
    """
    import llmhelpers.inference.engine as engine

    ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]  # the template put the bos
    if engine.supports(model):
        return _engine_generate(model, tokenizer, ids, sampling, batch_size, progress, samples, tools, kv_cache_dtype,
                                decode_kernels)
    if kv_cache_dtype != "auto":
        print(f"kv_cache_dtype={kv_cache_dtype!r} applies to the engine only: this model (4-bit or with adapters "
              "attached) generates through model.generate with its own cache")
    if sampling.seed is not None:
        import torch

        torch.manual_seed(sampling.seed)
    flat = [i for i in ids for _ in range(samples)]
    if not batch_size:  # model.generate keeps its own cache and logits: a smaller share than the engine's
        from llmhelpers.inference.engine import auto_slots

        batch_size = auto_slots(model, max(map(len, ids), default=0) + sampling.max_new_tokens, share=0.7, cap=256)
    if tools is not None:  # rounds of model.generate, paused at each output fence (tool_use.ToolRunner)
        return tools.generate_in_rounds(model, tokenizer, flat, sampling, batch_size, progress)
    return hf_generate(model, tokenizer, flat, sampling, batch_size, progress)


_SAID: set = set()  # the reasons already printed why the fused decode kernels do not apply


def _engine_generate(model, tokenizer, ids, sampling, slots, progress, samples, tools=None,
                     kv_cache_dtype: str = "auto", decode_kernels: bool = True) -> list[Generation]:
    from llmhelpers.inference.engine import Engine, auto_slots
    from llmhelpers.inference.scheduler import Request

    budget = sampling.max_new_tokens
    # appended tool output takes cache room beyond the generated budget
    max_len = max(map(len, ids), default=0) + budget + 1 + (tools.reserve_tokens if tools else 0)
    requests = [Request(i, budget, key=(n, s)) for n, i in enumerate(ids) for s in range(samples)]
    slots = min(len(requests), slots or auto_slots(model, max_len, kv_cache_dtype=kv_cache_dtype)) or 1
    eng = Engine(model, slots=slots, max_len=max_len, kv_cache_dtype=kv_cache_dtype,
                 elementwise=None if decode_kernels else "model")
    if decode_kernels and eng.device.type == "cuda" and eng.elementwise != "triton" \
            and eng.decode_kernels_refusal not in _SAID:
        _SAID.add(eng.decode_kernels_refusal)  # once per reason and process: an evaluation generates three times
        print(f"the engine decodes through the model's modules, not its fused kernels (slower): the kernels "
              f"{eng.decode_kernels_refusal}")
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(requests), desc=f"generating ({slots} slots)", unit="answer")
        started = time.perf_counter()

        def report(done, generated):
            bar.n = done
            bar.set_postfix_str(f"{generated / max(time.perf_counter() - started, 1e-9):,.0f} tok/s", refresh=False)
            bar.refresh() if generated % (50 * slots) < slots else None
    was_training = model.training
    model.eval()
    try:
        hooks = dict(on_token=tools.on_token, on_pause=tools.on_pause, on_finish=tools.on_finish) if tools else {}
        eng.run(requests, sampling, eos=tokenizer.eos_token_id, progress=report if bar else None, **hooks)
    finally:
        if bar:
            bar.n = len(requests)
            bar.close()
        if was_training:
            model.train()
    end_think = end_think_id(tokenizer)
    out = [generation_record(tokenizer, r.new_ids, end_think, r.hit_budget) for r in requests]
    if tools is not None:
        out = [g.with_tools(tools.record(id(r)), r.appended, r.appended_spans) for g, r in zip(out, requests)]
    return out


def hf_generate(model, tokenizer, ids: list[list[int]], sampling: SamplingParams, batch_size: int, progress: bool,
                stop_strings=None, raw: bool = False):
    """Generations, or with raw=True each row as `_raw_row` gives it."""
    import torch

    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    results: list[Generation | None] = [None] * len(ids)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc="generating", unit="batch")
    tokenizer.padding_side = "left"
    end_think = end_think_id(tokenizer)
    for batch in batches:
        enc = tokenizer.pad({"input_ids": [ids[i] for i in batch]}, return_tensors="pt").to(device)
        stop = dict(stop_strings=stop_strings, tokenizer=tokenizer) if stop_strings else {}
        with torch.inference_mode():
            out = model.generate(**enc, max_new_tokens=sampling.max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                                 eos_token_id=tokenizer.eos_token_id, use_cache=True, **sampling.generate_kwargs(),
                                 **stop)
        new = out[:, enc["input_ids"].shape[1]:]
        for row, i in zip(new.tolist(), batch):
            results[i] = _raw_row(tokenizer, row) if raw else generation_record(tokenizer, row, end_think)
    if was_training:
        model.train()
    return results  # type: ignore[return-value]
