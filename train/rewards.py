"""Rewards for PPO, by `loss.reward`:

    <module>:<function>   a Python function, called as f(prompts, completions, **fields): the last user
                          turn of each prompt, the decoded completion (cut at its end token) and the
                          record's other fields, one list each; it returns one float per completion,
                          or None to leave that completion out of the update.
    <dir>                 a reward model: the FINAL/ of a `loss=bradley-terry` run (it loads with
                          AutoModelForSequenceClassification). Its tokenizer may differ from the
                          policy's: the decoded text is rendered again with its own chat template.
    labels                the data's own labels, for offline rollouts: desirable +1, undesirable -1
                          (a pair's chosen response +1, its rejected one -1).
"""
import importlib
import pathlib
from typing import Optional

import torch

from train.errors import ConfigError, first_line

LABELS = "labels"


def kind(spec: str) -> str:
    """'labels', 'function' or 'model': what `loss.reward` names."""
    if spec == LABELS:
        return "labels"
    if ":" in spec and "/" not in spec.split(":")[0]:
        return "function"
    return "model"


def load_function(spec: str):
    module_name, _, name = spec.partition(":")
    try:
        function = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"loss.reward: cannot import {spec}: {first_line(e)}") from None
    if not callable(function):
        raise ConfigError(f"loss.reward: {spec} is not a function")
    return function


def check(spec: str, rollout: str) -> None:
    """Fail fast on a reward that can't be used: a missing function or model dir, labels online."""
    what = kind(spec)
    if what == "labels" and rollout != "offline":
        raise ConfigError("loss.reward: labels score the dataset's own responses, so they need loss.rollout=offline")
    if what == "function":
        load_function(spec)
    if what == "model":
        path = pathlib.Path(spec).expanduser()
        if not (path / "config.json").is_file():
            raise ConfigError(f"loss.reward: {spec} is not a reward model dir (no config.json), a module:function, "
                              f"or labels")


class Reward:
    """Scores completions: `__call__(items, completions) -> list[float | None]`, where items are the
    data's Tokenized records (their `example` holds the prompt and fields)."""

    def __init__(self, spec: str, device, max_length: int):
        self.spec, self.kind, self.device, self.max_length = spec, kind(spec), device, max_length
        self.model = self.tokenizer = self.function = None
        if self.kind == "function":
            self.function = load_function(spec)
        elif self.kind == "model":
            from omegaconf import OmegaConf
            from transformers import AutoModelForSequenceClassification

            from train.models import checked_load, load_tokenizer
            self.model = checked_load("loss.reward", spec, AutoModelForSequenceClassification.from_pretrained,
                                          dtype=torch.float32)
            self.model.requires_grad_(False).eval().to(device)
            self.tokenizer = load_tokenizer(OmegaConf.create({"tokenizer_name_or_path": spec, "name_or_path": spec,
                                                              "trust_remote_code": False}))

    def __call__(self, items: list, completions: list[str]) -> list[Optional[float]]:
        if self.kind == "labels":
            return [1.0 if item.desirable else -1.0 for item in items]
        if self.kind == "function":
            fields = {}
            for item in items:
                for key, value in (item.example.fields or {}).items():
                    fields.setdefault(key, []).append(value)
            prompts = [item.example.prompt[-1]["content"] for item in items]
            scores = list(self.function(prompts=prompts, completions=completions, **fields))
            if len(scores) != len(completions):
                raise ConfigError(f"loss.reward: {self.spec} returned {len(scores)} scores for {len(completions)} "
                                  f"completions")
            return [None if s is None else float(s) for s in scores]
        return self._model_scores(items, completions)

    @torch.no_grad()
    def _model_scores(self, items: list, completions: list[str]) -> list[float]:
        from train.data import render
        rows = []
        for item, completion in zip(items, completions):
            prompt, response = render(self.tokenizer, item.example.prompt, completion)
            rows.append((prompt + response)[-self.max_length:])
        width = max(map(len, rows))
        ids = torch.full((len(rows), width), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):  # right-padded, as the reward model was trained
            ids[i, :len(row)], mask[i, :len(row)] = torch.tensor(row), 1
        scores = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).logits[:, 0]
        return scores.float().cpu().tolist()
