"""Make a Ferret delta against its base: delta = target - base (the inverse of apply_delta).

    python -m ferret.model.make_delta --base vicuna-7b-v1-3 --target ferret-7b --delta ferret-7b-delta

Shared tensors are stored as differences (the grown vocabulary rows and the Ferret-only tensors
raw). A difference of two fp32 numbers is not always an fp32 number, so by default the delta is
stored one precision wider than the target (fp16/bf16 -> fp32, fp32 -> fp64): then apply_delta
gives back the target bit for bit. `--delta-dtype float16` writes a released-style fp16 delta,
exact wherever fp16 can hold the difference and within one ulp elsewhere. Each difference is
nudged by an ulp where that makes apply_delta's arithmetic land exactly on the target.
"""

from __future__ import annotations

import sys

import torch

from ferret.model.apply_delta import DTYPES, combine, overlap, paired_names
from ferret.model.checkpoint_io import delta_parser, prepare_output_folder, read_checkpoint, run_cli, save_checkpoint

NUDGE_ROUNDS = 4


WIDER = {torch.float16: torch.float32, torch.bfloat16: torch.float32, torch.float32: torch.float64}


def exact_difference(target: torch.Tensor, base: torch.Tensor, delta_dtype: torch.dtype) -> torch.Tensor:
    """d (in delta_dtype) with combine(d, base, +1, target.dtype) == target wherever delta_dtype allows."""
    delta = combine(target, base, -1, delta_dtype)
    for _ in range(NUDGE_ROUNDS):
        restored = combine(delta, base, +1, target.dtype)
        wrong = restored != target
        if not bool(wrong.any()):
            break
        toward = torch.where(restored < target, torch.full_like(delta, float("inf")), torch.full_like(delta, float("-inf")))
        delta = torch.where(wrong, torch.nextafter(delta, toward), delta)
    return delta


def make_delta_state(
    base: dict[str, torch.Tensor], target: dict[str, torch.Tensor], delta_dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """delta_dtype None: one precision wider than each target tensor (exact round trip)."""
    delta = {}
    for name, tensor in target.items():
        if not tensor.is_floating_point():
            delta[name] = tensor.clone()
            continue
        delta[name] = tensor.to(delta_dtype or WIDER.get(tensor.dtype, tensor.dtype), copy=True)
    for name in paired_names(base, target, "target"):
        if not target[name].is_floating_point():
            continue
        index = overlap(name, base[name], target[name])
        delta[name][index] = exact_difference(target[name][index], base[name], delta[name].dtype)
    return delta


def make_delta(
    base_path, target_path, delta_path, overwrite: bool = False, delta_dtype: torch.dtype | None = None
) -> None:
    output = prepare_output_folder(delta_path, overwrite, "delta")
    base, target = read_checkpoint(base_path, "base"), read_checkpoint(target_path, "target")
    save_checkpoint(make_delta_state(base.state, target.state, delta_dtype), output, metadata_from=target.folder)


def main(argv: list[str] | None = None) -> int:
    parser = delta_parser(
        "python -m ferret.model.make_delta", __doc__.split("\n\n")[0], "Ferret checkpoint folder", "output delta folder"
    )
    parser.add_argument(
        "--delta-dtype", choices=sorted(DTYPES), default=None,
        help="delta precision (default: one step wider than the target, for an exact round trip)",
    )
    args = parser.parse_args(argv)
    make_delta(args.base, args.target, args.delta, overwrite=args.overwrite, delta_dtype=DTYPES.get(args.delta_dtype))
    print(f"wrote {args.delta}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
