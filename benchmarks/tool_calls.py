"""A small tool-calling task for real instruct models: three functions, requests phrased several ways, and the
call each request asks for.

    from tool_calls import TOOLS, write_calls, write_requests, score
    write_calls(Path("calls.jsonl"), 300, seed=0)       # {"tools", "messages": [user, assistant tool call]}
    write_requests(Path("requests.jsonl"), 40, seed=1)  # {"tools", "prompt", "call"}: held-out requests
    score(Path("answers.jsonl"))                        # (share parseable as a call, share exactly right)

Held-out requests use cities, amounts and phrasings drawn from the same lists with another seed, so most are
prompts never seen in training. A fifth of the training conversations go on with the tool's result and a
final answer (trained too), so that results and answers after them appear in the data.
"""

from __future__ import annotations

import json
import random
from pathlib import Path



def schema(name: str, description: str, **params: str) -> dict:
    return {"type": "function", "function": {"name": name, "description": description, "parameters": {
        "type": "object", "properties": {k: {"type": v} for k, v in params.items()}, "required": list(params)}}}


TOOLS = [schema("get_weather", "Current weather in a city", city="string"),
         schema("convert_currency", "Convert an amount of money", amount="number", to="string"),
         schema("set_timer", "Start a countdown timer", minutes="integer")]
CITIES = ["Paris", "Tokyo", "Lima", "Oslo", "Cairo", "Denver", "Hanoi", "Perth", "Quito", "Riga", "Seoul", "Turin"]
CURRENCIES = ["EUR", "USD", "JPY", "GBP", "CHF", "CAD"]
ASK = {
    "get_weather": ["What's the weather like in {city}?", "Is it raining in {city} right now?",
                    "How warm is it in {city} today?", "weather {city}"],
    "convert_currency": ["How much is {amount} dollars in {to}?", "Convert {amount} USD to {to}.",
                         "I have {amount} dollars, what is that in {to}?"],
    "set_timer": ["Set a timer for {minutes} minutes.", "Remind me in {minutes} minutes.",
                  "Start a {minutes} minute countdown."],
}


def request(rng: random.Random) -> tuple[str, dict]:
    name = rng.choice(list(ASK))
    slots = {"city": rng.choice(CITIES), "amount": rng.randint(2, 500), "to": rng.choice(CURRENCIES),
             "minutes": rng.randint(1, 90)}
    args = {"get_weather": {"city": slots["city"]}, "convert_currency": {"amount": slots["amount"], "to": slots["to"]},
            "set_timer": {"minutes": slots["minutes"]}}[name]
    return rng.choice(ASK[name]).format(**slots), {"name": name, "arguments": args}


def write_calls(path: Path, n: int, seed: int) -> Path:
    rng = random.Random(seed)
    with path.open("w") as f:
        for _ in range(n):
            prompt, call = request(rng)
            messages = [{"role": "user", "content": prompt},
                        {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": call}]}]
            if rng.random() < 0.2:
                messages += [{"role": "tool", "name": call["name"], "content": json.dumps({"ok": True})},
                             {"role": "assistant", "content": "Done."}]
            f.write(json.dumps({"tools": TOOLS, "messages": messages}) + "\n")
    return path


def write_requests(path: Path, n: int, seed: int) -> Path:
    rng = random.Random(seed)
    with path.open("w") as f:
        for _ in range(n):
            prompt, call = request(rng)
            f.write(json.dumps({"tools": TOOLS, "prompt": prompt, "call": call}) + "\n")
    return path


def score(path: Path) -> tuple[float, float]:
    """(share of answers that parse as tool calls, share that are exactly the call asked for)."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    parsed = [r.get("tool_calls") for r in rows]
    return (sum(p is not None for p in parsed) / len(rows),
            sum(p == [r["call"]] for p, r in zip(parsed, rows)) / len(rows))
