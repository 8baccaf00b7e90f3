"""Does the model know whether the asked object is there, even when it answers wrong? (issue 13)

    python bench/probes/yes_no_readout.py --model-path checkpoints/full_coordpe_v2n/hf --out R.json

Asks "Is there a X in the image?" for one present object and one absent name per scene (half the
absent names share the colour or the shape of a present object, as in training) and keeps, at the
position that writes the answer's first word, the residual stream after every layer. A logistic
readout per layer is fitted on `--fit-scenes` training scenes and scored on `--scenes` validation
scenes, beside the model's own "Yes"/"No" on the same validation questions, and beside a token
matcher that uses no attention at all: each image token's own colour and shape readout (the dense
loss's projection on the names' word embeddings), scored max over tokens of p(colour) x p(shape),
one threshold fitted on the training questions. That is what the image tokens hold.

Reading it: a readout well above the model's own answers means the layers hold presence and the
LM head does not use it (a loss or readout problem); a readout near chance means no layer holds it
(the attention that should find the object does not); a token matcher well above both means the
tokens hold it and the layers do not gather it.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch


def questions(scenes: list[dict], seed: int) -> list[tuple[dict, str, bool]]:
    """(scene, asked name, present?) twice per scene: a present object, then an absent name."""
    from ferret.data.synthetic import COLORS, SHAPES

    rng = random.Random(seed)
    out = []
    for scene in scenes:
        objects = scene["objects"]
        present = {o["name"] for o in objects}
        out.append((scene, rng.choice(objects)["name"], True))
        anchor = rng.choice(objects)
        if rng.random() < 0.5:  # a hard negative: the anchor's colour or shape
            options = [f"{anchor['color']} {s}" for s in SHAPES] + [f"{c} {anchor['shape']}" for c in COLORS]
        else:
            options = [f"{c} {s}" for c in COLORS for s in SHAPES]
        out.append((scene, rng.choice([o for o in options if o not in present]), False))
    return out


def absent_kind(scene: dict, name: str) -> str:
    """Which of the absent name's words some object of the scene has: "colour+shape" (both, on
    different objects), "colour", "shape" or "neither". Only a conjunction of the two words tells
    a "colour+shape" name from a present one."""
    color, shape = name.split()
    has_color = any(o["color"] == color for o in scene["objects"])
    has_shape = any(o["shape"] == shape for o in scene["objects"])
    return {(True, True): "colour+shape", (True, False): "colour", (False, True): "shape"}.get((has_color, has_shape), "neither")


@torch.no_grad()
def features(chat, data: Path, asked: list[tuple[dict, str, bool]], batch: int = 16):
    """([questions, layers + 1, hidden] residuals at the answer position, [questions] model says yes,
    [questions] token matcher score)."""
    from ferret.training.dense_supervision import DenseVocabulary, NameDirections, class_logits
    from ferret.training.grounding import spliced_index

    vocabulary = DenseVocabulary.synthetic()
    directions = NameDirections.from_embeddings(chat.model.get_input_embeddings().weight,
                                                NameDirections.token_ids(chat.tokenizer, vocabulary))
    n_image = chat.model.get_vision_tower().num_patches
    rows, says_yes, matches = [], [], []
    # The first tokens of the trained answers "Yes, the X [...]." and "No." (after "ASSISTANT:").
    yes_id, no_id = (chat.tokenizer.convert_tokens_to_ids(chat.tokenizer.tokenize(f" {a}")[0]) for a in ("Yes, the", "No."))
    for i in range(0, len(asked), batch):
        requests = [chat._prepare(str(data / scene["image"]), f"Is there a {name} in the image?")
                    for scene, name, _ in asked[i:i + batch]]
        inputs = chat._batch_inputs(requests)
        inputs.pop("region_generator")
        out = chat.model(**inputs, output_hidden_states=True)
        # Right padding: each row's last text token, moved past the spliced-in image tokens.
        last = inputs["attention_mask"].sum(1) - 1 + chat.model.get_vision_tower().num_patches - 1
        at = torch.arange(len(last))
        rows.append(torch.stack([h[at, last].float() for h in out.hidden_states], 1))
        says_yes.append(out.logits[at, last, yes_id] > out.logits[at, last, no_id])
        for row, (_, name, _) in enumerate(asked[i:i + batch]):
            start, _ = spliced_index(inputs["input_ids"][row], n_image)
            color, shape = class_logits(out.hidden_states[0][row, start:start + n_image], directions)
            c, s = name.split()  # index 0 of the logits is the background
            p = color.softmax(-1)[:, 1 + vocabulary.colors.index(c)] * shape.softmax(-1)[:, 1 + vocabulary.shapes.index(s)]
            matches.append(p.max())
    return torch.cat(rows), torch.cat(says_yes), torch.stack(matches)


def fit_readout(x: torch.Tensor, y: torch.Tensor, steps: int = 500, weight_decay: float = 1e-3) -> torch.nn.Linear:
    """A logistic readout (standardised inputs folded into the layer) fitted by full-batch L-BFGS."""
    mean, std = x.mean(0), x.std(0) + 1e-6
    linear = torch.nn.Linear(x.shape[1], 1)
    optimizer = torch.optim.LBFGS(linear.parameters(), max_iter=steps, line_search_fn="strong_wolfe")
    z, target = (x - mean) / std, y.float()

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(linear(z)[:, 0], target)
        loss = loss + weight_decay * linear.weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        linear.weight /= std
        linear.bias -= (linear.weight * mean).sum()
    return linear


def no_by_absent_kind(asked: list[tuple[dict, str, bool]], says_yes: torch.Tensor, readout_yes: torch.Tensor,
                      matched: torch.Tensor) -> dict:
    """Per kind of absent name (`absent_kind`): how many, and how often the model, the last
    layer's readout and the token matcher say "No" to it."""
    out = {}
    for kind in ("colour+shape", "colour", "shape", "neither"):
        rows = [i for i, (scene, name, present) in enumerate(asked) if not present and absent_kind(scene, name) == kind]
        if rows:
            out[kind] = {"questions": len(rows)} | {
                who: round(float((~said[rows]).float().mean()), 3)
                for who, said in (("model_no", says_yes), ("readout_no", readout_yes), ("token_match_no", matched))}
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-path", required=True)
    parser.add_argument("--data", default="data/synth")
    parser.add_argument("--fit-scenes", type=int, default=400)
    parser.add_argument("--scenes", type=int, default=200)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    from ferret.chat import FerretChat

    torch.manual_seed(0)
    data = Path(args.data)
    chat = FerretChat.from_pretrained(args.model_path, device="cpu", dtype=torch.float32)
    fit = questions(json.loads((data / "scenes_train.json").read_text())[: args.fit_scenes], seed=1)
    val = questions(json.loads((data / "scenes_val.json").read_text())[: args.scenes], seed=2)
    x_fit, _, match_fit = features(chat, data, fit)
    x_val, says_yes, match_val = features(chat, data, val)
    y_fit = torch.tensor([p for *_, p in fit])
    y_val = torch.tensor([p for *_, p in val])
    layers = []
    for layer in range(x_fit.shape[1]):
        readout = fit_readout(x_fit[:, layer], y_fit)
        with torch.no_grad():
            guess = readout(x_val[:, layer])[:, 0] > 0
        layers.append({"after_layer": layer, "readout_accuracy": round(float((guess == y_val).float().mean()), 3),
                       "readout_no": round(float((~guess[~y_val]).float().mean()), 3),
                       "readout_yes": round(float(guess[y_val].float().mean()), 3)})
    # The token matcher's one threshold: the best on the training questions.
    candidates = match_fit.sort().values
    hits = torch.stack([((match_fit > t) == y_fit).float().mean() for t in candidates])
    threshold = candidates[int(hits.argmax())]
    matched = match_val > threshold
    result = {"model": args.model_path, "fit_questions": len(fit), "val_questions": len(val),
              "token_match_accuracy": round(float((matched == y_val).float().mean()), 3),
              "token_match_no": round(float((~matched[~y_val]).float().mean()), 3),
              "token_match_yes": round(float(matched[y_val].float().mean()), 3),
              "model_no": round(float((~says_yes[~y_val]).float().mean()), 3),
              "model_yes": round(float(says_yes[y_val].float().mean()), 3),
              "layers": layers,  # after_layer 0: the embeddings (the image tokens included)
              "no_by_absent_kind": no_by_absent_kind(val, says_yes, guess, matched)}  # guess: the last layer's
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
