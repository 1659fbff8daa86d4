"""The typed UnitedLLM config: every section and key of FedML's ``fedml_config.yaml``, plus ours.

Keys present in FedML's UnitedLLM keep its meaning and default (for Hugging Face
training keys, the Hugging Face default). Keys UnitedLLM adds always have a default,
so a FedML config loads unchanged. Value limits live in the annotations (they become
the JSON Schema); checks across fields live in :mod:`unitedllm.config.checks`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

__all__ = [
    "CommArgs",
    "CommonArgs",
    "Config",
    "DataArgs",
    "DeviceArgs",
    "EnvironmentArgs",
    "ModelArgs",
    "MqttArgs",
    "S3Args",
    "ServerOptimizerArgs",
    "TrackingArgs",
    "TrainArgs",
    "ValidationArgs",
]

# Every number has an upper bound too: a value no run could use (a 5,000-digit lora_r, a seed
# numpy refuses) is a config error naming the key, not a crash deep inside training.
_MANY = 10**9  # counts of steps, examples, rounds: far beyond any real run
PositiveInt = Annotated[int, Meta(ge=1, le=_MANY)]
NonNegativeInt = Annotated[int, Meta(ge=0, le=_MANY)]
NonNegativeFloat = Annotated[float, Meta(ge=0.0, le=1e9)]
PositiveFloat = Annotated[float, Meta(gt=0, le=1e9)]
Probability = Annotated[float, Meta(ge=0.0, lt=1.0)]
Rank = Annotated[int, Meta(ge=1, le=100_000)]
ClientCount = Annotated[int, Meta(ge=1, le=100_000)]
Seed = Annotated[int, Meta(ge=0, le=2**32 - 1)]  # numpy's seed range, which Hugging Face's set_seed uses
Port = Annotated[int, Meta(ge=1, le=65535)]
Seconds = Annotated[float, Meta(gt=0, le=30 * 24 * 3600.0)]
LearningRate = Annotated[float, Meta(gt=0, le=1e3)]

#: Marks a config value as a credential: :mod:`unitedllm.config.redaction` masks it before any
#: tracker, log, report or package sees the config, and the JSON Schema shows it as ``writeOnly``.
SECRET = Meta(extra={"secret": True}, extra_json_schema={"writeOnly": True})
SecretStr = Annotated[str, SECRET]


class Section(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, omit_defaults=False):
    """Base of every config section: keyword-only, unknown keys rejected."""


class CommonArgs(Section):
    """``common_args``: what kind of federated run this is."""

    training_type: Literal["cross_cloud", "cross_silo", "simulation"] = "cross_cloud"
    scenario: Literal["horizontal", "hierarchical"] = "horizontal"
    use_customized_hierarchical: bool = False
    random_seed: Annotated[Seed, Meta(description="Seed for client sampling and initial weights")] = 0
    config_version: str = "release"


class EnvironmentArgs(Section):
    """``environment_args``: how a node is prepared and which launcher starts the work (docs/silos.md)."""

    bootstrap: Annotated[
        str | None,
        Meta(
            description="bash script run once per node before launch; relative: next to the config, else cwd"
        ),
    ] = None
    launcher: Annotated[
        Literal["auto", "torch", "deepspeed"],
        Meta(description="How a client silo starts: auto, torchrun (torch) or the DeepSpeed launcher"),
    ] = "auto"
    nproc_per_node: Annotated[
        Annotated[int, Meta(ge=1, le=1024)] | None,
        Meta(description="Processes per node (default: the GPU count, 1 on CPU)"),
    ] = None
    # UnitedLLM additions: a silo that spans several nodes (static rendezvous, as torchrun's flags)
    nnodes: Annotated[int, Meta(ge=1, le=100_000, description="Nodes in one client silo")] = 1
    node_rank: Annotated[
        int, Meta(ge=0, le=99_999, description="This node's index in its silo, 0..nnodes-1")
    ] = 0
    master_addr: Annotated[str, Meta(description="Address of the silo's node 0 (multi-node silos)")] = (
        "127.0.0.1"
    )
    master_port: Annotated[
        Port | None,
        Meta(description="Rendezvous port on node 0 (default: a free port on one node, 29500 on several)"),
    ] = None
    launcher_args: Annotated[
        list[str], Meta(description="Extra arguments passed to torchrun or deepspeed as they are")
    ] = msgspec.field(default_factory=list)


class DataArgs(Section):
    """``data_args``: where the instruction data comes from and how it is cut."""

    dataset: str = "databricks-dolly"
    dataset_name: str | None = "fedml/databricks-dolly-15k-niid"
    dataset_path: list[str] = msgspec.field(default_factory=list)
    client_dataset_path: list[str] = msgspec.field(default_factory=list)
    test_dataset_size: NonNegativeInt = 200
    remove_long_seq: bool = False
    truncate_long_seq: bool = True
    max_seq_length: Annotated[int, Meta(ge=1, le=2**24)] = 1024
    # UnitedLLM additions
    partition: Annotated[
        Literal["category", "iid"],
        Meta(description="How one dataset file is split across clients: by category (non-IID) or IID"),
    ] = "category"
    synthetic_num_examples: Annotated[
        PositiveInt, Meta(description="Examples generated when dataset is 'unitedllm-synthetic'")
    ] = 2000
    cache_dir: str | None = None


class ModelArgs(Section):
    """``model_args``: which causal LM to train and how (PEFT)."""

    skip_log_model_net: bool = True
    model_name_or_path: str = "EleutherAI/pythia-70m"
    use_flash_attention: bool = False
    load_pretrained: bool = True
    peft_type: Literal["none", "lora"] = "none"
    lora_r: Annotated[int, Meta(ge=1, le=65536)] = 8
    lora_alpha: Annotated[float, Meta(gt=0, le=1e6)] = 32.0
    lora_dropout: Probability = 0.1
    lora_target_modules: list[str] | None = None
    lora_on_all_modules: bool = False
    # UnitedLLM additions
    tokenizer_name_or_path: str | None = None
    train_tokenizer_vocab_size: Annotated[
        Annotated[int, Meta(ge=1, le=2**24)] | None,  # the tokenizer trainer needs >= 258 and says so
        Meta(description="Train a byte-level BPE tokenizer of this size on the training data (offline runs)"),
    ] = None
    model_config_overrides: dict[str, Any] = msgspec.field(default_factory=dict)
    trust_remote_code: bool = False
    model_revision: str | None = None


#: Server momentum and moment decay rates (FedAvgM, DiLoCo, FedAdam/FedYogi/FedAdagrad).
Decay = Annotated[float, Meta(ge=0.0, lt=1.0)]
Tau = Annotated[float, Meta(gt=0, le=1e3)]
TrimRatio = Annotated[float, Meta(ge=0.0, lt=0.5)]
ByzantineCount = Annotated[int, Meta(ge=0, le=100_000)]
#: A bound on the server step's L2 norm as a multiple of the round's mean-delta norm.
StepRatio = Annotated[float, Meta(gt=0, le=1e3)]


class ServerOptimizerArgs(Section):
    """``train_args.server_optimizer_args``: the server optimizer's hyper-parameters, as FedML's flat section.

    Each rule takes only its own keys, and a key left unset (null) takes the rule's default from its
    paper (:mod:`unitedllm.optimizers.builtin`); a key of another rule is a config error.
    """

    server_learning_rate: LearningRate | None = None
    server_momentum: Decay | None = None
    nesterov: bool | None = None
    beta1: Decay | None = None
    beta2: Decay | None = None
    tau: Tau | None = None
    sample_weighted: bool | None = None
    trim_ratio: TrimRatio | None = None
    num_byzantine: ByzantineCount | None = None
    multi_krum_m: ClientCount | None = None
    proximal_mu: NonNegativeFloat | None = None
    momentum_restart: bool | None = None
    max_step_ratio: StepRatio | None = None


class TrainArgs(Section):
    """``train_args``: federation shape plus the Hugging Face training arguments."""

    federated_optimizer: str = "FedAvg"
    client_optimizer: str = "adamw_torch"
    server_optimizer: str | None = None
    server_optimizer_args: ServerOptimizerArgs = msgspec.field(default_factory=ServerOptimizerArgs)
    client_num_in_total: ClientCount = 2
    client_num_per_round: ClientCount = 2
    comm_round: PositiveInt = 10
    # Hugging Face settings
    deepspeed: str | None = None
    ddp_find_unused_parameters: bool | None = None
    seed: Seed = 42
    fp16: bool = False
    bf16: bool = False
    gradient_checkpointing: bool = False
    per_device_train_batch_size: Annotated[int, Meta(ge=1, le=2**20)] = 8
    per_device_eval_batch_size: Annotated[int, Meta(ge=1, le=2**20)] = 8
    gradient_accumulation_steps: Annotated[int, Meta(ge=1, le=2**20)] = 1
    eval_accumulation_steps: Annotated[int, Meta(ge=1, le=2**20)] | None = None
    learning_rate: LearningRate = 5e-5
    weight_decay: NonNegativeFloat = 0.0
    adam_beta1: Annotated[float, Meta(ge=0.0, lt=1.0)] = 0.9
    adam_beta2: Annotated[float, Meta(ge=0.0, lt=1.0)] = 0.999
    adam_epsilon: Annotated[float, Meta(gt=0, le=1.0)] = 1e-8
    max_grad_norm: NonNegativeFloat = 1.0
    lr_scheduler_type: Literal[
        "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup"
    ] = "linear"
    warmup_steps: NonNegativeInt = 0
    warmup_ratio: Annotated[float, Meta(ge=0.0, le=1.0)] = 0.0
    output_dir: str = ".logs/UnitedLLM/{run_id}"
    logging_steps: PositiveFloat = 500
    eval_steps: PositiveFloat | None = None
    save_steps: PositiveFloat = 500
    save_total_limit: PositiveInt | None = None
    logging_strategy: Literal["no", "steps", "epoch"] = "steps"
    evaluation_strategy: Literal["no", "steps", "epoch"] = "no"
    eval_strategy: Literal["no", "steps", "epoch"] | None = None
    save_strategy: Literal["no", "steps", "epoch"] = "steps"
    save_on_each_node: bool = False
    dataloader_num_workers: Annotated[int, Meta(ge=0, le=1024)] = 0
    use_cpu: bool = False
    # extra options
    model_dtype: Literal["bf16", "fp16", "fp32"] = "fp32"
    local_num_train_epochs: Annotated[float, Meta(gt=0, le=1e6)] = 1.0
    local_max_steps: Annotated[int, Meta(ge=-1, le=_MANY, description="Steps per round; -1: epochs")] = -1
    local_optimizer_state: Annotated[
        Literal["keep", "reset"],
        Meta(
            description="keep: a client's optimizer moments carry into its next round (DiLoCo's inner "
            "optimizer); reset: they start from zero every round. The schedule continues either way"
        ),
    ] = "keep"


class ValidationArgs(Section):
    """``validation_args``: when and where models are evaluated and saved."""

    frequency_of_the_test: Annotated[int, Meta(ge=1, le=_MANY)] = 1
    test_on_clients: Literal["before_aggregation", "after_aggregation", "no", "both"] = "no"
    is_aggregator_test: bool = False
    test_on_client_ranks: list[Annotated[int, Meta(ge=0, le=100_000)]] = msgspec.field(default_factory=list)
    save_frequency: Annotated[int, Meta(ge=-1, le=_MANY)] | None = None
    #: Warn (metrics event, progress line, report) when the global eval loss rises more than this
    #: many nats from one evaluated round to the next; null: never (:mod:`unitedllm.instability`).
    loss_rise_warning: Annotated[float, Meta(gt=0, le=1e3)] | None = 0.1


class DeviceArgs(Section):
    """``device_args``: which device trains."""

    using_gpu: bool = False
    gpu_id: Annotated[int, Meta(ge=0, le=1023)] | None = None


class MqttArgs(Section):
    """``comm_args.mqtt``: the MQTT broker for control messages."""

    host: str | None = None
    port: Port = 1883
    username: str | None = None
    password: SecretStr | None = None
    keepalive: Annotated[int, Meta(ge=5, le=65535)] = 60
    tls_ca_file: str | None = None
    tls_cert_file: str | None = None
    tls_key_file: str | None = None


class S3Args(Section):
    """``comm_args.s3``: the S3 store for tensors."""

    endpoint_url: str | None = None
    bucket: str | None = None
    region: str = "us-east-1"
    prefix: str = "unitedllm"
    access_key_id: str | None = None
    secret_access_key: SecretStr | None = None
    multipart_threshold_mb: Annotated[int, Meta(ge=5, le=5 * 1024)] = 64


class CommArgs(Section):
    """``comm_args``: how the aggregator and the clients talk."""

    backend: Literal["LOCAL", "MQTT_S3"] = "LOCAL"
    is_mobile: Annotated[int, Meta(ge=0, le=1)] = 0
    # UnitedLLM additions
    mqtt: MqttArgs = msgspec.field(default_factory=MqttArgs)
    s3: S3Args = msgspec.field(default_factory=S3Args)
    mqtt_config_path: str | None = None
    s3_config_path: str | None = None
    run_secret: SecretStr | None = None
    rank_keys_path: Annotated[
        str | None,
        Meta(description="YAML file mapping client rank to its own HMAC key (UNITEDLLM_RANK_KEY_<r> wins)"),
    ] = None
    retry_window_s: Annotated[
        float,
        Meta(gt=0, le=86400.0, description="Seconds broker and S3 operations are retried before failing"),
    ] = 120.0
    round_timeout_s: Annotated[
        Seconds, Meta(description="Seconds the aggregator waits for the selected clients' updates")
    ] = 3600.0
    join_timeout_s: Annotated[
        Seconds, Meta(description="Seconds the aggregator waits for clients to come online")
    ] = 600.0
    min_updates_per_round: Annotated[
        ClientCount | None,
        Meta(description="Quorum: updates needed to aggregate after the deadline (default: all selected)"),
    ] = None
    update_codec: Annotated[
        str,
        Meta(
            description="How a client's update travels: none (as trained), bf16, fp16, int8 (blockwise, "
            "error feedback) or topk (largest fraction, error feedback)"
        ),
    ] = "none"
    update_codec_block_size: Annotated[
        int, Meta(ge=8, le=1 << 20, description="int8 codec: values per quantisation block (one scale each)")
    ] = 256
    update_codec_topk_fraction: Annotated[
        float, Meta(gt=0, le=1, description="topk codec: fraction of each tensor's entries sent per round")
    ] = 0.01
    global_codec: Annotated[
        str,
        Meta(
            description="How the global weights travel to clients: none (exact), or bf16, fp16, int8: the "
            "change of the clients' copy, the aggregator keeping what encoding lost (error feedback)"
        ),
    ] = "none"
    global_codec_block_size: Annotated[
        int,
        Meta(
            ge=8, le=1 << 20, description="int8 global codec: values per quantisation block (one scale each)"
        ),
    ] = 256


class TrackingArgs(Section):
    """``tracking_args``: where metrics go."""

    enable_wandb: bool = False
    wandb_only_server: bool = True
    wandb_project: str = "unitedllm"
    wandb_entity: str | None = None
    wandb_name: str | None = None
    wandb_mode: Literal["online", "offline", "disabled"] = "online"
    enable_tensorboard: bool = False
    mlflow_tracking_uri: str | None = None
    mlflow_experiment: str = "unitedllm"
    log_system_metrics: bool = True


class Config(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """A whole UnitedLLM run config (the sections of ``fedml_config.yaml``)."""

    common_args: CommonArgs = msgspec.field(default_factory=CommonArgs)
    environment_args: EnvironmentArgs = msgspec.field(default_factory=EnvironmentArgs)
    data_args: DataArgs = msgspec.field(default_factory=DataArgs)
    model_args: ModelArgs = msgspec.field(default_factory=ModelArgs)
    train_args: TrainArgs = msgspec.field(default_factory=TrainArgs)
    validation_args: ValidationArgs = msgspec.field(default_factory=ValidationArgs)
    device_args: DeviceArgs = msgspec.field(default_factory=DeviceArgs)
    comm_args: CommArgs = msgspec.field(default_factory=CommArgs)
    tracking_args: TrackingArgs = msgspec.field(default_factory=TrackingArgs)

    @property
    def server_optimizer_name(self) -> str:
        """The server optimizer to use: ``server_optimizer``, else FedML's ``federated_optimizer``."""
        return self.train_args.server_optimizer or self.train_args.federated_optimizer
