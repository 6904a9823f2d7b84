"""The run's configuration: the project's own settings, with the three library configs nested as they are.

`FinetuneConfig` holds what no library knows (the model id, data sources and mix, the evaluation protocol, tool
execution, sharing) and, unchanged, the `BitsAndBytesConfig`, peft `LoraConfig` and TRL `SFTConfig` that loading,
LoRA and the trainer receive. The libraries check their own fields; `FinetuneConfig` checks only its own and the
few combinations the project relies on. `llmhelpers.config.profiles` builds one (`make_config`) from the notebook's
objects or from the recipe files in configs/.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from pathlib import Path

from llmhelpers.config import run_identity
from llmhelpers.config.library import (LIBRARY_CONFIGS, SECRET_FIELDS, bnb_arguments, changed_bnb,
                                       keep_accelerator_state, library_owner, non_default_fields, plain_value)
from llmhelpers.config.validation import check, project_fields, reject_unknown

CONFIG_NAME = "finetune_config.json"  # the config saved beside checkpoints, adapters and merged weights
TINY_MODEL_ID = "llmhelpers/tiny-r1"  # the smoke profile's model, built locally by llmhelpers.model.tiny


@dataclass(frozen=True)
class FinetuneConfig(run_identity.RunFolders):
    profile: str = "full"  # the configs/<profile>.yaml this config starts from; make_config sets it

    # --- model -------------------------------------------------------------------------------------------------
    model_id: str = "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B"  # Hub id, local folder, .gguf, or pip:<pkg>/<file>.gguf
    model_revision: str | None = None  # pin a Hub commit for reproducible runs
    tiny_model_dir: str = ""  # where the smoke profile builds its local tiny model ("" = <output_dir>/tiny-r1)

    # --- training, beyond what the libraries know --------------------------------------------------------------------
    max_example_tokens: int = 2048  # longer examples are dropped and counted, never truncated
    # How many decoder layers recompute their activations: -1 = as few as fit the worst batch in memory, measured on
    # the GPU before step 1 (llmhelpers.training.memory; all of them on a CPU); 0..layers = exactly that many.
    checkpoint_layers: int = -1
    memory_limit_gib: float = 0.0  # GPU memory the run may use (0 = all of it); e.g. 22 to fit a 24 GB card
    # peft's prepare_model_for_kbit_training casts embeddings, norms and lm_head to fp32, which makes the residual
    # stream fp32 and doubles checkpointed activations. Keeping them bf16 halves that memory with the same loss
    # (bench/train_throughput.py checks it); the seed profile keeps the upcast.
    upcast_to_fp32: bool = False
    # MathCodeInstruct's ```output blocks were written by an interpreter, not the model: train on the code and the
    # opening fence, never on predicting what the interpreter prints (MathCoder executes the code at inference).
    mask_tool_output: bool = True
    # Stop when eval loss (metric_for_best_model) has not improved for this many evaluations, with transformers'
    # EarlyStoppingCallback (0 = train to the end); the best checkpoint is restored (load_best_model_at_end).
    early_stopping_patience: int = 0
    liger_kernels: bool = True  # Liger's fused RMSNorm/SwiGLU/RoPE Triton kernels (CUDA only; TRL's switch is deprecated)
    # Each LoRA layer on the 4-bit base as one autograd node with a written-out backward (llmhelpers.model.fused_lora):
    # the same forward bit for bit, a fraction of peft's per-layer CPU work, which held the GPU back on 8k-token rows.
    fused_lora: bool = True
    # The frozen 4-bit base dequantized once into bf16 and kept for the training steps (with fused_lora), instead of
    # in every forward, backward and recomputation: the same numbers, 2 bytes per quantized parameter of GPU memory
    # (2.4 GiB for the 1.5B). "auto": kept when the worst step still fits memory_limit_gib with it (measured before step 1,
    # with the checkpointed layers chosen after it); "on", "off".
    dequantize_once: str = "auto"
    # The LoRA layers that read one input (q/k/v of each attention, gate/up of each MLP) as one autograd node: one
    # dropout mask and one stacked LoRA-A matmul per group (llmhelpers.model.fused_lora.InputGroup). With
    # lora_dropout > 0 the group shares its mask (peft draws one per layer), so it is part of the run's identity.
    # On: measured on an H200 (2026-12-04) 1.10x the tokens/s at rows of 16,384, 1.15x under a 22 GiB limit (fewer
    # layers recompute), 1.40x at rows of 8,192, the loss after 30 steps equal to 6 digits (issue #31, lever 3).
    group_lora_inputs: bool = True
    # Each decoder layer compiled as one region (torch.compile) for the training steps, to cut the per-step CPU work
    # (llmhelpers.training.compiled). Off: on an H200 +7.5% at rows of 16,384, -22% at 8,192; undone when training stops.
    compile_layers: bool = False

    # --- data ----------------------------------------------------------------------------------------------------
    # A Hub id, a local .json/.jsonl file, or a folder of them.
    math_dataset: str = "MathLLMs/MathCodeInstruct"
    science_dataset: str = "xw27/scibench"  # as math_dataset: a Hub id, a local .json/.jsonl file, or a folder
    dataset_revision: str | None = None  # a Hub revision (commit) of both datasets, for a reproducible pool
    allow_one_source: bool = False  # True: a source with no usable rows is left out instead of stopping the run
    math_samples: int = 15000  # of ~80k MathCodeInstruct rows
    science_samples: int = 0  # 0 = all; SciBench has only 692 rows, 112 with a worked solution
    eval_fraction: float = 0.1  # 90/10 train/eval split of the training pool
    heldout_max: int = 0  # cap on the held-out accuracy set (0 = all)

    # --- answer-accuracy evaluation --------------------------------------------------------------------------------
    # The model authors' protocol (and open-r1's): sampling at temperature 0.6, top-p 0.95, several answers per
    # problem, long budgets. Greedy decoding makes R1 models loop, and a short budget cuts most answers off, so a
    # fine-tuned model that merely thinks shorter would "win".
    # "heldout" (eval split + SciBench problems without solutions), "math500", or a local .jsonl file of problems in
    # MathCodeInstruct's schema, graded by their boxed answer (the small profile's held-out problems)
    eval_set: str = "heldout"
    math500_dataset: str = "HuggingFaceH4/MATH-500"  # Hub id or a local .jsonl with MATH-500's fields
    eval_samples: int = 4  # answers per problem: pass@1 is their mean, maj@k their majority vote
    eval_max_new_tokens: int = 8192  # per-answer budget; 32768 is the authors' (set it for final numbers)
    eval_batch_size: int = 0  # 0 = as many sequences (engine slots) as fit 85% of free GPU memory
    eval_bf16: bool = True  # evaluate on bf16 weights (base, then merged adapters): the fast engine runs those
    # The engine's KV cache: "auto" (the model's dtype) or "fp8" (e4m3 values with a scale per head vector: about half
    # the bytes, so about twice the slots). Off: measured on real weights it cost a little accuracy and speed where the
    # slot cap, not memory, bounds the batch (FINETUNING_GUIDE); for cards where memory bounds the slots.
    eval_kv_cache_dtype: str = "auto"
    # On a GPU the engine's decode steps run its fused kernels (add + RMSNorm, RoPE + KV write, SiLU * up: the
    # modules' arithmetic in fewer launches; 27.5k against 21.8k tokens/s on an H200). False: the model's own modules,
    # the path before them (to compare, or where a doubt about them needs ruling out). The CPU always runs the modules.
    eval_decode_kernels: bool = True
    eval_do_sample: bool = True  # False = greedy (loops on R1 models; only for debugging)
    eval_temperature: float = 0.6  # the model authors' recommendation
    eval_top_p: float = 0.95  # the model authors' recommendation
    eval_limit: int = 200  # problems per evaluation run (0 = all)
    # Tool execution (MathCoder's inference): python blocks the model writes are run in a sandbox process and their
    # real output is appended before it continues (llmhelpers.inference.tool_use; limits in FINETUNING_GUIDE.md).
    tool_execution: bool = True  # evaluation runs code; False lets the model write its own "output"
    eval_without_tools: bool = True  # also grade the fine-tuned model with tool_execution off (the comparison)
    tool_timeout: float = 10.0  # wall-clock seconds per block (CPU time: this + 2 s); the sandbox is killed after it
    tool_max_calls: int = 8  # executions per answer; later blocks get an error message as their output
    tool_workers: int = 0  # blocks run at once (0 = min(16, CPU cores - 1): one core stays with generation)
    tool_max_sandboxes: int = 64  # interpreter processes alive at once (each holds ~30-100 MB once sympy is in)
    accuracy_callback: bool = False  # accuracy on a small fixed subset at each save
    accuracy_callback_size: int = 16  # problems in that subset (one sampled answer each: a trend, not the table)

    # --- outputs and sharing -----------------------------------------------------------------------------------------
    merge_after_training: bool = False  # needs ~3.5 GB disk and a bf16 copy of the base
    gguf_outtype: str = ""  # "q8_0", "f16" or "bf16": write merged/ as GGUF for llama.cpp / Ollama ("" = don't)
    hub_repo_id: str = ""  # e.g. "you/r1-math-lora": push the adapters with their card ("" = don't)
    hub_private: bool = True  # a pushed repository is private unless this is False

    # --- the libraries' own configs, as loading, LoRA and the trainer receive them ------------------------------------
    bnb: typing.Any = None  # transformers.BitsAndBytesConfig
    lora: typing.Any = None  # peft.LoraConfig
    sft: typing.Any = None  # trl.SFTConfig (its output_dir is the root; the trainer writes to run_dir)

    config_name: typing.ClassVar[str] = CONFIG_NAME  # the file it is saved in, beside a run's checkpoints

    def __post_init__(self):
        check(self)

    @property
    def trainer_config(self):
        """The library config the trainer runs with (SFTConfig; a GRPO run's is its GRPOConfig)."""
        return self.sft

    # --- what other steps read, derived from the library configs ----------------------------------------------------
    @property
    def output_dir(self) -> str:
        return self.sft.output_dir

    @property
    def seed(self) -> int:
        return self.sft.seed

    @property
    def pack_tokens(self) -> int:
        """Tokens per packed row (SFTConfig's max_length with packing on), 0 for padded batches."""
        return self.sft.max_length if self.sft.packing else 0

    @property
    def compute_dtype(self):
        """The torch dtype matmuls run in: the 4-bit compute dtype, also the dtype of unquantized weights."""
        import torch

        dtype = self.bnb.bnb_4bit_compute_dtype
        return getattr(torch, dtype) if isinstance(dtype, str) else dtype or torch.float32

    @property
    def is_tiny(self) -> bool:
        return self.model_id == TINY_MODEL_ID

    # --- the run: one folder per set of training settings -------------------------------------------------------------
    @property
    def run_id(self) -> str:
        """A short hash of every setting that changes what is trained (llmhelpers.config.run_identity)."""
        return run_identity.run_id(self)

    def training_settings(self) -> dict:
        """Everything the trained weights depend on (llmhelpers.config.run_identity)."""
        return run_identity.training_settings(self)

    @property
    def run_name(self) -> str:
        """The run's folder and TensorBoard name, e.g. lr2e-4_r16_t16k_ep3-1a2b3c4d5e."""
        return run_identity.run_name(self)

    @property
    def merged_dir(self) -> Path:
        return self.run_dir / "merged"

    @property
    def eval_dir(self) -> Path:
        return self.run_dir / "eval"

    def replace(self, **changes) -> "FinetuneConfig":
        """A copy with `changes`, each routed by its name to the project's settings or to the library config that
        has the field (copies of those; this config's objects are left as they are)."""
        routed: dict[str, dict] = {key: {} for key in ("project", *LIBRARY_CONFIGS)}
        for key, value in changes.items():
            routed["project" if key in PROJECT_FIELDS or key in LIBRARY_CONFIGS else
                   library_owner(key, PROJECT_FIELDS)][key] = value
        objects = {}
        if routed["bnb"]:
            objects["bnb"] = changed_bnb(self.bnb, **routed["bnb"])
        for key in ("lora", "sft"):
            if routed[key]:
                with keep_accelerator_state():
                    objects[key] = dataclasses.replace(getattr(self, key), **routed[key])
        return dataclasses.replace(self, **routed["project"], **objects)

    def trainer_args(self):
        """The SFTConfig the trainer runs with: `sft` with its output_dir pointed at this run's folder."""
        with keep_accelerator_state():  # no secret: the trainer pickles its arguments into every checkpoint
            return dataclasses.replace(self.sft, output_dir=str(self.run_dir),
                                       **{k: None for k in SECRET_FIELDS if getattr(self.sft, k, None)})

    # --- what is shown and saved ----------------------------------------------------------------------------------------
    def summary(self) -> str:
        """The key hyperparameters, then every setting that differs from the libraries' and the project's defaults."""
        sft, lora = self.sft, self.lora
        step = (f"packed rows of {self.pack_tokens} tokens x accumulation {sft.gradient_accumulation_steps}"
                if self.pack_tokens else
                f"batch {sft.per_device_train_batch_size} x accumulation {sft.gradient_accumulation_steps}")
        length = f"max_steps {sft.max_steps}" if sft.max_steps > 0 else f"{sft.num_train_epochs:g} epochs"
        quant = f"4-bit {self.bnb.bnb_4bit_quant_type}" if self.bnb.load_in_4bit else "no quantization"
        lines = [f"profile {self.profile}, model {self.model_id}  |  run folder {self.run_dir}",
                 f"QLoRA: {quant}, LoRA r={lora.r} alpha={lora.lora_alpha} dropout={lora.lora_dropout} on "
                 f"{lora.target_modules}",
                 f"lr {sft.learning_rate} ({plain_value(sft.lr_scheduler_type)}), {step}, {length}, "
                 f"examples up to {self.max_example_tokens} tokens, optim {plain_value(sft.optim)}"]
        changed = {k: v for k, v in self.project_settings().items()
                   if k != "profile" and v != _PROJECT_DEFAULTS[k]}
        if changed:
            lines.append("project settings changed: " + ", ".join(f"{k}={v!r}" for k, v in sorted(changed.items())))
        return "\n".join(lines)

    def project_settings(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in LIBRARY_CONFIGS}

    def to_dict(self) -> dict:
        """Project settings, and for each library config the fields that differ from its defaults (what the recipe
        sets): readable, and enough to rebuild every object (`from_dict`)."""
        return {**self.project_settings(), "bnb": bnb_arguments(self.bnb),
                "lora": non_default_fields(self.lora), "sft": non_default_fields(self.sft)}

    @classmethod
    def from_dict(cls, data: dict) -> "FinetuneConfig":
        from peft import LoraConfig
        from transformers import BitsAndBytesConfig
        from trl import SFTConfig

        libraries = {"bnb": BitsAndBytesConfig, "lora": LoraConfig, "sft": SFTConfig}
        missing = [k for k in libraries if not isinstance(data.get(k), dict)]
        if missing:
            raise ValueError(f"{', '.join(missing)}: missing (each library config is a JSON object of its arguments)")
        reject_unknown({k for k in data if k not in libraries}, PROJECT_FIELDS)
        built = {}
        for key, kind in libraries.items():
            try:
                with keep_accelerator_state():
                    built[key] = kind(**data[key])
            except (TypeError, ValueError) as err:
                raise ValueError(f"{key} ({kind.__name__}): {err}") from None
        return cls(**{**{k: v for k, v in data.items() if k not in libraries}, **built})

    @classmethod
    def load(cls, path: str | Path) -> "FinetuneConfig":
        """A config file that `save` wrote (or one written by hand in its shape)."""
        data = run_identity.read_config_file(path)
        try:
            return cls.from_dict(data)
        except (TypeError, ValueError) as err:
            raise ValueError(f"config file {path}: {err}") from None


_PROJECT_DEFAULTS = {f.name: f.default for f in dataclasses.fields(FinetuneConfig) if f.name not in LIBRARY_CONFIGS}
PROJECT_FIELDS = project_fields(FinetuneConfig)
