"""Offline GPU compile check, in CI on CPU: every Triton kernel, forward and backward, compiled for
sm_90 (as sm_90a) and sm_80 with the exact constexprs / num_warps its launcher picks at the released
shapes (C = 1024, adapter widths 4096 / 5120, 512 points, stages 128 -> 32, k = 24) and at the
embedded model's (ferret/assets/model/config.json: width 160, LLM 256, 12 x 12 map), in fp32, bf16
and fp16 -- see `ferret_kernels.compile_check`. Launches that specialise identically compile once
(about 45 compiles in all; Triton's on-disk cache makes reruns faster).

It runs `python -m ferret_kernels.compile_check` in a subprocess because the kernels must be
JITFunctions there, while this test session imports triton with TRITON_INTERPRET=1. The PTX-content
checks pin compile-level fixes that an interpreted run cannot see.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
try:
    from triton.backends.nvidia.compiler import get_ptxas

    get_ptxas(90).path
except Exception as error:  # noqa: BLE001 - any missing piece of the CUDA toolchain in the wheel
    pytest.skip(f"triton's NVIDIA backend / ptxas is not usable here: {error}", allow_module_level=True)

KERNELS_DIR = Path(__file__).resolve().parents[1]
FORWARD = {"_fps_kernel", "_knn_kernel", "_finish_points_kernel", "_point_features_fwd", "_group_pool_fwd", "_mask_pool_fwd"}
BACKWARD = {"_point_features_bwd", "_group_pool_bwd", "_mask_pool_bwd"}


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("compile") / "rows.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # Triton 3.9's default, stated; kernels that need it off say so
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(KERNELS_DIR), env.get("PYTHONPATH")]))
    result = subprocess.run(
        [sys.executable, "-m", "ferret_kernels.compile_check", "--json", str(out)],
        env=env, capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(out.read_text())


def rows_of(compiled, kernel):
    rows = [row for row in compiled if row["kernel"] == kernel]
    assert rows, f"{kernel} was never launched by its launcher"
    return rows


def test_every_kernel_compiles_for_both_archs_and_all_dtypes(compiled):
    assert {row["kernel"] for row in compiled} == FORWARD | BACKWARD
    for kernel in FORWARD | BACKWARD:
        assert {row["arch"] for row in rows_of(compiled, kernel)} == {"sm_90", "sm_80"}
    for kernel in ("_point_features_fwd", "_point_features_bwd", "_group_pool_fwd", "_group_pool_bwd", "_mask_pool_fwd", "_mask_pool_bwd"):
        seen = {d for row in rows_of(compiled, kernel) for d in row["dtypes"]}
        assert {"float32", "bfloat16", "float16"} <= seen, (kernel, seen)
    assert all(set(row["cases"]) for row in compiled)
    assert {c for row in compiled for c in row["cases"]} == {"released", "embedded"}


def test_shared_memory_fits_and_nothing_spills(compiled):
    for row in compiled:
        label = f"{row['kernel']} {row['dtypes']} {row['arch']} {row['constexprs']}"
        assert row["smem_fits"], f"{label}: {row['smem_bytes']} B shared memory"
        assert row["spill_store_bytes"] == 0 and row["spill_load_bytes"] == 0, (
            f"{label}: spills {row['spill_store_bytes']} B / {row['spill_load_bytes']} B at {row['registers']} registers"
        )
        assert row["blocks_per_sm"] >= 1, label


def test_fps_has_no_fused_multiply_add(compiled):
    """torch rounds dx*dx + dy*dy as two products and an add; a fused fma picks other anchors."""
    for row in rows_of(compiled, "_fps_kernel"):
        assert not row["enable_fp_fusion"]
        assert row["ptx_ops"]["fma.rn.f32"] == 0, row["ptx_ops"]


def test_knn_keeps_only_its_explicit_fma(compiled):
    """One fma per distance (the explicit tl.fma that mirrors torch's 2-term matmul); fusion off
    otherwise, so -2*dot + |q|^2 and the norms are not contracted."""
    for row in rows_of(compiled, "_knn_kernel"):
        assert not row["enable_fp_fusion"]
        tile = row["constexprs"]["BLOCK_Q"] * row["constexprs"]["BLOCK_N"]
        threads = 32 * row["num_warps"]
        assert row["ptx_ops"]["fma.rn.f32"] <= tile // threads, row["ptx_ops"]


def test_exactly_compared_divisions_are_ieee(compiled):
    """Mask points equal torch's x / W bit for bit: div.rn, never the 2-ulp div.full; the LayerNorm
    statistics use div.rn and sqrt.rn too."""
    for kernel in ("_finish_points_kernel", "_mask_pool_fwd", "_mask_pool_bwd", "_group_pool_fwd", "_group_pool_bwd"):
        for row in rows_of(compiled, kernel):
            ops = row["ptx_ops"]
            assert ops["div.full.f32"] == 0 and ops["div.approx.f32"] == 0 and ops["sqrt.approx.f32"] == 0, (kernel, ops)
    for row in rows_of(compiled, "_finish_points_kernel"):
        assert row["ptx_ops"]["div.rn.f32"] > 0


def test_atomics_are_relaxed_and_the_deterministic_variant_has_none(compiled):
    """Order-free float sums need no acquire/release ordering (Triton's default is acq_rel)."""
    for kernel in BACKWARD:
        for row in rows_of(compiled, kernel):
            if row["constexprs"].get("DETERMINISTIC"):
                assert not row["atomic_forms"], (kernel, row["atomic_forms"])
                continue
            assert row["atomic_forms"], f"{kernel}: no atomics found"
            assert all(".relaxed." in form for form in row["atomic_forms"]), (kernel, row["atomic_forms"])
    assert any(row["constexprs"].get("DETERMINISTIC") for row in rows_of(compiled, "_group_pool_bwd"))
