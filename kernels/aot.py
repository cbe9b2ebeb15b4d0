"""Ahead-of-time compile of a Triton kernel for the H100 (sm_90) without a GPU: registers, spills, shared memory.

Triton specialises a launch on its arguments (ints equal to 1 become constants, pointers and ints
divisible by 16 get a divisibility hint that enables vectorised loads and the async-copy pipeline);
a compile without those hints is a different, much worse kernel. `sm90_resources` therefore takes
the argument *values* a real launch would see (small CPU tensors stand in for device tensors: only
their dtype and alignment matter), specialises them with Triton's own launch-time rule, compiles
for sm_90 and runs ptxas -v on the PTX. Used by tests/test_moe_fused.py and tests/test_router.py (through
kernels.router.compile_report) to keep the fused MoE and router kernels free of register spills at the
benchmark's constexprs.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any


def ptxas() -> str | None:
    """A ptxas binary (Triton's bundled one first, else the CUDA toolkit's), or None."""
    try:
        from triton.backends.nvidia import compiler

        path = compiler.get_ptxas(90).path
        if path and Path(path).exists():
            return path
    except Exception:  # noqa: BLE001 - any import/lookup problem: try the toolkit's
        pass
    return shutil.which("ptxas") or (p if Path(p := "/usr/local/bin/ptxas").exists() else None)


def sm90_resources(fn: Any, args: dict[str, Any], num_warps: int, num_stages: int) -> dict[str, int]:
    """{"registers", "spill_stores", "spill_loads", "shared"} of jit function `fn` compiled for sm_90.

    args: every parameter of `fn` by name: constexpr parameters their value, the others what a
    launch passes (torch tensors for pointers, ints, bools)."""
    import triton
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend, GPUTarget

    signature: dict[str, str] = {}
    constexprs: dict[tuple[int, ...], Any] = {}
    attrs: dict[tuple[int, ...], list[list[Any]]] = {}
    for i, name in enumerate(fn.arg_names):
        value = args[name]
        if i in fn.constexprs:
            signature[name], constexprs[(i,)] = "constexpr", value
            continue
        kind, key = native_specialize_impl(BaseBackend, value, False, True, True)
        signature[name] = kind
        if kind == "constexpr":
            constexprs[(i,)] = key
        elif key == "D":
            attrs[(i,)] = [["tt.divisibility", 16]]
    src = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                            options={"num_warps": num_warps, "num_stages": num_stages})
    binary = ptxas()
    if binary is None:
        raise FileNotFoundError("no ptxas found (Triton's bundled one or the CUDA toolkit's)")
    with tempfile.TemporaryDirectory() as tmp:
        ptx = Path(tmp) / "k.ptx"
        ptx.write_text(kernel.asm["ptx"])
        arch = "sm_90a" if ".target sm_90a" in kernel.asm["ptx"] else "sm_90"
        log = subprocess.run([binary, f"-arch={arch}", "-v", str(ptx), "-o", str(Path(tmp) / "k.cubin")],
                             capture_output=True, text=True, check=True).stderr

    def number(pattern: str) -> int:
        m = re.search(pattern, log)
        return int(m.group(1)) if m else 0

    return {"registers": number(r"Used (\d+) registers"), "spill_stores": number(r"(\d+) bytes spill stores"),
            "spill_loads": number(r"(\d+) bytes spill loads"), "shared": int(kernel.metadata.shared)}
