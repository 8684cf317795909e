"""Build the tree-search benchmark's task set: generate candidates, measure, keep the useful ones.

Candidates: short arithmetic and string tasks with exact answers (seeded), format-constrained
answers checked by a regex, and the next tool call of recorded tau-bench airline conversations
(the user's last message, a compact tool list; checked for valid JSON, the function name and
the arguments). Each candidate is sampled ``--samples`` times (HF ``generate`` with
``num_return_sequences``, temperature 1.0, seeded) with the default model; a task is kept when its
pass@1 lies in [--min-pass1, --max-pass1] and pass@k exceeds pass@1 by at least --min-gain::

    python scripts/build_search_tasks.py --tau PATH/tau_bench/gpt-4o-airline.json \
        --out src/agentspec/samples/search_tasks.jsonl

The bundled set was built in two runs (the second added to the first)::

    python scripts/build_search_tasks.py --threads 1 --arithmetic 15 --strings 8 --tool-calls 14 \
        --max-new-tokens 40 --tau PATH/tau_bench/gpt-4o-airline.json --out src/agentspec/samples/search_tasks.jsonl
    python scripts/build_search_tasks.py --threads 1 --kinds arithmetic,tau --seed 1 --arithmetic 10 \
        --tool-calls 12 --max-new-tokens 40 --tau PATH/tau_bench/gpt-4o-airline.json --append \
        --out src/agentspec/samples/search_tasks.jsonl

The multi-step set (``src/agentspec/samples/search_tasks_steps.jsonl``: word problems answered in
several steps, generated and from GSM8K through Spec-Bench's ``math_reasoning`` questions) was built
in two runs through ``engine.search`` best-of-N, then each kept line given ``"scorer": "arithmetic"``::

    python scripts/build_search_tasks.py --threads 1 --engine --kinds words,gsm8k --word-problems 12 \
        --gsm8k PATH/spec_bench/question.jsonl --gsm8k-count 8 --max-new-tokens 160 \
        --out src/agentspec/samples/search_tasks_steps.jsonl
    python scripts/build_search_tasks.py --threads 1 --engine --kinds words,gsm8k --seed 1 --word-problems 12 \
        --gsm8k PATH/spec_bench/question.jsonl --gsm8k-skip 8 --gsm8k-count 8 --max-new-tokens 160 --append \
        --out src/agentspec/samples/search_tasks_steps.jsonl

(the first run had only the first four word-problem forms; the kept word-0 is the same under six).
They kept 3 of 20 and 2 of 20: the 135M default model rarely solves a multi-step problem.

The first run kept 7 of 45 (one a repeated prompt, kept once). The second was stopped after its
10 arithmetic candidates and 4 tool calls (the CPU was shared and slow); its 4 kept arithmetic tasks
were added with the counts it logged. No tool-call candidate (18, with and without the example in
the prompt) was ever answered right in 16 samples at temperature 1.0 by the 135M default model.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

from agentspec import Engine
from agentspec.engine.model import load_model
from agentspec.replay.search_tasks import SearchTask, load_tasks, pass_at_k, save_tasks

ANSWER_ONLY = "Answer with the number only."

WORDS = ["cat", "dog", "sun", "tree", "book", "lamp", "frog", "milk", "star", "rain", "ship", "moon",
         "apple", "river", "table", "green", "house", "stone", "piano", "cloud", "tiger", "bread"]

TOOL_HELP = (
    "You are an airline customer-service agent. Tools:\n"
    "get_user_details(user_id)\nget_reservation_details(reservation_id)\n"
    "search_direct_flight(origin, destination, date)\nsearch_onestop_flight(origin, destination, date)\n"
    "list_all_airports()\ncalculate(expression)\n"
    'Reply with only the next tool call as JSON: {"name": "<tool>", "arguments": {...}}\n'
    "Example. User: My user id is sara_doe_496.\n"
    'You: {"name": "get_user_details", "arguments": {"user_id": "sara_doe_496"}}'
)
TOOLS_KEPT = {"get_user_details", "get_reservation_details", "search_direct_flight", "search_onestop_flight",
              "calculate"}


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def arithmetic(rng: random.Random, n: int) -> list[SearchTask]:
    """Sums, differences and products of a range of difficulties."""
    tasks = []
    forms = [
        lambda: (rng.randint(10, 49), "+", rng.randint(10, 49)),
        lambda: (rng.randint(50, 99), "-", rng.randint(10, 49)),
        lambda: (rng.randint(3, 9), "*", rng.randint(3, 9)),
        lambda: (rng.randint(11, 19), "*", rng.randint(3, 9)),
        lambda: (rng.randint(100, 499), "+", rng.randint(100, 499)),
    ]
    for i in range(n):
        a, op, b = forms[i % len(forms)]()
        value = {"+": a + b, "-": a - b, "*": a * b}[op]
        tasks.append(SearchTask(f"arith-{i}", user(f"What is {a} {op} {b}? {ANSWER_ONLY}"), "number", value))
    return tasks


def strings(rng: random.Random, n: int) -> list[SearchTask]:
    """Reversals, letter counts, letter positions, alphabetical order."""
    tasks = []
    ordinals = ["first", "second", "third", "fourth"]
    for i in range(n):
        word, other = rng.sample(WORDS, 2)
        form = i % 4
        if form == 0:
            task = (f"Write the word '{word}' backwards. Answer with the word only.", "word", word[::-1])
        elif form == 1:
            task = (f"How many letters are in the word '{word}'? {ANSWER_ONLY}", "number", len(word))
        elif form == 2:
            k = rng.randrange(min(4, len(word)))
            task = (f"What is the {ordinals[k]} letter of the word '{word}'? Answer with the letter only.",
                    "regex", rf"['\"]?{word[k]}['\"]?")
        else:
            task = (f"Which word comes first in alphabetical order: '{word}' or '{other}'? "
                    "Answer with the word only.", "regex", rf"['\"]?{min(word, other)}['\"]?")
        tasks.append(SearchTask(f"string-{i}", user(task[0]), task[1], task[2]))
    return tasks


def formats() -> list[SearchTask]:
    """Answers whose shape a regex checks."""
    items = [
        ("List exactly three fruits, in lowercase, separated by commas, and nothing else.",
         r"[a-z]+, ?[a-z]+, ?[a-z]+"),
        ("Name one color in uppercase letters only. Answer with the word only.", r"[A-Z]{3,}"),
        ("Write a date in the format YYYY-MM-DD and nothing else.", r"\d{4}-\d{2}-\d{2}"),
        ("Give a US phone number in the format 555-123-4567 and nothing else.", r"\d{3}-\d{3}-\d{4}"),
        ("Write a time in 24-hour HH:MM format and nothing else.", r"([01]\d|2[0-3]):[0-5]\d"),
        ("Write exactly two words, both lowercase, separated by one space, and nothing else.", r"[a-z]+ [a-z]+"),
        ('Answer with a JSON object with the single key "ok" set to true, and nothing else.',
         r'\{\s*"ok"\s*:\s*true\s*\}'),
        ("Write the numbers from 1 to 5 separated by commas, and nothing else.", r"1, ?2, ?3, ?4, ?5"),
    ]
    return [SearchTask(f"format-{i}", user(text), "regex", pattern) for i, (text, pattern) in enumerate(items)]


STEP_BY_STEP = "Solve it step by step, one short step per paragraph, and end with: The answer is <number>."

NAMES = ["Sam", "Mia", "Leo", "Ana", "Tom", "Eva", "Max", "Zoe"]
THINGS = ["apples", "stickers", "marbles", "books", "coins", "pencils", "cards", "shells"]


def word_problems(rng: random.Random, n: int) -> list[SearchTask]:
    """Word problems with small numbers, of one to three operations, answered step by step."""
    tasks = []
    for i in range(n):
        name, thing = rng.choice(NAMES), rng.choice(THINGS)
        a, b, c, k = rng.randint(5, 20), rng.randint(2, 12), rng.randint(1, 5), rng.randint(2, 4)
        form = i % 6
        if form == 4:
            text, value = f"{name} has {a} {thing} and buys {b} more.", a + b
        elif form == 5:
            text, value = f"{name} has {a + b} {thing} and gives {b} to a friend.", a
        elif form == 0:
            text, value = f"{name} has {a} {thing}. {name} buys {b} more and then gives away {c}.", a + b - c
        elif form == 1:
            text, value = f"{name} has {a} {thing} and gets {k} times as many from a friend.", a + k * a
        elif form == 2:
            text, value = (f"{name} buys {k} bags with {b} {thing} in each bag and already had {a} {thing}.",
                           k * b + a)
        else:
            text, value = (f"{name} has {a + b} {thing}, loses {b}, and then buys {k} packs of {c}.",
                           a + k * c)
        question = f"{text} How many {thing} does {name} have now? {STEP_BY_STEP}"
        tasks.append(SearchTask(f"word-{i}", user(question), "number", value))
    return tasks


def gsm8k(path: Path, n: int, skip: int = 0) -> list[SearchTask]:
    """Grade-school math word problems (GSM8K, through Spec-Bench's math_reasoning questions): the
    reference's final ``#### N`` is the answer."""
    tasks = []
    for line in path.read_text().splitlines():
        record = json.loads(line)
        if record.get("category") != "math_reasoning" or not record.get("reference"):
            continue
        answer = record["reference"][0].rsplit("####", 1)[-1].strip().replace(",", "")
        if not answer.lstrip("-").isdigit():
            continue
        tasks.append(SearchTask(f"gsm8k-{record['question_id']}", user(f"{record['turns'][0]} {STEP_BY_STEP}"),
                                "number", int(answer), source=f"GSM8K via Spec-Bench {path.name} (MIT / Apache-2.0), "
                                f"question {record['question_id']}"))
        if len(tasks) >= skip + n:
            break
    return tasks[skip:]


def tau_tool_calls(path: Path, n: int) -> list[SearchTask]:
    """Next tool call right after a user message in recorded tau-bench conversations."""
    trajectories = json.loads(path.read_text())
    tasks, seen = [], set()
    for t, record in enumerate(trajectories):
        traj = record["traj"]
        for i in range(2, len(traj)):
            msg, prev = traj[i], traj[i - 1]
            calls = msg.get("tool_calls") or []
            if msg["role"] != "assistant" or len(calls) != 1 or prev["role"] != "user":
                continue
            function = calls[0]["function"]
            arguments = json.loads(function["arguments"])
            key = (function["name"], json.dumps(arguments, sort_keys=True))
            if function["name"] not in TOOLS_KEPT or key in seen or len(prev["content"] or "") > 400:
                continue
            seen.add(key)
            messages = [{"role": "system", "content": TOOL_HELP}, {"role": "user", "content": prev["content"]}]
            tasks.append(SearchTask(f"tau-{t}-{i}", messages, "tool_call",
                                    {"name": function["name"], "arguments": arguments},
                                    source=f"tau-bench {path.name} (MIT, Sierra), trajectory {t} message {i}"))
            if len(tasks) >= n:
                return tasks
    return tasks


def unique(tasks: list[SearchTask]) -> list[SearchTask]:
    """The first task of each prompt (seeded generators can repeat one)."""
    seen: dict[str, SearchTask] = {}
    for task in tasks:
        seen.setdefault(json.dumps(task.messages, sort_keys=True), task)
    return list(seen.values())


@torch.inference_mode()
def measure(model, tokenizer, task: SearchTask, samples: int, max_new_tokens: int, seed: int) -> list[str]:
    """``samples`` completions of one task: HF generate, temperature 1.0, seeded."""
    ids = tokenizer.apply_chat_template(task.messages, add_generation_prompt=True, return_tensors="pt",
                                        return_dict=True)
    torch.manual_seed(seed)
    out = model.generate(**ids, do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
                         num_return_sequences=samples, max_new_tokens=max_new_tokens,
                         pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    return tokenizer.batch_decode(out[:, ids["input_ids"].shape[1]:], skip_special_tokens=True)


def measure_search(engine, task: SearchTask, samples: int, max_new_tokens: int, seed: int) -> list[str]:
    """``samples`` completions of one task through ``engine.search`` best-of-N (each an exact sample
    at temperature 1.0, as HF ``generate``; faster on long answers)."""
    result = engine.search(task.messages, width=samples, policy="best_of_n", max_new_tokens=max_new_tokens,
                           max_step_tokens=max_new_tokens, temperature=1.0, seed=seed)
    return [t.text for t in result.trajectories]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tau", type=Path, help="tau-bench airline trajectories (gpt-4o-airline.json)")
    parser.add_argument("--out", type=Path, default=Path("src/agentspec/samples/search_tasks.jsonl"))
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--arithmetic", type=int, default=25)
    parser.add_argument("--strings", type=int, default=16)
    parser.add_argument("--tool-calls", type=int, default=20)
    parser.add_argument("--word-problems", type=int, default=16)
    parser.add_argument("--gsm8k", type=Path, help="Spec-Bench question.jsonl (its math_reasoning questions are GSM8K)")
    parser.add_argument("--gsm8k-count", type=int, default=16)
    parser.add_argument("--gsm8k-skip", type=int, default=0, help="skip the first N GSM8K questions")
    parser.add_argument("--engine", action="store_true",
                        help="sample through agentspec's engine.search best-of-N instead of HF generate")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--min-pass1", type=float, default=0.05)
    parser.add_argument("--max-pass1", type=float, default=0.60)
    parser.add_argument("--min-gain", type=float, default=0.25, help="pass@k - pass@1 at least this")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kinds", default="arithmetic,strings,formats,tau",
                        help="candidate families to generate (comma-separated)")
    parser.add_argument("--append", action="store_true", help="add the kept tasks to --out instead of replacing it")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rng = random.Random(args.seed)
    kinds = set(args.kinds.split(","))
    candidates = ((arithmetic(rng, args.arithmetic) if "arithmetic" in kinds else [])
                  + (strings(rng, args.strings) if "strings" in kinds else [])
                  + (formats() if "formats" in kinds else [])
                  + (word_problems(rng, args.word_problems) if "words" in kinds else []))
    if args.gsm8k and "gsm8k" in kinds:
        candidates += gsm8k(args.gsm8k, args.gsm8k_count, args.gsm8k_skip)
    if args.tau and "tau" in kinds:
        print(f"reading recorded tool calls from {args.tau}", file=sys.stderr)
        candidates += tau_tool_calls(args.tau, args.tool_calls)
    if args.append and args.out.exists():
        known = {t.id for t in load_tasks(args.out)}
        for task in candidates:  # a later seed must not reuse an earlier run's ids
            task.id = task.id if task.id not in known else f"{task.id}-s{args.seed}"
    if args.engine:
        engine = Engine.from_pretrained(store="memory")
    else:
        model, tokenizer = load_model()
    kept, t0 = [], time.perf_counter()
    for i, task in enumerate(candidates):
        if args.engine:
            texts = measure_search(engine, task, args.samples, args.max_new_tokens, args.seed + i)
        else:
            texts = measure(model, tokenizer, task, args.samples, args.max_new_tokens, args.seed + i)
        correct = sum(task.check(t) for t in texts)
        p1, pk = correct / args.samples, pass_at_k(args.samples, correct, args.samples)
        keep = args.min_pass1 <= p1 <= args.max_pass1 and pk - p1 >= args.min_gain
        task.measured = {"samples": args.samples, "correct": correct, "pass@1": round(p1, 4),
                         f"pass@{args.samples}": round(pk, 4), "seed": args.seed + i,
                         "max_new_tokens": args.max_new_tokens}
        print(f"[{time.perf_counter() - t0:6.0f}s] {task.id:14s} {correct:2d}/{args.samples} "
              f"{'kept' if keep else '    '} {texts[0][:60]!r}", file=sys.stderr, flush=True)
        if keep:
            kept.append(task)
    save_tasks(unique((load_tasks(args.out) if args.append and args.out.exists() else []) + kept), args.out)
    print(f"kept {len(kept)} of {len(candidates)} candidates -> {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
