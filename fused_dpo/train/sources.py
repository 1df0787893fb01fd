"""Where the model and the data come from (run.json's "sources"), besides the built-in `tiny` and
`smollm2` models and the `synthetic` and `zen` sets: a hub id (resolved by transformers / datasets,
served from the local HF cache under HF_HUB_OFFLINE=1), a local folder, or a data file.

--data is read here into preference rows in TRL's formats: standard (strings) or conversational
(lists of {role, content}), with an explicit `prompt` or an implicit one (no prompt column: the
shared start of chosen and rejected is the prompt, TRL's `extract_prompt`). Extra columns are
dropped. Every row is checked (`data.check_row`) with an error that names where it came from:
`pairs.jsonl:7` (a JSONL line, read by data.py's own reader), `pairs.parquet row 6` (the
0-based index into the table, `dataset[6]`) or `org/name [train] row 6`."""

from __future__ import annotations

import contextlib
import random
from pathlib import Path

from .data import FIELDS, check_row, load_rows, read_jsonl

BUILTIN_MODELS = ("tiny", "smollm2")
BUILTIN_DATA = ("synthetic", "zen")
# A data file's suffix -> the datasets builder that reads it (.jsonl goes to data.read_jsonl).
DATA_FILES = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}
FORMS = ("synthetic, zen, a .json, .jsonl, .parquet or .csv file, a folder (Dataset.save_to_disk, or "
         "of data files) or a hub dataset id")
# The kinds of --data (`data_kind`), and which of them hold named splits.
BUILTIN = "builtin"  # synthetic, zen
FILE = "file"
DATASET = "dataset"  # a folder written by Dataset.save_to_disk
DATASET_DICT = "dataset_dict"  # ... by DatasetDict.save_to_disk
FOLDER = "folder"  # any other folder: its data files, as load_dataset(folder) finds them
HUB = "hub"
_WITH_SPLITS = (DATASET_DICT, FOLDER, HUB)
_DESCRIBED = {BUILTIN: "a built-in set", FILE: "a file", DATASET: "one saved Dataset (save_to_disk)",
              DATASET_DICT: "a saved DatasetDict", FOLDER: "a folder of data files", HUB: "a hub dataset"}


def hub_id(name: str) -> bool:
    """`name` is read as a hub id: no such local path, and in the hub's `name` or `org/name` form
    (which a path written as ./x, /x, ~/x or a/b/c is not)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if Path(name).expanduser().exists():
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


# -- models -------------------------------------------------------------------------------------

def check_revision(model: str, revision: str | None) -> None:
    """A --revision is a version of a hub model: refused for any other --model."""
    if revision is not None and (model in BUILTIN_MODELS or not hub_id(model)):
        raise ValueError(f"--revision {revision}: it chooses a version of a hub model; --model {model} "
                         f"is not a hub id")


def check_hub_model(name: str, revision: str | None) -> None:
    """Offline (HF_HUB_OFFLINE), a hub model must be in the local HF cache: said here, in one line,
    before anything is loaded (transformers' own error is a paragraph about connecting)."""
    from huggingface_hub import constants

    if constants.is_offline_mode() and not hub_model_cached(name, revision):
        raise ValueError(_not_cached(name, revision, None))


def hub_model_error(name: str, revision: str | None, error: OSError) -> Exception:
    """What to raise for transformers' `error` loading a hub model: a one-line ValueError when the
    model is not in the cache (offline, no network, or no such repo or revision), else `error`
    itself (a cached model that fails to load is another problem)."""
    return error if hub_model_cached(name, revision) else ValueError(_not_cached(name, revision, error))


def hub_model_cached(name: str, revision: str | None) -> bool:
    """config.json of `name` at `revision` (default main) is in the local HF cache."""
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(name, "config.json", revision=revision), str)


def _not_cached(name: str, revision: str | None, error: Exception | None) -> str:
    from huggingface_hub import constants

    at = f" (revision {revision})" if revision else ""
    get = f"hf download {name}" + (f" --revision {revision}" if revision else "")
    if constants.is_offline_mode():
        why = (f"HF_HUB_OFFLINE is set, so it is not downloaded: download it once with network "
               f"(`{get}`), or unset HF_HUB_OFFLINE")
    else:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        why = f"downloading it failed (no network, or no such repo or revision?): {first}"
    like = _cached_like(name)
    hint = f"; did you mean {' or '.join(like)} (in the cache)?" if like else ""
    return (f"--model {name}{at}: no such local directory, and not in the local HF cache "
            f"({constants.HF_HUB_CACHE}); {why}{hint}")


def _cached_like(name: str) -> list[str]:
    """The model ids in the local hub cache that look like `name` (a typo, another case), not it."""
    import difflib

    from huggingface_hub import constants

    try:
        ids = [p.name.removeprefix("models--").replace("--", "/")  # hub ids never hold "--"
               for p in Path(constants.HF_HUB_CACHE).iterdir() if p.name.startswith("models--")]
    except OSError:  # no cache yet
        return []
    by_lower = {i.lower(): i for i in ids if i != name}
    return [by_lower[m] for m in difflib.get_close_matches(name.lower(), by_lower, n=3, cutoff=0.8)]


# -- data: which kind, checked before anything is loaded ----------------------------------------

def data_kind(name: str, flag: str = "--data") -> str:
    """BUILTIN, FILE, DATASET, DATASET_DICT, FOLDER or HUB; a ValueError naming `name` if it is a
    local path that does not exist or a file of another type."""
    if name in BUILTIN_DATA:
        return BUILTIN
    p = Path(name).expanduser()
    if p.is_file():
        if p.suffix not in DATA_FILES:
            raise ValueError(f"{flag} {name}: a {p.suffix or 'suffix-less'} file; {flag} is {FORMS}")
        return FILE
    if p.is_dir():
        if (p / "dataset_dict.json").is_file():
            return DATASET_DICT
        if (p / "state.json").is_file() and (p / "dataset_info.json").is_file():
            return DATASET  # the two files load_from_disk reads
        return FOLDER
    if p.suffix in DATA_FILES:
        raise ValueError(f"{flag} {name}: no such file")
    if not hub_id(name):
        raise ValueError(f"{flag} {name}: no such file or directory; {flag} is {FORMS}")
    return HUB


def check_data(sources: dict) -> None:
    """--data, --eval-data and the config/split flags name things that exist and fit together."""
    data, eval_data = sources["data"], sources.get("eval_data")
    config, split, eval_split = (sources.get(k) for k in ("data_config", "data_split", "eval_split"))
    kind = data_kind(data)
    _need_datasets("--data", data, kind)
    if config and kind not in (HUB, FOLDER):
        raise ValueError(f"--data-config {config}: it chooses a configuration of a hub dataset (or of a "
                         f"folder of data files); --data {data} is {_DESCRIBED[kind]}")
    if split and kind not in _WITH_SPLITS:
        raise ValueError(f"--data-split {split}: --data {data} is {_DESCRIBED[kind]}, with no named "
                         f"splits")
    if eval_data is not None:
        eval_kind = data_kind(eval_data, "--eval-data")
        _need_datasets("--eval-data", eval_data, eval_kind)
        if eval_split and eval_kind not in _WITH_SPLITS:
            raise ValueError(f"--eval-split {eval_split}: --eval-data {eval_data} is "
                             f"{_DESCRIBED[eval_kind]}, with no named splits")
    elif eval_split:
        if kind not in _WITH_SPLITS:
            raise ValueError(f"--eval-split {eval_split}: --data {data} is {_DESCRIBED[kind]}, with no "
                             f"named splits; give the held-out set as --eval-data")
        if eval_split == (split or "train"):
            raise ValueError(f"--eval-split {eval_split} is the split trained on (--data-split "
                             f"{split or 'train'}): the held-out pairs must be other pairs")


# -- data: loading ------------------------------------------------------------------------------

def load_pairs(sources: dict, seed: int, eval_fraction: float,
               progress: bool = False) -> tuple[list[dict], list[dict], list[dict]]:
    """(training rows, held-out rows, every row) of `sources`. The held-out rows are --eval-data
    (its --eval-split, else its test split when it has splits) or --data's --eval-split; without
    either, eval_fraction of --data after a shuffle by `seed`."""
    data, eval_data, eval_split = sources["data"], sources.get("eval_data"), sources.get("eval_split")
    rows = read_rows(data, seed, sources.get("data_config"), sources.get("data_split"), progress=progress)
    by = {"split_flag": "--eval-split"}  # what chooses the held-out split
    if eval_data is None and eval_split is None:
        order = list(range(len(rows)))
        random.Random(seed).shuffle(order)
        n_eval = int(len(rows) * eval_fraction)
        held = [rows[i] for i in order[:n_eval]]
        return [rows[i] for i in order[n_eval:]], held, rows
    if eval_data is None:
        held = read_rows(data, seed, sources.get("data_config"), eval_split, progress=progress, **by)
    else:
        held = read_rows(eval_data, seed, None, eval_split, "--eval-data", "test", progress, **by)
    return rows, held, rows + held


def read_rows(name: str, seed: int = 0, config: str | None = None, split: str | None = None,
              flag: str = "--data", default_split: str = "train", progress: bool = False,
              split_flag: str = "--data-split") -> list[dict]:
    """The checked preference rows of one source (one split of it, `split` as `split_flag` gave
    it, else `default_split`); datasets' bars only with `progress`."""
    kind = data_kind(name, flag)
    if kind == BUILTIN:
        return load_rows(name, seed=seed)
    if kind == FILE and Path(name).suffix == ".jsonl":
        return prepare_rows(read_jsonl(Path(name).expanduser()))
    _need_datasets(flag, name, kind)
    import datasets

    path = str(Path(name).expanduser())
    given, split = split, split or default_split
    if kind == FILE:
        ds = _hf(lambda: datasets.load_dataset(DATA_FILES[Path(name).suffix], data_files=path,
                                               split="train"), flag, name, progress)
        label = name
    elif kind in (DATASET, DATASET_DICT):
        ds = _hf(lambda: datasets.load_from_disk(path), flag, name, progress)
        if kind == DATASET_DICT:
            if split not in ds:
                where = f"{split_flag} {split}: {flag} {name} has" if given else f"{flag} {name}:"
                choose = "" if given else f" (choose one with {split_flag})"
                raise ValueError(f"{where} no split {split!r}; its splits are {list(ds)}{choose}")
            ds = ds[split]
        label = name if kind == DATASET else f"{name} [{split}]"
    else:
        ds = _hf(lambda: datasets.load_dataset(path if kind == FOLDER else name, name=config,
                                               split=split), flag, name, progress)
        label = f"{name} [{split}]"
    return prepare_rows(_labelled(ds, label))


def _labelled(ds, label: str) -> list[tuple[str, dict]]:
    missing = [c for c in ("chosen", "rejected") if c not in ds.column_names]
    if missing:
        raise ValueError(f"{label}: no {' or '.join(repr(c) for c in missing)} column (its columns: "
                         f"{', '.join(ds.column_names)}); a preference set has chosen and rejected, "
                         f"and a prompt column or a prompt that both start with")
    ds = ds.select_columns([c for c in FIELDS if c in ds.column_names])  # extra columns not read
    return [(f"{label} row {i}", row) for i, row in enumerate(ds.to_list())]


def _need_datasets(flag: str, name: str, kind: str) -> None:
    """Every kind but the built-in sets and JSONL files is read with datasets (an extra)."""
    import importlib.util

    if kind == BUILTIN or (kind == FILE and Path(name).suffix == ".jsonl"):
        return
    if importlib.util.find_spec("datasets") is None:
        raise ValueError(f"{flag} {name} is read with the datasets library: pip install datasets "
                         f"(the fused_dpo[data] extra)")


def _hf(load, flag: str, name: str, progress: bool):
    """load(), its errors as one ValueError naming `name` (datasets' own read as a paragraph),
    with datasets' warnings off ("Using the latest cached version ...") and its bars too unless
    `progress`."""
    import datasets

    try:
        with _datasets_quiet(progress):
            return load()
    except ConnectionError as e:  # offline or unreachable, and not in datasets' cache
        why = ("HF_HUB_OFFLINE is set, so it is not downloaded" if datasets.config.HF_HUB_OFFLINE
               else f"the hub could not be reached ({e})")
        raise ValueError(f"{flag} {name}: no such file or directory, and not a dataset in the local HF "
                         f"cache ({datasets.config.HF_DATASETS_CACHE}); {why}") from None
    except datasets.exceptions.DatasetGenerationError as e:  # the reader's error is the cause
        raise ValueError(f"{flag} {name}: cannot read it ({e.__cause__ or e})") from None
    except (OSError, ValueError) as e:
        raise ValueError(f"{flag} {name}: {e}") from None


@contextlib.contextmanager
def _datasets_quiet(progress: bool):
    """datasets' warnings off for the block, and its bars unless `progress`; as they were after."""
    import datasets
    from datasets.utils import logging as ds_logging

    verbosity, bars = ds_logging.get_verbosity(), datasets.is_progress_bar_enabled()
    ds_logging.set_verbosity_error()
    if bars and not progress:
        datasets.disable_progress_bars()
    try:
        yield
    finally:
        ds_logging.set_verbosity(verbosity)
        if bars and not progress:
            datasets.enable_progress_bars()


# -- rows in TRL's formats ----------------------------------------------------------------------

def prepare_rows(labelled: list[tuple[str, object]]) -> list[dict]:
    """Checked {prompt, chosen, rejected} rows from (where, raw row) pairs. A set where no row has
    a prompt takes it from chosen and rejected (`extract_prompt`); so does a row whose prompt is of
    the other kind than its responses (a text prompt beside whole conversations), as TRL's
    `maybe_extract_prompt` does. In a set with prompts, a row without one is an error."""
    explicit = any(isinstance(r, dict) and r.get("prompt") is not None for _, r in labelled)
    rows = []
    for where, row in labelled:
        if isinstance(row, dict):
            # Arrow gives a value absent from a row (or a message) as None: it is absent.
            row = {k: _without_none(row[k]) for k in FIELDS if row.get(k) is not None}
            chosen, rejected = row.get("chosen"), row.get("rejected")
            same = type(chosen) is type(rejected) and isinstance(chosen, (str, list))
            prompt = row.get("prompt")
            if same and (not explicit or (prompt is not None and isinstance(prompt, list)
                                          != isinstance(chosen, list))):
                row = extract_prompt(chosen, rejected, where)
        check_row(row, where)
        rows.append(row)
    return rows


def _without_none(value):
    if isinstance(value, list):
        return [{k: v for k, v in m.items() if v is not None} if isinstance(m, dict) else m
                for m in value]
    return value


def extract_prompt(chosen, rejected, where: str) -> dict:
    """{prompt, chosen, rejected} from responses that both start with the prompt, by TRL 1.16's
    rule (trl.data_utils.extract_prompt): the prompt is the longest common prefix (of characters,
    or of whole messages); a space just before the first difference goes to the responses; when
    one is a prefix of the other, the prompt stops one element short of the shorter. An empty
    prompt is a ValueError naming `where` (TRL would take none, or cut at chosen's last space)."""
    n = min(len(chosen), len(rejected))
    cut = next((i for i in range(n) if chosen[i] != rejected[i]), None)
    if cut is None:
        cut = n - 1
    elif cut > 0 and chosen[cut - 1] == " ":
        cut -= 1
    if cut <= 0:
        raise ValueError(f"{where}: no prompt, and chosen and rejected do not start alike, so none "
                         f"can be taken from them; give the row a prompt field")
    return {"prompt": chosen[:cut], "chosen": chosen[cut:], "rejected": rejected[cut:]}
