"""Offline GPU compile check: every Triton kernel built for sm_90 / sm_80 without a GPU.

How: each launcher (the real Python code, so the constexprs and num_warps are exactly the ones it
picks) runs on CPU tensors of the released and the embedded model's shapes with every kernel swapped
for a recorder that launches nothing; each distinct recorded launch is then specialised as the JIT
does at launch time and compiled with `triton.compile(..., target=GPUTarget("cuda", cc, 32))`;
ptxas -v (shipped in the triton wheel) gives registers and spills. Shapes that give the same
specialisation compile once.

Covered: fps, kNN, mask points, point features fwd/bwd, group pool fwd/bwd (max pooling, the
released and embedded pooler; the backward also in its deterministic variant) and mask pool fwd/bwd, in fp32, bf16 and fp16 (the coordinate
kernels are fp32 whatever the model dtype), for sm_90 (sm_90a, as Triton builds it) and sm_80.
Shapes: "released" = CLIP width 1024, adapter width 4096 (7B LLM) and 5120 (13B), 512 points,
stages 128 -> 32, k = 24, 24 x 24 map, 336 x 336 masks; "embedded" = ferret/assets/model/config.json
(mm_hidden_size 160, hidden_size 256, 12 x 12 map from the conv tower's 144 px image, same sampler
geometry; tests/test_embedded_model.py keeps it equal to the shipped config).

The kernels must be JITFunctions, i.e. TRITON_INTERPRET unset when triton was imported: run it as
`python -m ferret_kernels.compile_check` (the CPU test-suite starts it in a subprocess).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .params import SamplerGeometry

__all__ = ["CASES", "DTYPES", "ARCHS", "record_launches", "compile_launch", "run"]

# (name, CLIP/map width, adapter widths, grid side, image side) of the shapes a GPU will see.
CASES = {
    "released": dict(width=1024, adapter_widths=(4096, 5120), side=24, image=336),
    "embedded": dict(width=160, adapter_widths=(256,), side=12, image=144),
}
POINTS, GEOMETRY = 512, SamplerGeometry()  # the released sampler's
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Shared memory a block may use (opt-in maximum) and an SM holds, in bytes; 64 warps, 64K registers.
ARCHS = {
    90: dict(ptxas_arch="sm_90a", smem_per_block=232448, smem_per_sm=233472),
    80: dict(ptxas_arch="sm_80", smem_per_block=166912, smem_per_sm=167936),
}
KERNEL_MODULES = ("fps", "knn", "mask_points", "point_features_kernel", "group_pool", "mask_pool")


@dataclass
class Launch:
    kernel: object  # JITFunction
    args: tuple
    options: dict
    grid: tuple
    cases: set = field(default_factory=set)

    @property
    def name(self) -> str:
        return self.kernel.fn.__name__


class _Recorder:
    """Stands in for a JITFunction: `kernel[grid](*args, **options)` records instead of launching."""

    def __init__(self, kernel, sink: list):
        self.kernel, self.sink = kernel, sink

    def __getitem__(self, grid):
        def record(*args, **options):
            grid_value = grid(options) if callable(grid) else tuple(grid)
            self.sink.append(Launch(self.kernel, args, options, grid_value))

        return record


def _modules():
    import importlib

    return [importlib.import_module(f"ferret_kernels.{name}") for name in KERNEL_MODULES]


def record_launches(case: str, dtype: torch.dtype) -> list[Launch]:
    """Run every launcher (fwd and bwd) at one case's shapes on CPU tensors, recording the launches."""
    from triton.runtime.jit import JITFunction

    from . import fps, group_pool, knn, mask_points, mask_pool, point_features_kernel

    shape = CASES[case]
    sink: list[Launch] = []
    patched = []
    for module in _modules():
        for name, value in list(vars(module).items()):
            if isinstance(value, JITFunction):
                patched.append((module, name, value))
                setattr(module, name, _Recorder(value, sink))
            elif name in ("check_device", "interpreting"):  # CPU tensors stand in for CUDA ones here
                patched.append((module, name, value))
                setattr(module, name, (lambda *a: None) if name == "check_device" else (lambda: False))
    try:
        gen = torch.Generator().manual_seed(0)
        regions, images = 2, 2
        cells, width = shape["side"] ** 2, shape["width"]
        image_index = torch.arange(regions) % images
        masks = torch.zeros(regions, shape["image"], shape["image"], dtype=torch.bool)
        masks[:, 10:60, 20:90] = True
        xy = torch.rand(regions, POINTS, 2, generator=gen)
        mask_points.sample_mask_points(masks, POINTS, gen)
        available = POINTS
        for sub, neighbours in zip(GEOMETRY.num_sub_point, GEOMETRY.num_neighbor):
            fps.farthest_point_sample(xy[:, :available], sub, 0)
            knn.knn_indices(xy[:, :sub], xy[:, :available], neighbours)
            u = torch.randn(regions, available, width, dtype=dtype, requires_grad=True)
            v = torch.randn(regions, sub, width, dtype=dtype, requires_grad=True)
            index = torch.randint(0, available, (regions, sub, neighbours), generator=gen)
            gamma = torch.ones(width, dtype=dtype, requires_grad=True)
            beta = torch.zeros(width, dtype=dtype, requires_grad=True)
            out = group_pool.group_pool(u, v, index, gamma, beta, 1e-5, "max")
            torch.autograd.grad(out, [u, v, gamma, beta], torch.ones_like(out))
            deterministic = torch.are_deterministic_algorithms_enabled()
            torch.use_deterministic_algorithms(True)  # the backward's variant without atomics
            try:
                out = group_pool.group_pool(u, v, index, gamma, beta, 1e-5, "max")
                torch.autograd.grad(out, [u, v, gamma, beta], torch.ones_like(out))
            finally:
                torch.use_deterministic_algorithms(deterministic)
            available = sub
        maps = torch.randn(images, cells, width, dtype=dtype, requires_grad=True)
        for points in (xy, xy[:, : GEOMETRY.num_sub_point[0]]):  # every point, then the anchors
            out = point_features_kernel.point_features(maps, points, image_index)
            torch.autograd.grad(out, maps, torch.ones_like(out))
        for adapter in shape["adapter_widths"]:
            projected = torch.randn(images, cells, adapter, dtype=dtype, requires_grad=True)
            out = mask_pool.mask_average_pool(projected, masks, image_index, POINTS, generator=gen)
            torch.autograd.grad(out, projected, torch.ones_like(out))
    finally:
        for module, name, value in patched:
            setattr(module, name, value)
    for launch in sink:
        launch.cases.add(case)
    return sink


def _specialise(launch: Launch, target):
    """The JIT's own launch-time specialisation -> (ASTSource, options dict)."""
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import MockTensor, create_function_from_signature

    backend = make_backend(target)
    kernel = launch.kernel
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    args = tuple(MockTensor(a.dtype) if isinstance(a, torch.Tensor) else a for a in launch.args)
    bound, specialization, options = binder(*args, **launch.options)
    options, signature, constexprs, attrs = kernel._pack_args(backend, dict(launch.options), bound, specialization, options)
    return ASTSource(kernel, signature, constexprs, attrs), options.__dict__, specialization


def launch_key(launch: Launch) -> tuple:
    from triton.compiler import make_backend
    from triton.backends.compiler import GPUTarget
    from triton.runtime.jit import MockTensor, create_function_from_signature

    backend = make_backend(GPUTarget("cuda", 90, 32))
    binder = create_function_from_signature(launch.kernel.signature, launch.kernel.params, backend)
    args = tuple(MockTensor(a.dtype) if isinstance(a, torch.Tensor) else a for a in launch.args)
    _, specialization, _ = binder(*args, **launch.options)
    return launch.name, str(specialization), str(sorted(launch.options.items()))


_PTXAS_USED = re.compile(r"Used (\d+) registers")
_PTXAS_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_SMEM = re.compile(r"(\d+) bytes smem")


def ptxas_stats(ptx: str, arch: int, fp_fusion: bool) -> dict:
    from triton.backends.nvidia.compiler import get_ptxas

    ptxas = get_ptxas(arch).path  # the one Triton itself runs for this arch
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        cmd = [str(ptxas), "-v", "--regAllocOptLevel=2", f"--gpu-name={ARCHS[arch]['ptxas_arch']}", str(src), "-o", str(src) + ".o"]
        if not fp_fusion:
            cmd.insert(1, "--fmad=false")
        log = subprocess.run(cmd, capture_output=True, text=True, check=True).stderr
    spill = _PTXAS_SPILL.search(log)
    smem = _PTXAS_SMEM.search(log)
    return dict(
        registers=int(_PTXAS_USED.search(log).group(1)),
        stack_bytes=int(spill.group(1)), spill_store_bytes=int(spill.group(2)), spill_load_bytes=int(spill.group(3)),
        static_smem_bytes=int(smem.group(1)) if smem else 0,
    )


def occupancy(arch: int, registers: int, num_warps: int, smem: int) -> dict:
    """Resident blocks and warps per SM (64 warps, 65536 registers, 32 blocks per SM on sm_80/90;
    registers allocated per warp in units of 256)."""
    per_warp = math.ceil(max(registers, 1) * 32 / 256) * 256
    by_regs = (65536 // per_warp) // num_warps
    by_warps = 64 // num_warps
    by_smem = ARCHS[arch]["smem_per_sm"] // (smem + 1024) if smem else 32
    blocks = min(by_regs, by_warps, by_smem, 32)
    return dict(blocks_per_sm=blocks, occupancy=round(blocks * num_warps / 64, 3))


PTX_OPS = ("fma.rn.f32", "div.full.f32", "div.rn.f32", "div.approx.f32", "sqrt.approx.f32", "sqrt.rn.f32",
           "rsqrt.approx.f32", "atom.global", "red.global")


def compile_launch(launch: Launch, arch: int) -> tuple[dict, str]:
    import triton
    from triton.backends.compiler import GPUTarget

    target = GPUTarget("cuda", arch, 32)
    source, options, _ = _specialise(launch, target)
    start = time.perf_counter()
    compiled = triton.compile(source, target=target, options=options)
    seconds = time.perf_counter() - start
    ptx = compiled.asm["ptx"]
    num_warps = compiled.metadata.num_warps
    stats = ptxas_stats(ptx, arch, compiled.metadata.enable_fp_fusion)
    smem = compiled.metadata.shared + stats["static_smem_bytes"]
    pointer_dtypes = sorted({str(a.dtype).replace("torch.", "") for a in launch.args if isinstance(a, torch.Tensor) and a.is_floating_point()})
    constexprs = {k: v for k, v in launch.options.items() if k.isupper() or k in ("MAX_POOL", "OFFICIAL")}
    atomics = re.findall(r"\b(?:atom|red)\.global[.a-z0-9_]*", ptx)
    return dict(
        kernel=launch.name, arch=f"sm_{arch}", dtypes=pointer_dtypes, cases=sorted(launch.cases),
        grid=list(launch.grid), num_warps=num_warps, constexprs=constexprs,
        enable_fp_fusion=compiled.metadata.enable_fp_fusion,
        **stats, smem_bytes=smem, smem_fits=smem <= ARCHS[arch]["smem_per_block"],
        **occupancy(arch, stats["registers"], num_warps, smem),
        ptx_ops={op: ptx.count(op) for op in PTX_OPS},
        atomic_forms=sorted(set(atomics)),
        compile_seconds=round(seconds, 2),
    ), ptx


def unique_launches(cases=tuple(CASES), dtypes=tuple(DTYPES)) -> list[Launch]:
    unique: dict[tuple, Launch] = {}
    for case in cases:
        for dtype_name in dtypes:
            for launch in record_launches(case, DTYPES[dtype_name]):
                key = launch_key(launch)
                if key in unique:
                    unique[key].cases |= launch.cases
                else:
                    unique[key] = launch
    return list(unique.values())


def run(archs=(90, 80), cases=tuple(CASES), dtypes=tuple(DTYPES), ptx_dir: Path | None = None) -> list[dict]:
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("compile_check needs TRITON_INTERPRET unset when triton is imported (kernels must be JITFunctions)")
    rows = []
    for launch in unique_launches(cases, dtypes):
        for arch in archs:
            row, ptx = compile_launch(launch, arch)
            rows.append(row)
            if ptx_dir is not None:
                ptx_dir.mkdir(parents=True, exist_ok=True)
                row["ptx_file"] = f"{len(rows):03d}_{row['kernel']}_{'_'.join(row['dtypes']) or 'int'}_sm{arch}.ptx"
                (ptx_dir / row["ptx_file"]).write_text(ptx)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, required=True, help="write the rows here")
    parser.add_argument("--arch", type=int, action="append", choices=sorted(ARCHS), help="default: 90 and 80")
    parser.add_argument("--dtype", action="append", choices=sorted(DTYPES), help="default: all")
    parser.add_argument("--ptx-dir", type=Path, default=None, help="also write each kernel's PTX here")
    args = parser.parse_args(argv)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # today's default, stated (silences 3.9's warning)
    rows = run(tuple(args.arch or (90, 80)), dtypes=tuple(args.dtype or DTYPES), ptx_dir=args.ptx_dir)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
