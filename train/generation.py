"""Generation: left-padded, batched, with the KV cache; greedy for eval scoring, sampled for rollouts.

Masks come from lengths, never from comparing ids with the pad id: many tokenizers (Llama, Mistral)
pad with their EOS, and an EOS taken for padding would hide the very token the reward is read at.
"""
from dataclasses import dataclass

import torch


@dataclass
class Generated:
    prompts: torch.Tensor  # (B, P) left-padded prompt ids
    prompt_mask: torch.Tensor  # (B, P) bool, True on real prompt tokens
    responses: torch.Tensor  # (B, T) response ids, left-aligned; pad after the end
    response_mask: torch.Tensor  # (B, T) bool: up to and including the first stop token
    ended: torch.Tensor  # (B,) bool: the response ends with a stop token (False: cut at max_new_tokens)


def left_pad(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, width) ids padded on the left, and the mask of real tokens."""
    width = max(map(len, sequences))
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.bool)
    for i, seq in enumerate(sequences):
        if seq:
            ids[i, width - len(seq):] = torch.tensor(seq)
            mask[i, width - len(seq):] = True
    return ids, mask


def right_pad(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, width) ids padded on the right, and the mask of real tokens."""
    width = max(map(len, sequences))
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.bool)
    for i, seq in enumerate(sequences):
        ids[i, :len(seq)], mask[i, :len(seq)] = torch.tensor(seq, dtype=torch.long), True
    return ids, mask


def concat(parts: list[Generated], pad_id: int) -> Generated:
    """One Generated from several: prompts left-padded, responses right-padded to the widest."""
    prompt_width = max(g.prompts.shape[1] for g in parts)
    response_width = max(g.responses.shape[1] for g in parts)

    def pad(t, left, right, value):
        return torch.nn.functional.pad(t, (left, right), value=value)
    return Generated(
        torch.cat([pad(g.prompts, prompt_width - g.prompts.shape[1], 0, pad_id) for g in parts]),
        torch.cat([pad(g.prompt_mask, prompt_width - g.prompts.shape[1], 0, False) for g in parts]),
        torch.cat([pad(g.responses, 0, response_width - g.responses.shape[1], pad_id) for g in parts]),
        torch.cat([pad(g.response_mask, 0, response_width - g.responses.shape[1], False) for g in parts]),
        torch.cat([g.ended for g in parts]))


def written(prompts: list[list[int]], responses: list[list[int]], tokenizer) -> Generated:
    """Responses that exist already (a dataset's, ending at their EOS) as completions of the prompts."""
    ids, mask = right_pad(responses, tokenizer.pad_token_id)
    ended = torch.tensor([r[-1] == tokenizer.eos_token_id for r in responses])
    return Generated(*left_pad(prompts, tokenizer.pad_token_id), ids, mask, ended)


def response_mask(responses: torch.Tensor, stop_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The mask of tokens up to and including the first stop token, and whether each row has one."""
    stops = torch.isin(responses, torch.tensor(stop_ids, device=responses.device))
    ended = stops.any(-1)
    before_stop = (stops.cumsum(-1) - stops.long()) == 0  # no stop token strictly before this position
    return before_stop, ended


@torch.no_grad()
def generate(model, prompts: list[list[int]], tokenizer, max_new_tokens: int, device, sample: bool = False,
             temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, synced: bool = False) -> Generated:
    """Complete each prompt (token ids) with `model`: greedy, or sampled from the torch RNG.
    Everything after the first EOS is padding and outside the mask. `synced`: a sharded model, whose
    every forward is collective: each rank steps until all ranks are done."""
    ids, mask = left_pad(prompts, tokenizer.pad_token_id)
    options = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=top_k) if sample else dict(do_sample=False)
    out = model.generate(input_ids=ids.to(device), attention_mask=mask.long().to(device), max_new_tokens=max_new_tokens,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, use_cache=True,
                         synced_gpus=synced, **options).cpu()
    responses = out[:, ids.shape[1]:]
    kept, ended = response_mask(responses, [tokenizer.eos_token_id])
    responses = responses.masked_fill(~kept, tokenizer.pad_token_id)
    return Generated(ids, mask, responses, kept, ended)
