"""Preference data in TRL's format (`prompt`, `chosen`, `rejected`; text or chat messages):
built-in sets, JSONL loading, tokenisation with prompt masking, and batching."""

from __future__ import annotations

import ast
import codecs
import importlib.util
import json
import random
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

FIELDS = ("prompt", "chosen", "rejected")


def synthetic_sorting(n: int = 800, seed: int = 0) -> list[dict]:
    """A task with a known right answer: the sorted list is preferred over a shuffled one.

    prompt "sort 3 1 4 1 5 ->", chosen " 1 1 3 4 5", rejected the same digits in an unsorted order.
    """
    rng = random.Random(seed)
    rows = []
    while len(rows) < n:
        xs = [rng.randrange(10) for _ in range(rng.randint(4, 6))]
        good = sorted(xs)
        bad = good[:]
        while bad == good:
            rng.shuffle(bad)
        rows.append({"prompt": "sort " + " ".join(map(str, xs)) + " ->",
                     "chosen": " " + " ".join(map(str, good)),
                     "rejected": " " + " ".join(map(str, bad))})
    return rows


def zen_pairs() -> list[dict]:
    """The 19 aphorisms of PEP 20, regenerated from the standard library's `this` module (without
    importing it, which would print them): prompt = the first half of a line, chosen = its real
    second half, rejected = the second half of the next line."""
    src = Path(importlib.util.find_spec("this").origin).read_text()
    encoded = next(n.value.value for n in ast.parse(src).body
                   if isinstance(n, ast.Assign) and n.targets[0].id == "s")
    lines = [ln for ln in codecs.decode(encoded, "rot13").splitlines()[2:] if ln.strip()]
    halves = []
    for ln in lines:
        words = ln.split()
        k = max(1, len(words) // 2)
        halves.append((" ".join(words[:k]), " " + " ".join(words[k:])))
    return [{"prompt": p, "chosen": c, "rejected": halves[(i + 1) % len(halves)][1]}
            for i, (p, c) in enumerate(halves)]


def load_jsonl(path: str | Path) -> list[dict]:
    """The rows of a JSONL file, each checked here so that an error names the file and its line
    (after the train/held-out shuffle, a row's position no longer says where it came from)."""
    rows = read_jsonl(path)
    for where, row in rows:
        check_row(row, where)
    return [row for _, row in rows]


def read_jsonl(path: str | Path) -> list[tuple[str, object]]:
    """(`path:line`, the parsed value) of each non-blank line of a JSONL file, unchecked."""
    rows = []
    try:
        f = open(path, encoding="utf-8")
    except OSError as e:
        raise ValueError(f"{path}: cannot read it ({e.strerror})") from None
    with f:
        try:
            for i, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append((f"{path}:{i}", json.loads(line)))
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{path}:{i}: not valid JSON ({e.msg})") from None
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    return rows


def load_rows(name: str, seed: int = 0) -> list[dict]:
    if name == "synthetic":
        return synthetic_sorting(seed=seed)
    if name == "zen":
        return zen_pairs()
    if Path(name).suffix == ".jsonl" and Path(name).exists():
        return load_jsonl(name)
    raise ValueError(f"--data must be synthetic, zen or an existing .jsonl file; got {name!r}")


def row_texts(rows: list[dict]) -> list[str]:
    """Every string in the rows (to train a tokenizer on)."""
    out = []
    for r in rows:
        for k in FIELDS:
            v = r.get(k)
            if isinstance(v, str):
                out.append(v)
            elif isinstance(v, list):
                out.extend(m.get("content", "") for m in v if isinstance(m, dict))
    return out


@dataclass
class Tokenized:
    pairs: list[tuple[list[int], list[int], list[int]]]  # (prompt, chosen, rejected) token ids
    skipped: Counter = field(default_factory=Counter)  # reason -> count

    def report(self) -> str:
        if not self.skipped:
            return f"{len(self.pairs)} pairs, none skipped"
        reasons = ", ".join(f"{n} {why}" for why, n in sorted(self.skipped.items()))
        return f"{len(self.pairs)} pairs kept; skipped {sum(self.skipped.values())}: {reasons}"


def check_row(row, where: str) -> None:
    """A preference row is an object with prompt, chosen and rejected: all three strings, or all
    three lists of chat messages ({"role": ..., "content": ...}). `where` names the row in the
    error."""
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected an object with {FIELDS}, got {type(row).__name__}")
    missing = [k for k in FIELDS if k not in row]
    if missing:
        raise ValueError(f"{where}: missing field(s) {missing}; each row needs {FIELDS}")
    for k in FIELDS:
        v = row[k]
        if not (isinstance(v, str) or (isinstance(v, list) and all(
                isinstance(m, dict) and isinstance(m.get("role"), str)
                and isinstance(m.get("content"), str) for m in v))):
            raise ValueError(f"{where}: field {k!r} must be a string or a list of chat messages "
                             f"(each with a string role and content), got {type(v).__name__}")
    kinds = {k: "text" if isinstance(row[k], str) else "messages" for k in FIELDS}
    if len(set(kinds.values())) > 1:
        # a text response after a templated prompt would have no end-of-turn of the template
        raise ValueError(f"{where}: prompt, chosen and rejected must be all text or all chat "
                         f"messages, got {kinds}")


def _name(tok) -> str:
    path = getattr(tok, "name_or_path", "")
    return type(tok).__name__ + (f" ({path!r})" if path else "")


def pad_id(tok) -> int:
    """The id to pad batches with: the tokenizer's pad token, else its EOS (as TRL does). A
    ValueError naming the tokenizer if it has neither."""
    for token_id in (tok.pad_token_id, tok.eos_token_id):
        if token_id is not None:
            return token_id
    raise ValueError(f"the tokenizer {_name(tok)} has neither a pad token nor an EOS token: set one "
                     f"(e.g. tokenizer.pad_token = ...) before training")


def _chat_ids(tok, messages: list[dict], generation_prompt: bool = False) -> list[int]:
    # Token ids as the template writes them: no special tokens added on top (those it needs, such
    # as Llama 3's BOS, it emits itself), as TRL's `_tokenize` does.
    return tok.apply_chat_template(messages, tokenize=True, return_dict=True,
                                   add_generation_prompt=generation_prompt)["input_ids"]


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _chat_pair(tok, row: dict) -> tuple[list[int], list[int], list[int], list[int]]:
    """(prompt, chosen, rejected, dropped prompt tail) ids of a chat row, as TRL 1.16 tokenises
    it: the prompt with the generation prompt, and prompt + response as one conversation, whose
    response is what follows the common prefix of the two. Every token after the prompt is
    response, including any user turn inside a multi-turn `chosen` (TRL's completion mask)."""
    prompt = _chat_ids(tok, row["prompt"], generation_prompt=True)
    chosen = _chat_ids(tok, row["prompt"] + row["chosen"])
    rejected = _chat_ids(tok, row["prompt"] + row["rejected"])
    # A template may render the prompt alone differently (e.g. an empty thought block that the
    # whole conversation drops): the response then starts where they diverge.
    n = min(_common_prefix(prompt, chosen), _common_prefix(prompt, rejected))
    return prompt[:n], chosen[n:], rejected[n:], prompt[n:]


def _is_empty(value) -> bool:
    return not (value if isinstance(value, str) else "".join(m["content"] for m in value)).strip()


def tokenize(rows: list[dict], tok, max_length: int, truncation_side: str = "left") -> Tokenized:
    """Tokenise preference rows; a row that cannot make a valid pair is counted, never dropped
    silently. A row missing a field is an error (the data set is malformed).

    Text rows: BOS (if the tokenizer has one) + prompt, and each response + EOS. Chat rows go
    through the tokenizer's chat template as TRL does (`_chat_pair`), the responses ending in the
    template's end of turn; BOS is added only where the templated prompt does not start with it."""
    pad_id(tok)  # here, before any run directory is made, not in the first batch's collate
    out = Tokenized([])
    bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
    eos = tok.eos_token_id
    warned = False
    for i, row in enumerate(rows):
        check_row(row, f"row {i}")
        if _is_empty(row["chosen"]) or _is_empty(row["rejected"]):
            out.skipped["empty response"] += 1
            continue
        if isinstance(row["prompt"], str):
            if eos is None:
                raise ValueError(f"the tokenizer {_name(tok)} has no EOS token to end the text "
                                 f"responses with (row {i}): set tokenizer.eos_token")
            pi = bos + tok(row["prompt"], add_special_tokens=False)["input_ids"]
            ci, ri = (tok(row[k], add_special_tokens=False)["input_ids"] + [eos]
                      for k in ("chosen", "rejected"))
        else:
            pi, ci, ri, dropped = _chat_pair(tok, row)
            if dropped and not warned:
                warned = True
                warnings.warn(f"row {i}: the templated prompt is not a prefix of the templated "
                              f"prompt + response; the response starts where they diverge and "
                              f"{tok.decode(dropped)!r} is left out of the prompt", stacklevel=2)
            if bos and pi[:1] != bos:
                pi = bos + pi
        if ci == ri:  # compared as tokens: a template may render different messages alike (trim)
            out.skipped["identical chosen and rejected"] += 1
            continue
        if len(pi) + 1 > max_length:
            out.skipped["prompt longer than max_length"] += 1
            continue
        over = len(pi) + max(len(ci), len(ri)) - max_length
        if over > 0:
            if truncation_side == "left" and len(pi) - over >= 1:
                pi = pi[over:]
            else:
                room = max_length - len(pi)
                ci, ri = ci[:room], ri[:room]
            if ci == ri:
                out.skipped["identical after truncation"] += 1
                continue
        out.pairs.append((pi, ci, ri))
    return out


def collate(pairs, pad_id: int, packed: bool = False) -> dict[str, torch.Tensor]:
    """[chosen_0..chosen_{B-1}; rejected_0..rejected_{B-1}], right-padded, with the response mask;
    or with `packed`, the same sequences in one row without padding (`collate_packed`)."""
    if packed:
        return collate_packed(pairs)
    seqs = [(p, c) for p, c, _ in pairs] + [(p, r) for p, _, r in pairs]
    L = max(len(p) + len(x) for p, x in seqs)
    ids = torch.full((len(seqs), L), pad_id, dtype=torch.long)
    attn = torch.zeros((len(seqs), L), dtype=torch.long)
    resp = torch.zeros((len(seqs), L), dtype=torch.bool)
    for k, (p, x) in enumerate(seqs):
        n = len(p) + len(x)
        ids[k, :n] = torch.tensor(p + x)
        attn[k, :n] = 1
        resp[k, len(p) : n] = True
    return {"input_ids": ids, "attention_mask": attn, "response_mask": resp}


def collate_packed(pairs) -> dict[str, torch.Tensor]:
    """The same 2B sequences as `collate`, packed into one row of their real tokens (no padding):
    input_ids and response_mask (1, total_T), and attention_mask (1, total_T) holding each token's
    sequence number, 1 to 2B (the packed-batch convention of sample packing: nonzero on every real
    token, so `attention_mask > 0` still counts them). `packing(attention_mask)` turns it into the
    position_ids that restart at 0 for each sequence and the cu_seqlens (2B + 1,) of the ops."""
    seqs = [(p, c) for p, c, _ in pairs] + [(p, r) for p, _, r in pairs]
    ids, seq, resp = [], [], []
    for k, (p, x) in enumerate(seqs, 1):
        ids += p + x
        seq += [k] * (len(p) + len(x))
        resp += [False] * len(p) + [True] * len(x)
    return {"input_ids": torch.tensor([ids], dtype=torch.long),
            "attention_mask": torch.tensor([seq], dtype=torch.long),
            "response_mask": torch.tensor([resp], dtype=torch.bool)}


def packing(seq_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(position_ids (1, total_T) long, cu_seqlens (S + 1,) int32) of a packed row whose tokens carry
    their sequence number (`collate_packed`'s attention_mask). One host sync (the number of
    sequences), as transformers' own packed-sequence detection has."""
    if seq_ids.dim() != 2 or seq_ids.shape[0] != 1:
        raise ValueError(f"a packed batch is one row (1, total_T); got attention_mask of shape "
                         f"{tuple(seq_ids.shape)}")
    row = seq_ids[0]
    n = row.shape[0]
    idx = torch.arange(n, device=row.device)
    start = torch.ones_like(row, dtype=torch.bool)
    start[1:] = row[1:] != row[:-1]
    # Each token's distance from the first token of its sequence.
    first = torch.where(start, idx, torch.zeros_like(idx)).cummax(0).values
    cu = torch.cat([idx[start], idx.new_full((1,), n)]).to(torch.int32)
    return (idx - first)[None], cu
