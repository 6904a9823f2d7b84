"""What Triton makes of the decode-attention kernel for an H100/H200 (sm_90), without a GPU (issue #32).

    python bench/attention_codegen.py [--out bench/results/<date>-cpu-attention-codegen.json]

Compiles `split_kv_attention` (llmhelpers.inference.engine) for sm_90 with the argument specialization the JIT
gives at run time (16-byte-aligned tensors, a chunk divisible by 16) and reports per variant: registers and spills
(ptxas, through cuobjdump), shared memory, whether the key/value tiles are pipelined (cp.async), and the PTX
instruction mix: byte-wise shared-memory loads and fp8 conversions. On 2026-12-03 (Triton 3.6, the GPU image's)
this showed why the fp8 cache's kernel ran no faster than bf16's on half the bytes: it reads the transposed value
operand byte by byte from shared memory (64 `ld.shared.b8` per thread per tile) and converts each entry twice
(e4m3 -> f16 -> bf16): its loop over key blocks issues ~5.7x the bf16 kernel's warp instructions per byte read
(229 against 40 per KiB at 64 keys and 4 warps). At ~1.05e12 warp instructions per second on an H200 that caps it
near 4.7 TB/s with every issue slot used, ~2 TB/s at a realistic half: what was measured (1.8-2.1 TB/s); bf16's
cap is far above the memory's. Since 2026-12-04 the kernel runs its dots in fp16 for an fp8 cache under a bf16 query
(e4m3 -> fp16 is one conversion per two entries): 182 per KiB at 64 keys, 145 at 128 keys with 4 warps
(`bench/results/2026-12-04-cpu-attention-codegen.json`); the value tile is still read byte by byte. Reading the
values as 16-bit pairs converted by one PTX `cvt.rn.f16x2.e4m3x2` each (104 per KiB at 128 keys, no byte-wise
reads) matched the plain path on an H200 and ran no faster (0.413 against 0.393 ms per layer at mixed lengths,
2026-12-04's third session): removed.
(Triton feeds fp8 to Hopper's tensor cores as fp8 only through wgmma, at 64 query rows or more; this kernel's
query tile has 16, the 6 query heads of a key head padded, so every fp8 entry is converted first.) It also
compiles a design study, never run: the keys as the 64-row operand with the query and probabilities in e4m3
(Hopper's fp8 wgmma): ~112 warp instructions per KiB at 128 keys, between the two; its accuracy is untested.
The Triton installed here may differ from the GPU's: the version is in the output.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def compile_for_sm90(kernel, signature: dict, constants: dict, num_warps: int, num_stages: int | None = None):
    """`kernel` compiled for sm_90 as the JIT specializes it at run time: tensors 16-byte aligned, chunk a multiple
    of 64 (the cache's T is not)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = list(signature)
    aligned = [n for n in names if signature[n].startswith("*")] + ["chunk"]
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    options = {"num_warps": num_warps, **({"num_stages": num_stages} if num_stages else {})}
    return triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constants, attrs=attrs),
                          target=GPUTarget("cuda", 90, 32), options=options)


def compile_variant(fp8: bool, block_n: int, num_warps: int, num_stages: int | None):
    from llmhelpers.inference.engine import _build_triton_kernel

    split_kernel, _ = _build_triton_kernel()
    kv = "*fp8e4nv" if fp8 else "*bf16"
    signature = {"q_ptr": "*bf16", "k_ptr": kv, "v_ptr": kv, "len_ptr": "*i32",
                 "acc_ptr": "*fp32", "m_ptr": "*fp32", "l_ptr": "*fp32", "ks_ptr": "*fp32", "vs_ptr": "*fp32",
                 "scale": "fp32", "T": "i32", "chunk": "i32",
                 **{name: "constexpr" for name in ("Hkv", "GROUP", "D", "NSPLIT", "BLOCK_G", "BLOCK_N", "FP8_KV",
                                                   "LIVE_SPLIT")},
                 "out_ptr": "*bf16"}
    constants = {"Hkv": 2, "GROUP": 6, "D": 128, "NSPLIT": 4, "BLOCK_G": 16, "BLOCK_N": block_n, "FP8_KV": fp8,
                 "LIVE_SPLIT": False}  # R1-1.5B's heads; splits combined after
    return compile_for_sm90(split_kernel, signature, constants, num_warps, num_stages)


def e4m3_design():
    """A design study, compiled here and never run by the engine: fp8 attention with the keys as the MMA's 64-row
    operand (S^T = K Q^T, O^T = V^T P^T) and the query and probabilities quantized to e4m3 too, so Triton can
    use Hopper's fp8 wgmma (it needs 64+ rows; the engine's kernel has 16 query rows). Its accuracy is the open
    question (FlashAttention-3's recipe); its instruction count is what this script measures."""
    import triton
    import triton.language as tl

    @triton.jit
    def keys_as_rows_e4m3(q_ptr, k_ptr, v_ptr, len_ptr, acc_ptr, ks_ptr, vs_ptr, scale, T, chunk, D: tl.constexpr,
                          GROUP: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr):
        slot, split = tl.program_id(0), tl.program_id(1)
        length = tl.load(len_ptr + slot)
        start = split * chunk
        end = tl.minimum(start + chunk, length)
        g = tl.arange(0, BLOCK_G)
        d = tl.arange(0, D)
        q = tl.load(q_ptr + (slot * GROUP + g[:, None]) * D + d[None, :], mask=g[:, None] < GROUP,
                    other=0.0).to(tl.float32)
        q_amax = tl.maximum(tl.max(tl.abs(q), axis=1), 1e-30)
        q8 = (q * (448.0 / q_amax)[:, None]).to(tl.float8e4nv)
        q_scale = q_amax / 448.0 * scale
        m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_G], tl.float32)
        acc = tl.zeros([D, BLOCK_G], tl.float32)
        base = slot * T * D
        for n0 in range(start, end, BLOCK_N):
            n = n0 + tl.arange(0, BLOCK_N)
            live = n < end
            k = tl.load(k_ptr + base + n[:, None] * D + d[None, :], mask=live[:, None], other=0.0)
            k_s = tl.load(ks_ptr + slot * T + n, mask=live, other=0.0)
            s = tl.dot(k, tl.trans(q8)) * (k_s[:, None] * q_scale[None, :])  # [BLOCK_N, BLOCK_G]
            s = tl.where(live[:, None], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=0))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(s - m_new[None, :])
            v_s = tl.load(vs_ptr + slot * T + n, mask=live, other=0.0)
            w = p * v_s[:, None]
            w_max = tl.maximum(tl.max(w, axis=0), 1e-30)
            w8 = (w * (448.0 / w_max)[None, :]).to(tl.float8e4nv)
            vt = tl.trans(tl.load(v_ptr + base + n[:, None] * D + d[None, :], mask=live[:, None], other=0.0))
            acc = acc * alpha[None, :] + tl.dot(vt, w8) * (w_max / 448.0)[None, :]  # [D, BLOCK_G]
            l_i = l_i * alpha + tl.sum(p, axis=0)
            m_i = m_new
        tl.store(acc_ptr + (slot * BLOCK_G + g[None, :]) * D + d[:, None], acc / l_i[None, :])

    return keys_as_rows_e4m3


def compile_design(block_n: int, num_warps: int):
    signature = {"q_ptr": "*bf16", "k_ptr": "*fp8e4nv", "v_ptr": "*fp8e4nv", "len_ptr": "*i32", "acc_ptr": "*fp32",
                 "ks_ptr": "*fp32", "vs_ptr": "*fp32", "scale": "fp32", "T": "i32", "chunk": "i32",
                 **{name: "constexpr" for name in ("D", "GROUP", "BLOCK_G", "BLOCK_N")}}
    return compile_for_sm90(e4m3_design(), signature, {"D": 128, "GROUP": 6, "BLOCK_G": 16, "BLOCK_N": block_n},
                            num_warps)


def loop_body(ptx: str) -> list[str]:
    """The instructions of the kernel's longest loop (a block of keys per iteration): label to backward branch."""
    lines = [line.strip() for line in ptx.splitlines()]
    labels = {m.group(1): i for i, line in enumerate(lines) if (m := re.match(r"^(\$L__BB\d+_\d+):", line))}
    best: list[str] = []
    for i, line in enumerate(lines):
        m = re.search(r"bra(?:\.uni)?\s+(\$L__BB\d+_\d+);", line)
        if m and labels.get(m.group(1), i) < i:
            body = [x for x in lines[labels[m.group(1)]:i + 1] if x and not x.startswith(("//", ".", "{", "}", "$"))]
            best = max(best, body, key=len)
    return best


def describe(kernel, tile_bytes: int, num_warps: int) -> dict:
    import triton

    ptx = kernel.asm["ptx"]
    ops = collections.Counter(line.split()[0] for line in map(str.strip, ptx.splitlines())
                              if line and not line.startswith(("//", ".", "{", "}", "$")))
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(kernel.asm["cubin"])
    tools = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    usage = subprocess.run([str(tools / "cuobjdump"), "--dump-resource-usage", f.name], capture_output=True,
                           text=True).stdout
    os.unlink(f.name)
    regs = re.search(r"REG:(\d+) STACK:(\d+)", usage)

    def count(prefix):
        return sum(c for op, c in ops.items() if op.startswith(prefix))

    loop = loop_body(ptx)
    return {"loop_instructions_per_thread": len(loop),
            # what an SM's schedulers issue (one instruction per warp at a time) per KiB of keys and values read:
            # an H200's 132 SMs x 4 schedulers x 1.98 GHz issue ~1.05e12 per second
            "loop_warp_instructions_per_kib": round(len(loop) * num_warps / (tile_bytes / 1024), 1),
            "loop_ld_shared_b8": sum(x.startswith("ld.shared.b8") for x in loop),
            "loop_st_shared_b8": sum(x.startswith("st.shared.b8") for x in loop),
            "loop_cvt": sum(x.startswith("cvt") for x in loop),
            "registers": int(regs.group(1)), "spill_stack_bytes": int(regs.group(2)),
            "shared_bytes": kernel.metadata.shared, "ptx_instructions": sum(ops.values()),
            "cp_async": count("cp.async"), "ldmatrix": count("ldmatrix"), "ld_shared_b8": count("ld.shared.b8"),
            "cvt_e4m3x2_to_f16x2": count("cvt.rn.f16x2.e4m3x2"), "cvt_f16_to_bf16": count("cvt.bf16.f16"),
            "mma": count("mma.sync"), "wgmma": count("wgmma.mma_async")}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    import triton

    import time

    results = {"triton": triton.__version__, "target": "cuda sm_90", "date": time.strftime("%Y-%m-%d"),
               "command": "python " + " ".join(sys.argv), "variants": {}}
    for fp8 in (False, True):
        for block_n, warps, stages in ((64, 4, None), (128, 4, None), (128, 8, 3), (64, 8, None), (32, 4, None),
                                       (64, 2, None)):
            name = f"{'fp8' if fp8 else 'bf16'}_n{block_n}_w{warps}_s{stages or 'default'}"
            tile_bytes = 2 * block_n * 128 * (1 if fp8 else 2)  # one block's keys and values
            results["variants"][name] = describe(compile_variant(fp8, block_n, warps, stages), tile_bytes, warps)
            print(name, json.dumps(results["variants"][name]), flush=True)
    results["design_keys_as_rows_e4m3"] = {}
    for block_n, warps in ((64, 4), (128, 4)):
        name = f"fp8_e4m3_inputs_n{block_n}_w{warps}"
        results["design_keys_as_rows_e4m3"][name] = describe(compile_design(block_n, warps), 2 * block_n * 128, warps)
        print("design", name, json.dumps(results["design_keys_as_rows_e4m3"][name]), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
