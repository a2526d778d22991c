"""Models: the tokenizer, the policy (optionally LoRA-wrapped) and its dtype."""
import logging
import pathlib

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

log = logging.getLogger(__name__)

# Used when a tokenizer has no chat template of its own.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
WEIGHT_FILES = ("*.safetensors", "*.bin", "*.safetensors.index.json", "*.bin.index.json")


def resolve_dtype(name: str) -> torch.dtype:
    """`auto` is float32 on CPU (bf16 is ~20x slower on CPUs without bf16 units), bfloat16 on GPU."""
    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return getattr(torch, name)


def load_tokenizer(model_cfg):
    tokenizer = AutoTokenizer.from_pretrained(model_cfg.tokenizer_name_or_path or model_cfg.name_or_path,
                                              trust_remote_code=model_cfg.trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not tokenizer.chat_template:
        log.info("tokenizer has no chat template: using ChatML")
        tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def has_weights(name_or_path: str) -> bool:
    path = pathlib.Path(name_or_path)
    return not path.is_dir() or any(any(path.glob(pattern)) for pattern in WEIGHT_FILES)


def load_policy(model_cfg, seed: int, model_class: str = "causal_lm", pad_token_id: int = None):
    """The model to train. A local dir holding only config.json is initialised from `seed`.

    model_class "sequence_classification" gives a reward model: the same backbone with a one-output
    head (new, initialised from `seed`) that scores the last non-padding token.
    """
    kwargs = dict(dtype=resolve_dtype(model_cfg.dtype), attn_implementation=model_cfg.attn_implementation,
                  trust_remote_code=model_cfg.trust_remote_code)
    config = AutoConfig.from_pretrained(model_cfg.name_or_path, trust_remote_code=model_cfg.trust_remote_code)
    auto = AutoModelForCausalLM
    if model_class == "sequence_classification":
        auto = AutoModelForSequenceClassification
        config.num_labels, config.pad_token_id = 1, pad_token_id
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        if has_weights(model_cfg.name_or_path):
            model = auto.from_pretrained(model_cfg.name_or_path, config=config, **kwargs)
        else:
            model = auto.from_config(config, **kwargs)
    if model_cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if model_cfg.use_peft:
        from peft import LoraConfig, get_peft_model
        p = model_cfg.peft
        targets = p.target_modules if isinstance(p.target_modules, str) else list(p.target_modules)
        # A fresh LoraConfig per model: get_peft_model rewrites it in place.
        model = get_peft_model(model, LoraConfig(r=p.lora_r, lora_alpha=p.lora_alpha, lora_dropout=p.lora_dropout,
                                                 target_modules=targets,
                                                 task_type="SEQ_CLS" if model_class != "causal_lm" else "CAUSAL_LM"))
    return model
