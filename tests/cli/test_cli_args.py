"""Flags and YAML files from config dataclasses (honelm.cli.args)."""

from __future__ import annotations

import argparse
import enum
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pytest

from honelm.cli import args as cli_args
from honelm.cli.args import ConfigError, add_config_arguments, build_configs, resolve_values


class Color(enum.Enum):
    RED = "red"
    BLUE = "blue"


@dataclass
class ToyConfig:
    """A config with one field of every kind the flags support."""

    # ---- Numbers -------------------------------------------------------
    steps: int = field(default=3, metadata={"help": "How many steps."})
    rate: float = field(default=0.5, metadata={"help": "A rate of 100%."})
    limit: int | None = field(default=None, metadata={"help": "Optional limit."})

    # ---- Switches ------------------------------------------------------
    fast: bool = field(default=False, metadata={"help": "Go fast."})
    safe: bool = field(default=True, metadata={"help": "Stay safe."})
    maybe: bool | None = field(default=None, metadata={"help": "Undecided."})

    # ---- Text and structures -------------------------------------------
    name: str = field(default="toy", metadata={"help": "A name."})
    mode: Literal["a", "b"] = field(default="a", metadata={"help": "A mode."})
    color: Color | str = field(default="red", metadata={"help": "A color."})
    level: str = field(default="info", metadata={"help": "A level.", "choices": ["info", "debug"]})
    tags: list[str] = field(default_factory=list, metadata={"help": "Tags."})
    sizes: list[int] | None = field(default=None, metadata={"help": "Sizes."})
    report: None | str | list[str] = field(default="none", metadata={"help": "Where to report."})
    extra: dict[str, Any] | None = field(default=None, metadata={"help": "Extra options."})
    path_or_json: dict | str | None = field(default=None, metadata={"help": "A path or a JSON object."})


def _parse(argv: list[str], config_cls: type = ToyConfig) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="honelm toy", exit_on_error=False)
    add_config_arguments(parser, config_cls, method="Toy")
    return parser.parse_args(argv)


def _config(argv: list[str], config_cls: type = ToyConfig) -> Any:
    return build_configs(resolve_values(_parse(argv, config_cls), config_cls), config_cls)[1]


def _write(tmp_path: Path, text: str, name: str = "cfg.yaml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


# ---- flag types --------------------------------------------------------------------------------


def test_defaults_come_from_the_dataclass() -> None:
    assert _config([]) == ToyConfig()


def test_numbers() -> None:
    config = _config(["--steps", "7", "--rate", "1e-3", "--limit", "4"])
    assert (config.steps, config.rate, config.limit) == (7, 1e-3, 4)
    assert isinstance(config.rate, float) and isinstance(config.steps, int)
    assert _config(["--limit", "none"]).limit is None


@pytest.mark.parametrize("argv, expected", [
    (["--fast"], True), (["--fast", "true"], True), (["--fast", "True"], True), (["--fast", "yes"], True),
    (["--fast", "false"], False), (["--fast", "0"], False), (["--fast", "true", "--no_fast"], False),
])
def test_bool_flag_spellings(argv: list[str], expected: bool) -> None:
    assert _config(argv).fast is expected


def test_bool_negation_and_optional_bool() -> None:
    assert _config(["--no_safe"]).safe is False
    assert _config(["--no-safe"]).safe is False
    assert _config(["--maybe", "false"]).maybe is False
    assert _config(["--maybe"]).maybe is True
    assert _config(["--maybe", "none"]).maybe is None


def test_dashed_spelling_is_accepted() -> None:
    parser = argparse.ArgumentParser(exit_on_error=False)
    add_config_arguments(parser, ToyConfig, method="Toy")
    config = build_configs(resolve_values(parser.parse_args(["--path-or-json", "x.json"]), ToyConfig), ToyConfig)[1]
    assert config.path_or_json == "x.json"


def test_choices_literal_enum_and_metadata() -> None:
    config = _config(["--mode", "b", "--color", "BLUE", "--level", "debug"])
    assert (config.mode, config.color, config.level) == ("b", "blue", "debug")
    for argv, wanted in ((["--mode", "c"], "a, b"), (["--color", "green"], "red, blue"),
                         (["--level", "loud"], "info, debug")):
        with pytest.raises(argparse.ArgumentError, match=wanted):
            _parse(argv)


def test_lists_dicts_and_unions() -> None:
    config = _config(["--tags", "x", "y", "--sizes", "1", "2", "--report", "wandb",
                      "--extra", '{"a": 1, "b": [2]}', "--path_or_json", '{"k": true}'])
    assert config.tags == ["x", "y"]
    assert config.sizes == [1, 2]
    assert config.report == "wandb"  # one value of `str | list[str]` stays a string
    assert config.extra == {"a": 1, "b": [2]}
    assert config.path_or_json == {"k": True}
    assert _config(["--tags", "solo"]).tags == ["solo"]
    assert _config(["--report", "a", "b"]).report == ["a", "b"]
    assert _config(["--report", "none"]).report == "none"  # a string where strings are allowed


@pytest.mark.parametrize("argv, message", [
    (["--steps", "2.5"], "expected an integer, got '2.5'"),
    (["--rate", "fast"], "expected a number, got 'fast'"),
    (["--fast", "maybe"], "expected true or false, got 'maybe'"),
    (["--sizes", "1", "x"], "expected an integer, got 'x'"),
    (["--extra", "{oops"], "invalid JSON object"),
    (["--extra", "[1]"], "expected a JSON object"),
])
def test_bad_flag_values_name_the_flag(argv: list[str], message: str) -> None:
    with pytest.raises(argparse.ArgumentError, match=rf"argument {argv[0]}: .*{message.replace('[', '.')}"):
        _parse(argv)


def test_abbreviated_and_unknown_flags_are_rejected() -> None:
    for argv in (["--ste", "3"], ["--stepz", "3"]):
        with pytest.raises(SystemExit):
            _parse(argv)


def test_flags_are_recorded_for_relaunching() -> None:
    args = _parse(["--steps", "7", "--no_safe", "--tags", "x", "y", "--config", "c.yaml"])
    assert args._cli_argv == ["--steps", "7", "--no_safe", "--tags", "x", "y", "--config", "c.yaml"]


# ---- YAML --------------------------------------------------------------------------------------


def test_precedence_defaults_then_yaml_then_flags(tmp_path: Path) -> None:
    path = _write(tmp_path, "steps: 10\nrate: 0.25\nname: from-yaml\n")
    config = _config(["--config", path, "--steps", "20"])
    assert config.steps == 20  # flag beats YAML
    assert config.rate == 0.25  # YAML beats default
    assert config.name == "from-yaml"
    assert config.limit is None  # default where neither sets it
    config = _config(["--steps", "20", "--config", path])  # the order of flags does not matter
    assert config.steps == 20


def test_yaml_values_are_converted_like_flags(tmp_path: Path) -> None:
    path = _write(tmp_path, (
        "rate: 1e-5\nsteps: '12'\nlimit: null\nfast: true\nsafe: false\nmode: b\ncolor: BLUE\n"
        "tags: solo\nsizes: [1, 2]\nreport: [a, b]\nextra: {x: 1}\npath_or_json: '{\"k\": 2}'\nname: 7\n"
    ))
    config = _config(["--config", path])
    assert config.rate == 1e-5 and isinstance(config.rate, float)  # PyYAML alone reads 1e-5 as a string
    assert config.steps == 12 and config.limit is None
    assert (config.fast, config.safe, config.mode, config.color) == (True, False, "b", "blue")
    assert (config.tags, config.sizes, config.report) == (["solo"], [1, 2], ["a", "b"])
    assert config.extra == {"x": 1} and config.path_or_json == {"k": 2}
    assert config.name == "7"


def test_yaml_no_is_a_string_not_false(tmp_path: Path) -> None:
    # YAML 1.1 reads a bare `no` as false, which would break `eval_strategy: no`.
    config = _config(["--config", _write(tmp_path, "name: no\nreport: off\n")])
    assert (config.name, config.report) == ("no", "off")


def test_yaml_unknown_key_suggests_the_closest_field(tmp_path: Path) -> None:
    path = _write(tmp_path, "stpes: 3\n")
    with pytest.raises(ConfigError, match=r"cfg.yaml: unknown option `stpes`\. Did you mean `steps`\?"):
        resolve_values(_parse(["--config", path]), ToyConfig)


def test_yaml_bad_value_names_file_and_key(tmp_path: Path) -> None:
    path = _write(tmp_path, "steps: many\n")
    with pytest.raises(ConfigError, match=r"cfg.yaml: `steps`: expected an integer, got 'many'"):
        resolve_values(_parse(["--config", path]), ToyConfig)
    path = _write(tmp_path, "mode: c\n")
    with pytest.raises(ConfigError, match=r"`mode`: expected one of a, b"):
        resolve_values(_parse(["--config", path]), ToyConfig)


def test_yaml_dashed_keys_and_duplicates(tmp_path: Path) -> None:
    assert _config(["--config", _write(tmp_path, "path-or-json: p\n")]).path_or_json == "p"
    path = _write(tmp_path, "path-or-json: p\npath_or_json: q\n")
    with pytest.raises(ConfigError, match="given twice"):
        resolve_values(_parse(["--config", path]), ToyConfig)


def test_yaml_file_problems(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        resolve_values(_parse(["--config", str(tmp_path / "missing.yaml")]), ToyConfig)
    with pytest.raises(ConfigError, match="mapping"):
        resolve_values(_parse(["--config", _write(tmp_path, "- a\n- b\n")]), ToyConfig)
    with pytest.raises(ConfigError, match="not valid YAML"):
        resolve_values(_parse(["--config", _write(tmp_path, "a: [1\n")]), ToyConfig)
    with pytest.raises(ConfigError, match="command-line flag only"):
        resolve_values(_parse(["--config", _write(tmp_path, "num_processes: 2\n")]), ToyConfig)
    assert _config(["--config", _write(tmp_path, "")]) == ToyConfig()


def test_script_arguments_and_lora_without_peft(tmp_path: Path) -> None:
    path = _write(tmp_path, "model_name_or_path: m\ndataset_name: d\nuse_peft: true\nlora_target_modules: [q_proj]\n")
    script, config = build_configs(resolve_values(_parse(["--config", path, "--lora_r", "4"]), ToyConfig), ToyConfig)
    assert (script.model_name_or_path, script.dataset_name, script.dataset_train_split) == ("m", "d", "train")
    assert (script.use_peft, script.lora_r, script.lora_target_modules) == (True, 4, ["q_proj"])
    assert config == ToyConfig()
    with pytest.raises(ConfigError, match="lora_r set without use_peft"):
        build_configs(resolve_values(_parse(["--lora_r", "4"]), ToyConfig), ToyConfig)


def test_require_names_the_missing_option() -> None:
    with pytest.raises(ConfigError, match=r"--model_name_or_path is required"):
        cli_args.require({"dataset_name": "d"}, "model_name_or_path", "dataset_name")


# ---- help --------------------------------------------------------------------------------------


def test_help_groups_follow_section_comments(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        _parse(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    titles = ["Model, data and config file:", "LoRA adapters", "Toy: Numbers:", "Toy: Switches:",
              "Toy: Text and structures:", "Launching several processes"]
    positions = [out.index(t) for t in titles]
    assert positions == sorted(positions)
    assert out.index("--steps") < out.index("Toy: Switches:") < out.index("--fast")
    flat = " ".join(out.split())
    assert "A rate of 100%. (default: 0.5)" in flat  # help from metadata, % kept, default shown
    assert "--mode {a,b}" in flat and "--path-or-json" not in flat  # one spelling shown per option
    assert "Stay safe. (default: true) Turn off with --no_safe." in flat


def test_sft_config_help_puts_sft_options_before_training_options() -> None:
    from honelm.methods.sft.config import SFTConfig

    parser = argparse.ArgumentParser(prog="honelm sft")
    add_config_arguments(parser, SFTConfig, method="SFT")
    text = parser.format_help()
    assert text.index("SFT: Data preprocessing:") < text.index("Training options (transformers.TrainingArguments):")
    assert text.index("--packing") < text.index("--per_device_train_batch_size")
    assert "--eval_strategy {no,steps,epoch}" in text


# ---- SFTConfig, LoRA and launching -------------------------------------------------------------


def test_every_sft_config_field_is_a_flag() -> None:
    import dataclasses

    from honelm.methods.sft.config import SFTConfig

    specs = {s.name for s in cli_args.field_specs(SFTConfig, "SFT")}
    fields = {f.name for f in dataclasses.fields(SFTConfig) if f.init and not f.name.startswith("_")}
    assert fields <= specs


def test_sft_config_from_yaml_and_flags(tmp_path: Path) -> None:
    from honelm.methods.sft.config import SFTConfig

    path = _write(tmp_path, (
        f"output_dir: {tmp_path / 'out'}\nlearning_rate: 1e-4\nmax_length: 64\npacking: true\n"
        "eval_strategy: no\nreport_to: none\nuse_cpu: true\nlr_scheduler_type: cosine\n"
        "model_init_kwargs: {attn_implementation: eager}\n"
    ))
    config = _config(["--config", path, "--max_length", "32", "--lr_scheduler_type", "constant"], SFTConfig)
    assert isinstance(config, SFTConfig)
    assert (config.learning_rate, config.max_length, config.packing) == (1e-4, 32, True)
    assert config.lr_scheduler_type.value == "constant"
    assert config.eval_strategy.value == "no"
    assert config.model_init_kwargs == {"attn_implementation": "eager"}


def test_invalid_sft_config_is_a_config_error(tmp_path: Path) -> None:
    from honelm.methods.sft.config import SFTConfig

    argv = ["--output_dir", str(tmp_path), "--loss_type", "mse", "--use_cpu"]
    with pytest.raises(ConfigError, match=r"invalid SFTConfig: .*loss_type='mse'"):
        _config(argv, SFTConfig)


def test_lora_config_from_script_arguments(monkeypatch: pytest.MonkeyPatch) -> None:
    script = cli_args.ScriptArguments(use_peft=True, lora_r=4, lora_alpha=8, lora_target_modules=["all-linear"])
    lora = cli_args.lora_config(script)
    assert (lora.r, lora.lora_alpha, lora.target_modules) == (4, 8, "all-linear")
    assert cli_args.lora_config(cli_args.ScriptArguments()) is None
    monkeypatch.setitem(sys.modules, "peft", None)  # as if peft were not installed
    with pytest.raises(ConfigError, match="needs the peft package"):
        cli_args.lora_config(script)


def test_launch_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli_args, "_has_accelerator", lambda: False)
    args = _parse(["--num_processes", "2", "--main_process_port", "1234", "--steps", "5"])
    cmd = cli_args.launch_command(args, "toy", resolve_values(args, ToyConfig))
    assert cmd[:3] == [sys.executable, "-m", "accelerate.commands.launch"]
    launcher, child = cmd[3:cmd.index("honelm.cli") - 1], cmd[cmd.index("honelm.cli") + 1:]
    assert launcher == ["--num_processes", "2", "--multi_gpu", "--main_process_port", "1234"]
    assert child == ["toy", "--steps", "5", "--use_cpu", "true"]  # launch flags dropped; CPU made explicit
    accelerate_yaml = _write(tmp_path, "distributed_type: MULTI_GPU\n", "accelerate.yaml")
    args = _parse(["--accelerate_config", accelerate_yaml, "--fast"])
    cmd = cli_args.launch_command(args, "toy", {})
    assert cmd[3:5] == ["--config_file", accelerate_yaml] and cmd[-2:] == ["toy", "--fast"]
    assert cli_args.launch_command(_parse(["--fast"]), "toy", {}) is None
    with pytest.raises(ConfigError, match="no such file"):
        cli_args.launch_command(_parse(["--accelerate_config", str(tmp_path / "x.yaml")]), "toy", {})
    with pytest.raises(ConfigError, match="at least 1"):
        cli_args.launch_command(_parse(["--num_processes", "0"]), "toy", {})


def test_example_yaml_is_a_valid_sft_config(recwarn: pytest.WarningsRecorder) -> None:
    from honelm.methods.sft.config import SFTConfig

    example = Path(__file__).resolve().parents[2] / "examples" / "sft.yaml"
    script, config = build_configs(resolve_values(_parse(["--config", str(example), "--use_cpu"], SFTConfig),
                                                  SFTConfig), SFTConfig)
    assert script.model_name_or_path and script.dataset_name
    assert config.packing is True and config.eval_strategy.value == "steps"
    assert not [w for w in recwarn if issubclass(w.category, FutureWarning)], "the example uses a deprecated option"


def test_one_token_for_a_list_field_is_a_list_of_one_and_scalar_unions_stay_scalar():
    from honelm.cli.main import build_parser

    def parsed(argv):
        return build_parser(argv).parse_args(argv)

    assert parsed(["sft", "--lora_target_modules", "all-linear"]).lora_target_modules == ["all-linear"]
    assert parsed(["dpo", "--loss_weights", "1.0"]).loss_weights == [1.0]
    assert parsed(["dpo", "--loss_type", "sigmoid"]).loss_type == "sigmoid"  # str | list[str]: stays a string
    assert parsed(["dpo", "--loss_type", "sigmoid", "ipo"]).loss_type == ["sigmoid", "ipo"]
