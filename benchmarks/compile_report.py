"""Compile every fused-op kernel configuration for an NVIDIA GPU on a machine without one.

    python benchmarks/compile_report.py [--arch 90] [--json] [OP ...]     OP: sid_loss noise fake_score_loss grad_scale

Prints each configuration's register count and local-memory (spill) bytes; ``--json`` prints one JSON
list instead (what tests/test_ops_*.py read: no configuration may spill or exceed 255 registers). Runs
without TRITON_INTERPRET: the kernels must be decorated for compilation (the script refuses otherwise).
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the checkout's sidfast

import torch  # noqa: E402

TRITON_TYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64"}
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float64)


def compile_for_gpu(kernel, args: dict, constexprs: dict, num_warps: int = 4, arch: int = 90,
                    divisible: tuple = ()) -> dict:
    """Compile a Triton kernel for ``sm_{arch}``: ``args`` maps every runtime argument to a Triton type
    ("*bf16", "i32", "fp32", ...), ``constexprs`` the compile-time ones; ``divisible`` names arguments to
    specialise as multiples of 16 (what the JIT does at run time for such values, enabling vector loads).
    Returns the cubin's register count and local-memory (spill) bytes."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = list(inspect.signature(kernel.fn).parameters)
    signature = {n: ("constexpr" if n in constexprs else args[n]) for n in names}
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in divisible}
    compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=dict(constexprs), attrs=attrs),
                              target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as fh:
        fh.write(compiled.asm["cubin"])
        fh.flush()
        usage = subprocess.run([cuobjdump, "-res-usage", fh.name], capture_output=True, text=True, check=True).stdout
    fields = dict(kv.split(":") for line in usage.splitlines() if "REG:" in line for kv in line.split() if ":" in kv)
    return dict(registers=int(fields["REG"]), spill_bytes=int(fields.get("LOCAL", 0)))


def _types(dt: torch.dtype) -> tuple[str, str]:
    """(pointer type of the data, pointer type of the loss) for inputs of ``dt``."""
    return "*" + TRITON_TYPES[dt], "*fp64" if dt == torch.float64 else "*fp32"


def sid_loss_specs() -> list[dict]:
    from sidfast.ops import sid_loss as S
    from sidfast.ops._common import RBLOCK, acc_type, num_warps

    specs = []
    div = ("r_ptr", "f_ptr", "x_ptr", "gr_ptr", "gf_ptr", "gx_ptr", "loss_ptr", "N")
    for dt in FLOAT_DTYPES:
        t, lt = _types(dt)
        acc = acc_type(dt)
        io = dict(r_ptr=t, f_ptr=t, x_ptr=t, gr_ptr=t, gf_ptr=t, gx_ptr=t, loss_ptr=lt, part_ptr=lt,
                  counter_ptr="*i32", out_ptr=lt, drop_ptr="*i32", inv_w_ptr=lt, B="i32", N="i32",
                  alpha="fp32", grad_scale="fp32", loss_scale="fp32", n_programs="i32", r_iters="i32")
        # the SiD variants, and SiDA's (normalized, batchmean, per-sample drop flags and 1/w)
        variants = [(n, r, False) for n in (True, False) for r in (True, False)] + [(True, True, True)]
        for normalize, reduce, per_sample in variants:
            tag = f"{TRITON_TYPES[dt]} normalize={normalize} reduce={reduce} per_sample={per_sample}"
            for n in (16, 8192):
                p = S.plan(64, n, 4, torch.device("cpu"))
                specs.append(dict(name=f"sid tile N={n} {tag}", kernel=S._sid_tile_kernel, args=io,
                                  constexprs=dict(ROWS=p["ROWS"], BLOCK_N=p["BLOCK_N"], NORMALIZE=normalize,
                                                  REDUCE=reduce, ACC=acc, RBLOCK=RBLOCK,
                                                  PER_SAMPLE=per_sample),
                                  num_warps=num_warps(p["ROWS"] * p["BLOCK_N"], dt.itemsize), divisible=div))
            block = S.LOOP_BYTES // dt.itemsize
            specs.append(dict(name=f"sid loop {tag}", kernel=S._sid_loop_kernel,
                              args=dict(io, sample_iters="i32", col_iters="i32"),
                              constexprs=dict(BLOCK=block, NORMALIZE=normalize, REDUCE=reduce, ACC=acc,
                                              RBLOCK=RBLOCK, PER_SAMPLE=per_sample),
                              num_warps=num_warps(block, dt.itemsize), divisible=div))
        for normalize, per_sample in ((True, False), (False, False), (True, True)):
            apply_args = {k: v for k, v in io.items() if k not in ("B", "drop_ptr")}
            apply_args.update(inv_w_ptr=lt, sample_bad_ptr="*i32", C="i32")
            if not per_sample:
                specs.append(dict(name=f"sid split-apply {TRITON_TYPES[dt]} reduce={normalize}",
                                  kernel=S._sid_apply_kernel, args=apply_args,
                                  constexprs=dict(BLOCK=S.SPLIT_BLOCK, REDUCE=normalize, ACC=acc,
                                                  RBLOCK=RBLOCK),
                                  num_warps=num_warps(S.SPLIT_BLOCK, dt.itemsize), divisible=div))
            specs.append(dict(name=f"sid split-sample {TRITON_TYPES[dt]} normalize={normalize} "
                                   f"per_sample={per_sample}",
                              kernel=S._sid_sample_kernel,
                              args=dict(abs_ptr=lt, bad_ptr="*i32", inv_w_ptr=lt, sample_bad_ptr="*i32", N="i32",
                                        C="i32", c_iters="i32"),
                              constexprs=dict(NORMALIZE=normalize, CBLOCK=S.CBLOCK, ACC=acc,
                                              PER_SAMPLE=per_sample),
                              num_warps=4))
        specs.append(dict(name=f"sid split-stats {TRITON_TYPES[dt]}", kernel=S._sid_stats_kernel,
                          args=dict(r_ptr=t, f_ptr=t, x_ptr=t, abs_ptr=lt, bad_ptr="*i32", N="i32", C="i32"),
                          constexprs=dict(BLOCK=S.SPLIT_BLOCK, ACC=acc),
                          num_warps=num_warps(S.SPLIT_BLOCK, dt.itemsize), divisible=div[:3] + ("N",)))
    return specs


def noise_specs() -> list[dict]:
    from sidfast.ops import noise as Nz
    from sidfast.ops._common import acc_type, num_warps
    from sidfast.ops._philox import tile_shape

    specs = []
    for dt in FLOAT_DTYPES:
        t, _ = _types(dt)
        args = dict(x_ptr=t, noise_ptr=t, a_ptr="*fp32", s_ptr="*fp32", seed_ptr="*i64", out_ptr=t, B="i32", N="i32",
                    NQ="i32", C_CH="i32", HW="i32", offset="i32", n_chunks="i32")
        for n in (16, 12288):
            rows, block_n, _ = tile_shape(64, n)
            for has_noise, cl in ((True, False), (False, False), (False, True)):
                specs.append(dict(name=f"add_noise {TRITON_TYPES[dt]} N={n} noise={has_noise} cl={cl}",
                                  kernel=Nz._add_noise_kernel, args=args,
                                  constexprs=dict(HAS_NOISE=has_noise, CL=cl, ROWS=rows, BLOCK_N=block_n,
                                                  ACC=acc_type(dt), FAST=True),
                                  num_warps=num_warps(rows * block_n, dt.itemsize),
                                  divisible=("x_ptr", "noise_ptr", "out_ptr", "N", "NQ")))
        rows, block_n, _ = tile_shape(64, 12288)
        specs.append(dict(name=f"scale_rows {TRITON_TYPES[dt]}", kernel=Nz._scale_rows_kernel,
                          args=dict(g_ptr=t, a_ptr="*fp32", out_ptr=t, B="i32", N="i32", n_chunks="i32"),
                          constexprs=dict(ROWS=rows, BLOCK_N=block_n, ACC=acc_type(dt)),
                          num_warps=num_warps(rows * block_n, dt.itemsize), divisible=("g_ptr", "out_ptr", "N")))
    rows, block_n, _ = tile_shape(64, 12288)
    specs.append(dict(name="noise fp32", kernel=Nz._noise_kernel,
                      args=dict(seed_ptr="*i64", out_ptr="*fp32", B="i32", N="i32", NQ="i32", offset="i32",
                                n_chunks="i32"),
                      constexprs=dict(ROWS=rows, BLOCK_N=block_n, FAST=True), num_warps=num_warps(rows * block_n),
                      divisible=("out_ptr", "N", "NQ")))
    return specs


def fake_score_loss_specs() -> list[dict]:
    from sidfast.ops import fake_score_loss as F
    from sidfast.ops._common import RBLOCK, acc_type, num_warps
    from sidfast.ops._philox import tile_shape

    specs = []
    for dt in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        t, lt = _types(dt)
        args = dict(pred_ptr=t, x0_ptr=t, noise_ptr=t, a_ptr="*fp32", s_ptr="*fp32", seed_ptr="*i64", grad_ptr=t,
                    loss_ptr=lt, part_ptr=lt, counter_ptr="*i32", out_ptr=lt, B="i32", N="i32", NQ="i32", C_CH="i32",
                    HW="i32", offset="i32", n_chunks="i32", sigma_data="fp32", gamma="fp32", grad_scale="fp32",
                    loss_scale="fp32", n_programs="i32", r_iters="i32")
        rows, block_n, _ = tile_shape(64, 12288)
        for pname, pcode in F.PREDICTION_CODES.items():
            for wname, wcode in F.WEIGHTING_CODES.items():
                for has_noise, cl in ((True, False), (False, False), (False, True)):
                    if dt == torch.float32:  # every pair with explicit noise, the usual pairs in the seed modes
                        keep = has_noise or wname in ("edm", pname)
                    else:  # other dtypes: two usual pairs, in-kernel noise
                        keep = (pname, wname) in (("x0", "edm"), ("eps", "eps")) and not has_noise and not cl
                    if not keep:
                        continue
                    specs.append(dict(
                        name=f"fake_score {TRITON_TYPES[dt]} pred={pname} weighting={wname} noise={has_noise} cl={cl}",
                        kernel=F._fake_score_kernel, args=args,
                        constexprs=dict(HAS_NOISE=has_noise, CL=cl, PRED=pcode,
                                        SPACE=F.PREDICTION_CODES[F.SPACE_OF[wname]], WEIGHTING=wcode, REDUCE=True,
                                        ROWS=rows, BLOCK_N=block_n, ACC=acc_type(dt), FAST=True, RBLOCK=RBLOCK),
                        num_warps=num_warps(rows * block_n, dt.itemsize),
                        divisible=("pred_ptr", "x0_ptr", "noise_ptr", "grad_ptr", "N", "NQ")))
    return specs


def grad_scale_specs() -> list[dict]:
    from sidfast.ops import grad_scale as G
    from sidfast.ops._common import num_warps

    specs = []
    for dt in FLOAT_DTYPES:
        for num in (1, 3):
            args = dict(g_ptr="*fp32", applied_ptr="*" + ("fp64" if dt == torch.float64 else "fp32"), n="i32",
                        iters="i32", nprog="i32", **{f"t{i}_ptr": "*" + TRITON_TYPES[dt] for i in range(3)})
            specs.append(dict(name=f"scale_inplace {TRITON_TYPES[dt]} x{num}", kernel=G._scale_inplace_kernel,
                              args=args, constexprs=dict(NUM=num, BLOCK=G.SCALE_BLOCK),
                              num_warps=num_warps(G.SCALE_BLOCK, dt.itemsize),
                              divisible=("t0_ptr", "t1_ptr", "t2_ptr", "n")))
    return specs


SPECS = {"sid_loss": sid_loss_specs, "noise": noise_specs, "fake_score_loss": fake_score_loss_specs,
         "grad_scale": grad_scale_specs}


def report(op: str, arch: int = 90) -> list[dict]:
    """One dict per configuration of ``op``'s kernels: name, registers, spill_bytes."""
    rows = []
    for spec in SPECS[op]():
        r = compile_for_gpu(spec["kernel"], spec["args"], spec["constexprs"], spec["num_warps"], arch,
                            spec.get("divisible", ()))
        rows.append(dict(name=spec["name"], **r))
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("ops", nargs="*", metavar="OP", help=f"any of {', '.join(SPECS)} (default: all)")
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90 for sm_90")
    parser.add_argument("--json", action="store_true", help="print one JSON list")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("0", ""):
        parser.error("unset TRITON_INTERPRET: the kernels must be decorated for compilation")
    unknown = [op for op in args.ops if op not in SPECS]
    if unknown:
        parser.error(f"unknown OP {', '.join(unknown)}: choose from {', '.join(SPECS)}")
    rows = [dict(op=op, **row) for op in (args.ops or list(SPECS)) for row in report(op, args.arch)]
    if args.json:
        print(json.dumps(rows))
    else:
        for row in rows:
            print(f"{row['name']:64s} registers {row['registers']:4d}  spill bytes {row['spill_bytes']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
