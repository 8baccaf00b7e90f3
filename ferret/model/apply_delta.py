"""Rebuild Ferret weights from a released delta: target = base (Vicuna v1.3) + delta.

    python -m ferret.model.apply_delta --base vicuna-7b-v1-3 --delta ferret-7b-delta --target ferret-7b

Rule (as in the released tool): every delta tensor is added to the base tensor of the same name.
The vocabulary grew by `<region_fea>`: base embed_tokens / lm_head have 32000 rows, the delta
32001; the base is added to the first 32000 rows and the extra row is the delta's own. Tensors
only Ferret has (vision tower, mm_projector, region sampler) are taken from the delta unchanged.
The target gets the delta folder's config and tokenizer files, and the base's dtype (the released
flow: fp16 Vicuna + fp16 delta -> fp16 Ferret) unless `--dtype` says otherwise; the sums are
computed in fp32 (fp64 when an input is fp64).
"""

from __future__ import annotations

import sys

import torch

from ferret.model.checkpoint_io import (
    CheckpointError,
    delta_parser,
    prepare_output_folder,
    read_checkpoint,
    run_cli,
    save_checkpoint,
)
from ferret.model.modeling_ferret import MULTIMODAL_MODULES

# Tensors whose rows grow when tokens are added to the vocabulary.
VOCAB_TENSORS = ("model.embed_tokens.weight", "lm_head.weight")
# Tensors only Ferret has: stored raw (not as a difference) in deltas.
FERRET_ONLY_PREFIXES = tuple(f"model.{name}." for name in MULTIMODAL_MODULES)


DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32, "float64": torch.float64}


def combine(value: torch.Tensor, base: torch.Tensor, sign: int, out_dtype: torch.dtype) -> torch.Tensor:
    """value + sign * base, computed in fp32 (fp64 if an input or the output is fp64), returned as out_dtype."""
    work = torch.float64 if torch.float64 in (value.dtype, base.dtype, out_dtype) else torch.float32
    return (value.to(work) + sign * base.to(work)).to(out_dtype)


def reference_dtype(base: dict[str, torch.Tensor]) -> torch.dtype:
    """The base checkpoint's floating dtype (its embedding's)."""
    if "model.embed_tokens.weight" in base:
        return base["model.embed_tokens.weight"].dtype
    return next((t.dtype for t in base.values() if t.is_floating_point()), torch.float32)


def overlap(name: str, base: torch.Tensor, other: torch.Tensor) -> tuple[slice, ...] | None:
    """Index of `other` that corresponds to `base`: all of it, or its first rows for a grown vocabulary."""
    if base.shape == other.shape:
        return (slice(None),)
    grown = (
        name in VOCAB_TENSORS
        and base.dim() == other.dim() == 2
        and base.shape[1] == other.shape[1]
        and base.shape[0] <= other.shape[0]
    )
    if grown:
        return (slice(0, base.shape[0]),)
    raise CheckpointError(
        f"{name}: base shape {list(base.shape)} does not fit {list(other.shape)}; "
        "is the base the right model (Vicuna v1.3 of the same size)?"
    )


def paired_names(base: dict, other: dict, other_kind: str) -> list[str]:
    """Names present in both; a name only in `other` must be a Ferret-only tensor."""
    stray = [n for n in other if n not in base and not n.startswith(FERRET_ONLY_PREFIXES)]
    if stray:
        raise CheckpointError(
            f"{len(stray)} {other_kind} tensor(s) have no counterpart in the base model, e.g. {stray[0]!r}; "
            "is the base a LLaMA/Vicuna checkpoint?"
        )
    return [n for n in other if n in base]


def apply_delta_to_state(
    base: dict[str, torch.Tensor], delta: dict[str, torch.Tensor], dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    out_dtype = dtype or reference_dtype(base)
    target = {name: (t.to(out_dtype, copy=True) if t.is_floating_point() else t.clone()) for name, t in delta.items()}
    for name in paired_names(base, delta, "delta"):
        index = overlap(name, base[name], delta[name])
        target[name][index] = combine(delta[name][index], base[name], +1, out_dtype)
    return target


def apply_delta(base_path, target_path, delta_path, overwrite: bool = False, dtype: torch.dtype | None = None) -> None:
    output = prepare_output_folder(target_path, overwrite, "target")
    base, delta = read_checkpoint(base_path, "base"), read_checkpoint(delta_path, "delta")
    save_checkpoint(apply_delta_to_state(base.state, delta.state, dtype), output, metadata_from=delta.folder)


def main(argv: list[str] | None = None) -> int:
    parser = delta_parser(
        "python -m ferret.model.apply_delta", __doc__.split("\n\n")[0], "output folder", "Ferret delta folder"
    )
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="target dtype (default: the base's)")
    args = parser.parse_args(argv)
    apply_delta(args.base, args.target, args.delta, overwrite=args.overwrite, dtype=DTYPES.get(args.dtype))
    print(f"wrote {args.target}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
