"""``honelm reward``: train a reward model on preference pairs from the command line.

    honelm reward --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct \\
        --dataset_name trl-lib/ultrafeedback_binarized --output_dir Qwen2.5-0.5B-Reward
    honelm reward --config reward.yaml --max_steps 100        # flags override the YAML file
    honelm reward --config reward.yaml --num_processes 4      # re-launched under `accelerate launch`
    honelm reward --config reward.yaml --use_peft --lora_r 16 # LoRA adapters + the score head

Every ``RewardConfig`` field is a flag; ``honelm reward --help`` lists them by section.
"""

from __future__ import annotations

from ._train_command import TrainCommand

COMMAND = TrainCommand(
    "reward", "Reward", "honelm.methods.reward.config:RewardConfig", "honelm.methods.reward.trainer:RewardTrainer",
    lora_task_type="SEQ_CLS",  # adapters + the score head
    saved="reward model",
)

add_arguments = COMMAND.add_arguments
default_output_dir = COMMAND.default_output_dir
load_datasets = COMMAND.load_datasets
_configure = COMMAND.configure
run = COMMAND.run
train = COMMAND.train
