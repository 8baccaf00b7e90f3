"""Where does each head of one layer look while a referring answer writes the object's name?
(issue 13, session 26: the copy supervision's runs name worse; is it the name head?)

    python bench/probes/refer_attention_probe.py --model-path checkpoints/ft_small/hf --scenes 30

For the first `--scenes` validation scenes, for each object asks "What is the object <region>?"
with its box as the region, with the true answer ("A yellow star.") teacher-forced, and reads
every head of `--layer` at the two positions that write the colour word and the shape word: its
mass on BOS, the image tokens, the region's feature token, the rest of the question, and the
answer written so far. A head taught to copy a name word from the question has none to find
here; where its attention goes instead is what it brings to the naming. Validation only.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

PARTS = ("bos", "image", "region_feature", "question", "answer")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-path", required=True)
    parser.add_argument("--data", default="data/synth")
    parser.add_argument("--scenes", type=int, default=30)
    parser.add_argument("--layer", type=int, default=0)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    from ferret.chat import FerretChat
    from ferret.constants import REGION_TOKEN
    from ferret.processing import build_question, load_image
    from ferret.regions import Box
    from ferret.training.grounding import spliced_index

    data = Path(args.data)
    scenes = json.loads((data / "scenes_val.json").read_text())[: args.scenes]
    chat = FerretChat.from_pretrained(args.model_path, device="cpu")
    model = chat.model
    model.config._attn_implementation = "eager"  # sdpa returns no attention weights
    n_image = model.get_vision_tower().num_patches
    region_id = chat.tokenizer.convert_tokens_to_ids(REGION_TOKEN)
    masses = {"colour": [], "shape": []}  # per object: [PARTS, heads]
    for scene in scenes:
        picture = load_image(str(data / scene["image"]))
        for obj in scene["objects"]:
            box = Box(*obj["box"])
            question = build_question("What is the object <region>?", [box], *picture.size)
            answer = f"A {obj['color']} {obj['shape']}."
            sample = chat.processor.encode(picture, [("USER", question), ("ASSISTANT", answer)], [box],
                                           return_labels=False)
            batch = chat.collator([sample])
            ids = batch["input_ids"][0]
            with torch.no_grad():
                attentions = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                   images=batch["pixel_values"], region_masks=batch["region_masks"],
                                   output_attentions=True).attentions
            attention = attentions[args.layer][0]  # [heads, queries, keys] in spliced positions
            start, to_spliced = spliced_index(ids, n_image)
            tokens = chat.tokenizer.convert_ids_to_tokens([max(int(i), 0) for i in ids])
            # the answer's colour and shape words are the last occurrences of those words
            colour_at = max(j for j, t in enumerate(tokens) if t.lstrip("▁").rstrip(".") == obj["color"])
            shape_at = max(j for j, t in enumerate(tokens) if t.lstrip("▁").rstrip(".") == obj["shape"])
            answer_start = colour_at - 1  # "A" (or "▁A"), the answer's first token
            region_at = [to_spliced(j) for j, i in enumerate(ids.tolist()) if i == region_id]
            for kind, word_at in (("colour", colour_at), ("shape", shape_at)):
                row = attention[:, to_spliced(word_at - 1)]  # the position that writes the word
                image = row[:, start:start + n_image].sum(-1)
                region = row[:, region_at].sum(-1)
                answer_mass = row[:, to_spliced(answer_start):].sum(-1)
                bos = row[:, 0]
                question_mass = row.sum(-1) - image - region - answer_mass - bos
                masses[kind].append(torch.stack([bos, image, region, question_mass, answer_mass]))
    result = {"model": args.model_path, "layer": args.layer, "scenes": len(scenes),
              "objects": len(masses["colour"])}
    for kind, rows in masses.items():
        mean = torch.stack(rows).mean(0)
        result[kind] = {part: [round(float(v), 3) for v in mean[k]] for k, part in enumerate(PARTS)}
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
