"""A copy of an exported model whose image tokens are scaled by S: the projector's weight and bias
times S (the projector is one Linear, so every image token is exactly S times what it was).

    python bench/probes/scale_projector.py checkpoints/wu_rot45_w2400/hf 0.7 --out checkpoints/wu_rot45_w2400_s07/hf

An intervention for the LLM-stage probes (llm_stage_probe.sh): does the LLM stage bind more slowly
because the warmed-up image tokens are larger (token_probe.py's token_norm: 79 after the 2,400-step
warm-up against 55-60 after every 1,200-step one)? The decoder's RMSNorm sees the same directions;
what changes is the image tokens' share of the residual stream and the dense readout's logits.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from safetensors.torch import load_file, save_file

PROJECTOR = ("model.mm_projector.weight", "model.mm_projector.bias")


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", type=Path, help="an exported model folder (hf/)")
    parser.add_argument("scale", type=float)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    if not args.scale > 0:
        raise SystemExit(f"scale_projector: the scale must be > 0, got {args.scale}")
    state = load_file(str(args.model / "model.safetensors"))
    missing = [k for k in PROJECTOR if k not in state]
    if missing:
        raise SystemExit(f"scale_projector: {args.model} has no {', '.join(missing)} (not a one-Linear projector)")
    for key in PROJECTOR:
        state[key] = state[key] * args.scale
    if args.out.exists():
        shutil.rmtree(args.out)
    shutil.copytree(args.model, args.out)
    save_file(state, str(args.out / "model.safetensors"), metadata={"format": "pt"})
    print(f"scale_projector: {args.model} x {args.scale} -> {args.out}")
    return args.out


if __name__ == "__main__":
    main()
