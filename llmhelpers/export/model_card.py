"""A model card (README.md with Hub metadata) for the adapters and the merged model, and the Hub push.

`write_model_card(folder, cfg, ...)` writes what a reader of the model needs: the base model, the data mix with the
counts of the data report, the recipe's non-default settings, the evaluation table with its protocol, the sampling
settings and template to use, the tool-execution requirement, and the limits. `push_to_hub` uploads a folder
(card included) to a private repository unless told otherwise; the notebook calls it only when `hub_repo_id` is set.
"""
from __future__ import annotations

from pathlib import Path



def is_hub_dataset(spec: str) -> bool:
    """Whether a dataset setting names a Hub dataset (owner/name), not a local file or folder."""
    import re

    return (re.fullmatch(r"[\w.-]+/[\w.-]+", spec) is not None and not Path(spec).exists()
            and not spec.endswith((".json", ".jsonl", ".parquet")))


def _source_text(name: str, spec: str, samples) -> str:
    rows = f"{samples or 'all'} rows sampled"
    if is_hub_dataset(spec):
        return f"{name} ({spec}, {rows})"
    return f"local rows in {name}'s schema (`{Path(spec).name}`, {rows}; not the Hub dataset)"


def _data_section(report) -> str:
    if report is None:
        return "The data report was not passed; see the run's notebook or log for the counts."
    lines = ["| source | rows read | bad | no reasoning | too long | train | eval | held out |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, c in sorted(report.sources.items()):
        lines.append(f"| {name} | {c.rows} | {sum(c.bad.values())} | {c.empty_reasoning} | {c.too_long} | {c.train} "
                     f"| {c.eval} | {c.heldout} |")
    return "\n".join(lines)


def _eval_section(results, cfg) -> str:
    if not results:
        return "No evaluation was passed to the card: run the notebook's answer-accuracy step (or `--evaluate`) and write it again."
    lines = ["| run | problems | samples | pass@1 | maj@k | hit budget | pass@1 finished | mean thinking tokens | "
             "tool calls per answer |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        m = r.summary()["all"]
        fin = "n/a" if m["pass@1_finished"] is None else f"{m['pass@1_finished']:.1%}"
        lines.append(f"| {r.label} | {m['problems']} | {m['samples']} | {m['pass@1']:.1%} | {m['maj@k']:.1%} | "
                     f"{m['hit_budget']:.1%} | {fin} | {m['mean_thinking_tokens']:.0f} | "
                     f"{m['tool_calls_per_answer']:.2f} |")
    protocol = (f"Protocol: {cfg.eval_samples} answers per problem sampled at temperature {cfg.eval_temperature}, "
                f"top-p {cfg.eval_top_p}, up to {cfg.eval_max_new_tokens} new tokens; problems: `{cfg.eval_set}` "
                f"(at most {cfg.eval_limit or 'all'}); graded with math-verify (math) and SciBench's 5% relative "
                "tolerance (science). pass@1 is the mean over samples, maj@k the majority vote; *hit budget* is the "
                "share of answers cut off by the token budget. `base` is the untuned model; `finetuned-no-tools` "
                "is the tuned model with code execution off (it writes its own outputs).")
    return "\n".join(lines) + "\n\n" + protocol


def model_card_text(cfg, kind: str, report=None, results=None):
    """The card as a huggingface_hub ModelCard. kind: "adapters" (a PEFT LoRA folder) or "merged" (bf16 weights)."""
    from huggingface_hub import ModelCard, ModelCardData

    from llmhelpers.config.profiles import changed_settings

    changed = changed_settings(cfg)
    data = ModelCardData(
        base_model=cfg.model_id, library_name="peft" if kind == "adapters" else "transformers",
        license="mit", pipeline_tag="text-generation", language=["en"],
        datasets=[d for d in (cfg.math_dataset, cfg.science_dataset) if is_hub_dataset(d)] or None,
        tags=["qlora", "lora", "sft", "trl", "reasoning", "math", "science", "deepseek-r1"])
    sft, lora = cfg.sft, cfg.lora
    length = f"{sft.num_train_epochs:g} epochs" if sft.max_steps <= 0 else f"{sft.max_steps} steps"
    batch = (f"rows of {cfg.pack_tokens} packed tokens" if cfg.pack_tokens
             else f"{sft.per_device_train_batch_size} padded sequences per micro-batch")
    load = (f'model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("{cfg.model_id}"), "<this repo>")'
            if kind == "adapters" else 'model = AutoModelForCausalLM.from_pretrained("<this repo>")')
    content = f"""---
{data.to_yaml()}
---

# {cfg.run_name}: {cfg.model_id} fine-tuned on MathCodeInstruct and SciBench ({kind})

{"LoRA adapters" if kind == "adapters" else "The base model with the LoRA adapters merged in, bf16"} trained with QLoRA
(4-bit NF4 base, LoRA r={lora.r}, alpha={lora.lora_alpha} on {lora.target_modules}) and TRL's `SFTTrainer` on
R1-format chat: the problem as the user turn, the worked solution inside `<think>`…`</think>`, the boxed answer after it.

## Data

{_source_text("MathCodeInstruct", cfg.math_dataset, cfg.math_samples)} and
{_source_text("SciBench", cfg.science_dataset, cfg.science_samples)}: of SciBench only the worked solutions are
trained on; problems without one form the held-out set.
The interpreter outputs inside MathCodeInstruct's solutions are masked from the loss (the model learns to write code,
not to invent what it prints).

{_data_section(report)}

## Recipe

Learning rate {sft.learning_rate} ({getattr(sft.lr_scheduler_type, "value", sft.lr_scheduler_type)}), {length}, {batch} ×
{sft.gradient_accumulation_steps} accumulation, examples up to {cfg.max_example_tokens} tokens, optimizer
{getattr(sft.optim, "value", sft.optim)}, seed {cfg.seed}.
Settings that differ from the project's `{cfg.profile}` profile: {", ".join(f"`{k}={v!r}`" for k, v in sorted(changed.items())) or "none"}.

## Evaluation

{_eval_section(results, cfg)}

## How to use it

Sample as the model's authors evaluate it: temperature 0.6, top-p 0.95, a long budget (thousands of tokens of
thinking); greedy decoding makes R1 models repeat themselves. Use the tokenizer's chat template (it opens `<think>`).

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
{"from peft import PeftModel" if kind == "adapters" else ""}
tokenizer = AutoTokenizer.from_pretrained("<this repo>")
{load}
```

**Tool execution.** The model was trained on solutions that run Python and read the interpreter's output. The
accuracy above with tools comes from executing each ```` ```python ```` block and appending its real output at the
opened ```` ```output ```` fence (the project's `llmhelpers.inference.tool_use`). Runtimes that execute no code (llama.cpp,
Ollama, plain `generate`) get the `finetuned-no-tools` behaviour: the model writes its own "outputs".

## Limits

Trained and evaluated by the project's notebook; the figures are from the evaluation above only, on the problem set
it names. The model can write wrong code and wrong answers with confidence; check its answers. Model-written code
must run in a sandbox you trust, never with your credentials.
"""
    return ModelCard(content)


def write_model_card(folder, cfg, kind: str, report=None, results=None) -> Path:
    """README.md in `folder`, with valid Hub metadata."""
    card = model_card_text(cfg, kind, report, results)
    path = Path(folder) / "README.md"
    card.save(str(path))
    return path


def push_to_hub(folder, repo_id: str, private: bool = True, api=None) -> str:
    """Upload `folder` (with its card) to the Hub repository `repo_id`, created private unless private=False.
    Needs a token (`huggingface-cli login` or HF_TOKEN). Returns the repository's URL."""
    from huggingface_hub import HfApi

    api = api or HfApi()
    url = api.create_repo(repo_id, private=private, exist_ok=True)
    api.upload_folder(folder_path=str(folder), repo_id=repo_id,
                      commit_message=f"upload {Path(folder).name} from the fine-tuning notebook")
    return str(url)

