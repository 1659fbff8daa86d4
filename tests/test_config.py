"""Loading, overriding, checking and schema-validating run configs, as a user meets them."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from services import require

from unitedllm.config import Config, config_digest, config_schema, dump_config, load_config, validate_file
from unitedllm.config.cli_support import format_problems, parse_set_options
from unitedllm.errors import ConfigError

SEED = Path(__file__).resolve().parents[2] / "shared" / "seed" / "fedml_config.yaml"
# A copy of the seed inside the repository: general features (overrides, run-id filling, dump) are
# tested on it, so they never depend on a file outside the repository.
FEDML_CONFIG = Path(__file__).resolve().parent / "fixtures" / "fedml_config.yaml"


@pytest.fixture
def seed() -> Path:
    """The original seed config beside the repository (the must-load-unchanged tests read it)."""
    require(None if SEED.exists() else f"FedML seed config not found at {SEED}")
    return SEED


@pytest.fixture
def fedml_config() -> Path:
    return FEDML_CONFIG


def test_the_repository_copy_is_the_seed_unchanged(seed: Path) -> None:
    assert FEDML_CONFIG.read_bytes() == seed.read_bytes()


def write(tmp_path: Path, text: str, name: str = "config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def problems_of(source: Any, **kwargs: Any) -> list[str]:
    """The ``path: message`` lines a user would see for a bad config."""
    with pytest.raises(ConfigError) as info:
        load_config(source, **kwargs)
    return format_problems(info.value).splitlines()


# --- the FedML seed -----------------------------------------------------------------


def test_seed_config_loads_unchanged_with_its_values(seed: Path) -> None:
    cfg = load_config(seed)
    assert cfg.common_args.training_type == "cross_cloud"
    assert cfg.common_args.use_customized_hierarchical is True
    assert cfg.environment_args.bootstrap == "fedml_config/bootstrap.sh"
    assert cfg.data_args.dataset_name == "fedml/databricks-dolly-15k-niid"
    assert cfg.data_args.remove_long_seq is True
    assert cfg.model_args.model_name_or_path == "EleutherAI/pythia-70m"
    assert cfg.model_args.load_pretrained is False
    assert cfg.model_args.peft_type == "lora"
    t = cfg.train_args
    assert (t.client_num_in_total, t.client_num_per_round, t.comm_round) == (2, 2, 5)
    assert t.learning_rate == pytest.approx(3e-4)
    assert t.seed == 1234 and t.warmup_steps == 50 and t.local_max_steps == 200
    assert t.deepspeed == "configs/deepspeed/ds_z3_bf16_config.json"
    assert t.output_dir == ".logs/UnitedLLM/{run_id}"  # no run id given: the template stays
    assert cfg.server_optimizer_name == "FedAvg"
    assert cfg.validation_args.test_on_clients == "after_aggregation"
    assert cfg.validation_args.test_on_client_ranks == [1]
    assert cfg.validation_args.save_frequency is None
    assert cfg.device_args.using_gpu is True
    assert cfg.comm_args.backend == "MQTT_S3"
    assert cfg.tracking_args.enable_wandb is False


def test_seed_config_passes_validate_file_and_the_json_schema(seed: Path) -> None:
    assert validate_file(seed) == []
    jsonschema.Draft202012Validator(config_schema()).validate(yaml.safe_load(seed.read_text()))


# --- defaults -----------------------------------------------------------------------


def test_missing_and_empty_sections_take_defaults(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        train_args:
          comm_round: 3
        tracking_args:
          # enable_wandb: true   (every key commented out)
        """,
    )
    cfg = load_config(path)
    assert cfg.train_args.comm_round == 3
    assert cfg.train_args.learning_rate == 5e-5  # Hugging Face's default
    assert cfg.model_args == Config().model_args
    assert cfg.tracking_args == Config().tracking_args


def test_empty_file_is_all_defaults(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, "# nothing set yet\n")) == Config()


# --- one message per kind of mistake -------------------------------------------------


@pytest.mark.parametrize(
    ("data", "line"),
    [
        (
            {"train_args": {"comm_round": "five"}},
            'train_args.comm_round: expected int >= 1 and <= 1000000000, got "five"',
        ),
        (
            {"train_args": {"comm_round": 0}},
            "train_args.comm_round: expected int >= 1 and <= 1000000000, got 0",
        ),
        ({"train_args": {"fp16": "maybe"}}, 'train_args.fp16: expected bool, got "maybe"'),
        (
            {"model_args": {"lora_dropout": 1.5}},
            "model_args.lora_dropout: expected float >= 0.0 and < 1.0, got 1.5",
        ),
        (
            {"model_args": {"peft_type": "lorra"}},
            "model_args.peft_type: 'lorra' is not one of 'none', 'lora'",
        ),
        (
            {"model_args": {"lora_target_modules": ["q_proj", 7]}},
            "model_args.lora_target_modules[1]: expected str, got 7",
        ),
        (
            {"train_args": {"comm_rnd": 3}},
            "train_args.comm_rnd: unknown key 'comm_rnd' in train_args; did you mean 'comm_round'?",
        ),
        (
            {"train_args": {"server_optimizer_args": {"server_lr": 1.0}}},
            (
                "train_args.server_optimizer_args.server_lr: unknown key 'server_lr' in "
                "train_args.server_optimizer_args; did you mean 'server_learning_rate'?"
            ),
        ),
        ({"trian_args": {}}, "trian_args: unknown section 'trian_args'; did you mean 'train_args'?"),
        (
            {"comm_round": 3},
            "comm_round: unknown section 'comm_round'; 'comm_round' is a key of train_args, not a section",
        ),
        (
            {"model_args": {"learning_rate": 1e-4}},
            "model_args.learning_rate: unknown key 'learning_rate' in model_args; 'learning_rate' belongs in train_args",
        ),
        ({"train_args": [1, 2]}, "train_args: expected a section (a mapping of keys), got [1, 2]"),
        (
            {"train_args": {"client_num_in_total": 2, "client_num_per_round": 3}},
            "train_args.client_num_per_round: 3 is more than client_num_in_total (2)",
        ),
        (
            {"train_args": {"local_optimizer_state": "fresh"}},
            "train_args.local_optimizer_state: 'fresh' is not one of 'keep', 'reset'",
        ),
        (
            {"train_args": {"local_optimizer_state": "reset", "deepspeed": "ds.json"}},
            "train_args.local_optimizer_state: reset is not supported with train_args.deepspeed",
        ),
        (
            {"validation_args": {"test_on_client_ranks": [0]}},
            (
                "validation_args.test_on_client_ranks[0]: rank 0 is not a client rank; "
                "clients are ranks 1..2 (0 is the aggregator)"
            ),
        ),
        (
            {"validation_args": {"test_on_client_ranks": [1, 3]}},
            (
                "validation_args.test_on_client_ranks[1]: rank 3 is not a client rank; "
                "clients are ranks 1..2 (0 is the aggregator)"
            ),
        ),
        (
            {"validation_args": {"test_on_client_ranks": [1, 1]}},
            "validation_args.test_on_client_ranks[1]: rank 1 is listed twice",
        ),
        (
            {"train_args": {"fp16": True, "bf16": True}},
            "train_args.bf16: fp16 and bf16 are both true; choose at most one",
        ),
        (
            {"train_args": {"federated_optimizer": "FedAvgg"}},
            "train_args.federated_optimizer: unknown server optimizer 'FedAvgg'; choose one of",
        ),
        (
            {"train_args": {"output_dir": "runs/{run_id}/{node}"}},
            "train_args.output_dir: unknown placeholder {node} in 'runs/{run_id}/{node}'; only {run_id} is filled in",
        ),
        (
            {"train_args": {"client_num_per_round": 2}, "comm_args": {"min_updates_per_round": 3}},
            "comm_args.min_updates_per_round: 3 is more than client_num_per_round (2)",
        ),
        (
            {"data_args": {"client_dataset_path": ["shared.jsonl"]}},
            "data_args.client_dataset_path: one path 'shared.jsonl' without {rank} would give all 2 clients",
        ),
        (
            {"data_args": {"client_dataset_path": ["a.jsonl", "b.jsonl", "c.jsonl"]}},
            "data_args.client_dataset_path: 3 paths for client_num_in_total 2",
        ),
        (
            {"comm_args": {"mqtt": {"tls_cert_file": "client.pem"}}},
            "comm_args.mqtt.tls_key_file: missing: a client certificate needs both, and tls_cert_file is set",
        ),
        (
            {"model_args": {"peft_type": "lora", "lora_target_modules": []}},
            "model_args.lora_target_modules: an empty list would put LoRA on no module",
        ),
    ],
)
def test_each_mistake_gets_its_own_message(data: dict[str, Any], line: str) -> None:
    lines = problems_of(data)
    assert len(lines) == 1, lines
    assert lines[0].startswith(line), lines[0]


def test_client_dataset_path_forms_that_are_fine() -> None:
    assert load_config({"data_args": {"client_dataset_path": ["data/c{rank}.jsonl"]}})
    assert load_config({"data_args": {"client_dataset_path": ["a.jsonl", "b.jsonl"]}})


def test_unquoted_no_gets_a_hint_about_yaml(tmp_path: Path) -> None:
    path = write(tmp_path, "train_args:\n  save_strategy: no\n")
    (line,) = problems_of(path)
    assert line.startswith("train_args.save_strategy: false is not one of 'no', 'steps', 'epoch'")
    assert 'quotes, e.g. "no"' in line


def test_learning_rate_without_a_dot_is_a_number(tmp_path: Path) -> None:
    # YAML 1.1 (PyYAML) would read 1e-4 as a string and fail the float check.
    cfg = load_config(write(tmp_path, "train_args:\n  learning_rate: 1e-4\n"))
    assert cfg.train_args.learning_rate == pytest.approx(1e-4)


def test_many_problems_are_reported_together(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        model_args:
          peft_type: lorra
        train_args:
          comm_round: five
          comm_rnd: 3
        validation_args:
          test_on_clients: sometimes
        trian_args: {}
        """,
    )
    with pytest.raises(ConfigError) as info:
        load_config(path)
    err = info.value
    assert [p.path for p in err.problems] == [
        "model_args.peft_type",
        "train_args.comm_round",
        "train_args.comm_rnd",
        "validation_args.test_on_clients",
        "trian_args",
    ]
    assert all(p.source == str(path) for p in err.problems)
    assert str(err).startswith(f"invalid config {path} (5 problems):")


def test_a_bad_section_does_not_hide_cross_checks_elsewhere() -> None:
    lines = problems_of({"model_args": {"peft_type": "lorra"}, "train_args": {"fp16": True, "bf16": True}})
    assert [line.split(":")[0] for line in lines] == ["model_args.peft_type", "train_args.bf16"]


def test_yaml_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path, "train_args:\n  comm_round: 3\n  fp16: [true\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(path) in str(info.value)
    assert "YAML syntax error at line 4" in str(info.value)


def test_duplicate_keys_are_reported_with_lines(tmp_path: Path) -> None:
    path = write(tmp_path, "train_args:\n  comm_round: 3\n  seed: 1\n  comm_round: 5\n")
    (line,) = problems_of(path)
    assert "duplicate key 'comm_round' at line 4 (first at line 2)" in line


def test_missing_file_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "fedml_config.yaml"
    with pytest.raises(ConfigError, match=f"config file not found: {missing}"):
        load_config(missing)


def test_top_level_must_be_a_mapping(tmp_path: Path) -> None:
    (line,) = problems_of(write(tmp_path, "- train_args\n- model_args\n"))
    assert "a config is a mapping of sections" in line


# --- overrides ------------------------------------------------------------------------


def test_overrides_by_mapping_and_by_strings(fedml_config: Path) -> None:
    by_map = load_config(
        fedml_config,
        overrides={"train_args.comm_round": 3, "model_args.lora_target_modules": ["query_key_value"]},
    )
    by_str = load_config(
        fedml_config,
        overrides=["train_args.comm_round=3", "model_args.lora_target_modules=[query_key_value]"],
    )
    assert by_map == by_str
    assert by_map.train_args.comm_round == 3
    assert by_map.model_args.lora_target_modules == ["query_key_value"]
    assert by_map.train_args.learning_rate == pytest.approx(3e-4)  # the rest is the file's


def test_override_reaches_keys_and_sections_the_file_leaves_out(tmp_path: Path) -> None:
    cfg = load_config(
        write(tmp_path, "train_args:\n  comm_round: 2\n"),
        overrides=[
            "comm_args.s3.bucket=fl-runs",
            "train_args.server_optimizer_args.server_learning_rate=0.5",
            "model_args.model_config_overrides.hidden_size=64",
            "environment_args.bootstrap=",
        ],
    )
    assert cfg.comm_args.s3.bucket == "fl-runs"
    assert cfg.train_args.server_optimizer_args.server_learning_rate == 0.5
    assert cfg.model_args.model_config_overrides == {"hidden_size": 64}
    assert cfg.environment_args.bootstrap is None


def test_bad_override_path_gets_a_hint_and_bad_override_value_is_attributed() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(
            {}, overrides=["train_args.comm_rounds=3", "train_args.seed=abc", "train_args.comm_round.x=1"]
        )
    problems = info.value.problems
    assert [p.path for p in problems] == [
        "train_args.comm_rounds",
        "train_args.comm_round",
        "train_args.seed",
    ]
    assert "did you mean 'comm_round'?" in problems[0].message
    assert "is a single value (int >= 1 and <= 1000000000), not a section" in problems[1].message
    assert problems[2].message == 'expected int >= 0 and <= 4294967295, got "abc"'
    assert {p.source for p in problems} == {"overrides"}


def test_malformed_override_is_named() -> None:
    lines = problems_of({}, overrides=["train_args.comm_round 3", "=3", "train_args.fp16=[true"])
    assert lines[0].endswith(
        "override 'train_args.comm_round 3' is not KEY=VALUE (e.g. train_args.comm_round=3)"
    )
    assert "override '=3' is not KEY=VALUE" in lines[1]
    assert lines[2].startswith(
        "train_args.fp16: cannot read the value of 'train_args.fp16=[true': YAML syntax error"
    )


def test_parse_set_options_for_the_cli() -> None:
    assert parse_set_options(
        ["train_args.comm_round=3", "data_args.dataset_path=[a.jsonl, b.jsonl]", "a.b=x=y"]
    ) == {
        "train_args.comm_round": 3,
        "data_args.dataset_path": ["a.jsonl", "b.jsonl"],
        "a.b": "x=y",
    }
    with pytest.raises(ConfigError) as info:
        parse_set_options(["comm_round"])
    assert (
        format_problems(info.value)
        == "--set: --set: override 'comm_round' is not KEY=VALUE (e.g. train_args.comm_round=3)"
    )


# --- run id -------------------------------------------------------------------------


def test_run_id_fills_output_dir(fedml_config: Path) -> None:
    assert load_config(fedml_config, run_id="run-42").train_args.output_dir == ".logs/UnitedLLM/run-42"
    assert (
        load_config({"train_args": {"output_dir": "/out/fixed"}}, run_id="7").train_args.output_dir
        == "/out/fixed"
    )


@pytest.mark.parametrize("run_id", ["", "../escape", "a/b", "has space", "x" * 200])
def test_unsafe_run_id_is_refused(run_id: str) -> None:
    with pytest.raises(ConfigError, match="is not a usable run id"):
        load_config({}, run_id=run_id)


# --- dump and digest ----------------------------------------------------------------


def test_dump_is_plain_yaml_that_loads_back_equal(fedml_config: Path, tmp_path: Path) -> None:
    cfg = load_config(fedml_config)
    dumped = tmp_path / "dumped.yaml"
    dumped.write_text(yaml.safe_dump(dump_config(cfg)))
    assert load_config(dumped) == cfg
    assert config_digest(load_config(dumped)) == config_digest(cfg)


def test_digest_changes_with_any_value_and_not_with_key_order() -> None:
    a = load_config({"train_args": {"comm_round": 3, "seed": 1}, "model_args": {"peft_type": "lora"}})
    b = load_config({"model_args": {"peft_type": "lora"}, "train_args": {"seed": 1, "comm_round": 3}})
    c = load_config({"train_args": {"comm_round": 4, "seed": 1}, "model_args": {"peft_type": "lora"}})
    assert config_digest(a) == config_digest(b)
    assert config_digest(a) != config_digest(c)
    assert len(config_digest(a)) == 64


# --- schema -------------------------------------------------------------------------


def test_schema_describes_limits_and_choices() -> None:
    defs = config_schema()["$defs"]
    assert defs["TrainArgs"]["properties"]["comm_round"]["minimum"] == 1
    assert defs["TrainArgs"]["additionalProperties"] is False
    assert sorted(defs["ModelArgs"]["properties"]["peft_type"]["enum"]) == ["lora", "none"]


def test_validate_file_reports_schema_and_cross_field_problems(tmp_path: Path) -> None:
    good = write(tmp_path, "train_args:\n  comm_round: 3\n", "good.yaml")
    assert validate_file(good) == []
    bad = write(
        tmp_path,
        """
        train_args:
          comm_round: 0
          client_num_in_total: 2
          client_num_per_round: 3
        model_args:
          peft_typ: lora
        """,
        "bad.yaml",
    )
    found = {p.path: p.message for p in validate_file(bad)}
    # train_args failed its type checks, so its cross-field check is not run on a half-read section.
    assert found == {
        "train_args.comm_round": "expected int >= 1 and <= 1000000000, got 0",
        "model_args.peft_typ": "unknown key 'peft_typ' in model_args; did you mean 'peft_type'?",
    }
    crossed = write(
        tmp_path, "train_args:\n  client_num_in_total: 2\n  client_num_per_round: 3\n", "crossed.yaml"
    )
    assert [(p.path, p.message) for p in validate_file(crossed)] == [
        ("train_args.client_num_per_round", "3 is more than client_num_in_total (2)")
    ]
    assert [p.message for p in validate_file(tmp_path / "absent.yaml")] == [
        f"config file not found: {tmp_path / 'absent.yaml'}"
    ]


def test_validate_file_applies_overrides(tmp_path: Path) -> None:
    path = write(tmp_path, "train_args:\n  comm_round: 3\n")
    (problem,) = validate_file(path, overrides=["train_args.comm_round=0"])
    assert (problem.path, problem.source) == ("train_args.comm_round", "overrides")


def test_importing_config_does_not_import_torch() -> None:
    code = "import sys, unitedllm.config; print('torch' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.strip() == "False"


def test_relative_model_and_data_paths_are_found_next_to_the_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    project = tmp_path / "project"
    (project / "models" / "tiny").mkdir(parents=True)
    (project / "data" / "clients").mkdir(parents=True)
    (project / "data" / "all.jsonl").write_text("{}\n")
    config = project / "fedml_config.yaml"
    config.write_text(
        "model_args:\n  model_name_or_path: models/tiny\n  tokenizer_name_or_path: EleutherAI/pythia-70m\n"
        "data_args:\n  dataset_path: [data/all.jsonl]\n  client_dataset_path: ['data/clients/{rank}.jsonl']\n"
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg = load_config(config)
    assert cfg.model_args.model_name_or_path == str(project / "models" / "tiny")
    assert cfg.model_args.tokenizer_name_or_path == "EleutherAI/pythia-70m"  # a hub name stays one
    assert cfg.data_args.dataset_path == [str(project / "data" / "all.jsonl")]
    assert cfg.data_args.client_dataset_path == [str(project / "data" / "clients" / "{rank}.jsonl")]

    # Not next to the config: left for the current directory (or the hub), as before.
    config.write_text("model_args:\n  model_name_or_path: examples/models/tiny-gpt-neox\n")
    assert load_config(config).model_args.model_name_or_path == "examples/models/tiny-gpt-neox"
