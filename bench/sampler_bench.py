"""Benchmark the region sampler: ours (ops auto route: Triton on CUDA, fast path on CPU) vs the
plain-PyTorch reference, in the SAME run, for the whole sampler and for each kernel.

    python bench/sampler_bench.py [--small] [--device cuda|cpu] [--out bench/results/x.json]

Cases are "images x regions per image" with Ferret-7B shapes: feature width 1024, LLM width 4096,
512 points per region, stages 128 -> 32, k = 24, max pooling, masks on a 336 x 336 image.
  full (default on CUDA): 1x1, 16x2, 64x4 in bf16 (the released timings' cases).
  --small (default on CPU): 1x1, 4x2, 8x4 in fp32 -- the same per-region shapes and widths, fewer
  regions so the reference finishes on two CPU cores (each reference call takes seconds).
"Whole sampler" = masks -> points -> bilinear features -> geo sampler -> [R, 4096] (ours: one
`ops.geo_region_sampler_from_maps` call after the points; reference: point_features then
geo_region_sampler, the released data flow), with random FPS
starts from a seeded generator; fwd+bwd adds the backward of a weighted sum of the output to the
feature maps and every weight. Timings are medians; peak memory is the allocator's peak on CUDA and
the profiler's allocation high-water mark on CPU (both above the inputs already resident).
The JSON holds the device name, dtype, shapes, median ms, peak bytes and ours/reference ratios.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "kernels") not in sys.path:
    sys.path.insert(0, str(ROOT / "kernels"))

from ferret_kernels import folded, ops, reference  # noqa: E402
from ferret_kernels.params import SamplerGeometry, SamplerParams, StageParams  # noqa: E402

WIDTH, LLM_WIDTH, POINTS, IMAGE_SIDE, GRID = 1024, 4096, 512, 336, 576
GEOMETRY = SamplerGeometry()  # the released sampler's
FULL_CASES = ((1, 1), (16, 2), (64, 4))
SMALL_CASES = ((1, 1), (4, 2), (8, 4))


@dataclass
class Inputs:
    maps: torch.Tensor
    masks: torch.Tensor
    image_index: torch.Tensor
    params: SamplerParams
    leaves: list[torch.Tensor]


def make_inputs(images: int, per_image: int, dtype: torch.dtype, device: torch.device, seed: int = 0) -> Inputs:
    gen = torch.Generator(device="cpu").manual_seed(seed)
    d = WIDTH + 2

    def rand(*shape, scale=None):
        t = torch.randn(*shape, generator=gen) * (scale or shape[-1] ** -0.5)
        return t.to(device=device, dtype=dtype).requires_grad_()

    stages = tuple(
        StageParams(rand(d, d), rand(d, scale=0.02), rand(WIDTH, 2 * d, 1), rand(WIDTH, scale=0.02),
                    (1 + 0.1 * torch.randn(WIDTH, generator=gen)).to(device=device, dtype=dtype).requires_grad_(),
                    rand(WIDTH, scale=0.02))
        for _ in GEOMETRY.num_sub_point
    )
    params = SamplerParams(stages, rand(WIDTH, GEOMETRY.num_sub_point[-1] * WIDTH), rand(WIDTH, scale=0.02),
                           rand(LLM_WIDTH, WIDTH), rand(LLM_WIDTH, scale=0.02))
    leaves = [t for s in stages for t in s[:6]] + [params.flatten_weight, params.flatten_bias, params.dim_weight, params.dim_bias]
    regions = images * per_image
    masks = torch.zeros(regions, IMAGE_SIDE, IMAGE_SIDE, dtype=torch.bool)
    corners = torch.randint(0, IMAGE_SIDE - 40, (regions, 2), generator=gen)
    sizes = torch.randint(8, 160, (regions, 2), generator=gen)
    for r in range(regions):  # boxes from 8x8 (64 px < 512: with replacement) to 160x160
        x0, y0 = corners[r].tolist()
        w, h = sizes[r].tolist()
        masks[r, x0 : x0 + w, y0 : y0 + h] = True
    maps = torch.randn(images, GRID, WIDTH, generator=gen).to(device=device, dtype=dtype).requires_grad_()
    image_index = torch.arange(images).repeat_interleave(per_image).to(device)
    return Inputs(maps, masks.to(device), image_index, params, leaves)


def whole_sampler(inputs: Inputs, backend: str, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator(device=inputs.maps.device).manual_seed(seed)
    points = ops.sample_mask_points(inputs.masks, POINTS, gen, backend=backend)
    if backend == "reference":  # the released data flow: features of every point, then the sampler
        features = ops.point_features(inputs.maps, points, inputs.image_index, "official", backend=backend)
        return ops.geo_region_sampler(points, features, inputs.params, GEOMETRY, "max", None, gen, backend=backend)
    return ops.geo_region_sampler_from_maps(
        inputs.maps, points, inputs.image_index, inputs.params, GEOMETRY, "max", None, gen, "official", backend=backend
    )


# --------------------------------------------------------------------------- measurement


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
CLOCK = "wall"


def median_ms(fn, device: torch.device, repeats: int, warmup: int = 1) -> float:
    """Median ms of `repeats` calls on the selected clock: "wall" (perf_counter), or "cpu" (this
    process's CPU time: robust to other jobs on a shared machine; use it with --threads 1)."""
    clock = CLOCKS[CLOCK]
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = clock()
        fn()
        synchronize(device)
        times.append((clock() - start) * 1e3)
    return statistics.median(times)


def peak_bytes(fn, device: torch.device) -> int:
    """Peak extra memory of one call: CUDA allocator peak, or the CPU profiler's allocation
    high-water mark (allocations and frees replayed in time order)."""
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    deltas = sorted((e.time_range.start, e.self_cpu_memory_usage) for e in prof.events() if e.self_cpu_memory_usage)
    level = peak = 0
    for _, delta in deltas:
        level += delta
        peak = max(peak, level)
    return int(peak)


def backward_of(fn, inputs: Inputs):
    def run():
        out = fn()
        weight = torch.ones_like(out) / out.numel()
        torch.autograd.grad((out * weight).sum(), [inputs.maps, *inputs.leaves])

    return run


def no_grad(fn):
    def run():
        with torch.no_grad():
            return fn()

    return run


# --------------------------------------------------------------------------- per-kernel pieces


def reference_group_stage(point_rows_xy, features, anchor_index, neighbour_index, stage: StageParams):
    """The released chain of one stage once FPS and kNN are done (reference math, for timing)."""
    rows = torch.cat([features, point_rows_xy.to(features.dtype)], dim=-1)
    anchors = reference.gather_points(rows, anchor_index).unsqueeze(2)
    neighbours = reference.gather_points(rows, neighbour_index)
    diff = torch.nn.functional.linear(neighbours - anchors, stage.diff_weight, stage.diff_bias)
    stacked = torch.cat([diff, anchors.expand_as(diff)], dim=-1)
    hidden = torch.relu(torch.nn.functional.linear(stacked, stage.conv_matrix, stage.conv_bias))
    hidden = torch.nn.functional.layer_norm(hidden, hidden.shape[-1:], stage.ln_weight, stage.ln_bias, stage.ln_eps)
    return hidden.amax(dim=2)


def ours_group_stage(xy, features, anchor_index, neighbour_index, stage: StageParams, group_pool=None):
    """The folded stage after FPS and kNN; `group_pool` defaults to the Triton kernel on CUDA."""
    folded_weight, w_a, w_b, bias = folded.fold_stage_weights(stage, xy.shape[0] * xy.shape[1])
    point_u = folded.point_projection(features, xy.to(features.dtype), stage, folded_weight, w_a)
    anchor_v = folded.anchor_projection(
        reference.gather_points(features, anchor_index), reference.gather_points(xy, anchor_index).to(features.dtype),
        reference.gather_points(point_u, anchor_index), w_b, bias,
    )
    if group_pool is None:
        if features.device.type == "cuda":
            from ferret_kernels.group_pool import group_pool
        else:
            group_pool = folded.group_pool
    return group_pool(point_u, anchor_v, neighbour_index, stage.ln_weight, stage.ln_bias, stage.ln_eps, "max")


def kernel_cases(inputs: Inputs, device: torch.device):
    """(name, ours fn, reference fn, fast-path fn, has backward) for each kernel on this case's
    shapes. The fast path (vectorised torch on the same device) is what ours is checked against."""
    def seeded():  # the same draws for every call: ours and the fast path pick the same pixels
        return torch.Generator(device=device).manual_seed(1)

    points = reference.sample_mask_points(inputs.masks.cpu(), POINTS, torch.Generator().manual_seed(1)).to(device)
    with torch.no_grad():
        features = reference.point_features(inputs.maps, points, inputs.image_index)
    features.requires_grad_()
    sub, k = GEOMETRY.num_sub_point[0], GEOMETRY.num_neighbor[0]
    anchors = reference.farthest_point_sample(points, sub, 0)
    anchor_xy = reference.gather_points(points, anchors)
    neighbours = reference.knn_indices(anchor_xy, points, k)
    inputs.knn_geometry = (anchor_xy, points)  # for the value check of the kNN row
    stage = inputs.params.stages[0]
    masks, maps, index = inputs.masks, inputs.maps, inputs.image_index
    yield ("mask->points", lambda: ops.sample_mask_points(masks, POINTS, seeded()),
           lambda: reference.sample_mask_points(masks, POINTS, seeded()),
           lambda: ops.sample_mask_points(masks, POINTS, seeded(), backend="fast"), False)
    yield ("point features", lambda: ops.point_features(maps, points, index),
           lambda: reference.point_features(maps, points, index),
           lambda: ops.point_features(maps, points, index, backend="fast"), True)
    yield (f"fps {POINTS}->{sub}", lambda: ops.farthest_point_sample(points, sub, 0),
           lambda: reference.farthest_point_sample(points, sub, 0),
           lambda: ops.farthest_point_sample(points, sub, 0, backend="fast"), False)
    yield (f"knn k={k}", lambda: ops.knn_indices(anchor_xy, points, k),
           lambda: reference.knn_indices(anchor_xy, points, k),
           lambda: ops.knn_indices(anchor_xy, points, k, backend="fast"), False)
    yield ("stage-1 group pool", lambda: ours_group_stage(points, features, anchors, neighbours, stage),
           lambda: reference_group_stage(points, features, anchors, neighbours, stage),
           lambda: ours_group_stage(points, features, anchors, neighbours, stage, folded.group_pool), True)
    yield ("mask average pool", lambda: ops.mask_average_pool(maps, masks, index, generator=seeded()),
           lambda: reference.mask_average_pool(maps, masks, index, generator=seeded()),
           lambda: ops.mask_average_pool(maps, masks, index, generator=seeded(), backend="fast"), True)


# --------------------------------------------------------------------------- value checks

# Ours vs the fast path on the same device and inputs: fp32 tight; bf16 within its rounding
# (the two paths accumulate in different orders and round at different points).
CHECK_TOLERANCE = {torch.float32: dict(rtol=1e-4, atol=1e-4), torch.bfloat16: dict(rtol=2e-2, atol=3e-2)}
WHOLE_SAMPLER_RELATIVE = {torch.float32: 1e-4, torch.bfloat16: 3e-2}


def check_close(name: str, got, expected, dtype: torch.dtype) -> None:
    """assert_close of one kernel row's outputs (exact for integer outputs), or raise."""
    if name.startswith("knn"):  # same neighbour distances (which of exactly tied points: topk's choice)
        query_xy, ref_xy, got_index, expected_index = got
        distance = reference.squared_distances(query_xy, ref_xy)
        torch.testing.assert_close(distance.gather(2, got_index).sort(-1).values,
                                   distance.gather(2, expected_index).sort(-1).values, rtol=1e-5, atol=1e-7)
        return
    if not got.is_floating_point():
        assert torch.equal(got, expected), f"{name}: {(got != expected).sum().item()} of {got.numel()} entries differ"
        return
    torch.testing.assert_close(got.float(), expected.float(), **CHECK_TOLERANCE[dtype], msg=lambda m: f"{name}: {m}")


def check_values(inputs: Inputs, device: torch.device, dtype: torch.dtype, kernel_rows) -> list[str]:
    """Ours against the fast path at this case's real shapes, before anything is timed. Returns the
    failures (empty when all agree)."""
    failures = []
    try:
        with torch.no_grad():
            ours, fast_out = whole_sampler(inputs, "auto"), whole_sampler(inputs, "fast")
        relative = ((ours.float() - fast_out.float()).norm() / fast_out.float().norm()).item()
        assert relative < WHOLE_SAMPLER_RELATIVE[dtype], f"whole sampler: relative error {relative:.3g}"
        leaves = [inputs.maps, *inputs.leaves]
        grads = torch.autograd.grad(whole_sampler(inputs, "auto").float().sum(), leaves)
        expected = torch.autograd.grad(whole_sampler(inputs, "fast").float().sum(), leaves)
        for i, (a, b) in enumerate(zip(grads, expected)):
            error = ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()
            assert error < WHOLE_SAMPLER_RELATIVE[dtype], f"whole sampler gradient {i}: relative error {error:.3g}"
    except AssertionError as error:
        failures.append(str(error))
    for name, ours_fn, _, fast_fn, _ in kernel_rows:
        try:
            with torch.no_grad():
                got, expected = ours_fn(), fast_fn()
            if name.startswith("knn"):
                got = (*inputs.knn_geometry, got, expected)
            check_close(name, got, expected, dtype)
        except AssertionError as error:
            failures.append(f"{name}: {error}")
    return failures


def grad_of(fn, tensors):
    def run():
        out = fn()
        leaves = [t for t in tensors if t.requires_grad]
        torch.autograd.grad(out.float().sum(), leaves, allow_unused=True)

    return run


# --------------------------------------------------------------------------- main


def paired_medians(ours, ref, device: torch.device, repeats: int, ref_repeats: int) -> tuple[float, float]:
    """Median ms of ours and of the reference, timed alternately so that load from other processes
    on a shared machine hits both alike (one untimed warm-up call each)."""
    ours_ms, ref_ms = [], []
    for i in range(max(repeats, ref_repeats) + 1):
        if i <= repeats:
            ours_ms.append(median_ms(ours, device, 1, warmup=0))
        if i <= ref_repeats:
            ref_ms.append(median_ms(ref, device, 1, warmup=0))
    return statistics.median(ours_ms[1:]), statistics.median(ref_ms[1:])


def measure_pair(name, ours, ref, device, repeats, ref_repeats, backward_ours=None, backward_ref=None):
    row = {"name": name}
    row["ours_fwd_ms"], row["ref_fwd_ms"] = paired_medians(no_grad(ours), no_grad(ref), device, repeats, ref_repeats)
    row["fwd_speedup"] = row["ref_fwd_ms"] / row["ours_fwd_ms"]
    if backward_ours is not None:
        row["ours_fwd_bwd_ms"], row["ref_fwd_bwd_ms"] = paired_medians(backward_ours, backward_ref, device, repeats, ref_repeats)
        row["fwd_bwd_speedup"] = row["ref_fwd_bwd_ms"] / row["ours_fwd_bwd_ms"]
        row["ours_peak_bytes"] = peak_bytes(backward_ours, device)
        row["ref_peak_bytes"] = peak_bytes(backward_ref, device)
    else:
        row["ours_peak_bytes"] = peak_bytes(no_grad(ours), device)
        row["ref_peak_bytes"] = peak_bytes(no_grad(ref), device)
    row["peak_ratio"] = row["ours_peak_bytes"] / max(1, row["ref_peak_bytes"])
    return row


def _git_commit() -> str:
    """Short hash of the checkout the benchmark ran from ("unknown" outside git), plus "+dirty" with uncommitted changes."""
    import subprocess

    root = Path(__file__).resolve().parents[1]
    run = lambda *a: subprocess.run(["git", "-C", str(root), *a], capture_output=True, text=True).stdout.strip()
    commit = run("rev-parse", "--short", "HEAD") or "unknown"
    return commit + ("+dirty" if run("status", "--porcelain", "--untracked-files=no") else "")


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--small", action="store_true", help="CPU-sized cases (default on CPU)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default=None, help="default: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats of ours (reference: fewer on CPU)")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                        help="wall time, or process CPU time (shared machines: with --threads 1)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--cases", default=None, help="override the cases, e.g. 1x1,8x4")
    parser.add_argument("--no-kernels", action="store_true", help="skip the per-kernel table")
    parser.add_argument("--no-check", action="store_true", help="skip the value check against the fast path")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default bench/results/sampler_<device>.json)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.clock == "cpu" and device.type == "cuda":
        parser.error("--clock cpu measures host CPU time: meaningless for CUDA kernels")
    global CLOCK
    CLOCK = args.clock
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch.cuda.is_available() is False")
    small = args.small or device.type == "cpu"
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    repeats = args.repeats or (20 if device.type == "cuda" else 3)
    ref_repeats = repeats
    cases = SMALL_CASES if small else FULL_CASES
    if args.cases:
        try:
            cases = tuple(tuple(int(v) for v in case.split("x")) for case in args.cases.split(","))
        except ValueError:
            parser.error(f"--cases must look like 1x1,16x2, got {args.cases!r}")
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name()
    result = {
        "device": device.type, "device_name": device_name, "dtype": str(dtype).replace("torch.", ""),
        "torch": torch.__version__, "threads": torch.get_num_threads(), "clock": args.clock,
        "commit": _git_commit(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "shapes": {"width": WIDTH, "llm_width": LLM_WIDTH, "points": POINTS, "sub_points": GEOMETRY.num_sub_point,
                   "neighbours": GEOMETRY.num_neighbor, "grid": GRID, "image_side": IMAGE_SIDE, "pool": "max"},
        "ours": "ops auto route (" + ("triton" if device.type == "cuda" else "fast") + ")",
        "cases": [],
    }
    print(f"device {device_name} ({device.type}), dtype {result['dtype']}, threads {result['threads']}, clock {args.clock}")
    header = f"{'case':<8}{'what':<22}{'ours fwd':>10}{'ref fwd':>10}{'x':>7}{'ours f+b':>10}{'ref f+b':>10}{'x':>7}{'ours MB':>9}{'ref MB':>9}"
    print(header)
    all_failures: list[str] = []
    for images, per_image in cases:
        inputs = make_inputs(images, per_image, dtype, device)
        label = f"{images}x{per_image}"
        kernel_rows = list(kernel_cases(inputs, device))
        failures = [] if args.no_check else check_values(inputs, device, dtype, kernel_rows)
        for failure in failures:
            print(f"{label:<8}VALUE CHECK FAILED: {failure}")
        all_failures += [f"{label} {failure}" for failure in failures]
        rows = [measure_pair(
            "whole sampler",
            lambda: whole_sampler(inputs, "auto"), lambda: whole_sampler(inputs, "reference"), device, repeats, ref_repeats,
            backward_of(lambda: whole_sampler(inputs, "auto"), inputs), backward_of(lambda: whole_sampler(inputs, "reference"), inputs),
        )]
        if not args.no_kernels:
            for name, ours, ref, _, has_bwd in kernel_rows:
                tensors = [inputs.maps, *inputs.leaves]
                rows.append(measure_pair(name, ours, ref, device, repeats, ref_repeats,
                                         grad_of(ours, tensors) if has_bwd else None, grad_of(ref, tensors) if has_bwd else None))
        for row in rows:
            fb = (f"{row['ours_fwd_bwd_ms']:>10.2f}{row['ref_fwd_bwd_ms']:>10.2f}{row['fwd_bwd_speedup']:>7.1f}"
                  if "ours_fwd_bwd_ms" in row else f"{'-':>10}{'-':>10}{'-':>7}")
            print(f"{label:<8}{row['name']:<22}{row['ours_fwd_ms']:>10.2f}{row['ref_fwd_ms']:>10.2f}{row['fwd_speedup']:>7.1f}"
                  f"{fb}{row['ours_peak_bytes'] / 2**20:>9.1f}{row['ref_peak_bytes'] / 2**20:>9.1f}")
        result["cases"].append({"images": images, "regions_per_image": per_image, "regions": images * per_image,
                                "checked_against_fast_path": not args.no_check, "check_failures": failures, "rows": rows})
        del inputs
    out = args.out or ROOT / "bench" / "results" / f"sampler_{device.type}{'_small' if small else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")
    if all_failures:
        raise SystemExit(f"{len(all_failures)} value check(s) failed (ours vs the fast path): " + "; ".join(all_failures))
    return result


if __name__ == "__main__":
    main()
