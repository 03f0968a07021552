"""The values a generation setting may take, one table for every door that reads them: ``model.chat`` (either
decoder), the inference engine's SamplingParams, the chat flags and a model dir's generation_config.json. It lives
beside the model because chat() checks its GenerationConfig with it, and the model imports nothing from inference/.
"""

from __future__ import annotations

import math


def whole(v) -> bool:
    """An int, not a bool (JSON's 3.0 and true are not token counts)."""
    return isinstance(v, int) and not isinstance(v, bool)


# A generation config field left None samples as if it were off (transformers 4's reading, the official chat()'s):
# the value each takes then, for chat()'s generate() and the inference engine alike
OFF_VALUES = {"do_sample": False, "temperature": 1.0, "top_k": 0, "top_p": 1.0, "repetition_penalty": 1.0,
              "min_new_tokens": 0}


def integral(v) -> bool:
    """An integer of any kind (numpy's and torch's too), not a bool: a value that converts to an int exactly."""
    return not isinstance(v, bool) and hasattr(v, "__index__")


def number(v) -> bool:
    """A finite int or float, not a bool (inf passed `>= 0`: a temperature of inf sampled uniformly, a repetition
    penalty of inf wiped the seen tokens' scores; NaN fails every comparison anyway)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# name -> (test, what the value must be). Temperature 0 is allowed for greedy decoding (it is ignored there);
# sampling needs it above 0.
SAMPLING_RANGES = {
    "temperature": (lambda v: number(v) and v >= 0, "a finite number >= 0"),
    "top_p": (lambda v: number(v) and 0 < v <= 1, "in (0, 1]"),
    "top_k": (lambda v: whole(v) and v >= 0, "an integer >= 0 (0: off)"),
    "repetition_penalty": (lambda v: number(v) and v > 0, "a finite number > 0"),
}


def out_of_range(name: str, value) -> str | None:
    """``must be ..., got ...`` when ``value`` is outside SAMPLING_RANGES[name], else None."""
    ok, want = SAMPLING_RANGES[name]
    return None if ok(value) else f"must be {want}, got {value!r}"


def do_sample_problem(do_sample) -> str | None:
    """Why ``do_sample`` is no switch value ("no" sampled: a non-empty string is true), or None."""
    return None if isinstance(do_sample, bool) else f"do_sample must be true or false, got {do_sample!r}"


def zero_temperature_problem(do_sample, temperature) -> str | None:
    """Sampling at temperature 0 (a greedy row ignores its temperature, as transformers does: a
    generation_config.json that says do_sample false often has temperature 0), or None."""
    if do_sample and number(temperature) and temperature == 0:
        return "temperature must be > 0 to sample (do_sample false decodes greedily), got 0"
    return None


def config_problems(gc) -> list[str]:
    """What a GenerationConfig that chat() would run with holds out of range, as ``<field> must be ..., got ...``:
    the sampling fields (None: unset), do_sample, num_beams. generate() took top_p 1.5 and do_sample "no" (which
    sampled), and failed on num_beams 0 with a ZeroDivisionError; the engine refused them."""
    problems = [f"{name} {why}" for name in SAMPLING_RANGES
                if (value := getattr(gc, name, None)) is not None and (why := out_of_range(name, value))]
    if why := do_sample_problem(gc.do_sample):
        problems.append(why)
    beams = getattr(gc, "num_beams", None)
    if beams is not None and not (whole(beams) and beams >= 1):
        problems.append(f"num_beams must be an integer >= 1, got {beams!r}")
    if why := zero_temperature_problem(gc.do_sample, gc.temperature):
        problems.append(why)
    return problems
