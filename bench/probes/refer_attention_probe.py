"""Where does each head of one layer look while a referring answer writes the object's name?
(issue 13, session 26: the copy supervision's runs name worse; is it the name head?)

    python bench/probes/refer_attention_probe.py --model-path checkpoints/ft_small/hf --scenes 30

For the first `--scenes` validation scenes, for each object asks "What is the object <region>?"
with its box as the region, with the true answer ("A yellow star.") teacher-forced, and reads
every head of `--layer` at the two positions that write the colour word and the shape word: its
mass on BOS, the image tokens, the region's feature token, the rest of the question, and the
answer written so far; and, within the image, on the object's own cells ("object": those it covers
by >= 20 %, what session 37's naming push aimed at: `train.region_name_supervision_layer`, commit d5e7ff5). Since session 37 each
word is also scored (the teacher-forced argmax writes it or not) and the masses split by that, and
the shape is read, for the same objects, off the projected image tokens (logits on the name
directions averaged over the object's cells, as token_probe.py's projected/names) and off the
region embedding: `shape_sources` counts the objects by which of the three read the shape right;
`shape_by_layer` reads the shape off the residual at the shape-writing position after each decoder
layer (final norm, LM head, the six shape words only), for all objects and for those the LLM gets
wrong while tokens and region are both right. A head taught to copy a name word from the question
has none to find here; where its attention goes instead is what it brings to the naming. Since
session 44, `colour_twins` repeats the shape's numbers for the objects whose scene has another object
of their colour (named wrong twice as often), with the heads' mass on those twins' cells ("twin")
beside the object's own: does a wrong shape come from reading the twin? Validation only.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from ferret.eval.common import write_json

PARTS = ("bos", "image", "region_feature", "question", "answer", "object", "twin")


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
    from ferret.training.dense_supervision import DenseVocabulary, NameDirections, ScenePatchTargets, class_logits
    from ferret.training.grounding import spliced_index

    data = Path(args.data)
    scenes = json.loads((data / "scenes_val.json").read_text())[: args.scenes]
    chat = FerretChat.from_pretrained(args.model_path, device="cpu")
    model = chat.model
    model.config._attn_implementation = "eager"  # sdpa returns no attention weights
    n_image = model.get_vision_tower().num_patches
    region_id = chat.tokenizer.convert_tokens_to_ids(REGION_TOKEN)
    cells = ScenePatchTargets(scenes, int(round(n_image ** 0.5)))
    vocabulary = DenseVocabulary.synthetic()
    directions = NameDirections.from_embeddings(model.get_input_embeddings().weight,
                                                NameDirections.token_ids(chat.tokenizer, vocabulary))
    sources: dict[str, int] = {}  # "llm/tokens/region" right (1) or wrong (0) -> objects
    twin_sources: dict[str, int] = {}  # the same, objects with a colour twin only
    has_twin: list[bool] = []  # per object
    shape_ids = NameDirections.token_ids(chat.tokenizer, vocabulary)[1]
    shape_rows = model.get_output_embeddings().weight[torch.tensor(shape_ids)]
    by_layer: dict[str, list[list[int]]] = {"all": [], "llm_wrong_sources_right": []}
    masses = {"colour": [], "shape": []}  # per object: [PARTS, heads]
    right = {"colour": [], "shape": []}  # per object: the teacher-forced argmax writes the word
    for scene in scenes:
        picture = load_image(str(data / scene["image"]))
        for index, obj in enumerate(scene["objects"]):
            object_cells = cells._cells_of(int(scene["scene_id"]), index)
            twin_indices = [k for k, other in enumerate(scene["objects"]) if k != index and other["color"] == obj["color"]]
            twin_cells = torch.zeros_like(object_cells)
            for k in twin_indices:
                twin_cells |= cells._cells_of(int(scene["scene_id"]), k)
            twin_cells &= ~object_cells
            has_twin.append(bool(twin_indices))
            box = Box(*obj["box"])
            question = build_question("What is the object <region>?", [box], *picture.size)
            article = "An" if obj["color"][0] in "aeiou" else "A"  # "An orange star." as the world writes it
            answer = f"{article} {obj['color']} {obj['shape']}."
            sample = chat.processor.encode(picture, [("USER", question), ("ASSISTANT", answer)], [box],
                                           return_labels=False)
            batch = chat.collator([sample])
            ids = batch["input_ids"][0]
            with torch.no_grad():
                # The region sampler draws its points at random: the LLM's forward and the region read
                # below use the same seed (the chat's default, 0), so both see the same embedding.
                out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                            images=batch["pixel_values"], region_masks=batch["region_masks"], output_attentions=True,
                            output_hidden_states=True, region_generator=[torch.Generator().manual_seed(0)])
                features, image_tokens = model.encode_images(batch["pixel_values"])
                region_embedding = model.encode_regions(features, batch["region_masks"],
                                                        generator=torch.Generator().manual_seed(0))[0]
            attentions = out.attentions
            truth = vocabulary.shapes.index(obj["shape"]) + 1
            token_right = int(class_logits(image_tokens[0], directions)[1][object_cells].mean(0)[1:].argmax()) + 1 == truth
            region_right = int(class_logits(region_embedding, directions)[1][0, 1:].argmax()) + 1 == truth
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
                right[kind].append(int(out.logits[0, to_spliced(word_at - 1)].argmax()) == int(ids[word_at]))
                if kind == "shape":
                    key = f"{int(right[kind][-1])}/{int(token_right)}/{int(region_right)}"
                    sources[key] = sources.get(key, 0) + 1
                    if has_twin[-1]:
                        twin_sources[key] = twin_sources.get(key, 0) + 1
                    at = to_spliced(word_at - 1)
                    lens = [int(shape_ids[int((model.model.norm(h[0, at]) @ shape_rows.T).argmax())] == int(ids[word_at]))
                            for h in out.hidden_states[1:-1]] + [int(right[kind][-1])]
                    by_layer["all"].append(lens)
                    if key == "0/1/1":
                        by_layer["llm_wrong_sources_right"].append(lens)
                image = row[:, start:start + n_image].sum(-1)
                region = row[:, region_at].sum(-1)
                answer_mass = row[:, to_spliced(answer_start):].sum(-1)
                bos = row[:, 0]
                question_mass = row.sum(-1) - image - region - answer_mass - bos
                on_object = row[:, start:start + n_image][:, object_cells].sum(-1)
                on_twin = row[:, start:start + n_image][:, twin_cells].sum(-1)
                masses[kind].append(torch.stack([bos, image, region, question_mass, answer_mass, on_object, on_twin]))
    result = {"model": args.model_path, "layer": args.layer, "scenes": len(scenes),
              "objects": len(masses["colour"])}
    for kind, rows in masses.items():
        mean = torch.stack(rows).mean(0)
        result[kind] = {part: [round(float(v), 3) for v in mean[k]] for k, part in enumerate(PARTS)}
        # The same split by whether the word comes out right (teacher-forced argmax): does a
        # misread look elsewhere, or at the object and read it wrong?
        ok = torch.tensor(right[kind])
        result[kind]["right"] = round(float(ok.float().mean()), 4)
        for label, chosen in (("when_right", ok), ("when_wrong", ~ok)):
            if bool(chosen.any()):
                part_mean = torch.stack(rows)[chosen].mean(0)
                result[kind][label] = {"objects": int(chosen.sum()),
                                       **{part: [round(float(v), 3) for v in part_mean[k]] for k, part in enumerate(PARTS)}}
    result["shape_sources"] = {"key": "llm/tokens/region, 1 = right", **dict(sorted(sources.items()))}
    twins = torch.tensor(has_twin)
    ok = torch.tensor(right["shape"])
    result["colour_twins"] = {"objects": int(twins.sum()), "shape_right": round(float(ok[twins].float().mean()), 4)
                              if bool(twins.any()) else None,
                              "shape_sources": dict(sorted(twin_sources.items()))}
    for label, chosen in (("when_right", twins & ok), ("when_wrong", twins & ~ok)):
        if bool(chosen.any()):
            part_mean = torch.stack(masses["shape"])[chosen].mean(0)
            result["colour_twins"][label] = {"objects": int(chosen.sum()),
                                             **{part: [round(float(v), 3) for v in part_mean[k]]
                                                for k, part in enumerate(PARTS)}}
    result["shape_by_layer"] = {name: [round(float(v), 3) for v in torch.tensor(rows, dtype=torch.float).mean(0)]
                                for name, rows in by_layer.items() if rows}
    print(json.dumps(result, indent=1))
    if args.out:
        write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
