"""The embedded `demo` task: small enough to learn on 2 CPU cores, with a rule that alignment must teach.

A prompt asks the assistant to shout or whisper about a topic:

    "Shout about the red fox."    ->  chosen "THE RED FOX RUNS SLOWLY."   rejected "the red fox runs slowly."
    "Whisper about the red fox."  ->  chosen "the red fox runs slowly."   rejected "THE RED FOX RUNS SLOWLY."

The rule: a shout is answered in capitals, a whisper in lower case. Chosen responses follow it and
rejected ones break it, so held-out reward accuracy measures whether a preference method learned it.

For SFT, each record's `response` is the chosen or the rejected one with even odds, as an
unaligned demonstrator would write: SFT learns the sentence format (well-formedness rises) but not
the rule (rule-following stays near chance); preference training then teaches the rule.

Test records use (adjective, noun) topics that never occur in training, so held-out numbers measure
generalisation, not recall. Everything is generated deterministically; no file ships.
"""
import random
import re

ADJECTIVES = ["red", "blue", "green", "small", "big", "old", "young", "quiet", "happy", "lazy",
              "brave", "clever", "gentle", "wild", "tiny", "golden"]
NOUNS = ["fox", "dog", "cat", "bird", "horse", "fish", "bear", "mouse", "lion", "owl", "frog",
         "wolf", "duck", "goat", "sheep", "tiger", "rabbit", "whale", "snake", "deer", "crow",
         "bee", "ant", "seal"]
VERBS = ["runs", "sleeps", "sings", "jumps", "swims", "waits", "eats", "plays", "hides", "dances",
         "walks", "rests"]
ADVERBS = ["slowly", "quickly", "loudly", "softly", "often", "today", "again", "alone", "happily",
           "early"]
INSTRUCTIONS = ("Shout", "Whisper")

N_TRAIN, N_TEST = 4000, 400
SEED = 0

_PROMPT = re.compile(r"^(Shout|Whisper) about the (\w+) (\w+)\.$")


def _is_test_topic(adjective: str, noun: str) -> bool:
    # A fixed fifth of all topics is held out; stable across Python versions (no hash()).
    return (ADJECTIVES.index(adjective) * len(NOUNS) + NOUNS.index(noun)) % 5 == 0


def _record(rng: random.Random, instruction: str, adjective: str, noun: str) -> dict:
    sentence = f"the {adjective} {noun} {rng.choice(VERBS)} {rng.choice(ADVERBS)}."
    shouted, whispered = sentence.upper(), sentence
    chosen, rejected = (shouted, whispered) if instruction == "Shout" else (whispered, shouted)
    return {
        "prompt": f"{instruction} about the {adjective} {noun}.",
        "chosen": chosen,
        "rejected": rejected,
        "response": rng.choice([chosen, rejected]),
    }


def records(split: str) -> list[dict]:
    """The `train` or `test` split: dicts with prompt, chosen, rejected and (for SFT) response."""
    if split not in ("train", "test"):
        raise ValueError(f"demo dataset: unknown split {split!r} (expected 'train' or 'test')")
    topics = [(a, n) for a in ADJECTIVES for n in NOUNS if _is_test_topic(a, n) == (split == "test")]
    rng = random.Random(f"{SEED}-{split}")
    n = N_TRAIN if split == "train" else N_TEST
    return [_record(rng, rng.choice(INSTRUCTIONS), *rng.choice(topics)) for _ in range(n)]


SCORES = ("well_formed", "follows_rule")  # what score() judges


def score(prompt: str, response: str) -> dict[str, bool]:
    """Judge one generated response to a demo prompt.

    well_formed: the response is "the <adjective> <noun> <verb> <adverb>." about the prompt's topic,
    in either case. follows_rule: well formed and in the case the instruction asks for.
    """
    match = _PROMPT.match(prompt.strip())
    if match is None:
        raise ValueError(f"not a demo prompt: {prompt!r}")
    instruction, adjective, noun = match.groups()
    text = response.strip()
    words = text.lower().rstrip(".").split()
    well_formed = (text.lower().endswith(".") and len(words) == 5 and words[:3] == ["the", adjective, noun]
                   and words[3] in VERBS and words[4] in ADVERBS)
    in_case = text == text.upper() if instruction == "Shout" else text == text.lower()
    return {"well_formed": well_formed, "follows_rule": well_formed and in_case}


def reward(prompts: list[str], completions: list[str], **fields) -> list[float]:
    """The demo's rule reward for PPO (`loss.reward=train.demo:reward`): +1 for following the rule,
    0 for a well-formed sentence in the wrong case, -1 for anything else."""
    out = []
    for prompt, completion in zip(prompts, completions):
        judged = score(prompt, completion)
        out.append(1.0 if judged["follows_rule"] else 0.0 if judged["well_formed"] else -1.0)
    return out
