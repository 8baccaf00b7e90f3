"""Give a conv-tower Ferret folder the fine region path, starting where the model already is.

    python bench/probes/add_fine_region_path.py --src ferret/assets/model --dst checkpoints/shipped_fine

Sets `vision_config.fine_region_features` (the tower then packs its first stage's cells behind
each token, `ConvVisionConfig`) and adds the second region sampler that reads them
(`GeoRegionSamplerWithFineCells.fine`). The new sampler's last projection is zero, so the new
folder answers exactly as the old one (checked here on one region) until a fine-tune moves it;
every other weight is copied in fp32. The fine-tune probe then starts from `--dst` with
`model.pretrained=`.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch


def main(argv=None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--src", required=True, type=Path, help="a Ferret folder with a conv tower")
    parser.add_argument("--dst", required=True, type=Path)
    args = parser.parse_args(argv)
    from ferret.model import FerretConfig, FerretLlamaForCausalLM
    from ferret.model.builder import load_pretrained
    from ferret.model.checkpoint_io import save_checkpoint

    fields = json.loads((args.src / "config.json").read_text())
    vision = fields.get("vision_config") or {}
    if vision.get("model_type") != "ferret_conv_vision":
        raise SystemExit(f"{args.src}: not a conv-tower model (vision_config.model_type {vision.get('model_type')!r})")
    if vision.get("fine_region_features"):
        raise SystemExit(f"{args.src}: already has the fine region path")
    vision["fine_region_features"] = True
    _, old, _, _ = load_pretrained(str(args.src), device="cpu", dtype=torch.float32)
    config = FerretConfig(**{k: v for k, v in fields.items() if k not in ("model_type", "transformers_version")})
    new = FerretLlamaForCausalLM(config).float()
    result = new.load_state_dict(old.state_dict(), strict=False)
    added = [k for k in result.missing_keys if ".region_geo_sampler.fine." not in k]
    if added or result.unexpected_keys:
        raise SystemExit(f"weights that do not carry over: missing {added}, unexpected {result.unexpected_keys}")

    # The same answer on one region before and after (the fine sampler adds exactly zero).
    pixels = torch.rand(1, 3, config.vision_tower_config().image_size, config.vision_tower_config().image_size,
                        generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(pixels.shape[-1], pixels.shape[-1], dtype=torch.bool)
    mask[10:40, 20:60] = True
    with torch.no_grad():
        before = old.encode_regions(old.encode_images(pixels)[0], [[mask]], generator=torch.Generator().manual_seed(0))[0]
        after = new.encode_regions(new.encode_images(pixels)[0], [[mask]], generator=torch.Generator().manual_seed(0))[0]
    if not torch.equal(before, after):
        raise SystemExit(f"the new folder's region embedding differs by {(before - after).abs().max():.3g}")

    with tempfile.TemporaryDirectory() as meta:
        # The source's tokenizer and processor files, with the new config.
        for item in args.src.iterdir():
            if item.is_file() and item.suffix != ".safetensors" and item.name != "config.json":
                (Path(meta) / item.name).write_bytes(item.read_bytes())
        fields["torch_dtype"] = "float32"
        fields.pop("dtype", None)
        (Path(meta) / "config.json").write_text(json.dumps(fields, indent=2) + "\n")
        save_checkpoint({k: v.detach() for k, v in new.state_dict().items()}, args.dst, metadata_from=Path(meta))
    print(f"wrote {args.dst}: {len(result.missing_keys)} new tensors "
          f"({sum(p.numel() for n, p in new.named_parameters() if '.fine.' in n):,} parameters)")
    return args.dst


if __name__ == "__main__":
    main()
