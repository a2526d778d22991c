"""Sample completions from a checkpoint for a dataset's prompts, into JSONL for a judge; with the
judge's `label` added, each line is a record in TRL's unpaired format (KTO, PPO's offline mode):

    .venv/bin/python scripts/sample.py runs/dpo-tiny/FINAL --datasets demo --out samples.jsonl \\
        [--split test] [--n 256] [--max-new-tokens 64] [--temperature 0.7] [--top-p 1.0] [--batch-size 32]

The checkpoint is a `FINAL/` or a `step-N/`, full or LoRA: a LoRA step-N holds only the adapter, so
its base is rebuilt as training built it (run_config.yaml's model and seed) and the adapter loaded
into it. Datasets take every entry form `datasets=` does (files, globs, dirs, hub ids, named). Each
line is {"prompt": [messages], "completion": text, "reference": {the record's other fields}}.

Engines (`--engine`): vLLM when it is installed and a GPU is present (`auto`), else batched
transformers `generate`, in float32 on CPU or `model.dtype` on a GPU. Greedy at temperature 0. vLLM
loads the checkpoint dir itself; a LoRA step-N is merged into its base in a temporary dir first.
"""
import argparse
import json
import pathlib
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def tokenizer_of(directory: pathlib.Path):
    from omegaconf import OmegaConf

    from train.models import load_tokenizer
    cfg = OmegaConf.load(directory / "run_config.yaml")
    return load_tokenizer(OmegaConf.merge(cfg.model, {"tokenizer_name_or_path": str(directory)}))


def load(directory: pathlib.Path, device):
    """The checkpoint's model (eval mode, on `device`) and tokenizer."""
    import torch
    from omegaconf import OmegaConf
    from transformers import AutoModelForCausalLM

    from train import checkpoint
    from train.models import load_policy, resolve_dtype
    cfg = OmegaConf.load(directory / "run_config.yaml")
    tokenizer = tokenizer_of(directory)
    dtype = resolve_dtype(cfg.model.dtype) if device.type == "cuda" else torch.float32
    if (directory / "adapter_config.json").is_file():
        from peft import set_peft_model_state_dict
        model = load_policy(OmegaConf.merge(cfg.model, {"dtype": str(dtype).removeprefix("torch.")}), cfg.seed,
                            pad_token_id=tokenizer.pad_token_id)
        set_peft_model_state_dict(model, checkpoint.read_weights(directory, "adapter_model"))
    else:
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype)
    return model.to(device).eval(), tokenizer


def engine(choice: str, device) -> str:
    """`vllm` or `transformers`: `auto` takes vLLM when it is installed and there is a GPU."""
    if choice != "auto":
        return choice
    import importlib.util
    return "vllm" if device.type == "cuda" and importlib.util.find_spec("vllm") is not None else "transformers"


def vllm_completions(directory: pathlib.Path, prompts: list[list[int]], a) -> list[str]:
    """Completions by vLLM (one batch: it schedules the prompts itself)."""
    import torch
    from omegaconf import OmegaConf
    from vllm import LLM, SamplingParams
    dtype = OmegaConf.load(directory / "run_config.yaml").model.dtype
    with tempfile.TemporaryDirectory() as merged:
        if (directory / "adapter_config.json").is_file():  # vLLM reads whole models: merge the adapter in
            model, tokenizer = load(directory, torch.device("cpu"))
            model.merge_and_unload().save_pretrained(merged)
            tokenizer.save_pretrained(merged)
            directory = pathlib.Path(merged)
        llm = LLM(model=str(directory), tokenizer=str(directory), seed=a.seed, dtype=dtype)
        params = SamplingParams(temperature=a.temperature, top_p=a.top_p, max_tokens=a.max_new_tokens, seed=a.seed)
        return [out.outputs[0].text for out in llm.generate([{"prompt_token_ids": ids} for ids in prompts], params)]


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
    p.add_argument("--batch-size", type=int, default=32, help="of transformers' generate")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--engine", choices=("auto", "vllm", "transformers"), default="auto")
    a = p.parse_args()

    import torch
    import transformers

    from train import data
    from train.errors import RunError
    from train.generation import generate
    try:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        use_vllm = engine(a.engine, device) == "vllm"
        model, tokenizer = (None, tokenizer_of(a.checkpoint)) if use_vllm else load(a.checkpoint, device)
        entries = [json.loads(d) if d.startswith("{") else d for d in a.datasets]
        examples = [ex for item in entries for ex in data.load_examples(item, a.split, "prompt", skip_invalid=False)]
    except RunError as e:
        sys.exit(f"error: {e}")
    examples = examples[:a.n]
    prompts = [data.render(tokenizer, ex.prompt)[0] for ex in examples]
    transformers.set_seed(a.seed)
    if use_vllm:
        completions = vllm_completions(a.checkpoint, prompts, a)
    else:
        completions = []
        for start in range(0, len(prompts), a.batch_size):
            out = generate(model, prompts[start:start + a.batch_size], tokenizer, a.max_new_tokens, device,
                           sample=a.temperature > 0, temperature=a.temperature or 1.0, top_p=a.top_p)
            completions += [tokenizer.decode(row[mask], skip_special_tokens=True)
                            for row, mask in zip(out.responses, out.response_mask)]
    a.out.parent.mkdir(parents=True, exist_ok=True)
    part = a.out.with_name(a.out.name + ".part")
    with open(part, "w") as f:
        for ex, text in zip(examples, completions):
            f.write(json.dumps({"prompt": ex.prompt, "completion": text, "reference": ex.fields}) + "\n")
    part.replace(a.out)  # whole or not at all
    print(f"{len(examples)} completions: {a.out}")


if __name__ == "__main__":
    main()
