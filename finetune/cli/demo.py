"""`finetune demo`: the whole workflow offline, on data the toolkit writes itself.

1. pre-train a small GPT from scratch on a corpus of short animal stories (self-supervised:
   predict the next token), with a BPE tokenizer trained on that corpus;
2. LoRA-fine-tune it to answer questions ("question: what does the cow say? answer: moo.")
   on some animals only;
3. ask it about animals it never saw a question about: the answers come from what it read
   during pre-training, in the format it learned during fine-tuning;
4. chat fine-tuning: LoRA on conversations rendered with the ChatML template, the loss on the
   assistant's answers only, then a short chat about held-out animals.

Each step is an ordinary run, made from the built-in recipes `tiny-gpt-pretrain-stories`,
`tiny-gpt-lora-animal-qa` and `tiny-gpt-lora-chat`; the summary prints the equivalent commands.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from finetune.errors import UserError

# name: (sound, colour, home, food). Forty animals: too many for fine-tuning to memorise the answers,
# so it has to learn the question format and take the facts from what pre-training read.
ANIMALS = {
    "cow": ("moo", "brown", "farm", "grass"), "dog": ("woof", "black", "house", "meat"),
    "cat": ("meow", "white", "house", "fish"), "duck": ("quack", "yellow", "pond", "bread"),
    "sheep": ("baa", "white", "field", "grass"), "lion": ("roar", "golden", "savanna", "meat"),
    "owl": ("hoot", "grey", "forest", "mice"), "frog": ("ribbit", "green", "pond", "flies"),
    "horse": ("neigh", "brown", "stable", "hay"), "bee": ("buzz", "yellow", "garden", "nectar"),
    "pig": ("oink", "pink", "farm", "corn"), "wolf": ("howl", "grey", "forest", "meat"),
    "goat": ("bleat", "white", "hill", "leaves"), "crow": ("caw", "black", "tree", "seeds"),
    "mouse": ("squeak", "grey", "barn", "cheese"), "snake": ("hiss", "green", "grass", "eggs"),
    "bear": ("growl", "brown", "cave", "honey"), "fox": ("yip", "red", "den", "rabbits"),
    "hen": ("cluck", "red", "coop", "grain"), "seal": ("bark", "grey", "beach", "fish"),
    "deer": ("bell", "brown", "woods", "acorns"), "tiger": ("snarl", "orange", "jungle", "meat"),
    "monkey": ("chatter", "brown", "jungle", "bananas"), "parrot": ("squawk", "green", "jungle", "nuts"),
    "goose": ("honk", "white", "lake", "grass"), "dove": ("coo", "white", "roof", "seeds"),
    "rat": ("squeal", "black", "sewer", "scraps"), "bat": ("screech", "black", "cave", "moths"),
    "camel": ("grunt", "tan", "desert", "thorns"), "zebra": ("whinny", "striped", "plain", "grass"),
    "whale": ("sing", "blue", "ocean", "krill"), "eagle": ("scream", "brown", "cliff", "fish"),
    "donkey": ("bray", "grey", "farm", "hay"), "turkey": ("gobble", "brown", "farm", "corn"),
    "cricket": ("chirp", "green", "meadow", "leaves"), "elephant": ("trumpet", "grey", "savanna", "fruit"),
    "hyena": ("laugh", "spotted", "plain", "bones"), "rooster": ("crow", "red", "yard", "worms"),
    "gull": ("cry", "white", "harbour", "chips"), "puppy": ("yap", "gold", "basket", "milk"),
}
HELD_OUT = ("frog", "wolf", "goat", "bear", "seal", "camel", "whale", "gull")  # never asked about in fine-tuning
QUESTIONS = {
    "sound": ("what does the {a} say?", "{v}."),
    "colour": ("what colour is the {a}?", "{v}."),
    "home": ("where does the {a} live?", "the {v}."),
    "food": ("what does the {a} eat?", "{v}."),
}
FACTS = {  # statements, and questions answered in plain words (so the words of the QA task are known)
    "sound": ["the {a} says {v}.", "a {a} says {v} all day.", "what does the {a} say? the answer is {v}."],
    "colour": ["the {a} is {v}.", "a {v} {a} sat down.", "what colour is the {a}? the answer is {v}."],
    "home": ["the {a} lives in the {v}.", "a {a} sleeps in the {v}.", "where does the {a} live? in the {v}."],
    "food": ["the {a} eats {v}.", "a hungry {a} looks for {v}.", "what does the {a} eat? the answer is {v}."],
}


def story(rng: random.Random) -> str:
    """A short paragraph of true facts about two or three animals."""
    names = rng.sample(sorted(ANIMALS), rng.randint(2, 3))
    sentences = []
    for a in names:
        for kind in rng.sample(sorted(FACTS), 3):
            value = ANIMALS[a][list(FACTS).index(kind)]
            sentences.append(rng.choice(FACTS[kind]).format(a=a, v=value))
    return " ".join(sentences)


def qa_pairs(animals) -> list[tuple[str, str]]:
    pairs = []
    for a in animals:
        for i, (q, ans) in enumerate(QUESTIONS.values()):
            pairs.append((f"question: {q.format(a=a)} answer:", " " + ans.format(v=ANIMALS[a][i])))
    return pairs


def write_data(data_dir: Path, n_stories: int = 6000, seed: int = 0) -> tuple[Path, Path]:
    rng = random.Random(seed)
    data_dir.mkdir(parents=True, exist_ok=True)
    corpus = data_dir / "stories.txt"
    corpus.write_text("\n".join(story(rng) for _ in range(n_stories)) + "\n")
    qa = data_dir / "animal_qa.jsonl"
    seen = [a for a in ANIMALS if a not in HELD_OUT]
    with qa.open("w") as f:
        for _ in range(4):  # each pair a few times: a small, learnable task
            for q, a in qa_pairs(seen):
                f.write(json.dumps({"text": q + a}) + "\n")
    return corpus, qa


def run_demo(out: Path, overwrite: bool = False) -> None:
    from finetune.recipe.load import load_recipe
    from finetune.run.lifecycle import execute
    from finetune.training import checkpoints
    from finetune.training import rundir
    from finetune.use.inference import generate_text

    pre_dir, lora_dir = out / "pretrain", out / "lora"
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise UserError(f"--output: '{out}' already holds a demo; pass --overwrite to run it again, "
                            "or choose another --output")
        if not (out / "data" / "stories.txt").exists():
            raise UserError(f"--output: '{out}' is not empty and holds no demo; choose another directory")
    for d in (pre_dir, lora_dir, out / "chat"):  # before anything is written
        rundir.check(d, overwrite, resume=False, has_checkpoint=checkpoints.latest(d) is not None)

    print(f"[1/5] writing the demo data to {out / 'data'}/", flush=True)
    corpus, qa = write_data(out / "data")

    print("[2/5] pre-training a small GPT on the stories (tokenizer trained on the corpus)", flush=True)
    pre_cmd = f"finetune pretrain tiny-gpt-pretrain-stories --data {corpus} -o {pre_dir}"
    pre = load_recipe("tiny-gpt-pretrain-stories", {"method": "pretrain", "data.train": str(corpus),
                                                    "train.output_dir": str(pre_dir)})
    pre_metrics = execute(pre, overwrite=overwrite)

    print("\n[3/5] LoRA fine-tuning it to answer questions", flush=True)
    lora_cmd = f"finetune lora tiny-gpt-lora-animal-qa --model {pre_dir} --data {qa} -o {lora_dir}"
    lora = load_recipe("tiny-gpt-lora-animal-qa", {"method": "lora", "model.name": str(pre_dir),
                                                   "data.train": str(qa), "train.output_dir": str(lora_dir)})
    lora_metrics = execute(lora, overwrite=overwrite)

    print("\n[4/5] asking about animals it never saw a question about:", flush=True)
    correct = 0
    questions = qa_pairs(HELD_OUT)
    for q, expected in questions:
        answer = generate_text(str(lora_dir), q, max_new_tokens=6, temperature=0.0, top_p=1.0, seed=0)
        answer = answer[len(q):].strip().split(".")[0] + "."
        ok = answer.strip() == expected.strip()
        correct += ok
        print(f"  {q} {answer:<14} {'✓' if ok else '✗ expected ' + expected.strip()}", flush=True)

    print("\n[5/5] chat fine-tuning on conversations (loss on the answers only), then chatting:", flush=True)
    chat_cmd, chat_metrics, chat_right, chat_asked = chat_step(out, pre_dir, out / "chat", overwrite)

    print(f"""
demo finished in {out}/
  pre-training     {pre_dir}/  eval perplexity {pre_metrics.get('perplexity')}
  LoRA adapter     {lora_dir}/  eval perplexity {lora_metrics.get('perplexity')}
  held-out answers {correct}/{len(questions)} right (facts from pre-training, format from fine-tuning)
  chat adapter     {out / 'chat'}/  eval loss {chat_metrics.get('eval_loss')} (answers only)
  held-out chats   {chat_right}/{chat_asked} answers right
the same steps by hand:
  {pre_cmd}
  {lora_cmd}
  {chat_cmd}
  finetune chat {out / 'chat'}
  finetune generate {lora_dir} "question: what does the frog say? answer:" --temperature 0
  finetune merge {lora_dir} -o {out / 'merged'}""", flush=True)


def chat_answer(animal: str, kind: str) -> str:
    """A whole sentence, worded as the stories word it, so the facts read in pre-training come back."""
    return FACTS[kind][0].format(a=animal, v=ANIMALS[animal][list(FACTS).index(kind)])


def write_chat_data(data_dir: Path, seed: int = 0) -> Path:
    """Conversations of two questions about one animal (some with a system prompt), seen animals only."""
    rng = random.Random(seed)
    path = data_dir / "animal_chat.jsonl"
    seen = [a for a in ANIMALS if a not in HELD_OUT]
    with path.open("w") as f:
        for _ in range(6):
            for a in seen:
                turns = [{"role": "system", "content": "answer in a few words."}] if rng.random() < 0.3 else []
                for kind in rng.sample(sorted(QUESTIONS), 2):
                    turns += [{"role": "user", "content": QUESTIONS[kind][0].format(a=a)},
                              {"role": "assistant", "content": chat_answer(a, kind)}]
                f.write(json.dumps({"messages": turns}) + "\n")
    return path


def chat_step(out: Path, pre_dir: Path, chat_dir: Path, overwrite: bool = False) -> tuple[str, dict, int, int]:
    """Train the chat adapter on the pre-trained model, then hold two-question chats about held-out animals."""
    from finetune.recipe.load import load_recipe
    from finetune.run.lifecycle import execute
    from finetune.use.inference import generate_ids, load_for_generation, prompt_ids

    data = write_chat_data(out / "data")
    cmd = f"finetune lora tiny-gpt-lora-chat --model {pre_dir} --data {data} -o {chat_dir}"
    recipe = load_recipe("tiny-gpt-lora-chat", {"method": "lora", "model.name": str(pre_dir),
                                                 "data.train": str(data), "train.output_dir": str(chat_dir)})
    metrics = execute(recipe, overwrite=overwrite)
    model, tokenizer, _ = load_for_generation(str(chat_dir))
    right = asked = 0
    for a in HELD_OUT:
        history: list[dict] = []
        print(f"  --- a chat about the {a}", flush=True)
        for kind in ("sound", "food"):
            q = QUESTIONS[kind][0]
            history.append({"role": "user", "content": q.format(a=a)})
            new = generate_ids(model, tokenizer, [prompt_ids(tokenizer, history, True)], 12, 0.0, 1.0)[0]
            answer = tokenizer.decode(new, skip_special_tokens=True).strip()
            history.append({"role": "assistant", "content": answer})
            expected = chat_answer(a, kind)
            right, asked = right + (answer == expected), asked + 1
            mark = "✓" if answer == expected else "✗ expected " + expected
            print(f"  you: {q.format(a=a)}\n  assistant: {answer:<24} {mark}", flush=True)
    return cmd, metrics, right, asked
