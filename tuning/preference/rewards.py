"""What scores a sampled answer in online RL (align.py --reward): the reward model, a check of the answer against
the record's reference answer (a verifiable reward), or a function of the user's, alone or several weighted.

    --reward model                   # reward.py's model (--reward-model DIR): a learned judgement
    --reward exact                   # 1 if the answer, stripped, is the reference, stripped; else 0
    --reward contains                # 1 if the answer holds the reference (stripped); else 0
    --reward my_rewards.py:score     # score(prompts, completions, **columns) -> one float per answer
    --reward exact,model --reward-weights 1,0.5

A record's reference is its Alpaca 'output', a pair's 'chosen' answer, a conversation's last assistant turn, or a
prompt-only record's 'reference', 'solution' or 'answer' field. A user's function gets, beside the prompts (as the
policy was asked them) and the answers (as decoded, stripped of nothing), each field of the records as a keyword
argument (one value per answer), and `reference`. Every function's output is checked: a function that raises,
returns the wrong number of rewards, or a value that is no finite number stops the run with a message naming it.
"""

from __future__ import annotations

import functools
import json
import math
import numbers
import os
import sys

from tuning.cli import UserError

BUILT_IN = ("exact", "contains")  # the verifiable rewards against the record's reference answer
MODEL = "model"  # the reward model of --reward-model
# The keyword arguments a user's function gets besides the records' fields, which must not be one of them.
ARGUMENTS = ("prompts", "completions", "reference")


def names(spec: str) -> list[str]:
    """The rewards of a --reward value, in order: "model", "exact", "contains" or "FILE.py:FUNCTION"."""
    return [name.strip() for name in spec.split(",") if name.strip()]


def weights_of(spec: str, weights: str) -> list[float] | None:
    """--reward-weights as floats (None: each reward weighs 1); spec_problems has checked them."""
    return [float(w) for w in weights.split(",")] if weights.strip() else None


def spec_problems(spec: str, weights: str) -> list[str]:
    """What is wrong with --reward and --reward-weights, every problem at once (without importing anything)."""
    problems, given = [], names(spec)
    if not given:
        problems.append("--reward is empty: give model, exact, contains or FILE.py:FUNCTION (or a comma list)")
    for name in given:
        if name not in (MODEL, *BUILT_IN) and not _is_function_spec(name):
            problems.append(f"--reward {name}: not one of model, exact, contains, or FILE.py:FUNCTION")
    if len(set(given)) < len(given):
        problems.append(f"--reward {spec}: names a reward twice")
    if weights.strip():
        try:
            values = [float(w) for w in weights.split(",")]
        except ValueError:
            problems.append(f"--reward-weights {weights}: not a comma list of numbers")
        else:
            if len(values) != len(given):
                problems.append(f"--reward-weights {weights}: {len(values)} weights for the {len(given)} rewards of "
                                f"--reward {spec}")
            if not all(math.isfinite(value) for value in values):
                problems.append(f"--reward-weights {weights}: every weight must be a finite number")
    return problems


def _is_function_spec(name: str) -> bool:
    path, _, function = name.rpartition(":")
    return path.endswith(".py") and function.isidentifier()


def load_user_functions(spec: str) -> None:
    """Imports each FILE.py:FUNCTION of --reward: a mistake in one is said before the models load."""
    for name in names(spec):
        if name not in (MODEL, *BUILT_IN):
            load_function(name)


@functools.lru_cache(maxsize=None)  # (a file is run once, however often its function is asked for)
def load_function(spec: str):
    """The function FUNCTION of FILE.py (a --reward FILE.py:FUNCTION), imported; a UserError naming the file and
    the function when it can't be."""
    import importlib.util

    path, _, function = spec.rpartition(":")
    if not os.path.isfile(path):
        raise UserError(f"--reward {spec}: no file {path}")
    module_name = f"reward_{abs(hash(os.path.realpath(path)))}_{os.path.splitext(os.path.basename(path))[0]}"
    loader = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(loader)
    sys.modules[module_name] = module  # (as an import does: dataclasses and pickling look the module up there)
    try:
        loader.loader.exec_module(module)
    except Exception as error:  # the user's file: any failure of it is theirs to fix
        del sys.modules[module_name]
        raise UserError(f"--reward {spec}: importing {path} raised {_described(error, path)}") from None
    found = getattr(module, function, None)
    if not callable(found):
        defined = sorted(name for name, value in vars(module).items()
                         if callable(value) and getattr(value, "__module__", None) == module_name)
        raise UserError(f"--reward {spec}: {path} has no function {function}"
                        + (f" (it defines {', '.join(defined)})" if defined else ""))
    return found


def _described(error: BaseException, path: str) -> str:
    """An exception as one line: its type and message, and the line of `path` it came from."""
    import traceback

    frames = [frame for frame in traceback.extract_tb(error.__traceback__)
              if os.path.realpath(frame.filename) == os.path.realpath(path)]
    if isinstance(error, SyntaxError) and error.lineno:
        return f"SyntaxError: {error.msg} ({path}, line {error.lineno})"
    where = f" ({path}, line {frames[-1].lineno})" if frames else ""
    return f"{type(error).__name__}: {error}{where}"


def exact(completions, reference, **kwargs) -> list[float]:
    """1.0 where the answer, stripped, is the reference answer, stripped; else 0.0."""
    return [float(answer.strip() == ref.strip()) for answer, ref in zip(completions, reference)]


def contains(completions, reference, **kwargs) -> list[float]:
    """1.0 where the answer holds the reference answer (stripped); else 0.0."""
    return [float(ref.strip() in answer) for answer, ref in zip(completions, reference)]


class Checked:
    """One reward as TRL calls a reward function, checked: the answers as texts (a conversation's answer turn, its
    content), and, for a user's function, the records' fields as keyword arguments. What is wrong with a call or
    its result stops the run with a UserError naming the reward."""

    def __init__(self, spec: str, function, path: str | None = None):
        self.spec, self.function, self.path = spec, function, path
        self.__name__ = os.path.basename(spec)  # TRL names a reward function in its logs (a path's / would nest them)

    def __call__(self, prompts=None, completions=(), reference=(), record=(), completion_ids=None, **trl):
        answers = [answer[-1]["content"] if isinstance(answer, list) else answer for answer in completions]
        if self.spec == MODEL:  # the Judge: it reads its own prompt column and the ids (a cut answer's penalty)
            return self.checked(self.function(prompts=prompts, completions=completions, completion_ids=completion_ids,
                                              **trl), len(answers), prompts)
        columns = columns_of([json.loads(text) for text in record]) if self.path else {}
        try:
            values = self.function(prompts=prompts, completions=answers, **{**columns, "reference": list(reference)})
        except UserError:
            raise
        except Exception as error:  # the user's function (or a built-in on bad data): named, in one line
            raise UserError(f"--reward {self.spec} raised {_described(error, self.path or __file__)}") from None
        return self.checked(values, len(answers), prompts)

    def checked(self, values, expected: int, prompts) -> list[float]:
        try:
            values = list(values)
        except TypeError:
            raise UserError(f"--reward {self.spec} returned {type(values).__name__}, not a list of floats") from None
        if len(values) != expected:
            raise UserError(f"--reward {self.spec} returned {len(values)} rewards for {expected} answers; it must "
                            "return one per answer")
        for i, value in enumerate(values):
            number = isinstance(value, numbers.Real) and not isinstance(value, bool) and type(value).__name__ != "bool_"
            if not number or not math.isfinite(float(value)):
                shown = prompts[i] if prompts is not None and i < len(prompts) else None
                asked = f" to the prompt {str(shown)[:80]!r}" if shown is not None else ""
                why = "a finite number" if number else "a number (an int or a float)"
                raise UserError(f"--reward {self.spec} returned {value!r} for answer {i}{asked}: every reward must "
                                f"be {why}")
        return [float(value) for value in values]


def columns_of(records: list[dict]) -> dict:
    """The records' fields as columns (one list per field, None where a record lacks it)."""
    fields = dict.fromkeys(field for record in records for field in record)
    return {field: [record.get(field) for record in records] for field in fields}


def build(spec: str, judge=None) -> list[Checked]:
    """The reward functions of --reward, in order, checked; `judge` is the reward model's (align_trainers.Judge)."""
    built = []
    for name in names(spec):
        if name == MODEL:
            built.append(Checked(name, judge))
        elif name in BUILT_IN:
            built.append(Checked(name, globals()[name]))
        else:
            built.append(Checked(name, load_function(name), name.rpartition(":")[0]))
    return built


def uses_reference(spec: str) -> bool:
    return any(name in BUILT_IN for name in names(spec))


def uses_functions(spec: str) -> bool:
    """Whether --reward names a function of the user's (which reads the records' fields)."""
    return any(name not in (MODEL, *BUILT_IN) for name in names(spec))


class Scorer:
    """The weighted sum of the rewards, as TRL sums them, for a held-out evaluation: score(records, answers), each
    record a row of the prompt dataset ({"prompt", "judge_prompt", "reference", "record"})."""

    def __init__(self, functions: list[Checked], weights: list[float] | None):
        self.functions, self.weights = functions, weights or [1.0] * len(functions)

    def score(self, records: list[dict], answers: list[str]) -> list[float]:
        columns = {key: [record.get(key) for record in records] for key in ("judge_prompt", "reference", "record")}
        total = [0.0] * len(answers)
        for function, weight in zip(self.functions, self.weights):
            values = function(prompts=[record["prompt"] for record in records], completions=answers, **columns)
            total = [t + weight * v for t, v in zip(total, values)]
        return total
