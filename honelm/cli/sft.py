"""``honelm sft``: supervised fine-tuning from the command line.

    honelm sft --model_name_or_path Qwen/Qwen2.5-0.5B --dataset_name trl-lib/Capybara \\
        --output_dir Qwen2.5-0.5B-SFT --learning_rate 2e-5
    honelm sft --config sft.yaml --max_steps 100           # flags override the YAML file
    honelm sft --config sft.yaml --num_processes 4         # re-launched under `accelerate launch`

Every ``SFTConfig`` field is a flag; ``honelm sft --help`` lists them by section.
"""

from __future__ import annotations

from ._train_command import TrainCommand

COMMAND = TrainCommand("sft", "SFT", "honelm.methods.sft.config:SFTConfig", "honelm.methods.sft.trainer:SFTTrainer")

add_arguments = COMMAND.add_arguments
default_output_dir = COMMAND.default_output_dir
load_datasets = COMMAND.load_datasets
_configure = COMMAND.configure
run = COMMAND.run
train = COMMAND.train
