"""PPO: masks from lengths, left-padding invariance, the first ratio, rollout reuse, the three reward
sources, frozen reference and reward model, v_head.pt, resume refusals, 2 ranks, and learning."""
import math

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from conftest import TINY, assert_same_weights, build_trainer, compose, events, train_in_process, two_ranks, weights
from train import checkpoint
from train.errors import CheckpointError
from train.generation import response_mask

# Four rollouts of 8 prompts, 2 epochs x 2 minibatches each, short completions, light eval.
PPO = ["loss=ppo", "n_examples=32", "model.batch_size=8", "model.eval_batch_size=8", "n_eval_examples=8",
       "n_eval_generations=4", "max_new_tokens=8", "loss.ppo_epochs=2", "loss.ppo_minibatches=2", "lr=1e-3",
       "log_every=1", "eval_every=2"]


def reward_model(directory):
    """A random one-output sequence classifier on the tiny config, saved with the tiny tokenizer."""
    tokenizer = AutoTokenizer.from_pretrained(TINY)
    config = AutoConfig.from_pretrained(TINY, num_labels=1, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(1)
    model = AutoModelForSequenceClassification.from_config(config)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def test_masks_come_from_lengths_even_when_pad_is_eos():
    """With pad == EOS (Llama, Mistral), the first EOS is kept in the mask and everything after it is
    out; a completion cut at max_new_tokens has no EOS; one that ends exactly at the limit does."""
    eos = pad = 3
    responses = torch.tensor([[5, 6, eos, pad, pad],   # ended early, then padded with the same id
                              [5, 6, 7, 8, 9],         # cut at max_new_tokens
                              [5, 6, 7, 8, eos],       # ends exactly at max_new_tokens
                              [eos, pad, pad, pad, pad]])
    mask, ended = response_mask(responses, [eos])
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]
    assert ended.tolist() == [True, False, True, True]


def test_log_probs_are_the_same_alone_and_left_padded_in_a_batch(tmp_path):
    """The update's forward (left padding, position ids from the mask) gives a sequence the same
    per-token log-probs and values whatever longer prompts share its batch."""
    trainer = build_trainer(tmp_path, *PPO, "exp_name=run")
    torch.nn.init.normal_(trainer.value_head.summary.weight)  # a non-zero head, so values mean something
    prompts = [[1, 20, 21, 22, 23, 2, 30], [1, 20, 24, 2, 30], [1, 40, 41, 42, 43, 44, 45, 46, 2, 30]]
    responses = [[50, 51, 3], [60, 61, 62, 63, 3], [70, 3]]

    def batch(rows):
        from train.generation import left_pad, right_pad
        p, pm = left_pad([prompts[i] for i in rows], 0)
        r, rm = right_pad([responses[i] for i in rows], 0)
        return {"prompts": p, "prompt_mask": pm, "responses": r, "response_mask": rm}

    model = trainer.accelerator.unwrap_model(trainer.policy)
    with torch.no_grad():
        together = trainer.forward(model, batch([0, 1, 2]), trainer.value_head)
        for i in range(3):
            alone = trainer.forward(model, batch([i]), trainer.value_head)
            n = len(responses[i])
            for a, b in zip(alone, together):
                torch.testing.assert_close(a[0, :n], b[i, :n], atol=1e-5, rtol=0)


def test_each_rollout_is_trained_on_for_epochs_x_minibatches_steps_starting_at_ratio_1(tmp_path):
    """One rollout per step; ppo_epochs x ppo_minibatches optimizer steps on that same stored rollout,
    every row once per epoch; the first minibatch of the first epoch has ratio 1 and nothing clipped
    (old log-probs come from the same forward as the update's)."""
    trainer = build_trainer(tmp_path, *PPO, "exp_name=run", "loss.ppo_epochs=3", "loss.ppo_minibatches=2",
                            "model.gradient_accumulation_steps=2")
    rollouts, steps, losses = [], [], []
    rollout, optimize, microbatch_loss = trainer.rollout, trainer.optimize, trainer.microbatch_loss
    trainer.rollout = lambda: rollouts.append(rollout()) or rollouts[-1]
    trainer.optimize = lambda microbatches: steps.append(microbatches) or optimize(microbatches)
    trainer.microbatch_loss = lambda model, batch: losses.append(microbatch_loss(model, batch)) or losses[-1]
    trainer.train_step()
    assert len(rollouts) == 1 and len(steps) == 3 * 2
    stored = rollouts[0][0]  # (rollout, stats, info)
    for epoch in range(3):
        rows = [row for microbatches in steps[2 * epoch:2 * epoch + 2] for mb in microbatches
                for row in mb["old_logps"][:, 0].tolist()]
        assert sorted(rows) == sorted(stored["old_logps"][:, 0].tolist()), f"epoch {epoch} is not the stored rollout"
    assert all(len(microbatches) == 2 for microbatches in steps)  # one microbatch per accumulation step
    for _, stats in losses[:2]:  # both microbatches of the first optimizer step
        n = float(stats["policy/ratio"][1])
        assert float(stats["policy/ratio"][0]) / n == pytest.approx(1.0, abs=1e-5)
        assert float(stats["policy/clipfrac"][0]) == 0
        assert float(stats["policy/approx_kl"][0]) / n < 1e-10

    # At the next step the policy has moved off the reference: the stored old log-probs are the rollout
    # policy's own, not the reference's (HALOs takes its ratio against the reference).
    trainer.step += 1
    trainer.train_step()
    stored = rollouts[1][0]
    policy = trainer.accelerator.unwrap_model(trainer.policy)
    with torch.no_grad(), trainer.reference.model(policy) as reference:
        reference_logps = trainer._forward_all(reference, stored)[0]
    mask = stored["mask"]
    assert (stored["old_logps"] - reference_logps)[mask].abs().max() > 1e-3, "old log-probs are the reference's"
    first = losses[2 * 3 * 2]  # the first microbatch of step 2: ratio 1 against the stored rollout
    assert float(first[1]["policy/ratio"][0]) / float(first[1]["policy/ratio"][1]) == pytest.approx(1.0, abs=1e-5)


def scores_of(trainer):
    """The rewards the trainer's reward gives its first rollout, and the rows' items."""
    items, completed = trainer.complete_rollout(trainer._groups())
    scores, valid, texts = trainer._score(items, completed)
    return items, completed, scores, valid, texts


def test_rewards_from_a_function_with_none_skipped_and_the_missing_eos_penalty(tmp_path, monkeypatch):
    """A module:function reward sees the prompt text, the decoded completion and the record's other
    fields; None leaves a completion out; a completion without EOS loses missing_eos_penalty."""
    seen = {}

    def reward(prompts, completions, **fields):
        seen.update(prompts=prompts, completions=completions, fields=fields)
        return [None if i == 0 else float(len(c)) for i, c in enumerate(completions)]

    import train.demo
    monkeypatch.setattr(train.demo, "length_reward", reward, raising=False)
    trainer = build_trainer(tmp_path, *PPO, "exp_name=run", "loss.reward=train.demo:length_reward",
                            "max_new_tokens=3", "loss.missing_eos_penalty=0.5")
    items, completed, scores, valid, texts = scores_of(trainer)
    assert seen["prompts"] == [it.example.prompt[-1]["content"] for it in items]
    assert seen["fields"]["chosen"] == [it.example.fields["chosen"] for it in items]
    assert valid.tolist() == [False] + [True] * (len(items) - 1)
    for i in range(1, len(items)):
        expected = len(texts[i]) - (0.0 if completed.ended[i] else 0.5)
        assert scores[i].item() == pytest.approx(expected)
    assert not completed.ended.all(), "3 tokens should cut some completions"
    trainer.train()  # a None row trains with no loss on it and nothing is NaN
    assert all(math.isfinite(e["loss/train"]) for e in events(tmp_path / "run") if "loss/train" in e)


def test_labels_reward_scores_the_datasets_own_responses(tmp_path):
    """reward=labels with offline rollouts: chosen responses +1, rejected -1, and the completions are
    the dataset's responses, not samples."""
    trainer = build_trainer(tmp_path, *PPO, "exp_name=run", "loss.reward=labels", "loss.rollout=offline")
    items, completed, scores, valid, texts = scores_of(trainer)
    assert scores.tolist() == [1.0 if it.desirable else -1.0 for it in items]
    assert texts == [it.example.response for it in items]
    assert completed.ended.all()


def test_reward_model_scores_the_retokenized_text_and_only_the_policy_and_value_head_train(tmp_path):
    """A reward model dir scores completions as AutoModelForSequenceClassification scores the same
    text; after training the reference and reward model are unchanged, policy and value head are
    not; FINAL loads as a plain causal LM and v_head.pt round-trips."""
    rm_dir = reward_model(tmp_path / "rm")
    trainer = build_trainer(tmp_path, *PPO, "exp_name=run", f"loss.reward={rm_dir}")
    items, completed, scores, valid, texts = scores_of(trainer)
    rm = AutoModelForSequenceClassification.from_pretrained(rm_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(rm_dir)
    for item, text, score, ended in list(zip(items, texts, scores, completed.ended))[:3]:
        chat = item.example.prompt + [{"role": "assistant", "content": text}]
        ids = tokenizer.apply_chat_template(chat, return_tensors="pt", return_dict=True)["input_ids"]
        prompt = tokenizer.apply_chat_template(item.example.prompt, add_generation_prompt=True, return_dict=True)
        ids = ids[:, :ids[0].tolist().index(tokenizer.eos_token_id, len(prompt["input_ids"])) + 1]  # to the reply's end
        with torch.no_grad():
            expected = rm(input_ids=ids).logits[0, 0].item() - (0 if ended else trainer.cfg.loss.missing_eos_penalty)
        assert score.item() == pytest.approx(expected, abs=1e-5)

    policy = trainer.accelerator.unwrap_model(trainer.policy)
    before = {name: {k: v.clone() for k, v in m.state_dict().items()} for name, m in
              (("policy", policy), ("reference", trainer.reference.copy), ("reward", trainer.reward.model),
               ("value", trainer.value_head))}
    assert trainer.optimizer.param_groups[1]["lr"] == pytest.approx(10 * trainer.optimizer.param_groups[0]["lr"])
    trainer.train()
    for name, model in (("policy", policy), ("reference", trainer.reference.copy), ("reward", trainer.reward.model),
                        ("value", trainer.value_head)):
        same = all(torch.equal(v, before[name][k]) for k, v in model.state_dict().items())
        assert same == (name in ("reference", "reward")), f"{name} {'un' if same else ''}changed"

    final = tmp_path / "run" / "FINAL"
    saved = torch.load(final / "v_head.pt", weights_only=True)
    assert saved.keys() == trainer.value_head.state_dict().keys()
    assert all(torch.equal(saved[k], v) for k, v in trainer.value_head.state_dict().items())
    assert type(AutoModelForCausalLM.from_pretrained(final)).__name__ == "LlamaForCausalLM"


def test_critic_from_the_reward_model_trains_a_copy_and_is_checkpointed(tmp_path):
    """loss.critic=reward_model: the value model starts as the reward model (same values at step 0),
    trains as a copy (the reward model stays as it was), and is saved as critic.safetensors."""
    rm_dir = reward_model(tmp_path / "rm")
    trainer = build_trainer(tmp_path, *PPO, "exp_name=run", f"loss.reward={rm_dir}", "loss.critic=reward_model")
    reward_before = {k: v.clone() for k, v in trainer.reward.model.state_dict().items()}
    critic_before = {k: v.clone() for k, v in trainer.value_head.state_dict().items()}
    assert all(torch.equal(critic_before[f"backbone.{k}"], v) for k, v in trainer.reward.model.model.state_dict().items())
    trainer.train()
    assert all(torch.equal(v, reward_before[k]) for k, v in trainer.reward.model.state_dict().items())
    assert any(not torch.equal(v, critic_before[k]) for k, v in trainer.value_head.state_dict().items())
    final = tmp_path / "run" / "FINAL"
    assert (final / "critic.safetensors").is_file() and not (final / "v_head.pt").exists()
    build_trainer(tmp_path / "again", *PPO, "exp_name=run", f"loss.reward={rm_dir}",
                  "loss.critic=reward_model").restore(checkpoint.read(final))


def test_adaptive_kl_coefficient_follows_the_controller_and_is_checkpointed(tmp_path):
    """kl_target > 0: after a step, kl_coef *= 1 + clip(KL / target - 1, +-0.2) * batch / horizon, with
    the step's mean KL per completion (0 at the first step: the policy is the reference); the value
    comes back on resume."""
    trainer = build_trainer(tmp_path, *PPO, "exp_name=run", "loss.kl_target=0.1", "loss.kl_horizon=100",
                            "n_examples=16")
    stats, scalars = trainer.train_step()
    trainer.step += 1
    assert scalars["kl_coef"] == 0.05
    assert trainer.kl_coef == pytest.approx(0.05 * (1 - 0.2 * 8 / 100))
    stats, _ = trainer.train_step()
    kl = float(stats["objective_{split}/kl"][0] / stats["objective_{split}/kl"][1])
    assert kl > 0
    expected = 0.05 * (1 - 0.2 * 8 / 100) * (1 + max(-0.2, min(0.2, kl / 0.1 - 1)) * 8 / 100)
    assert trainer.kl_coef == pytest.approx(expected)
    trainer.step += 1
    trainer.save("FINAL")
    resumed = build_trainer(tmp_path / "b", *PPO, "exp_name=run", "loss.kl_target=0.1", "loss.kl_horizon=100",
                            "n_examples=16")
    resumed.restore(checkpoint.read(tmp_path / "run" / "FINAL"))
    assert resumed.kl_coef == trainer.kl_coef


def test_resume_refuses_a_missing_value_head_another_reward_or_another_reference(tmp_path):
    trainer = build_trainer(tmp_path, *PPO, "exp_name=run")
    trainer.train()
    snapshot = checkpoint.read(tmp_path / "run" / "FINAL")
    build_trainer(tmp_path / "same", *PPO, "exp_name=run").restore(snapshot)  # what a resume does
    without = checkpoint.Snapshot(**{**snapshot.__dict__, "files": {k: v for k, v in snapshot.files.items()
                                                                      if k != "v_head.pt"}})
    with pytest.raises(CheckpointError, match="has no v_head.pt"):
        build_trainer(tmp_path / "a", *PPO, "exp_name=run").restore(without)
    rm_dir = reward_model(tmp_path / "rm")
    with pytest.raises(CheckpointError, match="another reward"):
        build_trainer(tmp_path / "b", *PPO, "exp_name=run", f"loss.reward={rm_dir}").restore(snapshot)
    other = tmp_path / "other-start"  # the same architecture, other initial weights: another reference
    torch.manual_seed(5)
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(TINY)).save_pretrained(other)
    AutoTokenizer.from_pretrained(TINY).save_pretrained(other)
    with pytest.raises(CheckpointError, match="another reference"):
        build_trainer(tmp_path / "c", *PPO, "exp_name=run", f"model.name_or_path={other}").restore(snapshot)


def test_two_ranks_equal_one_rank_with_accumulation(tmp_path, runs):
    """Real 2-process gloo DDP: each rank samples and trains on its half of every rollout, whitening and
    metrics are reduced over both; with SGD the weights equal one process with 2 accumulation steps."""
    exact = [*PPO, "optimizer=SGD", "lr=0.05", "lr_schedule=constant", "warmup=0", "do_first_eval=false",
             "loss.vf_lr=0.5", "n_examples=16", "wandb.mode=disabled"]
    single = train_in_process(tmp_path, "exp_name=single", *exact, "model.gradient_accumulation_steps=2")
    two_ranks(runs, tmp_path, "exp_name=ddp", *exact)
    ddp = tmp_path / "ddp" / "FINAL"
    assert_same_weights(weights(single), weights(ddp), atol=1e-5)
    heads = [torch.load(final / "v_head.pt", weights_only=True) for final in (single, ddp)]
    assert_same_weights(*heads, atol=1e-5)
    single_log, ddp_log = (events(tmp_path / name) for name in ("single", "ddp"))
    for key in ("objective_train/score", "objective_train/kl", "loss/train", "policy/clipfrac"):
        assert ddp_log[0][key] == pytest.approx(single_log[0][key], rel=1e-5, abs=1e-6), key


def shuffled_reward(prompts, completions, **fields):
    """The demo's rule reward, handed to the wrong completions: the control that must not learn."""
    import random

    from train.demo import reward
    scores = reward(prompts, completions)
    random.Random(len("".join(completions))).shuffle(scores)
    return scores


def run_at_defaults(cache_dir, *overrides):
    """launch.py with these overrides and every other setting at its default (no FAST)."""
    from launch import run
    return run(compose([f"cache_dir={cache_dir}", "wandb.mode=disabled", *overrides]))


@pytest.fixture(scope="session")
def demo_sft(tmp_path_factory):
    """The demo's SFT model, as `make demo` trains it: well-formed sentences, the case chosen at random."""
    return run_at_defaults(tmp_path_factory.mktemp("demo-sft"), "exp_name=sft", "n_epochs=3", "eval_every=125",
                           "do_first_eval=false")


def held_out(run_dir, name):
    evals = [e for e in events(run_dir) if f"generations_eval/{name}" in e]
    return evals[0][f"generations_eval/{name}"], evals[-1][f"generations_eval/{name}"]


@pytest.mark.parametrize("reward", ["rule", "shuffled"])
def test_ppo_at_its_defaults_teaches_the_demo_rule_and_a_shuffled_reward_does_not(reward, demo_sft, tmp_path):
    """`launch.py loss=ppo model=tiny model.name_or_path=<SFT>/FINAL`, everything else at its defaults,
    raises held-out rule-following by at least 0.3 and keeps the sentences well formed; the same run
    with the rewards shuffled between completions does not learn the rule."""
    overrides = ["loss=ppo", f"model.name_or_path={demo_sft}", "exp_name=run"]
    if reward == "shuffled":
        overrides.append("loss.reward=test_ppo:shuffled_reward")
    run_at_defaults(tmp_path, *overrides)
    (follows_before, follows_after), (_, well_formed) = (held_out(tmp_path / "run", name)
                                                         for name in ("follows_rule", "well_formed"))
    if reward == "rule":
        assert follows_after - follows_before >= 0.3, (follows_before, follows_after)
        assert well_formed >= 0.9
    else:  # a policy that ignores the instruction (say, always shouts) follows the rule half the time
        assert follows_after < 0.7 and follows_after - follows_before < 0.3, (follows_before, follows_after)


def test_kill_9_and_sigterm_then_resume_ends_bit_for_bit_as_a_straight_run(tmp_path, runs):
    """A real launch.py PPO run, killed with SIGKILL and later stopped with SIGTERM, continued each time by
    the same command, ends with the same weights and value head as one that ran straight through:
    sampling, data position, optimizer and RNG states all come back."""
    import os
    import signal

    from test_checkpoints import logged_step, wait_for
    common = [*PPO, "n_examples=96", "intermediate_checkpoints=true", "save_every=1", "keep_last_n=2",
              "wandb.mode=disabled", "exp_name=run"]
    straight = runs.start(f"cache_dir={tmp_path / 'a'}", *common)
    assert straight.wait() == 0, straight.output()[-3000:]
    run_dir = tmp_path / "b" / "run"
    for sig, after in ((signal.SIGKILL, 2), (signal.SIGTERM, 6)):
        run = runs.start(f"cache_dir={tmp_path / 'b'}", *common)
        wait_for(lambda: logged_step(run_dir) >= after, run)
        os.kill(run.pid, sig)
        run.wait()
        assert not (run_dir / "FINAL").exists(), "the run finished before the signal: give it more steps"
    run = runs.start(f"cache_dir={tmp_path / 'b'}", *common)
    assert run.wait() == 0, run.output()[-3000:]
    for name in ("model.safetensors", "v_head.pt", "optimizer.pt"):
        assert (run_dir / "FINAL" / name).read_bytes() == (tmp_path / "a" / "run" / "FINAL" / name).read_bytes(), name
