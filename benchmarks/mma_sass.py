"""The tensor-core GEMV's machine code without a GPU: compiles finetune/quant/mma_gemv.py's kernel for each launch
configuration with NVRTC to PTX, assembles it for sm_90 with Triton's bundled ptxas, and reports registers, stack,
local-memory instructions and the length of the main loop (from the first to the last HMMA, the instructions a
warp issues per 128-input chunk). For comparing a kernel change with the code before it (NOTES steps 13 and 17).

NVRTC: the wheel PyTorch's CUDA build depends on, or on a CPU machine ``pip download --no-deps
nvidia-cuda-nvrtc-cu12`` unpacked anywhere (``--nvrtc`` names libnvrtc.so.12).

    python benchmarks/mma_sass.py --nvrtc /tmp/nvrtc/x/nvidia/cuda_nvrtc/lib/libnvrtc.so.12
    python benchmarks/mma_sass.py --source old_mma_gemv.py   # another version of the module (e.g. git show)
    python benchmarks/mma_sass.py --gemm    # the small-M GEMM (finetune/quant/mma_gemm.py), every candidate config
"""

from __future__ import annotations

import argparse
import ctypes
import glob
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def find_nvrtc() -> str | None:
    import site

    roots = site.getsitepackages() + [site.getusersitepackages()]
    for root in roots:
        hits = sorted(glob.glob(os.path.join(root, "nvidia", "cuda_nvrtc", "lib", "libnvrtc.so*")))
        hits = [h for h in hits if "alt" not in os.path.basename(h) and "builtins" not in h]
        if hits:
            return hits[0]
    return None


def compile_ptx(lib, source: str, arch: str) -> str:
    prog = ctypes.c_void_p()
    if lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), b"mma_gemv.cu", 0, None, None):
        raise RuntimeError("nvrtcCreateProgram failed")
    opts = [b"-std=c++17", f"--gpu-architecture=compute_{arch}".encode()]
    rc = lib.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
    size = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    lib.nvrtcGetProgramLog(prog, log)
    if rc:
        raise RuntimeError("NVRTC: " + log.value.decode(errors="replace")[:3000])
    lib.nvrtcGetPTXSize(prog, ctypes.byref(size))
    ptx = ctypes.create_string_buffer(size.value)
    lib.nvrtcGetPTX(prog, ptx)
    return ptx.value.decode()


def nvidia_tools() -> Path:
    """Triton's bundled CUDA tools (ptxas, cuobjdump)."""
    import triton

    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin"


def assemble_ptx(ptx: str, arch: str, workdir: Path, name: str = "k") -> tuple[subprocess.CompletedProcess, Path]:
    """``ptx`` assembled for sm_``arch`` by Triton's ptxas with -v (registers, stack and shared memory in stderr):
    (the ptxas run, not checked, and the cubin's path)."""
    src, cubin = workdir / f"{name}.ptx", workdir / f"{name}.cubin"
    src.write_text(ptx)
    asm = subprocess.run([str(nvidia_tools() / "ptxas"), f"-arch=sm_{arch}", "-v", str(src), "-o", str(cubin)],
                         capture_output=True, text=True)
    return asm, cubin


def load_module(path: Path):
    spec = importlib.util.spec_from_file_location("finetune.quant._mma_sass_copy", path)
    mod = importlib.util.module_from_spec(spec)
    import finetune.quant  # noqa: F401  (the module's relative imports)

    mod.__package__ = "finetune.quant"
    spec.loader.exec_module(mod)
    return mod


def analyse(sass: str) -> dict:
    lines = [ln.split(";")[0] for ln in sass.splitlines() if re.match(r"\s+/\*[0-9a-f]{4,}\*/", ln)]
    hmma = [i for i, ln in enumerate(lines) if "HMMA" in ln]
    return dict(instructions=len(lines), hmma=len(hmma), main_loop=(hmma[-1] - hmma[0] + 1) if hmma else 0,
                local_memory=sum(("LDL" in ln or "STL" in ln) for ln in lines))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", type=Path, default=ROOT / "finetune" / "quant" / "mma_gemv.py")
    ap.add_argument("--nvrtc", default=None, help="libnvrtc.so.12 (default: the nvidia-cuda-nvrtc wheel's)")
    ap.add_argument("--arch", default="90")
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--out", default=None)
    ap.add_argument("--gemm", action="store_true", help="the small-M GEMM's configs instead of the GEMV's")
    args = ap.parse_args(argv)
    nvrtc = args.nvrtc or find_nvrtc()
    if not nvrtc:
        print("no libnvrtc found: pass --nvrtc (pip download --no-deps nvidia-cuda-nvrtc-cu12, then unzip the wheel)")
        return 2
    lib = ctypes.CDLL(nvrtc)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        def assemble(src: str, **labels) -> None:
            asm, cubin = assemble_ptx(compile_ptx(lib, src, args.arch), args.arch, Path(tmp))
            asm.check_returncode()
            info = " ".join(asm.stderr.split())
            regs = re.search(r"Used (\d+) registers", info)
            stack = re.search(r"(\d+) bytes stack frame", info) or re.search(r"(\d+) bytes cumulative stack", info)
            smem = re.search(r"(\d+) bytes smem", info)
            sass = subprocess.run([str(nvidia_tools() / "cuobjdump"), "-sass", str(cubin)], capture_output=True, text=True,
                                  check=True).stdout
            r = dict(**labels, registers=int(regs.group(1)) if regs else None,
                     stack_bytes=int(stack.group(1)) if stack else 0, smem_bytes=int(smem.group(1)) if smem else 0,
                     **analyse(sass))
            print(json.dumps(r), flush=True)
            results.append(r)

        if args.gemm:
            from finetune.quant import mma_gemm as M

            for mb in (1, 2, 4, 8):
                for warps, tpw, depth, per_sm in [(w, t, d, p) for w in (4, 8) for t in (1, 2) for d in (1, 3)
                                                  for p in (1, 2, 4)]:
                    assemble(M.kernel_source(warps, mb, tpw, depth, args.group_size, per_sm), kernel="gemm",
                             row_blocks=mb, warps=warps, tiles_per_warp=tpw, depth=depth, min_blocks=per_sm)
        else:
            G = load_module(args.source)
            configs = sorted({(mb, w, d) for mb, (w, d, _) in G.CONFIGS.items()} | {(1, 4, 2), (4, 4, 1)}
                         | {(mb, w, d) for (mb, _, _), (w, d, _) in getattr(G, "SHAPE_CONFIGS", {}).items()})
            variants = (0, 1) if "__LORA__" in G._SOURCE else (0,)  # the low-rank epilogue's build (step 17 on)
            for (mb, warps, depth), lora in [(c, v) for c in configs for v in variants]:
                if hasattr(G, "kernel_source"):
                    src = G.kernel_source(warps, mb, depth, args.group_size, bool(lora))
                else:  # an older version of the module (--source)
                    src = (G._SOURCE.replace("__WARPS__", str(warps)).replace("__MB__", str(mb))
                           .replace("__DEPTH__", str(depth)).replace("__GCHUNKS__", str(args.group_size // G.CHUNK))
                           .replace("__LORA__", str(lora)))
                assemble(src, row_blocks=mb, warps=warps, depth=depth, lora_epilogue=bool(lora))
    if args.out:
        source = "finetune/quant/mma_gemm.py" if args.gemm else str(args.source)
        Path(args.out).write_text(json.dumps(dict(source=source, arch=args.arch, configs=results),
                                             indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
