"""Reward functions: resolving them from a spec, and checking what they return.

A reward function has the signature of TRL's GRPO reward functions: `fn(prompts, completions, **columns)` returns
one number per completion, where `columns` are the dataset's other columns. A spec is a callable,
`"module:function"` or `"module.function"` (the module from the current folder first, then the import path, as
`trl grpo` finds it), or the folder of a sequence-classification reward model (its first logit is the reward).
`trl-nca generate` and the online trainers resolve specs the same way, and both check every value a function
returns: a wrong count, a value that is not a number, or a non-finite one stops the run with the function's name and
the prompt it was scoring, rather than training on it. A spec is checked when it is resolved (its form, that the
module and function exist and that the function takes `**kwargs`; that a folder holds a trained
sequence-classification model), and a function that raises is named with its spec and the line it failed on.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import json
import math
import numbers
import os
import re
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

RewardFunc = Callable[..., list[float]]

# TRL's GRPO reward signature: GRPOTrainer passes everything by keyword, the dataset's other columns among them
REWARD_SIGNATURE = "f(prompts, completions, **kwargs)"
# "module:function": a dotted module path and a (dotted) attribute of it
_IDENTIFIERS = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")
_SPEC_HELP = (
    "give 'module:function' or 'module.function' (e.g. 'my_rewards:correct', with my_rewards.py in the current "
    "folder or on the import path) or the folder of a sequence-classification reward model"
)
_FRESH_HEAD = (
    "; loaded as a reward model it would score with a freshly initialised head. Give the folder of a trained reward "
    "model (architectures: ...ForSequenceClassification) or a 'module:function'"
)


class RewardError(ValueError):
    """A reward function that cannot be found, fails, or returns what cannot be trained on."""


def reward_name(func) -> str:
    """The name errors and metrics use for a reward function."""
    return getattr(func, "__name__", None) or type(func).__name__


def reward_model_function(path: str | Path, batch_size: int = 16) -> RewardFunc:
    """A reward function from a sequence-classification model folder: its first logit for prompt + completion."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    check_reward_model_folder(path)
    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token

    @torch.no_grad()
    def score(prompts, completions, **kwargs):
        texts = []
        for prompt, completion in zip(prompts, completions, strict=True):
            if isinstance(prompt, list):
                texts.append(tokenizer.apply_chat_template(prompt + completion, tokenize=False))
            else:
                texts.append(prompt + completion)
        scores = []
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(texts[start : start + batch_size], return_tensors="pt", padding=True, truncation=True)
            scores.extend(model(**batch).logits[:, 0].float().tolist())
        return scores

    score.__name__ = Path(path).name
    return score


def check_reward_model_folder(path: str | Path) -> None:
    """Refuse a folder that is not a trained sequence-classification model. `AutoModelForSequenceClassification`, as
    GRPOTrainer and `reward_model_function` load reward models, gives any causal LM a freshly initialised score head
    and mentions it only in its load report: the folder's `config.json` must not declare another architecture, and
    its weights must hold the head (checked from the weight names; nothing is loaded)."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise RewardError(f"Reward model {path}: the folder has no config.json, so it is no model; {_SPEC_HELP}")
    config = AutoConfig.from_pretrained(folder, num_labels=1)
    architectures = config.architectures or []
    if architectures and not any(name.endswith("ForSequenceClassification") for name in architectures):
        raise RewardError(
            f"Reward model {path}: its config.json declares {', '.join(architectures)}, not a sequence-classification "
            f"model{_FRESH_HEAD}"
        )
    stored = _stored_weight_names(folder)
    if stored is None:
        return
    with torch.device("meta"):  # the parameter names of the head, without memory
        model = AutoModelForSequenceClassification.from_config(config)
    base = model.base_model_prefix + "."
    head = [name for name, _ in model.named_parameters() if not name.startswith(base)]
    missing = [name for name in head if not any(key == name or key.endswith("." + name) for key in stored)]
    if missing:
        raise RewardError(
            f"Reward model {path}: its weights have no {', '.join(missing)} (the sequence-classification head)"
            f"{_FRESH_HEAD}"
        )


def _stored_weight_names(folder: Path) -> set[str] | None:
    """The names of the weights a model folder stores (read from an index or a safetensors header), or None."""
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (folder / index).is_file():
            return set(json.loads((folder / index).read_text())["weight_map"])
    if (folder / "model.safetensors").is_file():
        from safetensors import safe_open

        with safe_open(str(folder / "model.safetensors"), framework="pt") as weights:
            return set(weights.keys())
    if (folder / "pytorch_model.bin").is_file():
        return set(torch.load(folder / "pytorch_model.bin", map_location="cpu", mmap=True, weights_only=True))
    return None


# The keywords GRPO (and `trl-nca generate`) pass to reward functions besides the dataset's other columns: a column of
# one of these names would be passed twice
REWARD_KEYWORDS = (
    "prompts", "completions", "completion_ids", "trainer_state", "log_extra", "log_metric", "environments"
)  # fmt: skip


def check_reward_columns(columns, split: str) -> None:
    """Refuse a dataset column that reward functions would receive twice: GRPO passes every column but `prompt` (and
    `completion`, `completion_ids`) to them by name, beside its own keywords (`REWARD_KEYWORDS`)."""
    clash = [name for name in columns or () if name in REWARD_KEYWORDS and name != "completion_ids"]
    if clash:
        raise ValueError(
            f"The {split} dataset has a column {clash[0]!r}, a keyword reward functions already get from GRPO "
            f"({', '.join(REWARD_KEYWORDS)}): it would be passed twice. Rename or remove it, e.g. "
            f"`dataset.remove_columns({clash!r})` (a previous round's output reused as prompts has `completions`)."
        )


def check_reward_signature(func: RewardFunc, label: str) -> None:
    """Refuse a function that cannot be called as TRL's GRPO reward functions are: every argument by keyword, with
    the dataset's other columns and (online) `completion_ids`, `trainer_state`, `log_extra`, `log_metric`, so it
    needs a `**kwargs`. Parameters named after columns are checked when it is called."""
    try:
        signature = inspect.signature(func)
    except (TypeError, ValueError):  # a builtin or extension callable: it is found out when called
        return
    parameters = signature.parameters.values()
    takes_keywords = any(p.kind is p.VAR_KEYWORD for p in parameters)
    if takes_keywords and not any(p.kind is p.POSITIONAL_ONLY and p.default is p.empty for p in parameters):
        return
    raise RewardError(
        f"{label} has the signature {signature}; expected {REWARD_SIGNATURE}: reward functions are called with "
        "keyword arguments, the dataset's other columns among them (online also completion_ids, trainer_state, "
        "log_extra, log_metric)"
    )


def named_reward(func: RewardFunc, spec: str | None = None) -> RewardFunc:
    """`func` with the same name (GRPO's metric names) and sync/async kind, raising a `RewardError` that names it, its
    spec (`"module:function"`) and where it failed when it raises, or that says which argument it could not take."""
    from trl.trainer.utils import get_callable_name, is_async_callable

    if getattr(func, "reward_spec", None) is not None:  # already named
        return func
    spec = spec or f"{getattr(func, '__module__', '?')}:{getattr(func, '__qualname__', reward_name(func))}"

    if is_async_callable(func):

        @functools.wraps(func)
        async def named(*args, **kwargs):
            try:
                return await func(*args, **kwargs)
            except RewardError:
                raise
            except Exception as error:
                raise _reward_failure(func, spec, error, args, kwargs) from error

    else:

        @functools.wraps(func)
        def named(*args, **kwargs):
            try:
                return func(*args, **kwargs)
            except RewardError:
                raise
            except Exception as error:
                raise _reward_failure(func, spec, error, args, kwargs) from error

    named.__name__ = get_callable_name(func)
    named.reward_spec = spec
    return named


def _reward_failure(func, spec: str, error: Exception, args, kwargs) -> RewardError:
    name = reward_name(func)
    if isinstance(error, TypeError):  # the call itself, or something inside the function?
        try:
            inspect.signature(func).bind(*args, **kwargs)
        except TypeError as mismatch:
            return RewardError(
                f"Reward function '{name}' ({spec}) cannot take the arguments it was given ({mismatch}): it is called "
                f"as {REWARD_SIGNATURE} with the keyword arguments {', '.join(sorted(kwargs))}"
            )
        except ValueError:
            pass
    frames = traceback.extract_tb(error.__traceback__)
    try:
        own = inspect.getsourcefile(inspect.unwrap(func))
    except TypeError:
        own = None
    frame = next((f for f in reversed(frames) if f.filename == own), frames[-1] if frames else None)
    where = f", at {frame.filename}, line {frame.lineno}" if frame is not None else ""
    return RewardError(f"Reward function '{name}' raised {type(error).__name__}: {error} ({spec}{where})")


def resolve_reward(spec: str | RewardFunc) -> RewardFunc:
    """A reward function from a callable, `"module:function"`, `"module.function"` (TRL's `trl grpo` spelling: the
    function after the last dot), or a reward model folder; a `RewardError` that says what is wrong otherwise (a
    malformed spec, a missing module, function or folder, a signature GRPO cannot call). The module is looked for in
    the current folder first, then on the import path, as `trl grpo` does. A function named by a spec comes back
    wrapped by `named_reward`, so that its errors name the spec."""
    if callable(spec):
        check_reward_signature(spec, f"Reward function '{reward_name(spec)}'")
        return spec
    path = Path(spec).expanduser()
    if path.is_dir():
        return reward_model_function(path)
    if ":" in spec:
        module_name, name = spec.split(":", 1)
    elif "/" in spec or "\\" in spec or spec.startswith((".", "~")):
        raise RewardError(f"Reward model folder not found: {spec} (no such folder)")
    elif "." in spec and _IDENTIFIERS.match(spec):
        module_name, name = spec.rsplit(".", 1)
    else:
        raise RewardError(
            f"Unknown reward {spec!r}: give 'module:function' or 'module.function' (a TRL GRPO-style reward function) "
            "or the folder of a sequence-classification reward model"
        )
    problem = (
        "the module before ':' is empty"
        if not module_name
        else "the function after ':' is empty"
        if not name
        else f"{module_name!r} is not a module path"
        if not _IDENTIFIERS.match(module_name)
        else f"{name!r} is not a function name"
        if not _IDENTIFIERS.match(name)
        else None
    )
    if problem:
        raise RewardError(f"Reward {spec!r} is malformed: {problem}; {_SPEC_HELP}")
    module = _import_reward_module(spec, module_name)
    func = module
    for part in name.split("."):
        func = getattr(func, part, None)
    if not callable(func):
        raise RewardError(f"Reward {spec!r}: module {module_name!r} has no function {name!r}")
    if inspect.isclass(func):
        raise RewardError(
            f"Reward {spec!r}: {name!r} is a class; name a function, or an instance of the class made in the module"
        )
    check_reward_signature(func, f"Reward function '{reward_name(func)}' ({spec})")
    return named_reward(func, spec)


def _import_reward_module(spec: str, module_name: str):
    """The module of a reward spec, from the current folder first, then the import path (the current folder goes
    first on `sys.path`, as `trl grpo` puts it, so that functions the module imports later are found too)."""
    folder = os.getcwd()
    if sys.path[:1] != [folder]:
        sys.path.insert(0, folder)
    importlib.invalidate_caches()  # a module written since the folder was last listed
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        missing = error.name or module_name
        if module_name != missing and not module_name.startswith(missing + "."):  # an import inside the module
            raise RewardError(f"Reward {spec!r}: importing module {module_name!r} failed ({error})") from None
        raise RewardError(
            f"Reward {spec!r}: cannot import module {module_name!r} ({error}): a reward module is looked for in the "
            f"current folder ({folder}), then on the import path"
        ) from None
    except Exception as error:  # the module's own code failed: a syntax error, an import inside it
        raise RewardError(
            f"Reward {spec!r}: importing module {module_name!r} failed ({type(error).__name__}: {error})"
        ) from None


def check_reward_values(
    name: str, values, prompts: Sequence, group_size: int = 1, *, allow_none: bool = False
) -> list[float | None]:
    """The values a reward function returned, as floats; a `RewardError` naming the function and the prompt when the
    count is wrong or a value is not a finite number. Completion i belongs to prompt i // `group_size`. `None`
    (GRPO's "not applicable") is kept where `allow_none`."""
    try:
        values = list(values)
    except TypeError:
        raise RewardError(
            f"Reward function '{name}' returned {type(values).__name__}, expected a list of {len(prompts)} numbers"
        ) from None
    if len(values) != len(prompts):
        raise RewardError(
            f"Reward function '{name}' returned {len(values)} values for {len(prompts)} completions; it must return "
            "one number per completion"
        )
    out = []
    for i, value in enumerate(values):
        if value is None and allow_none:
            out.append(None)
            continue
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        if not isinstance(value, numbers.Real) or isinstance(value, bool) or not math.isfinite(value):
            raise RewardError(
                f"Reward function '{name}' returned {value!r} for completion {i % group_size} of prompt "
                f"{i // group_size} ({_prompt_text(prompts[i])!r}); rewards must be finite numbers"
            )
        out.append(float(value))
    _check_float32(name, out, prompts, group_size)
    return out


def _check_float32(name: str, values: list[float | None], prompts: Sequence, group_size: int) -> None:
    """Rewards are trained on in float32 (GRPO stores them so, the offline trainers cast them): each value must stay
    finite there, and two different values of one prompt's group must stay different, else they silently tie."""
    for i, value in enumerate(values):
        if value is not None and not math.isfinite(_float32(value)):
            raise RewardError(
                f"Reward function '{name}' returned {value!r} for completion {i % group_size} of prompt "
                f"{i // group_size} ({_prompt_text(prompts[i])!r}), which overflows float32, the dtype rewards are "
                "trained in; rescale the rewards"
            )
    for start in range(0, len(values), group_size):
        seen = {}
        for k, value in enumerate(values[start : start + group_size]):
            if value is None:
                continue
            other = seen.setdefault(_float32(value), (k, value))
            if other[1] != value:
                raise RewardError(
                    f"Reward function '{name}' returned {other[1]!r} and {value!r} for completions {other[0]} and "
                    f"{k} of prompt {start // group_size} ({_prompt_text(prompts[start])!r}): they differ but are "
                    "equal in float32, the dtype rewards are trained in, so they would become a tie; rescale or "
                    "shift the rewards"
                )


def _float32(value: float) -> float:
    return float(torch.tensor(value, dtype=torch.float64).float())


def _prompt_text(prompt) -> str:
    text = prompt[-1].get("content", "") if isinstance(prompt, list) and prompt else str(prompt)
    return str(text)[:60]


def call_reward(func: RewardFunc, prompts: Sequence, completions: Sequence, **columns):
    """Call a reward function; an exception inside it is re-raised naming the function (`named_reward`)."""
    return named_reward(func)(prompts=prompts, completions=completions, **columns)


def score_completions(
    funcs: Sequence[RewardFunc], prompts: Sequence, completions: Sequence, group_size: int = 1, **columns
) -> list[float]:
    """The sum of the reward functions' checked values for each completion."""
    totals = [0.0] * len(completions)
    for func in funcs:
        values = check_reward_values(
            reward_name(func), call_reward(func, prompts, completions, **columns), prompts, group_size
        )
        totals = [total + value for total, value in zip(totals, values)]
    return totals
