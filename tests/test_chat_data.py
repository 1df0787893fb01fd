"""Chat-format rows (issue 20, items 2, 3 and 12): responses go through the chat template as TRL 1.16
tokenises them (token ids compared with TRL's own `DPOTrainer._prepare_dataset`), BOS once, and a
tokenizer that cannot pad is refused before anything is written."""

from types import SimpleNamespace

import pytest

from fused_dpo.train.data import check_row, tokenize
from fused_dpo.train.models import tiny_llama

CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>'"
          " + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
# Meta-Llama-3-8B-Instruct's template, verbatim: it writes bos_token itself.
LLAMA3 = ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
          "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim"
          " + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
          "{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant"
          "<|end_header_id|>\\n\\n' }}{% endif %}")

# A template that renders the prompt alone differently from the prompt in a whole conversation (as
# Gemma 4's does with an empty thought block): the response starts where the two diverge.
THINK = CHATML.replace("'<|im_start|>assistant\\n'", "'<|im_start|>assistant\\n<think></think>'")

TEXTS = ["sort 2 1", "1 2", "2 1", "more", "be brief", "A", "B", "C", "hello there", "assistant user system"]
# What each template needs, as in the real tokenizers: Qwen2.5 (base) has no BOS and pads with its
# EOS <|endoftext|>; Llama 3 Instruct has BOS <|begin_of_text|>, EOS <|eot_id|> and no pad token.
STYLES = {
    "chatml": dict(template=CHATML, specials=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                   bos=None, eos="<|endoftext|>", pad="<|endoftext|>"),
    "llama3": dict(template=LLAMA3, specials=["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>",
                                              "<|start_header_id|>", "<|end_header_id|>"],
                   bos="<|begin_of_text|>", eos="<|eot_id|>", pad=None),
    "think": dict(template=THINK, specials=["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>",
                                            "</think>"],
                  bos=None, eos="<|endoftext|>", pad="<|endoftext|>"),
}


def make_tokenizer(template, specials, bos, eos, pad):
    """A byte-level BPE trained in memory; with a BOS, a post-processor that adds it to plain text
    (as Llama 3's does), so that a tokenisation adding special tokens on top of the template shows."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(TEXTS, trainers.BpeTrainer(
        vocab_size=120, special_tokens=specials, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if bos is not None:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token=pad)
    fast.chat_template = template
    return fast


def msg(role, content):
    return {"role": role, "content": content}


ROWS = [
    {"prompt": [msg("user", "sort 2 1")], "chosen": [msg("assistant", "1 2")],
     "rejected": [msg("assistant", "2 1")]},
    {"prompt": [msg("system", "be brief"), msg("user", "hello"), msg("assistant", "hello there"),
                msg("user", "sort 2 1")],
     "chosen": [msg("assistant", "1 2")], "rejected": [msg("assistant", "2 1 C")]},
    # multi-turn responses: a user turn inside chosen
    {"prompt": [msg("user", "sort 2 1")],
     "chosen": [msg("assistant", "A"), msg("user", "more"), msg("assistant", "B")],
     "rejected": [msg("assistant", "C")]},
]


@pytest.fixture(params=list(STYLES))
def style(request):
    return request.param, make_tokenizer(**STYLES[request.param])


def trl_tokenize(tok, rows):
    """(prompt_ids, chosen_ids, rejected_ids) of each row from TRL 1.16's own preprocessing, the
    method `DPOTrainer.__init__` calls, bound to a stand-in holding only what it reads."""
    pytest.importorskip("trl")
    from datasets import Dataset
    from trl.trainer.dpo_trainer import DPOTrainer

    stand_in = SimpleNamespace(_tokenizer=tok)
    args = SimpleNamespace(dataset_num_proc=None, max_length=None, truncation_mode="keep_start")
    ds = DPOTrainer._prepare_dataset(stand_in, Dataset.from_list(rows), tok, args, "train")
    return [(r["prompt_ids"], r["chosen_ids"], r["rejected_ids"]) for r in ds]


def test_token_ids_equal_trl(style):
    name, tok = style
    if name == "think":
        with pytest.warns(UserWarning, match="'<think></think>' is left out of the prompt"):
            ours = tokenize(ROWS, tok, max_length=512).pairs
    else:
        ours = tokenize(ROWS, tok, max_length=512).pairs
    assert ours == trl_tokenize(tok, ROWS)


def test_chatml_response_ends_with_end_of_turn():
    tok = make_tokenizer(**STYLES["chatml"])
    (p, c, r), = tokenize(ROWS[:1], tok, 512).pairs
    assert tok.decode(p) == "<|im_start|>user\nsort 2 1<|im_end|>\n<|im_start|>assistant\n"
    assert tok.decode(c) == "1 2<|im_end|>\n" and tok.decode(r) == "2 1<|im_end|>\n"


def test_multi_turn_chosen_is_templated_and_all_response():
    """TRL 1.16's rule, kept: everything after the templated prompt is response, so the user turn
    inside a multi-turn chosen is trained on too, with its template markup (not glued to the
    assistant text). To train on the last assistant turn alone, put the turns before it in the
    prompt."""
    tok = make_tokenizer(**STYLES["chatml"])
    (p, c, r), = tokenize(ROWS[2:], tok, 512).pairs
    assert tok.decode(c) == ("A<|im_end|>\n<|im_start|>user\nmore<|im_end|>\n"
                             "<|im_start|>assistant\nB<|im_end|>\n")


def test_bos_once_when_the_template_writes_it():
    tok = make_tokenizer(**STYLES["llama3"])
    for p, _, _ in tokenize(ROWS, tok, 512).pairs:
        assert p[0] == tok.bos_token_id and p.count(tok.bos_token_id) == 1, tok.decode(p)


def test_bos_added_when_the_template_lacks_it():
    """The one difference from TRL, which adds nothing to a chat template's output: a tokenizer with
    a BOS whose template does not write it gets it in front of the prompt, as its text rows do."""
    tok = make_tokenizer(**{**STYLES["chatml"], "bos": "<|endoftext|>"})
    trl = trl_tokenize(tok, ROWS)
    for (p, c, r), (tp, tc, tr) in zip(tokenize(ROWS, tok, 512).pairs, trl, strict=True):
        assert p == [tok.bos_token_id] + tp and (c, r) == (tc, tr)


def test_responses_the_template_renders_alike_are_identical():
    """Llama 3's template trims the content: "1 2" and "1 2 " are the same tokens, no pair."""
    tok = make_tokenizer(**STYLES["llama3"])
    row = {**ROWS[0], "rejected": [msg("assistant", "1 2 ")]}
    tk = tokenize([row], tok, 512)
    assert not tk.pairs and dict(tk.skipped) == {"identical chosen and rejected": 1}


def test_mixed_and_malformed_rows_are_refused():
    with pytest.raises(ValueError, match="must be all text or all chat messages"):
        check_row({"prompt": [msg("user", "a")], "chosen": " b", "rejected": " c"}, "row 0")
    with pytest.raises(ValueError, match="field 'chosen' must be a string or a list of chat messages"):
        check_row({"prompt": [msg("user", "a")], "chosen": [{"content": "b"}],
                   "rejected": [msg("assistant", "c")]}, "row 0")


def test_tokenizer_without_pad_or_eos_is_refused():
    tok = make_tokenizer(**{**STYLES["chatml"], "eos": None, "pad": None})
    with pytest.raises(ValueError, match=r"the tokenizer \w+ has neither a pad token nor an EOS"):
        tokenize(ROWS, tok, 512)
    # text responses need an EOS to end them, even with a pad token
    tok = make_tokenizer(**{**STYLES["chatml"], "eos": None})
    with pytest.raises(ValueError, match="no EOS token to end the text responses"):
        tokenize([{"prompt": "sort 2 1", "chosen": " 1 2", "rejected": " 2 1"}], tok, 512)


@pytest.mark.usefixtures("one_thread")
def test_cli_refuses_it_before_writing(tmp_path, capsys, monkeypatch):
    from fused_dpo.train import models
    from fused_dpo.train.cli import main

    tok = make_tokenizer(**{**STYLES["chatml"], "eos": None, "pad": None})
    monkeypatch.setattr(models, "load_model", lambda *a, **k: (tiny_llama(len(tok)), tok))
    out = tmp_path / "run"
    assert main(["--data", "zen", "--max-steps", "1", "--no-progress", "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: the tokenizer {type(tok).__name__} has neither") and err.count("\n") == 1
    assert not out.exists()
