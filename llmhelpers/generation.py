"""Batched generation from rendered prompts, with thinking and answer shown apart."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from .chat import END_THINK, render_prompt, split_thinking


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

    def with_tools(self, record, appended: int) -> "Generation":
        self.tool_runs, self.tool_calls = list(record.runs), record.calls
        self.tool_errors, self.tool_timeouts, self.appended_tokens = record.errors, record.timeouts, appended
        return self


def _raw_row(tokenizer, row: list[int]) -> tuple[list[int], bool]:
    """A batch row's new ids before the first eos or pad, and whether one came (a row that stopped early is padded,
    and for R1 the pad id is eos: a stop-string stop and an eos look alike here)."""
    ends = [row.index(t) for t in {tokenizer.eos_token_id, tokenizer.pad_token_id} if t is not None and t in row]
    return (row[:min(ends)], True) if ends else (row, False)


def _generation(tokenizer, row: list[int], end_think: int, hit: bool | None = None) -> Generation:
    """One answer's record from its new token ids (cut after eos when the row runs on past it)."""
    if tokenizer.eos_token_id in row:
        n, stopped = row.index(tokenizer.eos_token_id) + 1, True
    else:
        n, stopped = len(row), False
    think = row.index(end_think) if end_think in row[:n] else n
    return Generation(tokenizer.decode(row[:n], skip_special_tokens=True), n,
                      (not stopped) if hit is None else hit, think)


def generate(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int = 0,
             do_sample: bool = False, temperature: float = 0.6, top_p: float = 0.95,
             progress: bool = False, seed: int | None = None, samples: int = 1, tools=None) -> list[Generation]:
    """Generate `samples` answers for every prompt (prompt-major order: all samples of prompt 0 first).

    With `tools` (an open `llmhelpers.tool_use.ToolRunner`), python blocks followed by an output fence are executed
    and their real output is appended before generation continues; each Generation records its tool runs.

    Qwen2 models with plain weights (bf16/fp32, base or merged) run on the continuous-batching engine
    (`llmhelpers.engine`): finished answers free their slot at once, and on a GPU the decode step is a CUDA
    graph. Other models (4-bit, adapters attached: the training model) use `model.generate` in batches of
    prompts of similar length. batch_size 0 sizes the batch (or the engine's slots) to free GPU memory.
    """
    from . import engine

    ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]  # the template put the bos
    if engine.supports(model):
        return _engine_generate(model, tokenizer, ids, max_new_tokens, batch_size, do_sample, temperature, top_p,
                                progress, seed, samples, tools)
    if seed is not None:
        import torch

        torch.manual_seed(seed)
    flat = [i for i in ids for _ in range(samples)]
    batch_size = batch_size or auto_batch_size(model, max(map(len, ids), default=0) + max_new_tokens)
    if tools is not None:
        return _hf_generate_with_tools(model, tokenizer, flat, max_new_tokens, batch_size, do_sample, temperature,
                                       top_p, progress, tools)
    return _hf_generate(model, tokenizer, flat, max_new_tokens, batch_size, do_sample, temperature, top_p, progress)


def _engine_generate(model, tokenizer, ids, max_new_tokens, slots, do_sample, temperature, top_p, progress, seed,
                     samples, tools=None) -> list[Generation]:
    from .engine import Engine, Request, Sampling, auto_slots

    # appended tool output takes cache room beyond the generated budget
    max_len = max(map(len, ids), default=0) + max_new_tokens + 1 + (tools.reserve_tokens if tools else 0)
    requests = [Request(i, max_new_tokens, key=(n, s)) for n, i in enumerate(ids) for s in range(samples)]
    slots = min(len(requests), slots or auto_slots(model, max_len)) or 1
    eng = Engine(model, slots=slots, max_len=max_len)
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
        eng.run(requests, Sampling(greedy=not do_sample, temperature=temperature, top_p=top_p),
                eos=tokenizer.eos_token_id, seed=seed, progress=report if bar else None, **hooks)
    finally:
        if bar:
            bar.n = len(requests)
            bar.close()
        if was_training:
            model.train()
    end_think = tokenizer.convert_tokens_to_ids(END_THINK)
    out = [_generation(tokenizer, r.new_ids, end_think, r.hit_budget) for r in requests]
    if tools is not None:
        out = [g.with_tools(tools.record(id(r)), r.appended) for g, r in zip(out, requests)]
    return out


def _hf_generate(model, tokenizer, ids: list[list[int]], max_new_tokens: int, batch_size: int, do_sample: bool,
                 temperature: float, top_p: float, progress: bool, stop_strings=None, raw: bool = False):
    """Generations, or with raw=True each row as `_raw_row` gives it."""
    import torch

    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    results: list[Generation | None] = [None] * len(ids)
    device = next(model.parameters()).device
    sampling = dict(do_sample=True, temperature=temperature, top_p=top_p) if do_sample else dict(do_sample=False)
    was_training = model.training
    model.eval()
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc="generating", unit="batch")
    tokenizer.padding_side = "left"
    end_think = tokenizer.convert_tokens_to_ids(END_THINK)
    for batch in batches:
        enc = tokenizer.pad({"input_ids": [ids[i] for i in batch]}, return_tensors="pt").to(device)
        stop = dict(stop_strings=stop_strings, tokenizer=tokenizer) if stop_strings else {}
        with torch.inference_mode():
            out = model.generate(**enc, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                                 eos_token_id=tokenizer.eos_token_id, use_cache=True, **sampling, **stop)
        new = out[:, enc["input_ids"].shape[1]:]
        for row, i in zip(new.tolist(), batch):
            results[i] = _raw_row(tokenizer, row) if raw else _generation(tokenizer, row, end_think)
    if was_training:
        model.train()
    return results  # type: ignore[return-value]


def _hf_generate_with_tools(model, tokenizer, ids, max_new_tokens, batch_size, do_sample, temperature, top_p,
                            progress, tools) -> list[Generation]:
    """Tool use on the model.generate path (4-bit or adapter-wrapped models), in rounds: generate until eos, the
    budget or an opened output fence; run the fenced blocks of all paused answers concurrently; append their
    outputs and generate again from there (the context is prefilled again each round)."""
    from .tool_use import OUTPUT_FENCE

    new: list[list[int]] = [[] for _ in ids]
    keys = [(id(new), i) for i in range(len(ids))]  # unique per call: one runner may serve several calls
    appended = [0] * len(ids)
    hit = [False] * len(ids)
    live = list(range(len(ids)))
    while live:
        budgets = {i: max_new_tokens - (len(new[i]) - appended[i]) for i in live}
        rounds = _hf_generate(model, tokenizer, [ids[i] + new[i] for i in live], max(budgets.values()), batch_size,
                              do_sample, temperature, top_p, progress, stop_strings=["```output\n"],
                              raw=True)
        paused = {}
        for i, (row, stopped) in zip(live, rounds):
            row = row[:budgets[i]]
            stopped = stopped and len(row) < budgets[i]
            text = tokenizer.decode(new[i] + row, skip_special_tokens=True)
            new[i] += row
            if OUTPUT_FENCE.search(text) and len(row) < budgets[i]:
                paused[i] = tools.submit(keys[i], text)
            elif stopped:
                new[i].append(tokenizer.eos_token_id)
            else:
                hit[i] = True
        for i, future in paused.items():
            extra = future.result()
            new[i] += extra
            appended[i] += len(extra)
        live = list(paused)
    for key in keys:
        tools.release(key)
    end_think = tokenizer.convert_tokens_to_ids(END_THINK)
    return [_generation(tokenizer, row, end_think, hit[i]).with_tools(tools.record(keys[i]), appended[i])
            for i, row in enumerate(new)]


def auto_batch_size(model, max_tokens: int, share: float = 0.7) -> int:
    """How many sequences of `max_tokens` fit their KV cache in `share` of the free GPU memory (model.generate
    path; the engine sizes its slots the same way in llmhelpers.engine.auto_slots)."""
    import torch

    if not torch.cuda.is_available():
        return 8
    from .engine import kv_bytes_per_token

    per_seq = kv_bytes_per_token(model.config, model.dtype) * max_tokens + 2 * model.config.vocab_size * 4
    free, _ = torch.cuda.mem_get_info()
    return int(max(1, share * free // per_seq))


def answer_examples(model, tokenizer, examples, cfg, progress: bool = False, samples: int | None = None,
                    tools: bool | None = None) -> list[list[Generation]]:
    """cfg.eval_samples answers per example (sampled at cfg's temperature and top-p, seeded), grouped per example;
    python blocks executed when `tools` (default cfg.tool_execution)."""
    from .tool_use import tool_runner

    samples = cfg.eval_samples if samples is None else samples
    prompts = [render_prompt(ex, tokenizer) for ex in examples]
    with tool_runner(tokenizer, cfg, tools) as runner:
        flat = generate(model, tokenizer, prompts, cfg.eval_max_new_tokens, cfg.eval_batch_size, cfg.eval_do_sample,
                        cfg.eval_temperature, cfg.eval_top_p, progress=progress, seed=cfg.seed, samples=samples,
                        tools=runner)
    return [flat[i * samples:(i + 1) * samples] for i in range(len(examples))]


def clip_text(s: str, width: int) -> str:
    """`s` cut at `width` characters, saying how many were left out."""
    return s if len(s) <= width else s[:width] + f" [... {len(s) - width} more chars]"


def format_generation(question: str, text: str, width: int = 600) -> str:
    """Question, thinking and answer as separate, trimmed sections."""
    thinking, answer = split_thinking(text)
    clip = lambda s: clip_text(s, width)
    return (f"Q: {clip(question.splitlines()[0])}\n"
            f"  thinking: {clip(thinking) or '(none)'}\n"
            f"  answer:   {clip(answer) or '(no answer: thinking not finished)'}")
