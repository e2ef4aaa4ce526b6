"""``honelm dpo``: Direct Preference Optimization from the command line.

    honelm dpo --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct --dataset_name trl-lib/ultrafeedback_binarized \\
        --output_dir Qwen2.5-0.5B-DPO --learning_rate 5e-7 --beta 0.1
    honelm dpo --config dpo.yaml --max_steps 100           # flags override the YAML file
    honelm dpo --config dpo.yaml --num_processes 4         # re-launched under `accelerate launch`

Every ``DPOConfig`` field is a flag; ``honelm dpo --help`` lists them by section. The
reference model is a frozen copy of the model (with ``--use_peft``: the model with its
adapter disabled, no copy).
"""

from __future__ import annotations

from ._train_command import TrainCommand

COMMAND = TrainCommand("dpo", "DPO", "honelm.methods.dpo.config:DPOConfig", "honelm.methods.dpo.trainer:DPOTrainer")

add_arguments = COMMAND.add_arguments
default_output_dir = COMMAND.default_output_dir
load_datasets = COMMAND.load_datasets
_configure = COMMAND.configure
run = COMMAND.run
train = COMMAND.train
