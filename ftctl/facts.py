"""Typed facts about a run that methods and tasks may decide by, known before the model is loaded.

`LaunchFacts` come from whatever launched the run: `--deepspeed`, an accelerate config (`ftctl train
--accelerate-config`, `accelerate launch --config_file`) or the environment accelerate's launcher exports. The run
layer reads them once (`launch.run.runs.launch_facts`), and every decision that depends on them (precision, storing
frozen weights in the autocast dtype, method refusals) uses these, so a run launched through an accelerate config
behaves as the same run given `--deepspeed`. `DataFacts` are added once the training data is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LaunchFacts:
    num_processes: int = 1
    num_machines: int = 1
    distributed_type: str = "no"  # no, multi (DDP), deepspeed
    deepspeed_stage: int | None = None  # ZeRO stage when DeepSpeed runs the engine
    deepspeed_offload: bool = False  # ZeRO moves optimizer states or parameters to the CPU
    deepspeed_optimizer: bool = False  # the DeepSpeed config brings its own optimizer (it replaces ftctl's groups)
    device: str = "cpu"  # cpu or cuda: where the training processes run

    @property
    def deepspeed(self) -> bool:
        return self.deepspeed_stage is not None


@dataclass(frozen=True)
class DataFacts:
    train_examples: int
    total_steps: int  # optimizer steps the run will take, as the Trainer counts them
