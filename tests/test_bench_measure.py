"""The training benches' timing (bench/train_throughput.py, shared by bench/train_unsloth.py): the per-step seconds
and the second half's rate, which shows a peer still compiling in its first measured steps."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

from train_throughput import second_half_rate  # noqa: E402


def test_the_second_half_rate_counts_only_the_second_halfs_steps_and_tokens():
    # 2 warm-up micro-batches, then 4 measured steps of 2 micro-batches each; the first two measured steps are slow
    batches = [[9999], [9999]] + [[100, 50], [50]] * 2 + [[300], [100]] * 2 + [[7777]]  # the last: prefetched
    marks = {"t0": 10.0, "n0": 2, "step_ends": [13.0, 16.0, 17.0, 18.0, 19.0]}  # a fifth step end is not measured
    out = second_half_rate(marks, batches, accumulation=2, steps=4)
    assert out["step_seconds"] == [3.0, 3.0, 1.0, 1.0]
    assert out["second_half_useful_tok_s"] == 400  # (300 + 100) * 2 tokens over 2 seconds


def test_a_run_cut_short_reports_its_steps_without_a_rate():
    out = second_half_rate({"t0": 0.0, "n0": 0, "step_ends": [1.0]}, [[5]] * 4, accumulation=1, steps=4)
    assert out == {"step_seconds": [1.0]}


def test_the_timed_runs_data_holds_the_target_tokens_per_epoch():
    """bench/time_to_model.py sizes its synthetic data from a sample's mean length: rows over the cap are dropped by
    the data step, so they neither count nor are made up for."""
    import pytest

    from time_to_model import rows_for_tokens

    assert rows_for_tokens(lambda i: 500, 1_000_000) == 2000
    lengths = [400, 600, 3000, 500]  # one in four over the cap: 3 rows of mean 500 kept out of 4
    assert rows_for_tokens(lambda i: lengths[i % 4], 1_500_000, sample=400, cap=2048) == 4000
    with pytest.raises(ValueError, match="fits"):
        rows_for_tokens(lambda i: 5000, 10)


@pytest.mark.slow
def test_the_training_profile_runs_its_steps_inside_a_training_run(tmp_path):
    """bench/profile_train.py trains as the notebook does (inside a TrainingRun: it refused a bare trainer.train()
    until 2026-12-03, unnoticed, since only a GPU session ran it): the CPU dry run profiles its window."""
    import json
    import subprocess

    out = tmp_path / "profile.json"
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve().parent.parent / "bench" / "profile_train.py"),
                           "--dry-run", "--no-cprofile", "--syncs", "--max-syncs", "0", "--steps", "2",
                           "--json", str(out)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads(out.read_text())
    assert summary["steps"] == 2 and summary["phases"]["forward+backward"]["cpu_s_per_step"] > 0
    assert summary["checkpointing"]["why"] == "no GPU to measure: all layers recompute"
    assert summary["syncs"]["steps"] == 2 and summary["syncs"]["verdict"]["passed"]  # the CPU never waits


def test_the_sync_count_names_the_line_that_waited():
    """profile_train's --syncs window: each of torch's "synchronizing CUDA operation" warnings is counted once, at the
    line of Python that caused it; other warnings pass through."""
    import warnings

    from profile_train import SyncSites

    sites = SyncSites()
    sites.start()
    try:
        for _ in range(3):
            warnings.warn("called a synchronizing CUDA operation")  # torch's text (set_sync_debug_mode("warn"))
        with pytest.warns(UserWarning, match="unrelated"):
            warnings.warn("unrelated")
    finally:
        sites.stop()
    summary = sites.summary(steps=2)
    assert summary["total"] == 3 and summary["per_step"] == 1.5
    [(site, count)] = summary["sites"].items()
    assert count == 3 and "test_bench_measure.py" in site and "test_the_sync_count_names_the_line" in site


@pytest.mark.slow
def test_the_timed_run_to_a_model_runs_every_phase_on_the_cpu(tmp_path):
    """bench/time_to_model.py --tiny: the CLI's run (train, grade base and tuned with and without tools, merge, GGUF)
    end to end, so the GPU session's timed run does not meet a broken script."""
    import json
    import subprocess

    out = tmp_path / "ttm.json"
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve().parent.parent / "bench" / "time_to_model.py"),
                           "--tiny", "--work", str(tmp_path / "work"), "--out", str(out)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    record = json.loads(out.read_text())
    assert record["seconds"] > 0 and record["run"]["global_step"] > 0
    assert set(record["run"]["accuracy"]) == {"base", "finetuned", "finetuned-no-tools"}
    assert Path(record["run"]["merged_dir"]).is_dir()


def test_the_size_sweep_falls_back_to_the_guides_half_rows_where_a_row_does_not_fit(monkeypatch):
    """bench/train_sizes.py: where the memory policy refuses rows of 16,384 on a card (the 7B on 16 GB did on
    2026-12-04), the card is measured with the guide's recipe for it (rows of 8,192, two per step) and says why."""
    import train_sizes

    calls = []

    def run_config(name, spec, *args, **kwargs):
        calls.append((name, dict(spec)))
        if spec.get("max_length") != 8192:
            raise RuntimeError("one training step on the longest batch this run can meet does not fit in 13.0 GiB")
        return {"useful_tok_s": 5000, "tokens_per_step": 16384, "mfu": 0.3, "checkpointing": {}, "warmup_seconds": 1,
                "peak_reserved_gib": 12.0, "worst_case_peak_reserved_gib": 12.5}

    monkeypatch.setattr(train_sizes, "run_config", run_config)
    monkeypatch.setattr(train_sizes, "random_nf4_loader", lambda arch: None)
    run = train_sizes.measure_packed("7b", {}, "/nowhere", 16, {}, 1, 1, {})
    assert [name for name, _ in calls] == ["7b-16gb", "7b-16gb-8k"]
    assert calls[1][1] == {"memory_limit_gib": 13.0, "max_length": 8192, "pad_to_multiple_of": 8192,
                           "gradient_accumulation_steps": 2}
    assert run["row_tokens"] == 8192 and "does not fit" in run["half_rows_because"] and run["fits"]
    monkeypatch.setattr(train_sizes, "run_config", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("CUDA error")))
    with pytest.raises(RuntimeError, match="CUDA error"):  # any other failure is the card's error, not a fallback
        train_sizes.measure_packed("7b", {}, "/nowhere", 16, {}, 1, 1, {})
    # where the half rows do not fit either, the card's error says both lengths were tried (2026-12-04's 7B on 16 GB
    # recorded only the second error, which read as if rows of 16,384 had been refused once)
    monkeypatch.setattr(train_sizes, "run_config", lambda *a, **k: (_ for _ in ()).throw(
        RuntimeError("one training step ... does not fit in 13.0 GiB")))
    with pytest.raises(RuntimeError, match=r"rows of 8,192 \(half rows, after 16,384 did not fit\) do not fit either"):
        train_sizes.measure_packed("7b", {}, "/nowhere", 16, {}, 1, 1, {})


def test_every_training_bench_configuration_is_a_valid_run():
    """bench/train_throughput.py's configurations are the GPU session's vocabulary: each one builds a valid config
    (four padded ones had stopped building when packing became the default, and only a GPU call would have said)."""
    import train_throughput

    from llmhelpers.config.profiles import make_config

    for name, spec in train_throughput.CONFIGS.items():
        spec = {k: 29.47 if v == "peer" else v for k, v in spec.items()}  # --peer: the peer's measured peak
        cfg = make_config(spec.pop("profile", "full"), **spec)
        assert cfg.run_name, name


def test_the_best_attention_launch_is_the_fastest_timed_one_as_engine_arguments():
    from best_attention_launch import best_launch

    record = {"attention_tuning": {"n64_w4_sdefault": {"ms": 0.43}, "n128_w4_s2": {"ms": 0.39},
                                   "n128_w8_s4": {"error": "OutOfResources"}, "n32_w2_sdefault": {"ms": 0.5}}}
    assert best_launch(record) == {"block_n": 128, "num_warps": 4, "num_stages": 2}
    record["attention_tuning"]["n32_w2_sdefault"]["ms"] = 0.1
    assert best_launch(record) == {"block_n": 32, "num_warps": 2}  # Triton's default stages: no num_stages
    assert best_launch({"attention_tuning": {"n64_w4_s2": {"error": "x"}}}) is None


def test_the_decode_matmul_benchs_triton_kernel_computes_f_linear_with_its_k_split_in_parts():
    """bench/decode_matmuls.py's candidate kernel (in Triton's interpreter, fp32): every split of K into parts, with
    and without a bias and with a K that is no multiple of the block, gives F.linear's result."""
    import os
    import subprocess
    import textwrap

    pytest.importorskip("triton")
    script = textwrap.dedent("""
        import sys, torch
        sys.path.insert(0, "bench")
        from decode_matmuls import MatmulConfig, linear
        torch.manual_seed(0)
        gaps = []
        for M, N, K, bias in ((5, 40, 96, True), (33, 70, 128, False), (3, 64, 200, True)):
            x, w, b = torch.randn(M, K), torch.randn(N, K), (torch.randn(N) if bias else None)
            ref = torch.nn.functional.linear(x, w, b)
            for split in (1, 2, 4):
                gaps.append((linear(x, w, b, MatmulConfig(16, 32, 32, split, 4, 2)) - ref).abs().max().item())
        print(max(gaps), len(gaps))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).resolve().parent.parent, env={**os.environ, "TRITON_INTERPRET": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    gap, count = proc.stdout.split()
    assert float(gap) < 1e-4 and count == "9"


def test_the_training_window_ends_before_the_worst_case_memory_steps(tmp_path, monkeypatch):
    """bench/train_throughput.py's rate covers the measured training steps only: the worst-case memory steps after
    them (a recompilation for compiled layers) stayed inside the window on 2026-12-04 and cost compiled runs ~30%."""
    import time

    import train_throughput
    from common import synthetic_rows

    from llmhelpers.model.tiny import build_tiny_r1

    def slow_worst_case(trainer, cfg):
        time.sleep(3.0)
        return 0.0

    monkeypatch.setattr(train_throughput, "worst_case_peak_reserved", slow_worst_case)
    rows = synthetic_rows(64, median=60, cap=120, prompt=8, vocab=1020)
    out = train_throughput.run_config("smoke", {"profile": "smoke"}, build_tiny_r1(tmp_path / "tiny-r1"), rows,
                                      warmup=1, steps=2)
    assert out["steps"] == 2 and len(out["step_seconds"]) == 2
    assert out["seconds"] < 3.0, out  # the sleep is outside the window


def test_the_eval_bench_buckets_decode_steps_by_width():
    from eval_engine import steps_by_width_buckets

    buckets = steps_by_width_buckets({487: [10, 0.09], 300: [2, 0.012], 256: [1, 0.005], 5: [3, 0.006], 1: [1, 0.002]},
                                     slots=487)
    assert [b["widths"] for b in buckets] == ["full", "256-486", "4-7", "1-1"]
    assert [b["steps"] for b in buckets] == [10, 3, 3, 1]
    assert buckets[1]["seconds"] == 0.02 and buckets[0]["ms_per_step"] == 9.0
