"""The few-token GEMV (quantune.kernels._gemv_kernel) compiled for the H200 (sm_90) on this machine, no GPU needed:
its registers, stack frame, instruction count and the PTX/SASS instructions asked for, for one set of the kernel's
compile-time arguments. Reading this costs no device time (the device notes: read the compiler's output first).

    python -m eval.sass_gemv '{"K": 4096, "GROUP": 4096, "BITS": 4, "KU": 3, "MODE": 5, "BLOCK_M": 2,
                              "BLOCK_W": 128, "SPLIT": 1, "ASM": true, "PDL": true, "LATE": true}'

Prints one JSON object: ``registers``, ``stack`` (bytes per thread: spills show here), ``sass_instructions``,
``ptx_count`` / ``sass_count`` (occurrences of each ``--ptx`` / ``--sass`` string), ``loop_bodies`` (the instructions
of each loop, from a label to the branch back to it: the K loop's cost per tile), ``ptx_around_wait`` (each
``--ptx`` string's occurrences before and after the PTX's first ``griddepcontrol.wait``, the wait for the input's
preparation under programmatic dependent launch). Run it with TRITON_INTERPRET unset (the interpreter's kernels do
not compile). The code is the installed Triton's: the H200 runs Triton 3.6 and this machine may have a newer one,
which can compile a kernel differently (the joined decode: 988 instructions a tile with 3.9 against 1550 with 3.6).
For the device's code install its version aside (`pip download triton==3.6.0 --no-deps -d W; pip install --no-deps
--target T W/*.whl`) and run with `PYTHONPATH=T`."""
from __future__ import annotations

import argparse
import inspect
import json
import re
import subprocess
import tempfile
from pathlib import Path


POINTERS = {"w_ptr": "*i32", "xp_ptr": "*i32", "xqp_ptr": "*i32", "xp16_ptr": "*i16", "xqp16_ptr": "*i16",
            "r_ptr": "*bf16", "out_ptr": "*bf16"}  # else fp32 (r_ptr, out_ptr: the joined decode's)


def compile_gemv(const: dict, num_warps: int = 1, ptx: tuple[str, ...] = (), sass: tuple[str, ...] = (),
                 kernel="_gemv_kernel", dump: str | None = None, maxnreg: int | None = None) -> dict:
    """``kernel`` (the name of a Triton kernel of quantune.kernels, the GEMV by default, or a Triton kernel)
    compiled for sm_90 with the compile-time arguments ``const`` (the others at their defaults); the report
    described above. ``dump``: a file to write the disassembly to."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from quantune import kernels

    fn = getattr(kernels, kernel) if isinstance(kernel, str) else kernel
    params = inspect.signature(fn.fn).parameters
    names = list(params)
    unknown = sorted(set(const) - set(names))
    if unknown:  # e.g. PREFETCH, in the commands of sessions before the twenty-seventh: the kernel lost it
        raise SystemExit(f"{fn.fn.__name__} has no argument {', '.join(unknown)} (its arguments: {', '.join(names)})")
    const = {**{n: v.default for n, v in params.items() if v.default is not inspect.Parameter.empty}, **const}
    ptrs = [n for n in names if n.endswith("_ptr")]
    sig = {n: POINTERS.get(n, "*fp32") if n in ptrs else "constexpr" if n in const else "i32" for n in names}
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in ptrs + ["stride_w"] if n in names}
    compiled = triton.compile(ASTSource(fn, sig, const, attrs=attrs), target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": num_warps, **({"maxnreg": maxnreg} if maxnreg else {})})
    tools = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "gemv.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        code = subprocess.run([str(tools / "nvdisasm"), str(cubin)], capture_output=True, text=True, check=True).stdout
        usage = subprocess.run([str(tools / "cuobjdump"), "--dump-resource-usage", str(cubin)], capture_output=True,
                               text=True, check=True).stdout
    if dump:
        Path(dump).write_text(code)
    regs = re.search(r"REG:(\d+)", usage)
    stack = re.search(r"STACK:(\d+)", usage)
    instructions = [line for line in code.splitlines() if re.match(r"\s+/\*[0-9a-f]{4,}\*/", line)]
    return {"registers": int(regs.group(1)) if regs else None, "stack": int(stack.group(1)) if stack else None,
            "sass_instructions": len(instructions),
            "ptx_count": {s: compiled.asm["ptx"].count(s) for s in ptx},
            "ptx_around_wait": {s: [part.count(s) for part in compiled.asm["ptx"].partition("griddepcontrol.wait")[::2]]
                                for s in ptx},
            "sass_count": {s: code.count(s) for s in sass}, "loop_bodies": loop_bodies(code)}


def loop_bodies(disassembly: str) -> list[int]:
    """Instruction counts of the loops in nvdisasm output: for each branch back to an earlier label, the
    instructions from that label to the branch, both included (in the order the branches appear); the
    one-instruction branch to itself that ends every kernel is left out."""
    labels, bodies, index = {}, [], 0
    for line in disassembly.splitlines():
        label = re.match(r"\s*(\.L_x_\d+):", line)
        if label:
            labels[label.group(1)] = index
        if re.match(r"\s+/\*[0-9a-f]{4,}\*/", line):
            target = re.search(r"BRA\b.*?(\.L_x_\d+)", line)
            if target and target.group(1) in labels and labels[target.group(1)] < index:
                bodies.append(index - labels[target.group(1)] + 1)
            index += 1
    return bodies


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("constexprs", help="the kernel's compile-time arguments as a JSON object")
    p.add_argument("--warps", type=int, default=1)
    p.add_argument("--kernel", default="_gemv_kernel", help="another Triton kernel of quantune.kernels")
    p.add_argument("--ptx", default="griddepcontrol.wait,dp2a", help="comma-separated PTX strings to count")
    p.add_argument("--sass", default="ACQBULK,IDP", help="comma-separated SASS strings to count")
    p.add_argument("--dump", help="write the disassembly to this file")
    p.add_argument("--maxnreg", type=int, help="the registers a thread may use at most (Triton's maxnreg option)")
    args = p.parse_args()
    print(json.dumps(compile_gemv(json.loads(args.constexprs), args.warps, tuple(filter(None, args.ptx.split(","))),
                                  tuple(filter(None, args.sass.split(","))), args.kernel,
                                  args.dump, args.maxnreg)))


if __name__ == "__main__":
    main()
