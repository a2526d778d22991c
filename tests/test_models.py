"""Every model yaml runs on a tiny random-weight checkpoint of its architecture, built here (no hub)."""
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import ARCHITECTURES, TINY, compose, local_model, tiny_config, train_in_process
from train.models import token_logps


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_label_only_projection_matches_a_full_forward(name):
    """The trainer sends only label-predicting positions through the LM head (and any soft-capping
    after it); the log-probs must equal log_softmax of the model's ordinary full logits."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(name, vocab_size=97)).eval()
    input_ids = torch.randint(3, 97, (3, 12))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 9:] = 0  # right padding
    labels = input_ids.clone()
    labels[:, :4] = -100  # prompts
    labels[2, :7] = -100
    labels[attention_mask == 0] = -100
    batch = dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    with torch.no_grad():
        logps, mask = token_logps(model, model.get_output_embeddings(), batch, "cpu")
        full = torch.log_softmax(model(input_ids=input_ids, attention_mask=attention_mask).logits.double(), -1)
    expected = full[:, :-1].gather(-1, labels[:, 1:].clamp(min=0)[..., None])[..., 0] * mask
    assert mask.sum() == (labels[:, 1:] != -100).sum()
    torch.testing.assert_close(logps.double(), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_model_yaml_trains_on_a_local_checkpoint(name, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(TINY)
    source = tmp_path / "source"
    original = local_model(name, source)

    final = train_in_process(tmp_path, f"model={name}", f"model.name_or_path={source}", "exp_name=run",
                             "n_examples=16", "model.batch_size=8", "model.max_length=96",
                             "model.max_prompt_length=48", "lr=1e-3")
    trained = AutoModelForCausalLM.from_pretrained(final)
    assert type(trained) is type(original)
    changed = [k for k, v in trained.state_dict().items() if not torch.equal(v, original.state_dict()[k])]
    assert changed, "training left every weight as it was"
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Shout about the red fox."}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = trained.generate(**prompt, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert out.shape[1] > prompt["input_ids"].shape[1]


def test_random_init_only_for_a_dir_with_a_config_and_no_weights(tmp_path, caplog):
    """A config-only dir is a new model (logged as such); a dir whose weights transformers can't read,
    or whose model.safetensors is damaged, stops with one line naming the key, never random weights."""
    from train.errors import ConfigError
    from train.models import load_policy
    cfg = compose([]).model
    with caplog.at_level("WARNING"):
        load_policy(cfg, 0)
    assert f"{TINY} holds a config and no weights: training a new model, initialised from seed 0" in caplog.text
    source = tmp_path / "source"
    local_model("llama", source)
    (source / "model.safetensors").write_bytes(b"\0" * 100)
    cfg.name_or_path = str(source)
    with pytest.raises(ConfigError, match=f"model.name_or_path: cannot load {source}: .*"):
        load_policy(cfg, 0)
    (source / "model.safetensors").rename(source / "consolidated.00.pth")
    with pytest.raises(ConfigError, match="holds weights transformers does not load \\(consolidated.00.pth\\)"):
        load_policy(cfg, 0)


def test_lora_target_modules_the_model_lacks_are_one_line():
    from train.errors import ConfigError
    from train.models import load_policy
    cfg = compose(["model.use_peft=true", "model.peft.target_modules=[q_projj]"]).model
    with pytest.raises(ConfigError, match="model.peft.target_modules: Target modules \\{'q_projj'\\} not found"):
        load_policy(cfg, 0)


def test_full_fine_tuning_of_bfloat16_weights_is_warned_about(caplog):
    """bf16 weights without an fp32 master copy lose small updates (docs/benchmarks.md, GPU checks)."""
    from train.models import load_policy
    for use_peft, warned in ((False, True), (True, False)):
        caplog.clear()
        with caplog.at_level("WARNING"):
            load_policy(compose(["model.dtype=bfloat16", f"model.use_peft={use_peft}"]).model, 0)
        assert ("round away updates" in caplog.text) == warned
