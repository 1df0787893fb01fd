"""--model and --data from the HF ecosystem (issue 21), offline: hub ids served from a local HF cache
that the tests write (HF_HUB_OFFLINE=1), data files in every format datasets reads, folders written
by save_to_disk, TRL's formats (implicit prompts as trl.data_utils.extract_prompt takes them), and
the one-line errors that name the file and the row."""

import csv
import json
import shutil
import types
from pathlib import Path

import pytest
import torch
from helpers import one_error_line, put_snapshot

from fused_dpo.train import rundir
from fused_dpo.train.cli import main as train
from fused_dpo.train.data import tokenize, zen_pairs
from fused_dpo.train.models import CHAT_TEMPLATE, load_model, tiny_llama, train_tokenizer
from fused_dpo.train.sources import hub_model_error, read_rows

datasets = pytest.importorskip("datasets")

# The models here are tiny: one intra-op thread (conftest's `one_thread`).
pytestmark = pytest.mark.usefixtures("one_thread")

QUICK = ["--max-steps", "1", "--batch-size", "2", "--max-length", "32", "--no-progress"]
TEXT = zen_pairs()[:10]  # explicit prompt, strings
SYS = {"role": "system", "content": "Answer in one word."}


def user(text):
    return {"role": "user", "content": text}


def bot(text):
    return {"role": "assistant", "content": text}


# explicit prompt, conversational: a system turn, and a multi-turn prompt; one message with a key
# the others lack (arrow fills it with None in every other message, which must not come back)
CHAT = [{"prompt": [SYS, user(f"colour {i}?")], "chosen": [bot("blue")], "rejected": [bot("red")]}
        for i in range(4)] + [
    {"prompt": [user("hi"), bot("hello"), user("sky?")], "chosen": [bot("blue")],
     "rejected": [{"role": "assistant", "content": "green", "name": "bot2"}]}]


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """HF_HUB_OFFLINE=1 with empty caches under tmp_path. huggingface_hub and datasets read these
    variables when imported: their constants are patched too."""
    from huggingface_hub import constants

    hub, cache = tmp_path / "hf" / "hub", tmp_path / "hf" / "datasets"
    for k, v in {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(hub), "HF_DATASETS_CACHE": str(cache)}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub))
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    monkeypatch.setattr(datasets.config, "DOWNLOADED_DATASETS_PATH", cache / "downloads")
    return types.SimpleNamespace(hub=hub, datasets=cache)


def write(path: Path, rows: list[dict]) -> Path:
    """rows as `path` in the format its suffix names (datasets writes parquet, as users do)."""
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows))
    elif path.suffix == ".csv":
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    elif path.suffix == ".parquet":
        datasets.Dataset.from_list(rows).to_parquet(path)
    else:
        datasets.Dataset.from_list(rows).save_to_disk(path)
    return path


def run_dir_sources(out: Path) -> dict:
    return rundir.read_run_json(out)["sources"]


# -- models: hub ids from the HF cache ----------------------------------------------------------

MAIN, V2 = "a" * 40, "b" * 40  # commit hashes of two snapshots
CUSTOM_TEMPLATE = ("{% for m in messages %}[{{ m['role'] }}]: {{ m['content'] }}"
                   "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}\n{% endfor %}"
                   "{% if add_generation_prompt %}[assistant]: {% endif %}")


@pytest.fixture
def hub_model(offline):
    """org/tiny in the cache: main (seed 0, the custom chat template) and the tag v2 (seed 1)."""
    tok = train_tokenizer([t for r in TEXT for t in r.values()] + ["[user]: [assistant]: colour"])
    tok.chat_template = CUSTOM_TEMPLATE
    models = {MAIN: tiny_llama(len(tok), seed=0, hidden=32), V2: tiny_llama(len(tok), seed=1, hidden=32)}
    put_snapshot(offline.hub, "org/tiny", MAIN, models[MAIN], tok, "main")
    put_snapshot(offline.hub, "org/tiny", V2, models[V2], tok, "v2")
    return models


def same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_hub_model_trains_by_id_offline(tmp_path, capsys, hub_model):
    out = tmp_path / "run"
    assert train(["--model", "org/tiny", "--data", "zen", "--output-dir", str(out)] + QUICK) == 0
    assert "model: org/tiny (LlamaForCausalLM)" in capsys.readouterr().out
    assert run_dir_sources(out)["model"] == "org/tiny"


def test_revision_picks_the_snapshot(tmp_path, capsys, hub_model):
    quiet = {"say": lambda s: None}
    assert same_weights(load_model("org/tiny", [], 0, **quiet)[0], hub_model[MAIN])
    assert same_weights(load_model("org/tiny", [], 0, revision="v2", **quiet)[0], hub_model[V2])
    assert same_weights(load_model("org/tiny", [], 0, revision=V2, **quiet)[0], hub_model[V2])
    assert not same_weights(hub_model[MAIN], hub_model[V2])  # the check above can fail
    out = tmp_path / "run"
    assert train(["--model", "org/tiny", "--revision", "v2", "--data", "zen", "--output-dir", str(out)]
                 + QUICK) == 0
    assert run_dir_sources(out)["revision"] == "v2"


def test_the_tokenizers_own_chat_template_is_used(hub_model):
    _, tok = load_model("org/tiny", [], 0, say=lambda s: None)
    assert tok.chat_template == CUSTOM_TEMPLATE
    row = CHAT[0]
    (prompt, chosen, _), = tokenize([row], tok, max_length=256).pairs

    def ids(messages, gen=False):
        return tok.apply_chat_template(messages, tokenize=True, return_dict=True,
                                       add_generation_prompt=gen)["input_ids"]
    assert prompt == [tok.bos_token_id] + ids(row["prompt"], gen=True)
    assert tok.decode(prompt).endswith("[assistant]: ")
    assert prompt + chosen == [tok.bos_token_id] + ids(row["prompt"] + row["chosen"])
    tok.chat_template = CHAT_TEMPLATE  # the built-in template tokenises the same row otherwise
    assert tokenize([row], tok, max_length=256).pairs[0][0] != prompt
    assert train_tokenizer(["a b"]).chat_template == CHAT_TEMPLATE  # what `tiny` gets


@pytest.mark.parametrize("flags,text", [
    (["--model", "org/missing"], ["--model org/missing: no such local directory, and not in the local HF "
                                  "cache", "HF_HUB_OFFLINE is set", "hf download org/missing"]),
    (["--model", "org/tiny", "--revision", "nope"], ["--model org/tiny (revision nope): ",
                                                     "not in the local HF cache"]),
    (["--revision", "v2"], ["--revision v2: it chooses a version of a hub model; --model tiny is not"]),
    (["--model", "./no/such/model"], ["--model ./no/such/model: no such directory"]),
], ids=["missing-id", "missing-revision", "revision-of-tiny", "missing-path"])
def test_model_source_errors(tmp_path, capsys, hub_model, flags, text):
    capsys.readouterr()  # transformers' "Writing model shards" bars
    out = tmp_path / "run"
    assert train(flags + ["--data", "zen", "--output-dir", str(out)] + QUICK) == 2
    one_error_line(capsys, *text)
    assert not out.exists()


def test_hub_model_that_cannot_be_downloaded_online_is_one_line(offline, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    error = OSError("We couldn't connect to 'https://huggingface.co' to load the files.\nCheck your "
                    "internet connection")
    msg = str(hub_model_error("org/missing", None, error))
    assert "not in the local HF cache" in msg and "downloading it failed" in msg
    assert "We couldn't connect" in msg and "\n" not in msg


# -- data: every format --------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["pairs.json", "pairs.jsonl", "pairs.parquet", "pairs.csv", "saved"])
def test_every_format_reads_the_rows_back(tmp_path, offline, name):
    extra = [{**r, "score": i, "source": "zen"} for i, r in enumerate(TEXT)]  # extra columns dropped
    assert read_rows(str(write(tmp_path / name, extra))) == TEXT
    if name != "pairs.csv":  # a CSV holds strings only
        assert read_rows(str(write(tmp_path / ("chat-" + name), CHAT))) == CHAT


def test_a_saved_dataset_dict_trains_on_train_and_evaluates_on_eval_split(tmp_path, capsys, offline):
    folder = tmp_path / "dd"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(TEXT[:7]),
                          "test": datasets.Dataset.from_list(TEXT[7:])}).save_to_disk(folder)
    out = tmp_path / "run"
    assert train(["--data", str(folder), "--eval-split", "test", "--output-dir", str(out)] + QUICK) == 0
    assert f"data {folder}: 7 train / 3 held-out pairs" in capsys.readouterr().out
    assert run_dir_sources(out)["eval_split"] == "test"


def test_eval_data_file_and_eval_fraction(tmp_path, capsys, offline):
    data, held = write(tmp_path / "train.parquet", TEXT), write(tmp_path / "held.json", TEXT[:3])
    out = tmp_path / "run"
    assert train(["--data", str(data), "--eval-data", str(held), "--output-dir", str(out)] + QUICK) == 0
    assert f"data {data}: 10 train / 3 held-out pairs" in capsys.readouterr().out
    out2 = tmp_path / "run2"  # without --eval-data: eval_fraction (0.2) of --data, as before
    assert train(["--data", str(data), "--output-dir", str(out2)] + QUICK) == 0
    assert f"data {data}: 8 train / 2 held-out pairs" in capsys.readouterr().out


def put_hub_dataset(cache: Path, repo: str, config: str, splits: dict[str, list[dict]], tmp: Path):
    """A hub dataset as datasets' cache holds it after a download (org___name/<config>/<version>/
    <hash>/, which offline `load_dataset(repo, config)` serves), built here from JSONL files."""
    from datasets.packaged_modules.json.json import Json

    files = {s: str(write(tmp / f"{s}.jsonl", rows)) for s, rows in splits.items()}
    name = repo.split("/")[1]
    Json(cache_dir=str(cache), dataset_name=name, config_name=config, config_id=config, hash="0123abcd",
         data_files=files).download_and_prepare()
    shutil.move(cache / name, cache / repo.replace("/", "___"))


def test_hub_dataset_from_the_cache_with_config_and_splits(tmp_path, capsys, offline):
    put_hub_dataset(offline.datasets, "org/prefs", "pairs", {"train": TEXT[:6], "test": TEXT[6:]}, tmp_path)
    capsys.readouterr()
    out = tmp_path / "run"
    assert train(["--data", "org/prefs", "--data-config", "pairs", "--data-split", "train",
                  "--eval-split", "test", "--output-dir", str(out)] + QUICK) == 0
    assert "data org/prefs: 6 train / 4 held-out pairs" in capsys.readouterr().out
    assert read_rows("org/prefs", config="pairs", split="test") == TEXT[6:]
    assert train(["--data", "org/prefs", "--data-config", "other", "--output-dir", str(tmp_path / "r2")]
                 + QUICK) == 2
    one_error_line(capsys, "--data org/prefs: Couldn't find cache for org/prefs for config 'other'")


# -- data: TRL's formats -------------------------------------------------------------------------

def test_implicit_prompt_is_trls_extract_prompt(tmp_path, offline):
    trl_data = pytest.importorskip("trl.data_utils")
    text = [{"chosen": "Q: what is 2+2? A: 4", "rejected": "Q: what is 2+2? A: 5"},  # the space rule
            {"chosen": "The cat sat", "rejected": "The car sat"},  # mid-word, by characters
            {"chosen": "Hello there", "rejected": "Hello there, friend"}]  # one a prefix of the other
    chat = [{"chosen": [SYS, user("sky?"), bot("blue")], "rejected": [SYS, user("sky?"), bot("green")]},
            {"chosen": [user("a"), bot("b"), user("c"), bot("d")],
             "rejected": [user("a"), bot("b"), user("c"), bot("e")]},
            {"chosen": [user("a"), bot("b"), user("c"), bot("d")],  # a multi-turn response
             "rejected": [user("a"), bot("x"), user("c"), bot("d")]}]
    for rows, name in ((text, "text.jsonl"), (text, "text.parquet"), (chat, "chat.parquet"),
                       (chat, "chat.jsonl")):
        got = read_rows(str(write(tmp_path / name, rows)))
        assert got == [trl_data.extract_prompt(r) for r in rows], name
    assert got[0]["prompt"] == [SYS, user("sky?")] and read_rows(str(tmp_path / "text.jsonl"))[0] == {
        "prompt": "Q: what is 2+2? A:", "chosen": " 4", "rejected": " 5"}
    # a text prompt beside whole conversations (as in ultrafeedback_binarized): taken from them
    ultra = [{"prompt": "sky?", **chat[0]}]
    assert read_rows(str(write(tmp_path / "u.json", ultra))) == [trl_data.maybe_extract_prompt(ultra[0])]


def test_system_and_multi_turn_prompts_tokenise_through_the_template(tmp_path, offline):
    tok = train_tokenizer(["colour blue red sky hello green hi answer in one word"] * 4)
    rows = read_rows(str(write(tmp_path / "chat.parquet", CHAT)))
    pairs = tokenize(rows, tok, max_length=256).pairs
    assert len(pairs) == len(CHAT)
    for row, (prompt, _, _) in zip(CHAT, pairs, strict=True):
        want = tok.apply_chat_template(row["prompt"], tokenize=True, return_dict=True,
                                       add_generation_prompt=True)["input_ids"]
        assert prompt == [tok.bos_token_id] + want
    multi = tok.decode(pairs[-1][0])
    assert multi.startswith("<s><|user|>hi") and multi.endswith("<|assistant|>hello</s><|user|>sky?"
                                                                  "<|assistant|>")
    assert tok.decode(pairs[0][0]).startswith("<s><|system|>Answer in one word.")


# -- data: errors name the file and the row ----------------------------------------------------------

def test_row_errors_name_the_file_and_row(tmp_path, capsys, offline):
    bad = [dict(r) for r in TEXT]
    del bad[7]["rejected"]  # the column exists: arrow gives row 7 a None
    cases = [(write(tmp_path / "pairs.parquet", bad), "row 7: missing field(s) ['rejected']")]
    bad = [dict(r) for r in TEXT]
    bad[3]["chosen"] = 5
    cases.append((write(tmp_path / "pairs.json", bad), "row 3: field 'chosen' must be a string or a list"))
    cases.append((write(tmp_path / "two.csv", [{"prompt": "a", "chosen": "b"}]),
                  ": no 'rejected' column (its columns: prompt, chosen)"))
    no_prompt = [dict(r) for r in TEXT]
    del no_prompt[2]["prompt"]  # in a set with prompts, a row without one is not guessed at
    cases.append((write(tmp_path / "np.jsonl", no_prompt), ":3: missing field(s) ['prompt']"))
    cases.append((write(tmp_path / "alike.jsonl", [{"chosen": "yes", "rejected": "no"}]),
                  ":1: no prompt, and chosen and rejected do not start alike"))
    (tmp_path / "broken.json").write_text('[{"prompt": "a",')
    cases.append((tmp_path / "broken.json", ": cannot read it"))
    capsys.readouterr()  # datasets' "Creating parquet" bar
    for path, text in cases:
        assert train(["--data", str(path), "--output-dir", str(tmp_path / "run")] + QUICK) == 2
        one_error_line(capsys, f"{path}{text}" if text.startswith(":") else f"{path} {text}")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("flags,text", [
    (["--data", "{tmp}/none.parquet"], "--data {tmp}/none.parquet: no such file"),
    (["--data", "./no/such/folder"], "--data ./no/such/folder: no such file or directory"),
    (["--data", "org/missing"], "--data org/missing: no such file or directory, and not a dataset in the "
                                "local HF cache"),
    (["--data", "{tmp}/notes.txt"], "--data {tmp}/notes.txt: a .txt file; --data is synthetic, zen, a .json"),
    (["--eval-data", "{tmp}/none.csv"], "--eval-data {tmp}/none.csv: no such file"),
    (["--data", "{tmp}/dd", "--eval-split", "valid"], "no split 'valid'; its splits are ['train', 'test']"),
    (["--data", "{tmp}/dd", "--eval-split", "train"], "--eval-split train is the split trained on"),
    (["--data", "{tmp}/p.json", "--data-split", "test"], "--data-split test: --data {tmp}/p.json is a file"),
    (["--data", "{tmp}/p.json", "--eval-split", "test"], "give the held-out set as --eval-data"),
    (["--data", "zen", "--data-config", "x"], "--data-config x: it chooses a configuration of a hub"),
], ids=["missing-file", "missing-folder", "missing-hub-id", "txt", "missing-eval", "unknown-split",
        "eval-is-train", "split-of-file", "eval-split-of-file", "config-of-zen"])
def test_data_source_errors(tmp_path, capsys, offline, flags, text):
    (tmp_path / "notes.txt").write_text("x")
    write(tmp_path / "p.json", TEXT)
    datasets.DatasetDict({"train": datasets.Dataset.from_list(TEXT[:5]),
                          "test": datasets.Dataset.from_list(TEXT[5:])}).save_to_disk(tmp_path / "dd")
    capsys.readouterr()
    out = tmp_path / "run"
    assert train([f.format(tmp=tmp_path) for f in flags] + ["--output-dir", str(out)] + QUICK) == 2
    one_error_line(capsys, text.format(tmp=tmp_path))
    assert not out.exists()
