"""Predicted peak memory and time of a training run, before any weight is read (`ftctl plan`, grids, run.json).

The prediction is not a formula of parameter counts: the run's own model is built from its config on fake tensors
(`FakeTensorMode`: shapes and dtypes, no storage, no weights read), its own method applied to it (LoRA, prefix,
adapters, freezing: the real code), and one real training step traced on the longest micro-batch of its own
training data, collated as training collates it: forward under the run's autocast, its loss (the lean LM loss
where training uses it), backward (with gradient checkpointing where asked), clipping and the optimizer step,
twice where gradients accumulate. torch's `MemTracker` follows every tensor the step allocates and frees and
gives the peak with its parts: weights, gradients, optimizer states, activations (with the logits and the loss)
and temporaries. `FlopCounterMode` counts the step's FLOPs.

What the trace on this machine's CPU cannot see is added from the launch: ZeRO sharding over the processes (and
CPU offload), DDP's gradient buckets, bitsandbytes' 4/8-bit storage of the quantized layers (the trace holds them
in the compute dtype) and the de-quantized copy of one layer that a quantized product makes. Time is the step's
FLOPs over a device rate: one measured here (a matrix product in the training dtype) or one stated (`--tflops`).

`accelerate estimate-memory` and DeepSpeed's estimators count weights and optimizer states only; the activations,
logits and temporaries they leave out are most of the peak for short-sequence encoders and for LM vocabularies.

The pieces: `prediction` (what is predicted), `predict` (one run's prediction), `trace` (the traced step),
`accounting` (what the trace cannot see), `rate` (seconds from FLOPs), `measure` (the run's measured side) and
`fit` (what fits a GPU). `ftctl plan` is launch/plan.py.
"""
