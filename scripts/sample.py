"""Sample completions from a checkpoint for a dataset's prompts, into JSONL for a judge; with the
judge's `label` added, each line is a record in TRL's unpaired format (KTO, PPO's offline mode):

    .venv/bin/python scripts/sample.py runs/dpo-tiny/FINAL --datasets demo --out samples.jsonl \\
        [--split test] [--n 256] [--max-new-tokens 64] [--temperature 0.7] [--top-p 1.0] [--batch-size 32]

The checkpoint is a `FINAL/` or a `step-N/`, full or LoRA: a LoRA step-N holds only the adapter, so
its base is rebuilt as training built it (run_config.yaml's model and seed) and the adapter loaded
into it. Datasets take every entry form `datasets=` does (files, globs, dirs, hub ids, named). Each
line is {"prompt": [messages], "completion": text, "reference": {the record's other fields}}.
Batched transformers `generate`, in float32 on CPU or `model.dtype` on a GPU; greedy at temperature 0.
"""
import argparse
import json
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def load(directory: pathlib.Path, device):
    """The checkpoint's model (eval mode, on `device`) and tokenizer."""
    import torch
    from omegaconf import OmegaConf
    from transformers import AutoModelForCausalLM

    from train import checkpoint
    from train.models import load_policy, load_tokenizer, resolve_dtype
    cfg = OmegaConf.load(directory / "run_config.yaml")
    tokenizer = load_tokenizer(OmegaConf.merge(cfg.model, {"tokenizer_name_or_path": str(directory)}))
    dtype = resolve_dtype(cfg.model.dtype) if device.type == "cuda" else torch.float32
    if (directory / "adapter_config.json").is_file():
        from peft import set_peft_model_state_dict
        model = load_policy(OmegaConf.merge(cfg.model, {"dtype": str(dtype).removeprefix("torch.")}), cfg.seed,
                            pad_token_id=tokenizer.pad_token_id)
        set_peft_model_state_dict(model, checkpoint.read_weights(directory, "adapter_model"))
    else:
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype)
    return model.to(device).eval(), tokenizer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("checkpoint", type=pathlib.Path)
    p.add_argument("--datasets", nargs="+", required=True, help="entries as in datasets=[...] (JSON for a dict entry)")
    p.add_argument("--out", type=pathlib.Path, required=True)
    p.add_argument("--split", default="train", help="of a named dataset (others have one split)")
    p.add_argument("--n", type=int, help="the first N prompts (default: all)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.7, help="0: greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()

    import torch
    import transformers

    from train import data
    from train.errors import RunError
    from train.generation import generate
    try:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        model, tokenizer = load(a.checkpoint, device)
        entries = [json.loads(d) if d.startswith("{") else d for d in a.datasets]
        examples = [ex for item in entries for ex in data.load_examples(item, a.split, "prompt", skip_invalid=False)]
    except RunError as e:
        sys.exit(f"error: {e}")
    examples = examples[:a.n]
    transformers.set_seed(a.seed)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    part = a.out.with_name(a.out.name + ".part")
    with open(part, "w") as f:
        for start in range(0, len(examples), a.batch_size):
            batch = examples[start:start + a.batch_size]
            prompts = [data.render(tokenizer, ex.prompt)[0] for ex in batch]
            out = generate(model, prompts, tokenizer, a.max_new_tokens, device, sample=a.temperature > 0,
                           temperature=a.temperature or 1.0, top_p=a.top_p)
            for ex, row, mask in zip(batch, out.responses, out.response_mask):
                text = tokenizer.decode(row[mask], skip_special_tokens=True)
                f.write(json.dumps({"prompt": ex.prompt, "completion": text, "reference": ex.fields}) + "\n")
    part.replace(a.out)  # whole or not at all
    print(f"{len(examples)} completions: {a.out}")


if __name__ == "__main__":
    main()
