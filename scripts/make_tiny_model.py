"""Build the files behind `model=tiny`: a byte-level BPE tokenizer and a small Llama config.

Run once; its output (train/assets/tiny/) is committed, so runs and tests never need a network.
The tokenizer is trained on the demo task's text plus Python's standard library (for general
byte-pair merges); the model has no weights on disk: it is initialised from config.json by seed.

    .venv/bin/python scripts/make_tiny_model.py
"""
import pathlib
import sys
import sysconfig

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, PreTrainedTokenizerFast

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from train import demo  # noqa: E402
from train.models import CHATML_TEMPLATE  # noqa: E402

OUT = ROOT / "train" / "assets" / "tiny"
VOCAB_SIZE = 2048
SPECIAL = ["<|pad|>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def corpus():
    for split in ("train", "test"):
        for r in demo.records(split):
            yield f"<|im_start|>user\n{r['prompt']}<|im_end|>\n<|im_start|>assistant\n{r['chosen']}<|im_end|>\n"
            yield r["rejected"]
    stdlib = sorted(pathlib.Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:80]
    for path in stdlib:
        yield path.read_text(encoding="utf-8", errors="ignore")


def main():
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus(), trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<|pad|>", bos_token="<|endoftext|>", eos_token="<|im_end|>",
        unk_token=None, chat_template=CHATML_TEMPLATE, model_max_length=1024)
    tokenizer.save_pretrained(OUT)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=384, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024,
        tie_word_embeddings=False, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    config.save_pretrained(OUT)
    print(f"wrote {OUT}: vocab {len(tokenizer)}")


if __name__ == "__main__":
    main()
