"""Checking a Hugging Face model folder, so that a damaged one fails with a line that names the right file.

transformers reports a damaged folder in ways that mislead: a config.json that is not JSON surfaces as a
tokenizer failure, a tensor of the wrong shape as "look at the above report" (a report the CLI silences),
a missing tensor not at all (it is silently initialised at random). The cheap checks (config.json parsed,
weight files present) run before loading; the costly ones (safetensors headers, a skeleton model on the
meta device) only after transformers has failed, so a healthy folder loads at the same speed as before.
Only safetensors headers are read: nothing is unpickled.
"""

from __future__ import annotations

import json
from pathlib import Path

from edgestill.errors import EdgestillError

WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
_PICKLED_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json")
_TOKENIZER_JSON = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")
_JSON_TYPES = {dict: "an object", list: "an array", str: "a string", int: "a number", float: "a number",
               bool: "a boolean", type(None): "null"}


def error_line(error: BaseException, limit: int = 160) -> str:
    """'Class: first line' of an error, shortened: the CLI prints an EdgestillError on exactly one line."""
    lines = str(error).strip().splitlines()
    first = lines[0].strip() if lines else ""
    return f"{error.__class__.__name__}: {first[:limit]}" + ("..." if len(first) > limit else "")


def _shape(shape) -> str:
    return str(list(shape))


def read_json_file(path: Path, fix: str) -> object:
    """Parse a JSON file, or raise one line naming it with the JSON error's line and column and `fix`."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise EdgestillError(f"'{path}' is not UTF-8 text (byte {e.start} is {e.object[e.start:e.start + 1]!r}), "
                             f"so it is not a JSON file; {fix}") from None
    except json.JSONDecodeError as e:
        raise EdgestillError(f"'{path}' is not valid JSON ({e.msg} at line {e.lineno} column {e.colno}); "
                             f"{fix}") from None


def read_model_config(folder: Path) -> dict:
    """config.json as a dict, refusing one that transformers would fail on with a misleading message.

    transformers needs a JSON object with a `model_type` it knows; without one it fails later, at the
    tokenizer or the weights, and the error then names the wrong file.
    """
    path = folder / "config.json"
    if not path.is_file():
        raise EdgestillError(f"model folder '{folder}' has no config.json; pass a Hugging Face model folder "
                             "(config.json, model.safetensors and the tokenizer files)")
    fix = "repair it, or copy config.json again from where the model came from"
    config = read_json_file(path, fix)
    if not isinstance(config, dict):
        raise EdgestillError(f"'{path}' holds {_JSON_TYPES.get(type(config), 'a JSON value')}, not an object of model "
                             f"settings; {fix}")
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        named = config.get("architectures")
        raise EdgestillError(f"'{path}' has no \"model_type\"" + (f" (its architectures say {named})" if named else "")
                             + ", so transformers cannot tell which model it describes; add it (e.g. \"model_type\": "
                             "\"llama\" or \"bert\"), or copy config.json again from where the model came from")
    from transformers import CONFIG_MAPPING

    if model_type not in CONFIG_MAPPING:
        import transformers

        raise EdgestillError(f"'{path}' names model_type \"{model_type}\", which transformers "
                             f"{transformers.__version__} does not know; correct the name, or upgrade transformers "
                             "if the architecture is newer")
    return config


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files transformers will read: model.safetensors, else the shards its index names.

    Refuses a folder without them (also one holding only pickled weights: nothing is unpickled here).
    """
    single, index = folder / WEIGHTS_NAME, folder / WEIGHTS_INDEX_NAME
    if single.is_file():
        return [single]
    if index.is_file():
        return _shard_files(index)
    pickled = [n for n in _PICKLED_WEIGHTS if (folder / n).is_file()]
    if pickled:
        raise EdgestillError(f"model folder '{folder}' holds only pickled weights ({pickled[0]}), which edgestill "
                             f"does not load (unpickling can run code); convert them to {WEIGHTS_NAME} "
                             "(save_pretrained with safe_serialization=True, in a Python session you trust)")
    others = sorted(p.name for p in folder.glob("*.safetensors"))
    raise EdgestillError(f"model folder '{folder}' has config.json but no weights "
                         f"({WEIGHTS_NAME} or {WEIGHTS_INDEX_NAME}"
                         + (f"; it holds only {', '.join(others[:3])}" if others else "")
                         + "); copy the model's weights into it, or re-export the model with save_pretrained")


def _shard_files(index: Path) -> list[Path]:
    """The shard files that model.safetensors.index.json names, all of which must be present."""
    fix = "repair it, or copy the model's files again"
    data = read_json_file(index, fix)
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise EdgestillError(f"'{index}' has no \"weight_map\" (tensor name -> shard file); {fix}")
    shards = sorted({str(name) for name in weight_map.values()})
    absent = [name for name in shards if not (index.parent / name).is_file()]
    if absent:
        raise EdgestillError(f"'{index}' names shard '{absent[0]}', which is not in '{index.parent}' ({len(absent)} of "
                             f"{len(shards)} shards missing); copy the missing shards, or download the model again")
    return [index.parent / name for name in shards]


def check_hf_folder(folder: Path) -> None:
    """The cheap checks before loading: a usable config.json and the weight files it needs."""
    read_model_config(folder)
    weight_files(folder)


def explain_tokenizer_failure(folder: Path | None, spec: str, error: Exception) -> EdgestillError:
    """Why AutoTokenizer failed: name a tokenizer file that is not JSON, else report the error itself."""
    if folder is not None:
        present = [name for name in _TOKENIZER_JSON if (folder / name).is_file()]
        for name in present:
            read_json_file(folder / name, "re-save the tokenizer with save_pretrained, or copy the file again from "
                                          "where the model came from")
        if present:
            return EdgestillError(f"the tokenizer in '{spec}' ({', '.join(present)}) could not be loaded "
                                  f"({error_line(error, 120)}); re-save the tokenizer with save_pretrained, or copy its "
                                  "files again from where the model came from")
    return EdgestillError(f"no usable tokenizer in '{spec}' ({error_line(error, 120)}); "
                          "the folder needs tokenizer.json or the tokenizer files saved with it")


def safetensors_shapes(files: list[Path]) -> dict[str, tuple[Path, tuple[int, ...]]]:
    """{tensor name: (file, shape)} read from the safetensors headers only (no tensor data is read).

    A file whose header cannot be parsed is named: empty, or corrupt/truncated (safetensors checks
    that the header's offsets cover the file exactly, so a cut anywhere is caught here).
    """
    from safetensors import safe_open

    shapes = {}
    for file in files:
        if file.stat().st_size == 0:
            raise EdgestillError(f"'{file}' is empty (0 bytes); re-download or re-export the model")
        try:
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():
                    shapes[name] = (file, tuple(f.get_slice(name).get_shape()))
        except OSError as e:  # the file system, not the file's contents
            raise EdgestillError(f"'{file}' cannot be read ({error_line(e, 120)}); check its permissions") from None
        except Exception as e:  # safetensors raises SafetensorError on a damaged header
            raise EdgestillError(f"'{file}' is corrupt or truncated ({error_line(e, 120)}); "
                                 "re-download or re-export the model") from None
    return shapes


def skeleton_shapes(build) -> tuple[dict[str, tuple[int, ...]], str] | None:
    """({name: shape}, base_model_prefix) of the model `build()` makes on the meta device (no memory, no
    init cost), or None where the model cannot even be built (then there is nothing to compare)."""
    import torch

    try:
        with torch.device("meta"):
            model = build()
    except Exception:
        return None
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}, getattr(model, "base_model_prefix", "")


def _model_key(name: str, expected: dict, prefix: str) -> str | None:
    """The model's name for checkpoint tensor `name` (a base-model checkpoint lacks the task model's prefix)."""
    for key in (name, f"{prefix}.{name}", name.removeprefix(f"{prefix}.")):
        if key in expected:
            return key
    return None


def shape_mismatches(found: dict, expected: dict[str, tuple[int, ...]], prefix: str) -> list[tuple]:
    """[(tensor name, file, shape in the file, shape expected)] in the model's order, for tensors in both."""
    by_key = {key: name for name in found if (key := _model_key(name, expected, prefix)) is not None}
    rows = [(by_key[key], *found[by_key[key]], shape) for key, shape in expected.items() if key in by_key]
    return [row for row in rows if row[2] != row[3]]


def explain_weights_failure(folder: Path, spec: str, error: Exception, build) -> EdgestillError:
    """Why from_pretrained failed on a local folder, from facts: a damaged weight file, else the first tensor
    whose shape differs from the model that config.json describes (`build` makes it), else the error itself."""
    found = safetensors_shapes(weight_files(folder))
    skeleton = skeleton_shapes(build)
    mismatched = shape_mismatches(found, *skeleton) if skeleton is not None else []
    if not mismatched:
        return EdgestillError(f"transformers could not load the weights in '{spec}' ({error_line(error)}); "
                              "re-download or re-export the model")
    name, file, in_file, wanted = mismatched[0]
    more = len(mismatched) - 1
    return EdgestillError(
        f"tensor '{name}' in '{file}' has shape {_shape(in_file)} but '{folder / 'config.json'}' expects {_shape(wanted)}"
        + (f" ({more} more tensor{'s differ' if more > 1 else ' differs'} too)" if more else "")
        + "; the weights do not match config.json: re-export them together with it, or fix config.json")


def check_loading_info(folder: Path, info: dict) -> None:
    """Refuse a load where tensors were missing (transformers initialises them at random and only warns)
    or left over (the file describes a bigger or different model than config.json)."""
    missing = sorted(info.get("missing_keys", ()))
    unexpected = sorted(info.get("unexpected_keys", ()))
    weights = folder / WEIGHTS_NAME if (folder / WEIGHTS_NAME).is_file() else folder / WEIGHTS_INDEX_NAME
    fix = "the weights do not match config.json: re-export them together with it, or fix config.json"
    if missing:
        raise EdgestillError(f"'{weights}' lacks {_count(missing, 'tensor')} that '{folder / 'config.json'}' expects "
                             f"({_first(missing)}); {fix}")
    if unexpected:
        raise EdgestillError(f"'{weights}' holds {_count(unexpected, 'tensor')} that '{folder / 'config.json'}' does not "
                             f"describe ({_first(unexpected)}); {fix}")


def _count(items, noun: str) -> str:
    return f"{len(items)} {noun}{'s' if len(items) != 1 else ''}"


def _first(names: list[str]) -> str:
    return f"'{names[0]}'" + (f" and {len(names) - 1} more" if len(names) > 1 else "")
