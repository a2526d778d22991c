"""PPO with a value head (Schulman et al. 2017), for language models as in Ziegler et al. 2019.

One step is one rollout: this rank's share of `model.batch_size` prompts is completed by the policy
(sampled; `loss.rollout=offline` takes the dataset's own responses instead) and scored by the
reward (train.rewards). The score goes on the completion's last token (its EOS; a completion cut at
max_new_tokens loses `missing_eos_penalty`), every token pays `kl_coef` x its KL estimate to the
reference, GAE turns that into advantages (whitened over the whole rollout, all ranks) and returns,
and the stored rollout is then trained on for `ppo_epochs` passes of `ppo_minibatches` optimizer steps,
freshly shuffled each pass: clipped policy loss against the rollout's own log-probs, clipped value loss.

The value head is a linear layer over the policy's final hidden states, zero-initialised, on detached
states (the value loss never moves the policy), in its own optimizer group with its own learning rate
and gradient clip; it is saved as v_head.pt beside ordinary weights, so FINAL/ loads as a plain causal LM.
Log-probs are those of the sampling distribution (logits / temperature), from the same forward (left
padding, position ids from the mask) in the rollout and the update, so the first ratio is exactly 1.
"""
import copy
import logging
import time

import torch

from train import distributed, rl
from train.distributed import all_reduce_sum
from train.errors import CheckpointError, ConfigError, TrainingError
from train.generation import Generated, concat, generate, written
from train.models import disable_dropout
from train.reference import Reference, fingerprint
from train.rewards import Reward
from train.trainers.base import BasicTrainer, add_stats, new_stats

log = logging.getLogger(__name__)

ROLLOUTS = ("online", "offline")
CRITICS = ("head", "reward_model")


class ValueHead(torch.nn.Module):
    """V(state before each response token) = w . h + b over the policy's final hidden state h."""
    checkpoint_file = "v_head.pt"

    def __init__(self, hidden_size: int):
        super().__init__()
        self.summary = torch.nn.Linear(hidden_size, 1)
        torch.nn.init.zeros_(self.summary.weight)
        torch.nn.init.zeros_(self.summary.bias)

    def forward(self, hidden: torch.Tensor, inputs: dict) -> torch.Tensor:
        return self.summary(hidden.float()).squeeze(-1)


class Critic(torch.nn.Module):
    """A value model of its own (`loss.critic=reward_model`, as TRL and OpenRLHF): a trained copy of the
    reward model's backbone and score head, read at the state before each response token."""
    checkpoint_file = "critic.safetensors"

    def __init__(self, reward_model):
        super().__init__()
        self.backbone = copy.deepcopy(reward_model.base_model).requires_grad_(True).train()
        self.score = copy.deepcopy(reward_model.score).requires_grad_(True).train()

    def forward(self, hidden: torch.Tensor, inputs: dict) -> torch.Tensor:
        states = self.backbone(input_ids=inputs["ids"], attention_mask=inputs["attention"],
                               position_ids=inputs["positions"], use_cache=False).last_hidden_state
        prompt_len, response_len = inputs["prompt_len"], inputs["response_len"]
        return self.score(states[:, prompt_len - 1:prompt_len + response_len - 1]).squeeze(-1).float()


def _trim(batch: dict) -> dict:
    """Drop the prompt columns that are padding in every row (left) and response columns past every end."""
    keep_p = batch["prompt_mask"].any(0).nonzero()
    keep_t = int(batch["response_mask"].any(0).nonzero().max()) + 1
    p0 = int(keep_p.min()) if len(keep_p) else batch["prompt_mask"].shape[1] - 1
    return {k: v[:, p0:] if k in ("prompts", "prompt_mask") else v[:, :keep_t] if v.dim() == 2 else v
            for k, v in batch.items()}


class PPOTrainer(BasicTrainer):
    reads_examples = True  # rewards read each prompt's text and fields
    eval_metrics = ("objective_eval/score", "objective_eval/kl", "objective_eval/reward", "rollout_eval/length",
                    "rollout_eval/ended")

    @classmethod
    def loss_parameters(cls, loss_name):
        return {"reward", "rollout", "temperature", "top_p", "top_k", "missing_eos_penalty", "kl_coef", "kl_estimator",
                "kl_target", "kl_horizon", "whiten_rewards", "gamma", "lam", "clip", "vf_clip", "vf_coef", "vf_lr",
                "vf_max_grad_norm", "ppo_epochs", "ppo_minibatches", "critic"}

    @classmethod
    def loss_uses_reference(cls, loss_name):
        return True

    @classmethod
    def data_shape(cls, cfg):
        return "prompt" if cfg.loss.rollout == "online" else "binary"

    @classmethod
    def check_config(cls, cfg) -> None:
        from train import rewards
        p = cfg.loss
        choices = {"rollout": ROLLOUTS, "kl_estimator": rl.KL_ESTIMATORS, "critic": CRITICS}
        for key, allowed in choices.items():
            if p[key] not in allowed:
                raise ConfigError(f"loss.{key}: {p[key]!r} is not one of {', '.join(allowed)}")
        ranges = {"temperature": (0, None), "top_p": (0, 1), "clip": (0, None), "vf_clip": (0, None), "vf_coef": (0, None),
                  "vf_max_grad_norm": (0, None), "kl_horizon": (0, None)}
        for key, (low, high) in ranges.items():
            if not p[key] > low or high is not None and p[key] > high:
                raise ConfigError(f"loss.{key}: must be in ({low}, {high if high is not None else 'inf'}], got {p[key]}")
        for key in ("gamma", "lam"):
            if not 0 <= p[key] <= 1:
                raise ConfigError(f"loss.{key}: must be in [0, 1], got {p[key]}")
        for key in ("top_k", "kl_coef", "kl_target", "missing_eos_penalty"):
            if p[key] < 0:
                raise ConfigError(f"loss.{key}: must be 0 or more, got {p[key]}")
        for key in ("ppo_epochs", "ppo_minibatches"):
            if not isinstance(p[key], int) or p[key] < 1:
                raise ConfigError(f"loss.{key}: must be a whole number, at least 1; got {p[key]}")
        if p.critic == "reward_model" and rewards.kind(p.reward) != "model":
            raise ConfigError(f"loss.critic=reward_model starts the critic from the reward model, but loss.reward="
                              f"{p.reward} is not a reward model dir")
        if p.vf_lr is not None and not (isinstance(p.vf_lr, (int, float)) and p.vf_lr > 0):
            raise ConfigError(f"loss.vf_lr: a positive number, or null for 10 x lr; got {p.vf_lr!r}")
        per_step = p.ppo_minibatches * cfg.model.gradient_accumulation_steps
        if cfg.model.batch_size % per_step:
            raise ConfigError(f"model.batch_size={cfg.model.batch_size} (prompts per rollout) is not divisible by "
                              f"loss.ppo_minibatches x model.gradient_accumulation_steps = {per_step}")
        for key, why in (("cache_reference_logprobs", "its reference scores fresh samples at every step"),
                         ("sync_reference_every", "its reference stays the initial policy (the KL anchor)")):
            if cfg[key]:
                raise ConfigError(f"{key}: not with loss=ppo: {why}")
        if cfg.distributed == "deepspeed":  # an engine trains one module, PPO two (policy and value head)
            raise ConfigError("distributed=deepspeed: not with loss=ppo, which trains a value head beside the policy; "
                              "use distributed=fsdp")
        rewards.check(p.reward, p.rollout)

    # -- models

    def setup(self, policy):
        cfg, p, device = self.cfg, self.cfg.loss, self.accelerator.device
        world = self.accelerator.num_processes
        if cfg.model.batch_size % (world * p.ppo_minibatches * cfg.model.gradient_accumulation_steps):
            raise ConfigError(f"model.batch_size={cfg.model.batch_size} is not divisible by ranks x loss.ppo_minibatches "
                              f"x model.gradient_accumulation_steps = {world} x {p.ppo_minibatches} x "
                              f"{cfg.model.gradient_accumulation_steps}")
        disable_dropout(policy)
        policy.to(device)
        self.reference = Reference(policy, cfg.model.use_peft, device)
        with self.reference.model(policy) as reference_model:
            self.reference_fingerprint = fingerprint(reference_model)
        self.reward = Reward(p.reward, device, cfg.model.max_length)
        self.reward_fingerprint = fingerprint(self.reward.model) if self.reward.model is not None else p.reward
        if p.critic == "reward_model":
            if self.reward.tokenizer.get_vocab() != self.tokenizer.get_vocab():
                raise ConfigError(f"loss.critic=reward_model: the critic reads the policy's tokens, but {p.reward} "
                                  f"has another tokenizer; use loss.critic=head")
            self.value_head = Critic(self.reward.model).to(device)
            disable_dropout(self.value_head)
        else:
            self.value_head = ValueHead(policy.config.hidden_size).to(device)
        self.kl_coef = float(p.kl_coef)

    def trained_modules(self, policy):
        p = self.cfg.loss
        vf_lr = p.vf_lr if p.vf_lr is not None else 10 * self.cfg.lr
        return super().trained_modules(policy) + [(self.value_head, {"lr": vf_lr, "max_grad_norm": p.vf_max_grad_norm})]

    def checkpoint_states(self):
        return super().checkpoint_states() | {self.value_head.checkpoint_file: self.value_head}

    def forward(self, model, batch: dict, value_head=None) -> tuple:
        """Per-token log-probs of the responses under `model` (of logits / temperature), their entropies
        and, with a value head, the values of the states before each response token."""
        device = self.accelerator.device
        prompt_len, response_len = batch["prompts"].shape[1], batch["responses"].shape[1]
        ids = torch.cat([batch["prompts"], batch["responses"]], 1).to(device)
        attention = torch.cat([batch["prompt_mask"], batch["response_mask"]], 1).long().to(device)
        positions = (attention.cumsum(-1) - 1).clamp(min=0)
        states = {}

        def response_states(_, args):  # only the states that predict a response token become logits
            states["hidden"] = args[0][:, prompt_len - 1:prompt_len + response_len - 1]
            return (states["hidden"],) + args[1:]

        hook = self.accelerator.unwrap_model(model).get_output_embeddings().register_forward_pre_hook(response_states)
        try:
            logits = model(input_ids=ids, attention_mask=attention, position_ids=positions, use_cache=False).logits
        finally:
            hook.remove()
        logits = logits.float() / self.cfg.loss.temperature
        responses = batch["responses"].to(device)
        logps = logits.gather(-1, responses[..., None])[..., 0] - logits.logsumexp(-1)
        inputs = {"ids": ids, "attention": attention, "positions": positions, "prompt_len": prompt_len,
                  "response_len": response_len}
        values = value_head(states["hidden"].detach(), inputs) if value_head is not None else None
        return logps, rl.entropy(logits), values

    # -- one step: a rollout, then ppo_epochs x ppo_minibatches optimizer steps on it

    def _complete(self, items: list, seed=None) -> Generated:
        """Completions of the items' prompts: sampled from a generator seeded with `seed` (a rollout),
        the dataset's own (an offline rollout), or greedy (eval)."""
        policy, tokenizer, p = self.accelerator.unwrap_model(self.policy), self.tokenizer, self.cfg.loss
        if seed is not None and p.rollout == "offline":
            return written([it.prompt for it in items], [it.responses[0] for it in items], tokenizer)
        if seed is not None:
            # Sampling depends only on the seed and these prompts, not on the global RNG or on how
            # the rollout is split over ranks and accumulation steps: a resumed run or another
            # layout samples exactly the same completions.
            with torch.random.fork_rng(devices=[self.accelerator.device] if self.accelerator.device.type == "cuda" else []):
                torch.manual_seed(seed)
                return generate(policy, [it.prompt for it in items], tokenizer, self.cfg.max_new_tokens,
                                self.accelerator.device, sample=True, temperature=p.temperature, top_p=p.top_p,
                                top_k=p.top_k, synced=self.sharded)
        return generate(policy, [it.prompt for it in items], tokenizer, self.cfg.max_new_tokens, self.accelerator.device,
                        synced=self.sharded)

    def _score(self, items: list, completed: Generated) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        """(scores with the missing-EOS penalty, which rows have a score, decoded completions)."""
        texts = [self.tokenizer.decode(row[mask], skip_special_tokens=True)
                 for row, mask in zip(completed.responses, completed.response_mask)]
        raw = self.reward(items, texts)
        valid = torch.tensor([s is not None for s in raw])
        scores = torch.tensor([s if s is not None else 0.0 for s in raw], dtype=torch.float32)
        return scores - self.cfg.loss.missing_eos_penalty * (~completed.ended).float(), valid, texts

    def _forward_all(self, model, rollout: dict, value_head=None) -> tuple:
        """`forward` over a whole rollout in microbatches of the update's size, concatenated (no grad)."""
        size = self.batches.microbatch_size // self.cfg.loss.ppo_minibatches
        outputs = [[], [], []]
        width = rollout["responses"].shape[1]
        for start in range(0, len(rollout["responses"]), size):
            part = _trim({k: v[start:start + size] for k, v in rollout.items()
                          if k in ("prompts", "prompt_mask", "responses", "response_mask")})
            for out, value in zip(outputs, self.forward(model, part, value_head)):
                if value is not None:
                    out.append(torch.nn.functional.pad(value.cpu(), (0, width - value.shape[1])))
        return tuple(torch.cat(out) if out else None for out in outputs)

    def _groups(self) -> list[tuple[int, list]]:
        """This rank's share of the step's prompts, as (global index, items) groups: the rows that
        rank r's accumulation step a holds are group a * world + r whatever the layout, so rollouts
        and minibatches do not depend on how many ranks and accumulation steps share the batch."""
        epoch, index = divmod(self.step, self.batches.per_epoch)
        world, rank = self.accelerator.num_processes, self.accelerator.process_index
        return [(a * world + rank, items) for a, items in enumerate(self.batches.microbatches(epoch, index))]

    def complete_rollout(self, groups: list[tuple[int, list]]) -> tuple[list, Generated]:
        """This step's items and their completions, each group sampled with its own seed."""
        items = [it for _, group in groups for it in group]
        return items, concat([self._complete(group, seed=self._seed(g)) for g, group in groups],
                             self.tokenizer.pad_token_id)

    def _seed(self, *keys: int) -> int:
        """A seed for this run, step and keys (a group, an epoch)."""
        seed = self.cfg.seed * 1_000_003 + self.step
        for key in keys:
            seed = seed * 1_000_003 + key + 1
        return seed % 2 ** 63

    @torch.no_grad()
    def rollout(self) -> tuple[dict, dict, dict]:
        """This rank's rollout, ready to train on; its statistics (sums, counts); and its generation time,
        token count and the value head's explained variance."""
        p = self.cfg.loss
        groups = self._groups()
        start = time.time()
        items, completed = self.complete_rollout(groups)
        generation_s = time.time() - start
        scores, valid, _ = self._score(items, completed)
        if not all_reduce_sum(self.accelerator, valid.sum().float()).item():
            raise TrainingError(f"loss.reward: {p.reward} gave no score (None) for any completion of step "
                                f"{self.step + 1}: nothing to learn from")
        rollout = {"prompts": completed.prompts, "prompt_mask": completed.prompt_mask,
                   "responses": completed.responses, "response_mask": completed.response_mask,
                   "group": torch.cat([torch.full((len(group),), g) for g, group in groups])}
        policy = self.accelerator.unwrap_model(self.policy)
        old_logps, entropy, values = self._forward_all(policy, rollout, self.value_head)
        with self.reference.model(policy) as reference_model:
            ref_logps = self._forward_all(reference_model, rollout)[0]
        mask = completed.response_mask & valid[:, None]
        kl = rl.kl_estimate(old_logps, ref_logps, p.kl_estimator)
        rewards = rl.token_rewards(scores, kl, mask, self.kl_coef)
        if p.whiten_rewards:
            moments = all_reduce_sum(self.accelerator, rl.masked_moments(rewards, mask))
            rewards = rl.whiten(rewards, mask, moments, shift_mean=False)
        advantages, returns = rl.gae(rewards, values, mask, p.gamma, p.lam)
        moments = all_reduce_sum(self.accelerator, rl.masked_moments(advantages, mask))
        rollout |= {"mask": mask, "old_logps": old_logps, "old_values": values,
                    "advantages": rl.whiten(advantages, mask, moments), "returns": returns}
        sequence_kl = (kl * mask).sum(-1)
        rows = valid.sum()
        stats = {"objective_{split}/score": ((scores * valid).sum(), rows),
                 "objective_{split}/kl": (sequence_kl.sum(), rows),
                 "objective_{split}/reward": (((scores - self.kl_coef * sequence_kl) * valid).sum(), rows),
                 "objective_{split}/entropy": ((entropy * mask).sum(), mask.sum()),
                 "rollout_{split}/length": (completed.response_mask.sum(), len(items)),
                 "rollout_{split}/ended": (completed.ended.sum(), len(items))}
        info = {"generation_s": generation_s, "tokens": int(completed.prompt_mask.sum() + completed.response_mask.sum()),
                "explained_variance": rl.explained_variance(values, returns, mask)}
        return rollout, stats, info

    def train_step(self):
        p = self.cfg.loss
        start = time.time()
        rollout, rollout_stats, info = self.rollout()
        stats = new_stats()
        add_stats(stats, rollout_stats)
        update_start = time.time()
        lr = self.scheduler.get_last_lr()[0]
        norms, groups = [], rollout["group"].unique().tolist()
        for epoch in range(p.ppo_epochs):
            # Each group's rows are shuffled (a fresh order each epoch) and cut into ppo_minibatches parts;
            # minibatch k is part k of every group, one microbatch per group on its rank.
            parts = []
            for g in groups:
                rows = torch.nonzero(rollout["group"] == g)[:, 0]
                order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(self._seed(g, epoch)))
                parts.append(rows[order].chunk(p.ppo_minibatches))
            for k in range(p.ppo_minibatches):
                microbatches = [_trim({name: v[rows[k]] for name, v in rollout.items()}) for rows in parts]
                step_stats, grad_norm = self.optimize(microbatches)
                add_stats(stats, step_stats)
                norms.append(grad_norm)
        self.scheduler.step()
        kl_coef = self.kl_coef
        if p.kl_target:
            kl = self._reduce({"kl": stats["objective_{split}/kl"]}, "train")["kl"]
            self.kl_coef = rl.adaptive_kl_coef(self.kl_coef, kl, p.kl_target, self.cfg.model.batch_size, p.kl_horizon)
        self.examples += self.cfg.model.batch_size
        self.tokens += int(all_reduce_sum(self.accelerator, torch.tensor(info["tokens"])))
        return stats, {"grad_norm": sum(norms) / len(norms), "lr": lr, "kl_coef": kl_coef,
                       "value/explained_variance": info["explained_variance"], "episodes": self.examples,
                       "timing/generation_s": info["generation_s"], "timing/rollout_s": update_start - start,
                       "timing/update_s": time.time() - update_start}

    def normalizer(self, batch):
        return int(batch["mask"].sum())

    def microbatch_loss(self, model, batch):
        p = self.cfg.loss
        logps, entropy, values = self.forward(model, batch, self.modules[1])
        mask = batch["mask"].to(logps.device)
        old_logps, old_values, advantages, returns = (batch[k].to(logps.device) for k in
                                                      ("old_logps", "old_values", "advantages", "returns"))
        policy_loss, policy = rl.policy_loss(logps, old_logps, advantages, mask, p.clip)
        value_loss, value_clipped = rl.value_loss(values, old_values, returns, mask, p.vf_clip)
        n = mask.sum()
        loss = policy_loss + p.vf_coef * value_loss
        return loss, {
            "loss/{split}": (loss.detach(), n), "loss/policy": (policy_loss.detach(), n), "loss/value": (value_loss.detach(), n),
            "policy/clipfrac": (policy["clipped"], n), "policy/approx_kl": (policy["approx_kl"], n),
            "policy/ratio": (policy["ratio"], n), "value/clipfrac": (value_clipped, n),
            "policy/entropy": ((entropy.detach() * mask).sum(), n)}

    # -- evaluation: greedy completions of held-out prompts, scored by the reward and the dataset's scorer

    def eval_stats(self, model):
        stats = new_stats()
        size = max(1, self.cfg.model.eval_batch_size // self.accelerator.num_processes)
        chunks = distributed.my_chunks(self.eval_items, size, self.accelerator, self.sharded)
        for i, (chunk, real) in enumerate(chunks):
            completed = self._complete(chunk)
            scores, valid, texts = self._score(chunk, completed)
            batch = {"prompts": completed.prompts, "prompt_mask": completed.prompt_mask,
                     "responses": completed.responses, "response_mask": completed.response_mask}
            logps = self.forward(model, batch)[0].cpu()
            with self.reference.model(model) as reference_model:
                ref_logps = self.forward(reference_model, batch)[0].cpu()
            sequence_kl = (rl.kl_estimate(logps, ref_logps, "k1") * completed.response_mask).sum(-1)
            add_stats(stats, {"objective_{split}/score": ((scores * valid).sum(), valid.sum()),
                              "objective_{split}/kl": ((sequence_kl * valid).sum(), valid.sum()),
                              "objective_{split}/reward": (((scores - self.kl_coef * sequence_kl) * valid).sum(),
                                                           valid.sum()),
                              "rollout_{split}/length": (completed.response_mask.sum(), len(chunk)),
                              "rollout_{split}/ended": (completed.ended.sum(), len(chunk))} if real else {})
            if i == 0 and self.accelerator.is_main_process:
                for item, text, score in list(zip(chunk, texts, scores.tolist()))[:3]:
                    log.info("sample at step %d: %r -> %r (score %.3g)", self.step,
                             item.example.prompt[-1]["content"], text, score)
        if self.scorer is not None:
            stats |= self.generation_scores(model, self.eval_prompts)
        return stats

    # -- checkpoints

    def trainer_state(self):
        return super().trainer_state() | {"kl_coef": self.kl_coef, "reference": self.reference_fingerprint,
                                          "reward": self.reward_fingerprint}

    def restore(self, snapshot):
        state = snapshot.state
        for key, ours in (("reference", self.reference_fingerprint), ("reward", self.reward_fingerprint)):
            if state.get(key) != ours:
                what = "reference model (the initial policy)" if key == "reference" else f"reward ({self.cfg.loss.reward})"
                raise CheckpointError(f"{snapshot.directory} was trained against another {what}: fingerprint "
                                      f"{state.get(key)}, this run's is {ours}; continuing would change the objective "
                                      f"mid-run")
        super().restore(snapshot)
        self.kl_coef = state["kl_coef"]
