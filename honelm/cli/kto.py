"""``honelm kto``: Kahneman-Tversky Optimization from the command line.

    honelm kto --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct --dataset_name trl-lib/kto-mix-14k \\
        --output_dir Qwen2.5-0.5B-KTO --learning_rate 5e-7 --per_device_train_batch_size 16
    honelm kto --config kto.yaml --max_steps 100           # flags override the YAML file
    honelm kto --config kto.yaml --num_processes 4         # re-launched under `accelerate launch`

The dataset holds unpaired preference rows (``prompt``, ``completion``, ``label``) or paired
ones (``prompt``/``chosen``/``rejected``), which are split into unpaired rows. Every
``KTOConfig`` field is a flag; ``honelm kto --help`` lists them by section.
"""

from __future__ import annotations

from ._train_command import TrainCommand

COMMAND = TrainCommand(
    "kto", "KTO", "honelm.methods.kto.config:KTOConfig", "honelm.methods.kto.trainer:KTOTrainer",
    data_errors_exit=True,
)

add_arguments = COMMAND.add_arguments
default_output_dir = COMMAND.default_output_dir
load_datasets = COMMAND.load_datasets
_configure = COMMAND.configure
run = COMMAND.run
train = COMMAND.train
