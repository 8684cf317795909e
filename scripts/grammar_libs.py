"""Compare grammar libraries for constrained decoding on this CPU: per-token mask cost and rollback.

Run: ``python scripts/grammar_libs.py``. For each of xgrammar, llguidance and outlines-core: compile the
JSON schema of tau-bench's ``book_reservation`` tool (the largest) for SmolLM2's 49,152-token vocabulary,
then walk a recorded argument object token by token, computing the next-token mask at every step;
then walk it again with a rollback of one token after every step (a tree walk's pattern).
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from agentspec.engine.model import load_tokenizer

TOOLS = Path(__file__).parents[1] / "src" / "agentspec" / "samples" / "tau_bench_airline_tools.json"
ARGS = {"user_id": "mia_li_3668", "origin": "JFK", "destination": "SEA", "flight_type": "one_way",
        "cabin": "economy", "flights": [{"flight_number": "HAT136", "date": "2024-05-20"},
                                         {"flight_number": "HAT039", "date": "2024-05-20"}],
        "passengers": [{"first_name": "Mia", "last_name": "Li", "dob": "1990-04-05"}],
        "payment_methods": [{"payment_id": "certificate_7504069", "amount": 250}],
        "total_baggages": 3, "nonfree_baggages": 0, "insurance": "no"}


def mask_times(ids, fill, accept) -> list[float]:
    """Seconds ``fill()`` takes to compute the next-token mask before each token of ``ids``; each token
    is then given to ``accept(t)``, which must return true (else the walk stops with the token)."""
    times = []
    for t in ids:
        t1 = time.perf_counter()
        fill()
        times.append(time.perf_counter() - t1)
        assert accept(t), t
    return times


def schema() -> dict:
    tools = json.loads(TOOLS.read_text())
    return next(t["function"]["parameters"] for t in tools if t["function"]["name"] == "book_reservation")


def run_xgrammar(tok, ids, vocab):
    import xgrammar as xgr

    t0 = time.perf_counter()
    info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=vocab)
    compiled = xgr.GrammarCompiler(info).compile_json_schema(json.dumps(schema()), any_whitespace=False)
    compile_s = time.perf_counter() - t0
    m = xgr.GrammarMatcher(compiled)
    mask = xgr.allocate_token_bitmask(1, vocab)
    times = mask_times(ids, lambda: m.fill_next_token_bitmask(mask), m.accept_token)
    m2 = xgr.GrammarMatcher(compiled)
    ok = True
    for t in ids:  # accept, roll back, accept again: a tree walk's pattern
        ok = ok and m2.accept_token(t)
        m2.rollback(1)
        ok = ok and m2.accept_token(t)
    return compile_s, times, "rollback(n) on GrammarMatcher (any depth)", ok


def run_llguidance(tok, ids, vocab):
    import llguidance
    import llguidance.hf
    import llguidance.torch

    t0 = time.perf_counter()
    lltok = llguidance.hf.from_tokenizer(tok, n_vocab=vocab)
    separators = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
    grammar = llguidance.LLMatcher.grammar_from_json_schema(schema(), defaults=separators)
    m = llguidance.LLMatcher(lltok, grammar)
    compile_s = time.perf_counter() - t0
    mask = llguidance.torch.allocate_token_bitmask(1, vocab)
    def consume(t: int) -> bool:
        ok = m.consume_token(t)
        if not ok:
            print(f"llguidance refused token {t}: {m.get_error()}")
        return ok

    times = mask_times(ids, lambda: llguidance.torch.fill_next_token_bitmask(m, mask, 0), consume)
    m2 = llguidance.LLMatcher(lltok, grammar)
    ok = True
    for t in ids:
        ok = ok and m2.consume_token(t)
        m2.rollback(1)
        ok = ok and m2.consume_token(t)
    return compile_s, times, "rollback(n) on LLMatcher (any depth)", ok and not m2.is_error()


def run_outlines(tok, ids, vocab):
    import outlines_core as oc

    byte_of = {v: k for k, v in _bytes_to_unicode().items()}
    t0 = time.perf_counter()
    mapping: dict[bytes, list[int]] = {}
    eos = tok.eos_token_id
    for s, i in tok.get_vocab().items():
        if i == eos:
            continue
        b = bytes(byte_of[c] for c in s) if all(c in byte_of for c in s) else s.encode()
        mapping.setdefault(b, []).append(i)
    voc = oc.Vocabulary(eos, mapping)
    regex = oc.json_schema.build_regex_from_schema(json.dumps(schema()))
    index = oc.Index(regex, voc)
    compile_s = time.perf_counter() - t0
    g = oc.Guide(index, max_rollback=64)
    mask = torch.zeros((vocab + 31) // 32, dtype=torch.int32)
    times = []
    for t in ids:
        t1 = time.perf_counter()
        g.write_mask_into(mask.data_ptr(), mask.numel(), mask.element_size())
        times.append(time.perf_counter() - t1)
        g.advance(t)
    g2 = oc.Guide(index, max_rollback=64)
    for t in ids:
        g2.advance(t)
        g2.rollback_state(1)
        g2.advance(t)
    return compile_s, times, "Guide(max_rollback=k).rollback_state(n), bounded by k", True


def _bytes_to_unicode() -> dict[int, str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def main() -> None:
    torch.set_num_threads(1)
    tok = load_tokenizer()
    vocab = len(tok)
    ids = tok.encode(json.dumps(ARGS, separators=(", ", ": ")), add_special_tokens=False)
    print(f"vocab {vocab}, {len(ids)} tokens of book_reservation arguments")
    for name, fn in (("xgrammar", run_xgrammar), ("llguidance", run_llguidance), ("outlines-core", run_outlines)):
        try:
            compile_s, times, rollback, ok = fn(tok, ids, vocab)
        except Exception as exc:  # report and go on with the others
            print(f"{name}: failed: {type(exc).__name__}: {exc}")
            continue
        us = np.array(times) * 1e6
        print(f"{name}: compile {compile_s:.2f} s; mask per token median {statistics.median(us):.0f} us, "
              f"p90 {np.percentile(us, 90):.0f} us, max {us.max():.0f} us, mean {us.mean():.0f} us; "
              f"rollback: {rollback} ({'ok' if ok else 'FAILED'})")



def json_mode() -> None:
    """Mask cost for "any JSON object" (JSON mode), which outlines-core cannot express (no recursion)."""
    import llguidance
    import llguidance.hf
    import llguidance.torch
    import xgrammar as xgr

    tok = load_tokenizer()
    vocab = len(tok)
    ids = tok.encode(json.dumps(ARGS, separators=(", ", ": ")), add_special_tokens=False)
    info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=vocab)
    compiled = xgr.GrammarCompiler(info).compile_builtin_json_grammar()
    m = xgr.GrammarMatcher(compiled)
    mask = xgr.allocate_token_bitmask(1, vocab)
    xs = mask_times(ids, lambda: m.fill_next_token_bitmask(mask), m.accept_token)
    lltok = llguidance.hf.from_tokenizer(tok, n_vocab=vocab)
    lm = llguidance.LLMatcher(lltok, llguidance.LLMatcher.grammar_from_json_schema({"type": "object"}))
    ls = mask_times(ids, lambda: llguidance.torch.fill_next_token_bitmask(lm, mask, 0), lm.consume_token)
    for name, ts in (("xgrammar", xs), ("llguidance", ls)):
        us = np.array(ts) * 1e6
        print(f"JSON mode, {name}: mask per token median {np.median(us):.0f} us, p90 {np.percentile(us, 90):.0f} us, "
              f"max {us.max():.0f} us")


if __name__ == "__main__":
    main()
    json_mode()
