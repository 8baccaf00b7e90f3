"""Every trainable weight gets a gradient on every training step: DeepSpeed's rule, as one helper
the trainer installs on the model.

ZeRO-2 reduces gradients from per-parameter hooks and ZeRO-3 replays the parameter-gather order
it recorded at step 1 (DDP has the same rule): every rank must run the same modules in the same
order and every trainable weight must get a gradient, whatever the rank's batch holds (a
text-only batch, an image that refers to no region). A model with the cover installed does, in
each training forward (train mode, gradients on):

* run the region module on every image, with a 4x4-pixel placeholder mask where an image refers
  to no region (its output is not used);
* add 0 x (sum of the region module's outputs) to the input embeddings, or, when no image ran,
  0 x (sum of the trainable weights) of the multimodal modules.

The values the LLM sees are unchanged and the extra weights get zero gradients. Without the
cover (inference, evaluation, other training loops) a training forward computes exactly what an
inference forward does.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

PLACEHOLDER_MASK_SIDE = 4  # pixels; any non-empty mask would do


class GradientCover:
    """ferret.model.modeling_ferret.GradientCover for DeepSpeed (see the module docstring)."""

    def region_masks(self, model, per_image: list[list[torch.Tensor]], device: torch.device) -> list[list[torch.Tensor]]:
        """Each image's region masks, with a placeholder for an image that has none, when the
        region module has trainable weights."""
        module = model.model.region_module
        if module is None or not any(p.requires_grad for p in module.parameters()):
            return per_image
        placeholder = torch.ones(PLACEHOLDER_MASK_SIDE, PLACEHOLDER_MASK_SIDE, dtype=torch.bool, device=device)
        return [masks if masks else [placeholder] for masks in per_image]

    def touch(self, model, inputs_embeds: torch.Tensor, region_outputs: Sequence[torch.Tensor | None],
              ran_image: bool) -> torch.Tensor:
        """`inputs_embeds` + 0 x (what this forward ran but did not use, or did not run)."""
        if ran_image:
            outputs = [feats for feats in region_outputs if feats is not None]
            if not outputs:
                return inputs_embeds
            anchor = sum(feats.sum() for feats in outputs) * 0.0
        else:
            anchor = zero_sum_of_weights(model.model.multimodal_modules())
        return inputs_embeds + anchor.to(inputs_embeds.dtype)


def zero_sum_of_weights(modules: Sequence[nn.Module]) -> torch.Tensor:
    """0 x (sum of the trainable weights of `modules`): each then gets a zero gradient."""
    total = None
    for module in modules:
        for parameter in module.parameters():
            if parameter.requires_grad:
                term = parameter.sum()
                total = term if total is None else total + term.to(total.dtype)
    return torch.zeros(()) if total is None else total * 0.0


def install_gradient_cover(model) -> GradientCover:
    """Install the cover on a Ferret model (or a peft wrapper of one); returns it."""
    from ferret.training.model_setup import unwrap

    cover = GradientCover()
    unwrap(model).gradient_cover = cover
    return cover
