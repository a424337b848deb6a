"""The text form of a GuidanceConfig, written into image parameters and pasted back.

    add "smiling, smile" scale=5 threshold=0.9 warmup=10 weight=1; remove "glasses" scale=3
    threshold=0.95 warmup=5 cooldown=30 weight=1; momentum=0.1 beta=0.4

One clause per concept, in order, then the momentum clause. Prompts are JSON string literals,
so any text (commas, quotes, colons, brackets, newlines, unicode) comes back exactly; no line
break is ever written raw, since image parameters are read line by line. Every setting is
written out, so a pasted config never depends on what the defaults were when it was made.
"""

from __future__ import annotations

import json
import re
from typing import Dict, List, Tuple, Union

from .config import Concept, GuidanceConfig
from .safety_config import DEFAULT_SAFETY_CONCEPT, PRESETS as SAFETY_PRESETS, SafetyConfig

_DIRECTIONS = {"add": False, "remove": True}
_CONCEPT_KEYS = ("scale", "threshold", "warmup", "cooldown", "weight")
_MOMENTUM_KEYS = {"momentum": "momentum_scale", "beta": "momentum_beta"}
_INTEGER = re.compile(r"-?[0-9]+", re.ASCII)
_FLOAT = re.compile(r"-?(?:[0-9]+\.?[0-9]*(?:e[-+]?[0-9]+)?|nan|inf)", re.ASCII)
# Characters str.splitlines() breaks at that json.dumps(ensure_ascii=False) leaves raw.
_LINE_BREAKS = {"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"}
_WORD = re.compile(r'[^\s;"]+')


def _number(value: Union[int, float]) -> str:
    if isinstance(value, float) and value.is_integer() and abs(value) < 2 ** 53:
        return str(int(value))
    return repr(value)  # the shortest text that parses back to the same float


def _quote(prompt: str) -> str:
    text = json.dumps(prompt, ensure_ascii=False)
    for char, escape in _LINE_BREAKS.items():
        text = text.replace(char, escape)
    return text


def to_text(config: GuidanceConfig) -> str:
    clauses = []
    for c in config.concepts:
        settings = [f"{key}={_number(getattr(c, key))}" for key in _CONCEPT_KEYS
                    if getattr(c, key) is not None]
        direction = "remove" if c.reverse else "add"
        clauses.append(" ".join([direction, _quote(c.prompt)] + settings))
    clauses.append(f"momentum={_number(config.momentum_scale)} "
                   f"beta={_number(config.momentum_beta)}")
    return "; ".join(clauses)


def _tokens(text: str) -> List[Tuple[str, object, int]]:
    """(kind, value, position) with kind 'string' (a decoded prompt), ';' or 'word'."""
    decoder = json.JSONDecoder()
    tokens, pos = [], 0
    while pos < len(text):
        char = text[pos]
        if char.isspace():
            pos += 1
        elif char == ";":
            tokens.append((";", ";", pos))
            pos += 1
        elif char == '"':
            try:
                value, end = decoder.raw_decode(text, pos)
            except json.JSONDecodeError as error:
                raise ValueError(f"bad quoted prompt at position {pos}: {error.msg}") from None
            tokens.append(("string", value, pos))
            pos = end
        else:
            word = _WORD.match(text, pos).group()
            tokens.append(("word", word, pos))
            pos += len(word)
    return tokens


def _settings(words: List[Tuple[str, object, int]], allowed) -> Dict[str, str]:
    found: Dict[str, str] = {}
    for kind, word, pos in words:
        key, sep, value = str(word).partition("=")
        if kind != "word" or not sep or key not in allowed:
            raise ValueError(f"unexpected {word!r} at position {pos}; expected one of "
                             + ", ".join(f"{k}=<number>" for k in allowed))
        if key in found:
            raise ValueError(f"{key} is given twice (position {pos})")
        found[key] = value
    return found


def _parse_number(key: str, value: str) -> Union[int, float]:
    # Only the spellings to_text writes (ASCII digits, repr() of floats): Python's own int()
    # and float() would also take '1_0' or non-ASCII digits.
    if _INTEGER.fullmatch(value):
        return int(value)
    if _FLOAT.fullmatch(value):
        return float(value)
    raise ValueError(f"{key} must be a number, got {value!r}")


def _concept(index: int, clause) -> Concept:
    (_, direction, pos), prompt_token = clause[0], clause[1:2]
    if not prompt_token or prompt_token[0][0] != "string":
        raise ValueError(f"concept {index}: expected a quoted prompt after {direction!r} "
                         f"(position {pos})")
    prompt = prompt_token[0][1]
    try:
        settings = _settings(clause[2:], _CONCEPT_KEYS)
        missing = [k for k in _CONCEPT_KEYS if k not in settings and k != "cooldown"]
        if missing:
            raise ValueError(f"{missing[0]} is missing")
        values = {k: _parse_number(k, v) for k, v in settings.items()}
        return Concept(prompt=prompt, reverse=_DIRECTIONS[direction], **values)
    except ValueError as error:
        raise ValueError(f"concept {index} ({prompt!r}): {error}") from None


def from_text(text: str) -> GuidanceConfig:
    """Parses to_text's output. Anything else raises a ValueError that says what is wrong."""
    if not isinstance(text, str):
        raise ValueError(f"expected a string, got {type(text).__name__}")
    try:
        clauses: List[list] = [[]]
        for token in _tokens(text):
            if token[0] == ";":
                clauses.append([])
            else:
                clauses[-1].append(token)
        *concept_clauses, momentum_clause = clauses
        concepts = []
        for index, clause in enumerate(concept_clauses):
            if not clause or clause[0][0] != "word" or clause[0][1] not in _DIRECTIONS:
                pos = clause[0][2] if clause else "?"
                raise ValueError(f"clause {index + 1} (position {pos}) must start with "
                                 "'add' or 'remove' and a quoted prompt")
            concepts.append(_concept(index, clause))
        if not text.strip():
            raise ValueError("the text is empty")
        if momentum_clause and momentum_clause[0][1] in _DIRECTIONS:
            raise ValueError("the text ends without its 'momentum=<number> beta=<number>' clause")
        settings = _settings(momentum_clause, _MOMENTUM_KEYS)
        if len(settings) != len(_MOMENTUM_KEYS):
            raise ValueError("the last clause must be 'momentum=<number> beta=<number>'")
        momentum = {_MOMENTUM_KEYS[k]: _parse_number(k, v) for k, v in settings.items()}
        return GuidanceConfig(concepts=concepts, **momentum)
    except ValueError as error:
        raise ValueError(f"Latent Diffusion Guidance settings {_shorten(text)}: {error}") from None


def _shorten(text: str, limit: int = 60) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")


# -- Safe Latent Diffusion ------------------------------------------------------------------------
#
#     medium
#     strong "an image showing violence"
#     custom "an image showing violence" scale=1500 threshold=0.02 warmup=8 momentum=0.3 beta=0.4
#
# The configuration's name (one of SLD's four when the numbers are exactly its numbers, else
# "custom" followed by every number), then the safety concept as a JSON string literal when
# it is not SLD's default text.

CUSTOM = "custom"
_SAFETY_KEYS = {"scale": "scale", "threshold": "threshold", "warmup": "warmup",
                "momentum": "momentum_scale", "beta": "momentum_beta"}


def safety_to_text(config: SafetyConfig) -> str:
    name = config.preset_name
    words = [name]
    if config.concept != DEFAULT_SAFETY_CONCEPT:
        words.append(_quote(config.concept))
    if name == CUSTOM:
        words += [f"{key}={_number(getattr(config, field))}"
                  for key, field in _SAFETY_KEYS.items()]
    return " ".join(words)


def safety_from_text(text: str) -> SafetyConfig:
    """Parses safety_to_text's output; anything else is a ValueError saying what is wrong."""
    if not isinstance(text, str):
        raise ValueError(f"expected a string, got {type(text).__name__}")
    try:
        tokens = _tokens(text)
        names = list(SAFETY_PRESETS) + [CUSTOM]
        if not tokens or tokens[0][0] != "word" or tokens[0][1] not in names:
            raise ValueError(f"it must start with one of {', '.join(names)}")
        name, rest = tokens[0][1], tokens[1:]
        concept = DEFAULT_SAFETY_CONCEPT
        if rest and rest[0][0] == "string":
            concept, rest = rest[0][1], rest[1:]
        if name != CUSTOM:
            if rest:
                raise ValueError(f"unexpected {rest[0][1]!r} at position {rest[0][2]} after "
                                 f"{name!r} (numbers follow 'custom' only)")
            return SafetyConfig.preset(name, concept)
        settings = _settings(rest, _SAFETY_KEYS)
        missing = [k for k in _SAFETY_KEYS if k not in settings]
        if missing:
            raise ValueError(f"{missing[0]} is missing")
        return SafetyConfig(concept=concept, **{
            _SAFETY_KEYS[k]: _parse_number(k, v) for k, v in settings.items()})
    except ValueError as error:
        raise ValueError(f"Safe Latent Diffusion settings {_shorten(text)}: {error}") from None
