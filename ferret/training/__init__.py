"""Training-only code: nothing here is part of the exported model. `train/ferret_train.py` (the
torchrun entry point) reads as setup, loop, finish on top of these modules:

config             the typed training config (yaml/json + dotted overrides) and its errors
model_setup        the model a run trains: built from its source, frozen / LoRA-wrapped
gradient_cover     DeepSpeed's "every trainable weight gets a gradient" rule, installed on the model
distributed        torchrun's processes, the DeepSpeed config, batches on the device
schedule           the learning-rate schedule and AdamW groups
seeding            the seeded data order per rank and the region sampler's draws
checkpoint         crash-safe DeepSpeed checkpoints, resume, and the Hugging Face export
metrics            metrics.jsonl and TensorBoard
callbacks          hooks into the loop (tests crash a run there)
synthetic_world    the synthetic world's auxiliary losses and vision warm-up, behind one hook
scene_targets      their per-sample targets, attached to the generic dataset's items
dense_supervision  the dense readout's targets and losses
grounding          attention supervision, coordinate heads, number tokens
"""
