"""What this machine can do, with advice: GPU and free VRAM, free disk, library versions."""
from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

LIBRARIES = ("torch", "transformers", "trl", "peft", "bitsandbytes", "accelerate", "datasets", "math-verify")
# Estimates (FINETUNING_GUIDE.md): 3.55 GB of bf16 base weights in the Hub cache, the same again for an
# optional merged model, plus checkpoints (~0.14 GB each, estimated) and logs.
MIN_FREE_DISK_GB = {"full": 8.0, "smoke": 0.2}


@dataclass
class EnvReport:
    gpu: str | None
    gpu_free_gb: float | None
    gpu_total_gb: float | None
    bf16_ok: bool
    disk_free_gb: float
    versions: dict[str, str]
    advice: list[str] = field(default_factory=list)
    ok_to_train: bool = True

    def require_ok(self) -> None:
        """Stop here, before any download, when this machine cannot run the config."""
        if not self.ok_to_train:
            raise RuntimeError("this machine cannot run this config:\n" + "\n".join(f"- {a}" for a in self.advice))

    def __str__(self) -> str:
        gpu = (f"{self.gpu}: {self.gpu_free_gb:.1f} of {self.gpu_total_gb:.1f} GiB free" if self.gpu
               else "no CUDA GPU")
        lines = [f"GPU:   {gpu}", f"disk:  {self.disk_free_gb:.1f} GB free",
                 "libs:  " + ", ".join(f"{k} {v}" for k, v in self.versions.items())]
        lines += [f"-> {a}" for a in self.advice]
        return "\n".join(lines)


def free_bytes(path: str | Path) -> int:
    """Free disk space at `path`, or at its nearest existing parent if it does not exist yet."""
    path = Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "missing"


def environment_report(cfg) -> EnvReport:
    """What this machine offers for `cfg` (its profile, its output_dir), with advice; no download."""
    import torch

    profile = cfg.profile
    disk_free = free_bytes(cfg.output_dir) / 1e9
    gpu = free = total = None
    bf16 = False
    if torch.cuda.is_available():
        gpu = torch.cuda.get_device_name(0)
        f, t = torch.cuda.mem_get_info(0)
        free, total = f / 2**30, t / 2**30
        bf16 = torch.cuda.is_bf16_supported()
    report = EnvReport(gpu, free, total, bf16, disk_free, {k: version(k) for k in LIBRARIES})
    missing = [k for k, v in report.versions.items() if v == "missing"]
    if missing:
        report.advice.append(f"missing libraries: {', '.join(missing)}; run the install cell")
        report.ok_to_train = False
    try:
        check_device_support(cfg)
    except ValueError as err:
        report.advice.append(str(err))
        report.ok_to_train = False
    if gpu is not None and not bf16 and profile != "smoke":
        report.advice.append("this GPU lacks bf16: set OVERRIDES = {'bf16': False, 'bnb_4bit_compute_dtype': 'float16'}")
    need = MIN_FREE_DISK_GB.get(profile, MIN_FREE_DISK_GB["full"])
    if disk_free < need:
        report.advice.append(f"only {disk_free:.1f} GB free disk, {need} GB needed: free space before training")
        report.ok_to_train = False
    if not report.advice:
        report.advice.append("ready")
    return report


def check_output_dir(cfg) -> None:
    """Fail before anything loads when output_dir cannot be written (read-only, no permission)."""
    import tempfile

    out = Path(cfg.output_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-test-"):
            pass
    except OSError as err:
        raise ValueError(f"output_dir={cfg.output_dir!r} is not writable ({err.strerror or err}): "
                         "choose a folder you can write") from None


def preflight(cfg) -> None:
    """The checks that need no download: the GPU the config asks for, and a writable output_dir."""
    check_device_support(cfg)
    check_output_dir(cfg)


def fp8_cache_refusal(capability: tuple[int, int], gpu: str = "this GPU") -> str | None:
    """Why a CUDA GPU of this compute capability cannot hold the fp8 cache, or None when it can: the engine's Triton
    kernels (attention, the fused RoPE and cache write) need float8 e4m3, which Triton compiles for 8.9 and newer
    (Ada, Hopper, Blackwell) only; on an A100, A10 or RTX 3090 (8.0, 8.6) they would fail at the first decode step."""
    if tuple(capability) >= (8, 9):
        return None
    return (f"eval_kv_cache_dtype='fp8' needs float8 e4m3 on the GPU (compute capability 8.9 or newer: Ada, Hopper); "
            f"{gpu} is {capability[0]}.{capability[1]}, where Triton cannot compile e4m3: "
            "set eval_kv_cache_dtype='auto'")


def check_device_support(cfg) -> None:
    """Fail early, naming the keys, when the config asks for what only a CUDA GPU can do."""
    import torch

    if torch.cuda.is_available():
        if cfg.sft.bf16 and not torch.cuda.is_bf16_supported():
            raise ValueError("SFTConfig bf16=True but this GPU has no bf16: set bf16=False (SFTConfig) and "
                             "bnb_4bit_compute_dtype=torch.float16 (BitsAndBytesConfig)")
        if cfg.eval_kv_cache_dtype == "fp8":  # found now, not after training when the evaluation starts
            if refusal := fp8_cache_refusal(torch.cuda.get_device_capability(0), torch.cuda.get_device_name(0)):
                raise ValueError(refusal)
        return
    problems = []
    optim = getattr(cfg.sft.optim, "value", cfg.sft.optim)
    if cfg.sft.bf16:
        problems.append("bf16=True")
    if "paged" in optim or "8bit" in optim:
        problems.append(f"optim={optim!r}")
    if problems:
        raise ValueError(f"no CUDA GPU, but the config needs one ({', '.join(problems)}). Use the smoke profile "
                         "(LLM_PROFILE=smoke / --profile smoke), or set bf16=False and optim='adamw_torch' in SFTConfig.")
