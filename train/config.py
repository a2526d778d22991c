"""Configuration: the structured schema Hydra validates against, and checks that fail fast.

`config/config.yaml` starts from the `config_schema` node registered here, so Hydra type-checks
every top-level and `model.*` key. A loss yaml is its own schema: its keys and their types are
the only ones `loss.*` accepts, and they must be the hyperparameters its loss function takes.
`check_command_line` runs before Hydra so that a bad override gets one line naming the key (and
the closest valid one) before anything is loaded or written; `validate` checks every value that
can be checked without loading a model, the paths of data, model and checkpoint included.
"""
import difflib
import pathlib
from dataclasses import dataclass, field
from typing import Any, Optional

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from train.errors import ConfigError, DataError, first_line
from train.losses import LOSS_KEYS

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG_DIR = ROOT / "config"
GROUPS = ("loss", "model")
DATA_SHAPES = ("sft", "pairwise", "binary", "prompt")
LR_SCHEDULES = ("linear", "cosine", "constant")
WANDB_MODES = ("offline", "online", "disabled")
DTYPES = ("auto", "float32", "bfloat16")
DISTRIBUTED = ("ddp", "fsdp", "deepspeed")
CHECKPOINT_FORMATS = ("full", "sharded")
BEST_MODES = ("min", "max")
ATTENTION = ("sdpa", "eager", "flex_attention", "flash_attention_2", "flash_attention_3", "flash_attention_4")
# torch.optim classes this loop can drive: one .step() without a closure, dense gradients, any shape.
OPTIMIZERS = ("AdamW", "Adam", "SGD", "Adafactor", "Adadelta", "Adagrad", "Adamax", "ASGD", "NAdam", "RAdam",
              "RMSprop", "Rprop")
UNSUPPORTED_OPTIMIZERS = {"LBFGS": "it needs a closure that recomputes the loss several times per step",
                          "SparseAdam": "it needs sparse gradients",
                          "Muon": "it only takes 2-D weight matrices, and every model here has 1-D norms and biases"}


# Types only: every default is in config/config.yaml (and the model and loss yamls), written once.
@dataclass
class PeftSettings:
    lora_r: int = MISSING
    lora_alpha: int = MISSING
    lora_dropout: float = MISSING
    target_modules: Any = MISSING  # "all-linear" or a list of module names


@dataclass
class ModelConfig:
    name: str = MISSING  # short name of the model yaml, used in exp_name
    name_or_path: str = MISSING  # hub id or local dir; a dir with only config.json is initialised by seed
    tokenizer_name_or_path: Optional[str] = MISSING  # null: name_or_path
    dtype: str = MISSING  # auto: float32 on CPU, bfloat16 on GPU
    batch_size: int = MISSING  # global: across ranks and gradient accumulation
    eval_batch_size: int = MISSING  # global
    gradient_accumulation_steps: int = MISSING
    max_length: int = MISSING  # prompt + response tokens
    max_prompt_length: int = MISSING
    max_grad_norm: float = MISSING
    gradient_checkpointing: bool = MISSING
    attn_implementation: str = MISSING
    trust_remote_code: bool = MISSING
    use_peft: bool = MISSING
    peft: PeftSettings = field(default_factory=PeftSettings)


@dataclass
class WandbConfig:
    mode: str = MISSING
    project: str = MISSING
    entity: Optional[str] = MISSING


@dataclass
class Config:
    exp_name: str = MISSING  # the run dir is ${cache_dir}/${exp_name}
    cache_dir: str = MISSING
    seed: int = MISSING
    lr: float = MISSING
    n_epochs: int = MISSING
    n_examples: Optional[int] = MISSING  # train on this many examples instead of n_epochs epochs
    eval_every: int = MISSING  # optimizer steps
    save_every: int = MISSING  # optimizer steps, with intermediate_checkpoints
    intermediate_checkpoints: bool = MISSING
    keep_last_n: int = MISSING  # step-N checkpoints kept (-1: all); the newest is never deleted
    keep_best_metric: Optional[str] = MISSING  # also keep the step-N with the best value of this eval metric
    keep_best_mode: str = MISSING  # min or max
    objective: Optional[str] = MISSING  # the final eval metric a job returns to a sweeper (Optuna)
    resume: str = MISSING  # auto: newest complete checkpoint in the run dir; never; or a checkpoint path
    do_first_eval: bool = MISSING
    n_eval_examples: int = MISSING
    n_eval_generations: int = MISSING  # held-out prompts to generate for (datasets with a scorer)
    max_new_tokens: int = MISSING  # eval generations, and PPO's completions
    log_every: int = MISSING  # optimizer steps; the first step is always logged
    max_nonfinite_steps: int = MISSING  # steps with a non-finite loss or gradient norm to skip before stopping
    distributed: str = MISSING  # ddp: whole model per rank; fsdp: FSDP2 sharding; deepspeed: ZeRO via accelerate
    checkpoint_format: str = MISSING  # full: whole weights and optimizer in step-N; sharded: one shard per rank
    datasets: list[Any] = MISSING  # names, paths, globs, hub ids, or {path, column_map, n, fraction}
    test_datasets: Optional[list[Any]] = MISSING  # null: the test split of `datasets`
    skip_invalid: bool = MISSING  # skip (and count) malformed records instead of failing
    dataset_num_proc: int = MISSING  # processes that tokenize (chunks of TOKENIZE_CHUNK examples)
    optimizer: str = MISSING  # a torch.optim class from OPTIMIZERS
    weight_decay: float = MISSING
    warmup: float = MISSING  # fraction of training steps
    lr_schedule: str = MISSING
    group_by_length: bool = MISSING  # batch sequences of similar length together (less padding)
    cache_reference_logprobs: bool = MISSING  # compute reference log-probs once, reuse across runs
    sync_reference_every: int = MISSING  # TR-DPO: mix the policy into the reference every N steps (0: never)
    sync_reference_alpha: float = MISSING  # the mixing weight of the policy
    wandb: WandbConfig = field(default_factory=WandbConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: Any = MISSING  # a loss yaml: its keys are its schema


ConfigStore.instance().store(name="config_schema", node=Config)


def _closest(word: str, candidates) -> str:
    by_lower = {c.lower(): c for c in candidates}
    match = difflib.get_close_matches(word.lower(), list(by_lower), n=1, cutoff=0.5)
    return f" (did you mean '{by_lower[match[0]]}'?)" if match else ""


def _keys(node, prefix="") -> list[str]:
    """Every dotted key path in a config node."""
    out = []
    for key, value in node.items_ex(resolve=False) if isinstance(node, DictConfig) else []:
        path = f"{prefix}{key}"
        out.append(path)
        if isinstance(value, DictConfig):
            out.extend(_keys(value, path + "."))
    return out


def changed_keys(a: DictConfig, b: DictConfig) -> set[str]:
    """Dotted keys whose resolved values differ between two configs (a key in only one counts)."""
    def leaves(cfg):
        values = {key: OmegaConf.select(cfg, key) for key in _keys(cfg)}
        return {key: value for key, value in values.items() if not isinstance(value, DictConfig)}
    a, b = leaves(a), leaves(b)
    return {key for key in a.keys() | b.keys() if a.get(key) != b.get(key)}


def group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))


def override_strings(argv: list[str]) -> list[str]:
    """The Hydra overrides in argv, without flags (and the values of flags that take one)."""
    takes_value = {"-cn", "--config-name", "-cp", "--config-path", "-cd", "--config-dir",
                   "--experimental-rerun", "--info", "-i"}
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg.startswith("-"):
            skip = arg in takes_value
        else:
            out.append(arg)
    return out


def compose_config(overrides: list[str]) -> DictConfig:
    """The config that launch.py would get from these overrides (unchecked); ConfigError if Hydra can't make it."""
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            return compose("config", overrides=overrides)
    except (HydraException, OmegaConfBaseException) as e:
        cause = e.__cause__ if isinstance(e.__cause__, OmegaConfBaseException) else e
        message = str(getattr(cause, "msg", cause)).strip().splitlines()[0]
        key = getattr(cause, "full_key", None)
        raise ConfigError(f"{key}: {message}" if key else message) from None


def check_command_line(argv: list[str]) -> None:
    """Validate Hydra overrides (every value of a sweep) before Hydra runs; raise ConfigError."""
    parsed = []
    for text in override_strings(argv):
        try:
            override = OverridesParser.create().parse_overrides([text])[0]
        except HydraException as e:
            raise ConfigError(f"cannot parse override '{text}': {first_line(e)}") from None
        if override.key_or_group.startswith("hydra"):
            continue
        if override.is_delete():
            raise ConfigError(f"cannot remove config key '{override.key_or_group}' (~{override.key_or_group}): "
                              f"every key is read; set it to another value instead")
        if override.is_sweep_override():
            try:
                values = list(override.sweep_string_iterator())
            except Exception:  # interval sweeps have no finite list of values: Hydra checks them
                continue
        else:
            values = [override.get_value_element_as_str()]
        parsed.append((override, values))

    for override, values in parsed:
        if override.key_or_group in GROUPS:
            options = group_options(override.key_or_group)
            for value in values:
                if value not in options:
                    raise ConfigError(f"unknown {override.key_or_group} '{value}'{_closest(value, options)}; "
                                      f"choose from: {', '.join(options)}")

    first = {o.key_or_group: f"{o.key_or_group}={v[0]}" for o, v in parsed if o.key_or_group in GROUPS}
    skeleton = compose_config(list(first.values()))
    known = _keys(skeleton)
    for override, _ in parsed:
        key = override.key_or_group
        if key in GROUPS or key in known:
            continue
        added = "; '+' adds a key, but nothing reads a key the schema lacks" if override.is_add() else ""
        raise ConfigError(f"unknown config key '{key}'{_closest(key, known)}{added}")

    # The config with each sweep at its first value, then each other value of each sweep in turn.
    base = [f"{o.key_or_group}={v[0]}" if o.is_sweep_override() else o.input_line for o, v in parsed]
    validate(compose_config(base))
    for i, (override, values) in enumerate(parsed):
        for value in values[1:] if override.is_sweep_override() else []:
            validate(compose_config(base[:i] + [f"{override.key_or_group}={value}"] + base[i + 1:]))


def _check_choice(key: str, value, choices) -> None:
    if value not in choices:
        raise ConfigError(f"{key}: '{value}' is not one of {', '.join(choices)}{_closest(str(value), choices)}")




def _check_loss(cfg: DictConfig):
    """A loss yaml is the schema of `loss.*`: same keys, same types, and its hyperparameters are the
    ones its trainer's loss function takes; then the trainer's own checks. Returns the trainer class."""
    from train.trainers import TRAINERS
    loss = cfg.loss
    name = loss.get("name")
    path = CONFIG_DIR / "loss" / f"{name}.yaml"
    if not path.exists():
        raise ConfigError(f"loss.name: no config/loss/{name}.yaml")
    schema = OmegaConf.load(path)
    for key in LOSS_KEYS:
        if key not in schema:
            raise ConfigError(f"{path}: missing required key '{key}'")
    _check_choice("loss.data_shape", schema.data_shape, DATA_SHAPES)
    _check_choice("loss.trainer", schema.trainer, list(TRAINERS))
    for key in ("trainer", "data_shape"):
        if loss.get(key) != schema[key]:
            raise ConfigError(f"loss.{key}: config/loss/{name}.yaml uses {schema[key]!r}, not {loss.get(key)!r}; "
                              f"another {key} is another loss: write a loss yaml for it")
    if set(loss) != set(schema):
        raise ConfigError(f"loss: keys {sorted(loss)} are not those of config/loss/{name}.yaml {sorted(schema)} "
                          f"(to switch losses, use loss={name}, not loss.name={name})")
    try:
        expected = TRAINERS[schema.trainer].loss_parameters(name)
    except KeyError as e:
        raise ConfigError(f"{path.name}: {e.args[0]}") from None
    if expected != set(schema) - set(LOSS_KEYS):
        raise ConfigError(f"{path.name}: hyperparameters {sorted(set(schema) - set(LOSS_KEYS))} are not the "
                          f"{sorted(expected)} that {schema.trainer}'s '{name}' loss takes")
    for key, value in loss.items():
        expected = schema.get(key)
        if isinstance(expected, bool) != isinstance(value, bool) or (
                isinstance(expected, (int, float)) and not isinstance(value, (int, float))) or (
                isinstance(expected, str) and not isinstance(value, str)):
            raise ConfigError(f"loss.{key}: expected {type(expected).__name__} as in {path.name}, "
                              f"got {value!r}")
    for key in ("beta", "tau", "desirable_weight", "undesirable_weight"):
        if loss.get(key, 1) <= 0:
            raise ConfigError(f"loss.{key}: must be positive, got {loss[key]}")
    for key in ("lambda_coef", "gamma_beta_ratio"):
        if loss.get(key, 0) < 0:
            raise ConfigError(f"loss.{key}: must be 0 or more, got {loss[key]}")
    smoothing = loss.get("label_smoothing", 0.0)
    if not (0 < smoothing if name == "exo_pair" else 0 <= smoothing) or smoothing >= 0.5:
        raise ConfigError(f"loss.label_smoothing: must be in {'(0' if name == 'exo_pair' else '[0'}, 0.5), "
                          f"got {smoothing}")
    TRAINERS[schema.trainer].check_config(cfg)
    return TRAINERS[schema.trainer]


def validate(cfg: DictConfig) -> None:
    """Every check that needs no model: raise ConfigError with one line naming the key."""
    try:
        OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except OmegaConfBaseException as e:
        raise ConfigError(f"{getattr(e, 'full_key', '')}: {str(getattr(e, 'msg', e)).splitlines()[0]}") from None
    _check_run_dir(cfg)
    trainer_class = _check_loss(cfg)
    _check_optimization(cfg)
    m = cfg.model
    _check_choice("lr_schedule", cfg.lr_schedule, LR_SCHEDULES)
    _check_choice("wandb.mode", cfg.wandb.mode, WANDB_MODES)
    _check_choice("distributed", cfg.distributed, DISTRIBUTED)
    _check_choice("checkpoint_format", cfg.checkpoint_format, CHECKPOINT_FORMATS)
    if cfg.distributed == "deepspeed":
        for wrong, why in ((cfg.checkpoint_format == "sharded", "checkpoint_format=sharded is torch.distributed.checkpoint"
                            "'s, for distributed=fsdp; DeepSpeed checkpoints are whole"),
                           (cfg.sync_reference_every, "sync_reference_every (TR-DPO) needs whole policy weights at "
                            "every sync; use distributed=fsdp")):
            if wrong:
                raise ConfigError(f"distributed=deepspeed: {why}")
    if m.dtype == "float16":
        raise ConfigError("model.dtype: float16 training needs loss scaling, which this trainer does not do (it "
                          "overflows to NaN within a few steps); use bfloat16, or float32")
    _check_choice("model.dtype", m.dtype, DTYPES)
    _check_choice("model.attn_implementation", m.attn_implementation, ATTENTION)
    if m.attn_implementation.startswith("flash") and not _cuda():
        raise ConfigError(f"model.attn_implementation: {m.attn_implementation} needs a GPU; use sdpa")
    positive = {"n_epochs": cfg.n_epochs, "eval_every": cfg.eval_every, "save_every": cfg.save_every,
                "log_every": cfg.log_every, "n_eval_examples": cfg.n_eval_examples,
                "max_new_tokens": cfg.max_new_tokens, "model.batch_size": m.batch_size,
                "model.eval_batch_size": m.eval_batch_size,
                "model.gradient_accumulation_steps": m.gradient_accumulation_steps,
                "model.max_length": m.max_length, "model.max_prompt_length": m.max_prompt_length}
    not_negative = {"n_eval_generations": cfg.n_eval_generations, "sync_reference_every": cfg.sync_reference_every}
    _check_signs(positive, not_negative)
    if not 0 <= cfg.seed < 2 ** 32:
        raise ConfigError(f"seed: must be in [0, 2^32), got {cfg.seed}")
    if cfg.n_examples is not None and cfg.n_examples < m.batch_size:
        raise ConfigError(f"n_examples: {cfg.n_examples} is less than one batch (model.batch_size={m.batch_size})")
    if m.max_prompt_length >= m.max_length:
        raise ConfigError(f"model.max_prompt_length ({m.max_prompt_length}) must be less than "
                          f"model.max_length ({m.max_length})")
    for key in ("sync_reference_every", "cache_reference_logprobs"):
        if cfg[key] and not trainer_class.loss_uses_reference(cfg.loss.name):
            raise ConfigError(f"{key}: loss {cfg.loss.name} has no reference model")
    if cfg.sync_reference_every:
        if cfg.cache_reference_logprobs or m.use_peft:
            raise ConfigError("sync_reference_every: needs a reference model of its own, so not with "
                              "cache_reference_logprobs=true or model.use_peft=true")
        if not 0 < cfg.sync_reference_alpha <= 1:
            raise ConfigError(f"sync_reference_alpha: must be in (0, 1], got {cfg.sync_reference_alpha}")
    if m.use_peft:
        _check_signs({"model.peft.lora_r": m.peft.lora_r, "model.peft.lora_alpha": m.peft.lora_alpha}, {})
        if not m.peft.target_modules:
            raise ConfigError("model.peft.target_modules: empty; all-linear, or a list of module names")
        if not 0 <= m.peft.lora_dropout < 1:
            raise ConfigError(f"model.peft.lora_dropout: must be in [0, 1), got {m.peft.lora_dropout}")
    scores = _check_data(cfg)
    from train.models import check_model_paths
    check_model_paths(m)
    _check_checkpointing(cfg, trainer_class, scores)


def _cuda() -> bool:
    import torch
    return torch.cuda.is_available()


def _check_signs(positive: dict, not_negative: dict) -> None:
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{key}: must be positive, got {value}")
    for key, value in not_negative.items():
        if value < 0:
            raise ConfigError(f"{key}: must be 0 or more, got {value}")


def _check_run_dir(cfg: DictConfig) -> None:
    """The run dir is a new or earlier run's dir below cache_dir: exp_name is a relative path inside it."""
    name = cfg.exp_name
    parts = pathlib.PurePath(name).parts
    if not name.strip() or pathlib.PurePath(name).is_absolute() or ".." in parts or not parts or parts == (".",):
        raise ConfigError(f"exp_name: {name!r} must name a dir below cache_dir ({cfg.cache_dir}): not empty, '.', "
                          f"absolute, or with '..'")
    if not cfg.cache_dir.strip():
        raise ConfigError("cache_dir: empty; the parent of run dirs, e.g. runs")
    run_dir = pathlib.Path(cfg.cache_dir) / name
    existing = next(p for p in (run_dir, *run_dir.parents) if p.exists())
    if not existing.is_dir():
        raise ConfigError(f"exp_name: run dir {run_dir} can't be made: {existing} is a file")


def _check_optimization(cfg: DictConfig) -> None:
    import inspect

    import torch
    if cfg.optimizer in UNSUPPORTED_OPTIMIZERS:
        raise ConfigError(f"optimizer: {cfg.optimizer} does not fit this training loop: "
                          f"{UNSUPPORTED_OPTIMIZERS[cfg.optimizer]}; choose from: {', '.join(OPTIMIZERS)}")
    _check_choice("optimizer", cfg.optimizer, OPTIMIZERS)
    _check_signs({"lr": cfg.lr, "model.max_grad_norm": cfg.model.max_grad_norm},
                 {"weight_decay": cfg.weight_decay, "max_nonfinite_steps": cfg.max_nonfinite_steps})
    if cfg.weight_decay and "weight_decay" not in inspect.signature(getattr(torch.optim, cfg.optimizer)).parameters:
        raise ConfigError(f"weight_decay: {cfg.optimizer} has no weight decay; set weight_decay=0")
    if not 0 <= cfg.warmup < 1:
        raise ConfigError(f"warmup: a fraction of training in [0, 1), got {cfg.warmup}")


def _check_data(cfg: DictConfig) -> tuple:
    """Every data source resolves (named, or an existing file); returns the generation scores eval reports."""
    from train import data
    if not cfg.datasets:
        raise ConfigError("datasets: empty; name at least one dataset or file")
    if cfg.dataset_num_proc < 1:
        raise ConfigError(f"dataset_num_proc: at least 1 (processes that tokenize), got {cfg.dataset_num_proc}")
    if cfg.test_datasets is not None and not cfg.test_datasets:
        raise ConfigError("test_datasets: empty; name at least one dataset or file, or leave it null for the "
                          "held-out part of datasets")
    entries = {key: OmegaConf.to_container(cfg[key]) if cfg[key] is not None else None
               for key in ("datasets", "test_datasets")}
    for key, items in entries.items():
        for i, item in enumerate(items or []):
            try:
                data.check_source(data.entry(item).spec)
            except DataError as e:
                raise ConfigError(f"{key}[{i}]: {e}") from None
    source = data.scoring_source(entries["datasets"], entries["test_datasets"])
    return source.scores if source else ()


def _check_checkpointing(cfg: DictConfig, trainer_class, scores: tuple) -> None:
    from train.checkpoint import problem
    if cfg.keep_last_n == 0 or cfg.keep_last_n < -1:
        raise ConfigError(f"keep_last_n: at least 1, or -1 to keep every checkpoint; got {cfg.keep_last_n}")
    _check_choice("keep_best_mode", cfg.keep_best_mode, BEST_MODES)
    if cfg.keep_best_metric is not None:
        if cfg.save_every % cfg.eval_every:
            raise ConfigError(f"keep_best_metric: save_every ({cfg.save_every}) must be a multiple of eval_every "
                              f"({cfg.eval_every}) so that every step-N has fresh eval metrics")
        generated = trainer_class.generates and cfg.n_eval_generations
        metrics = [*trainer_class.eval_metrics, *(f"generations_eval/{name}" for name in scores if generated)]
        if cfg.keep_best_metric not in metrics:
            raise ConfigError(f"keep_best_metric: {cfg.loss.trainer} never reports '{cfg.keep_best_metric}'"
                              f"{_closest(cfg.keep_best_metric, metrics)}; it reports: {', '.join(metrics)}")
    if cfg.resume not in ("auto", "never"):
        why = problem(pathlib.Path(cfg.resume))
        if why:
            raise ConfigError(f"resume: {cfg.resume} is not a complete checkpoint: {why}")


# `${repo:train/assets/tiny}` in a yaml is that path inside this repository, wherever it is run from.
OmegaConf.register_new_resolver("repo", lambda path: str(ROOT / path), replace=True)
