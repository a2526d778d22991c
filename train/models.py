"""Models: the tokenizer, the policy (optionally LoRA-wrapped) and its dtype."""
import logging
import math
import os
import pathlib

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from train import losses
from train.errors import ConfigError, first_line

log = logging.getLogger(__name__)

# Used when a tokenizer has no chat template of its own.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# The weight files from_pretrained loads; anything else that looks like weights is refused, not skipped.
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".npz", ".pkl")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model", "vocab.txt", "tiktoken.model")


def resolve_dtype(name: str) -> torch.dtype:
    """`auto` is float32 on CPU (bf16 is ~20x slower on CPUs without bf16 units), bfloat16 on GPU."""
    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return getattr(torch, name)


def _is_path(name: str) -> bool:
    """Whether `name` is meant as a local path: a hub id is `name` or `org/name`."""
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or os.sep != "/" and os.sep in name


def has_weights(directory: pathlib.Path) -> bool:
    """Whether a model dir holds weights from_pretrained loads (False: config only). Files that look like
    weights in any other form stop the run: training them from random init would be silent."""
    if any((directory / name).is_file() for name in WEIGHT_FILES):
        return True
    others = sorted(str(p.relative_to(directory)) for p in [*directory.glob("*"), *directory.glob("*/*")]
                    if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
    if others:
        raise ConfigError(f"model.name_or_path: {directory} holds weights transformers does not load "
                          f"({', '.join(others[:3])}), and none it does (model.safetensors, pytorch_model.bin): save "
                          f"them with save_pretrained; refusing to train from random weights")
    return False


def _check_source(key: str, name: str, wanted: tuple, what: str) -> None:
    path = pathlib.Path(name).expanduser()
    if path.is_dir():
        if not any((path / file).is_file() for file in wanted):
            adapter = " (it holds a LoRA adapter: name its base model)" if (path / "adapter_config.json").is_file() else ""
            raise ConfigError(f"{key}: {name} has no {what} ({' or '.join(wanted[:3])}){adapter}")
    elif path.exists():
        raise ConfigError(f"{key}: {name} is a file; expected a model directory or a hub id")
    elif _is_path(name):
        raise ConfigError(f"{key}: {name}: no such directory")
    else:
        from huggingface_hub import constants, try_to_load_from_cache
        if constants.HF_HUB_OFFLINE and not any(isinstance(try_to_load_from_cache(name, file), str) for file in wanted):
            raise ConfigError(f"{key}: '{name}' is neither a local directory nor a model in the Hugging Face cache "
                              f"(and HF_HUB_OFFLINE is set)")


def _tokenizer_source(model_cfg) -> tuple[str, str]:
    """The config key that names the tokenizer, and its value."""
    if model_cfg.tokenizer_name_or_path:
        return "model.tokenizer_name_or_path", model_cfg.tokenizer_name_or_path
    return "model.name_or_path", model_cfg.name_or_path


def check_model_paths(model_cfg) -> None:
    """Stop with one line if the model or tokenizer named in the config can't be found or loaded as it is."""
    _check_source("model.name_or_path", model_cfg.name_or_path, ("config.json",), "config.json")
    model_dir = pathlib.Path(model_cfg.name_or_path).expanduser()
    if model_dir.is_dir():
        has_weights(model_dir)
    _check_source(*_tokenizer_source(model_cfg), TOKENIZER_FILES,
                  "tokenizer; set model.tokenizer_name_or_path to one that has")


def checked_load(key: str, name: str, load, *args, **kwargs):
    """`load(name, ...)`, with a failure to find or read the files as one line naming the config key."""
    from huggingface_hub.errors import HFValidationError
    from safetensors import SafetensorError
    try:
        return load(name, *args, **kwargs)
    except (OSError, HFValidationError, SafetensorError) as e:
        raise ConfigError(f"{key}: cannot load {name}: {first_line(e)}") from None


def load_tokenizer(model_cfg):
    key, name = _tokenizer_source(model_cfg)
    tokenizer = checked_load(key, name, AutoTokenizer.from_pretrained, trust_remote_code=model_cfg.trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not tokenizer.chat_template:
        log.info("tokenizer has no chat template: using ChatML")
        tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def load_policy(model_cfg, seed: int, model_class: str = "causal_lm", pad_token_id: int = None,
                float32_master: bool = False):
    """The model to train. A local dir holding only config.json is initialised from `seed`.
    `float32_master`: load float32 weights whatever model.dtype says (FSDP and DeepSpeed compute in
    model.dtype).

    model_class "sequence_classification" gives a reward model: the same backbone with a one-output
    head (new, initialised from `seed`) that scores the last non-padding token.
    """
    kwargs = dict(dtype=torch.float32 if float32_master else resolve_dtype(model_cfg.dtype),
                  attn_implementation=model_cfg.attn_implementation, trust_remote_code=model_cfg.trust_remote_code)
    if kwargs["dtype"] == torch.bfloat16 and not model_cfg.use_peft:
        # No fp32 master copy yet: measured on the demo, DPO at lr 3e-5 reached reward accuracy 0.57
        # with bf16 weights and 1.0 in float32 (docs/benchmarks.md, "GPU checks").
        log.warning("model.dtype=%s: the optimizer steps bfloat16 weights, which round away updates smaller than "
                    "about 1/256 of a weight (most of them at fine-tuning learning rates); train in float32 "
                    "(model.dtype=float32) or with LoRA (model.use_peft=true, adapters are float32)", model_cfg.dtype)
    name = model_cfg.name_or_path
    config = checked_load("model.name_or_path", name, AutoConfig.from_pretrained,
                              trust_remote_code=model_cfg.trust_remote_code)
    auto = AutoModelForCausalLM
    if model_class == "sequence_classification":
        auto = AutoModelForSequenceClassification
        config.num_labels, config.pad_token_id = 1, pad_token_id
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        path = pathlib.Path(name).expanduser()
        try:
            if not path.is_dir() or has_weights(path):
                model = checked_load("model.name_or_path", name, auto.from_pretrained, config=config, **kwargs)
            else:
                log.warning("%s holds a config and no weights: training a new model, initialised from seed %d",
                            name, seed)
                model = auto.from_config(config, **kwargs)
        except ImportError as e:  # e.g. flash_attention_2 without the flash-attn package
            raise ConfigError(f"model.attn_implementation={model_cfg.attn_implementation}: "
                              f"{first_line(e)}") from None
    if model_cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if model_cfg.use_peft:
        from peft import LoraConfig, get_peft_model
        p = model_cfg.peft
        targets = p.target_modules if isinstance(p.target_modules, str) else list(p.target_modules)
        from peft.utils.error import PeftError
        try:  # a fresh LoraConfig per model: get_peft_model rewrites it in place
            model = get_peft_model(model, LoraConfig(r=p.lora_r, lora_alpha=p.lora_alpha, lora_dropout=p.lora_dropout,
                                                     target_modules=targets,
                                                     task_type="SEQ_CLS" if model_class != "causal_lm" else "CAUSAL_LM"))
        except PeftError as e:  # e.g. target_modules that the model does not have
            raise ConfigError(f"model.peft.target_modules: {first_line(e)}") from None
    return model


def merged_lora_state_dict(peft_model, state_dict: dict) -> dict:
    """The base model's state dict with the LoRA adapter folded in: W' = W + s * B @ A per adapted layer.

    `state_dict` is the PEFT model's full state dict (gathered from every rank when sharded). The
    scale s = alpha / r, or alpha / sqrt(r) under rsLoRA, comes from each layer's own adapter
    config (so rank and alpha patterns count). The sum is done in float32 and cast back to W's
    dtype; GPT-2's Conv1D layers (fan_in_fan_out) store W as (in, out), so B @ A is transposed.
    Biases pass through; `modules_to_save` (e.g. a reward head) keep their trained copies.
    """
    from peft.tuners.lora import Linear as LoraLinear
    from peft.tuners.lora import LoraLayer
    from peft.utils import ModulesToSaveWrapper

    adapter = peft_model.active_adapter
    prefix = "base_model.model."
    layers, wrapped = {}, set()
    for name, module in peft_model.named_modules():
        if isinstance(module, LoraLayer):
            if not isinstance(module, LoraLinear) or module.use_dora.get(adapter, False):
                raise ConfigError(f"model.peft.target_modules: merging LoRA on {name} ({type(module).__name__}) into "
                                  f"FINAL is not supported: only plain LoRA on Linear/Conv1D layers")
            layers[name] = module
        elif isinstance(module, ModulesToSaveWrapper):
            wrapped.add(name)
    merged = {}
    for key, tensor in state_dict.items():
        module_path, _, param = key.rpartition(".")
        parent, _, child = module_path.rpartition(".")
        if ".lora_" in key or child == "original_module":
            continue
        if child == "base_layer" and parent in layers:
            layer = layers[parent]
            if param == "weight":
                a = state_dict[f"{parent}.lora_A.{adapter}.weight"].float()
                b = state_dict[f"{parent}.lora_B.{adapter}.weight"].float()
                r, alpha = layer.r[adapter], layer.lora_alpha[adapter]
                scale = alpha / (math.sqrt(r) if layer.use_rslora[adapter] else r)
                delta = (b @ a) * scale
                tensor = (tensor.float() + (delta.T if layer.fan_in_fan_out else delta)).to(tensor.dtype)
            module_path = parent
        elif module_path.endswith(f".modules_to_save.{adapter}") and module_path.rsplit(".", 2)[0] in wrapped:
            module_path = module_path.rsplit(".", 2)[0]
        merged[f"{module_path}.{param}".removeprefix(prefix)] = tensor
    return merged


def token_logps(model, head, batch: dict, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probabilities of a batch's labels under `model` (see losses.token_logps).

    Only the hidden states that predict a label go through the vocabulary projection `head`: a hook
    picks them out inside the model's own forward, so DDP, PEFT and logit soft-capping after the head
    all still apply, and prompt and padding positions never become logits.
    """
    labels = batch["labels"].to(device)
    predicts = torch.zeros(labels.shape, dtype=torch.bool, device=device)
    predicts[:, :-1] = labels[:, 1:] != -100
    hook = head.register_forward_pre_hook(lambda _, args: (args[0][predicts],) + args[1:])
    try:
        logits = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                       use_cache=False).logits
    finally:
        hook.remove()
    return losses.token_logps(logits, labels)


def disable_dropout(model) -> None:
    """Dropout off, so that policy and reference agree exactly at the start (first DPO loss = ln 2, PPO ratio 1)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0
