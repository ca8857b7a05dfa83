"""Tool argument validation against the subset of JSON Schema exai's tools use.

:func:`validate` runs on every ``tools/call`` before the handler; the first problem becomes
JSON-RPC -32602 naming the field by a dotted path (``arguments.files[2]``), with a message a
person can act on::

    arguments: missing required field 'prompt'
    arguments.temperature: must be at most 1 (got 3)
    arguments.modle: unknown field (did you mean 'model'?)

:func:`check_schema` runs when a tool is registered, so a typo in a schema (``minLenght``) or a
keyword this validator does not implement (``$ref``, ``multipleOf``) fails at start-up instead of
being silently ignored at call time.

Supported keywords: ``type`` (a name or a list of names: object, string, integer, number,
boolean, array, null), ``properties``, ``required``, ``additionalProperties`` (a boolean or a
schema), ``enum``, ``const``, ``minimum``, ``maximum``, ``exclusiveMinimum``,
``exclusiveMaximum`` (numbers, 2019+ style), ``minLength``, ``maxLength``, ``pattern``
(``re.search``, unanchored as in JSON Schema), ``items`` (one schema), ``minItems``,
``maxItems``, ``uniqueItems``, ``anyOf``, ``oneOf``. Annotations are accepted and ignored:
``title``, ``description``, ``default``, ``examples``, ``format``, ``deprecated``, ``readOnly``,
``writeOnly``, ``$schema``, ``$id``, ``$comment`` and any ``x-…`` key.

Deliberate differences from full JSON Schema: ``integer`` means a JSON integer (``3``, not
``3.0``), so handlers can rely on getting a Python ``int``; booleans are never numbers; numbers
must be finite; strings must be valid Unicode (a lone surrogate such as ``"\\ud800"`` is
refused: it could not be sent on as UTF-8). Equality for ``enum``/``const``/``uniqueItems`` is
JSON equality (``true`` is not ``1``; ``1`` equals ``1.0``).

Bounds: schemas are ours, values are hostile. A value nesting deeper than :data:`MAX_VALUE_DEPTH`
is refused before anything else looks at it, so no later step can recurse without limit; schemas
deeper than :data:`MAX_SCHEMA_DEPTH` are refused by :func:`check_schema`.
"""

from __future__ import annotations

import difflib
import json
import math
import re
from typing import Any, Final

from exai.errors import InvalidParams

__all__ = ["MAX_SCHEMA_DEPTH", "MAX_VALUE_DEPTH", "SchemaError", "check_schema", "validate"]

#: Deepest nesting of objects/arrays accepted in a value (the value itself is level 1).
MAX_VALUE_DEPTH: Final = 32
#: Deepest nesting of subschemas accepted by :func:`check_schema`.
MAX_SCHEMA_DEPTH: Final = 16

_TYPE_NAMES: Final = frozenset(
    {"object", "string", "integer", "number", "boolean", "array", "null"}
)
_ANNOTATIONS: Final = frozenset(
    {
        "title",
        "description",
        "default",
        "examples",
        "format",
        "deprecated",
        "readOnly",
        "writeOnly",
        "$schema",
        "$id",
        "$comment",
    }
)
_KEYWORDS: Final = frozenset(
    {
        "type",
        "properties",
        "required",
        "additionalProperties",
        "enum",
        "const",
        "minimum",
        "maximum",
        "exclusiveMinimum",
        "exclusiveMaximum",
        "minLength",
        "maxLength",
        "pattern",
        "items",
        "minItems",
        "maxItems",
        "uniqueItems",
        "anyOf",
        "oneOf",
    }
)
_IDENT: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_PATTERNS: dict[str, re.Pattern[str]] = {}


class SchemaError(ValueError):
    """A tool's schema uses a keyword or value this validator does not support."""


# --------------------------------------------------------------------------------------------
# Describing values and paths


def _child(path: str, key: str) -> str:
    if _IDENT.match(key):
        return f"{path}.{key}"
    return f"{path}[{_short(key, 40)}]"


def _short(value: Any, limit: int = 60) -> str:
    """A bounded JSON-ish rendering of a (possibly hostile) value for a message."""
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, int):
        if abs(value) >= 10**30:
            return "a very large integer"
        return str(value)
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, str):
        clipped = value if len(value) <= limit else value[:limit] + "…"
        return json.dumps(clipped, ensure_ascii=False)
    if isinstance(value, list):
        return f"an array of {len(value)} item{'' if len(value) == 1 else 's'}"
    if isinstance(value, dict):
        return f"an object with {len(value)} field{'' if len(value) == 1 else 's'}"
    return type(value).__name__


def _type_of(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


_ARTICLE: Final = {
    "object": "an object",
    "string": "a string",
    "integer": "an integer",
    "number": "a number",
    "boolean": "a boolean",
    "array": "an array",
    "null": "null",
}


def _is_type(value: Any, name: str) -> bool:
    if name == "number":
        return isinstance(value, int | float) and not isinstance(value, bool)
    if name == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    return _type_of(value) == name


def _fail(path: str, message: str, field: str | None = None) -> InvalidParams:
    return InvalidParams(f"{path}: {message}", field=field or path)


# --------------------------------------------------------------------------------------------
# JSON equality (values are depth-checked first, so recursion here is bounded)


def _canon(value: Any) -> Any:
    """A hashable form in which two values are equal exactly when they are equal as JSON."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return (_type_of(value), value)
    if isinstance(value, int | float):
        # 1 and 1.0 are the same JSON number; integral floats compare as ints.
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        return ("number", value)
    if isinstance(value, list):
        return ("array", tuple(_canon(v) for v in value))
    if isinstance(value, dict):
        return ("object", frozenset((k, _canon(v)) for k, v in value.items()))
    return ("other", id(value))


def _json_equal(a: Any, b: Any) -> bool:
    return _canon(a) == _canon(b)


# --------------------------------------------------------------------------------------------
# Validation


def _check_depth(value: Any, path: str) -> None:
    stack: list[tuple[Any, int, str]] = [(value, 1, path)]
    while stack:
        node, depth, where = stack.pop()
        if depth > MAX_VALUE_DEPTH:
            raise _fail(where, f"nests deeper than the limit of {MAX_VALUE_DEPTH} levels")
        if isinstance(node, dict):
            for key, child in node.items():
                if isinstance(child, dict | list):
                    stack.append((child, depth + 1, _child(where, str(key))))
        elif isinstance(node, list):
            for i, child in enumerate(node):
                if isinstance(child, dict | list):
                    stack.append((child, depth + 1, f"{where}[{i}]"))


def validate(schema: dict[str, Any], value: Any, *, path: str = "arguments") -> None:
    """Check ``value`` against ``schema``; return quietly when it conforms.

    Args:
        schema: a schema :func:`check_schema` accepts (a tool's ``input_schema``).
        value: the decoded JSON value (the call's ``arguments``).
        path: how the value is named in messages and ``field``.

    Raises:
        InvalidParams: on the first problem found; ``field`` is the dotted path of the offending
            value (for a missing required field, the path it should have had).
    """
    _check_depth(value, path)
    _validate(schema, value, path)


def _validate(schema: Any, value: Any, path: str) -> None:
    if schema is True:
        return
    if schema is False:
        raise _fail(path, "no value is allowed here")

    types = schema.get("type")
    if types is not None:
        names = [types] if isinstance(types, str) else list(types)
        if not any(_is_type(value, n) for n in names):
            wanted = " or ".join(_ARTICLE.get(n, n) for n in names)
            raise _fail(path, f"must be {wanted} (got {_describe_for_type(value)})")

    if isinstance(value, float) and not math.isfinite(value):
        raise _fail(path, "must be a finite number")

    if "const" in schema and not _json_equal(value, schema["const"]):
        raise _fail(path, f"must be {_short(schema['const'])} (got {_short(value)})")

    if "enum" in schema:
        options = schema["enum"]
        if not any(_json_equal(value, o) for o in options):
            shown = ", ".join(_short(o, 30) for o in options[:12])
            more = ", …" if len(options) > 12 else ""
            raise _fail(path, f"must be one of {shown}{more} (got {_short(value)})")

    if isinstance(value, int | float) and not isinstance(value, bool):
        _check_number(schema, value, path)
    elif isinstance(value, str):
        _check_string(schema, value, path)
    elif isinstance(value, list):
        _check_array(schema, value, path)
    elif isinstance(value, dict):
        _check_object(schema, value, path)

    if "anyOf" in schema:
        _check_any_of(schema["anyOf"], value, path)
    if "oneOf" in schema:
        _check_one_of(schema["oneOf"], value, path)


def _describe_for_type(value: Any) -> str:
    kind = _type_of(value)
    if kind in ("object", "array"):
        return _ARTICLE[kind]
    return f"{_ARTICLE.get(kind, kind)} {_short(value)}" if kind != "null" else "null"


def _check_number(schema: dict[str, Any], value: float, path: str) -> None:
    shown = _short(value)
    if "minimum" in schema and value < schema["minimum"]:
        raise _fail(path, f"must be at least {_num(schema['minimum'])} (got {shown})")
    if "maximum" in schema and value > schema["maximum"]:
        raise _fail(path, f"must be at most {_num(schema['maximum'])} (got {shown})")
    if "exclusiveMinimum" in schema and value <= schema["exclusiveMinimum"]:
        raise _fail(path, f"must be greater than {_num(schema['exclusiveMinimum'])} (got {shown})")
    if "exclusiveMaximum" in schema and value >= schema["exclusiveMaximum"]:
        raise _fail(path, f"must be less than {_num(schema['exclusiveMaximum'])} (got {shown})")


def _num(bound: float) -> str:
    return str(int(bound)) if isinstance(bound, float) and bound.is_integer() else str(bound)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _check_string(schema: dict[str, Any], value: str, path: str) -> None:
    if not value.isascii():
        # JSON lets a client send "\ud800"; such a string cannot be sent on as UTF-8, so it is
        # refused here, naming the field, before any provider is called (issue 12).
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise _fail(
                path, f"is not valid Unicode text (a lone surrogate at character {exc.start})"
            ) from None
    if "minLength" in schema and len(value) < schema["minLength"]:
        raise _fail(
            path,
            f"must be at least {_plural(schema['minLength'], 'character')} long (got {len(value)})",
        )
    if "maxLength" in schema and len(value) > schema["maxLength"]:
        raise _fail(
            path,
            f"must be at most {_plural(schema['maxLength'], 'character')} long (got {len(value)})",
        )
    if "pattern" in schema and _pattern(schema["pattern"]).search(value) is None:
        raise _fail(path, f"must match the pattern {schema['pattern']!r} (got {_short(value)})")


def _pattern(source: str) -> re.Pattern[str]:
    compiled = _PATTERNS.get(source)
    if compiled is None:
        compiled = _PATTERNS[source] = re.compile(source)
    return compiled


def _check_array(schema: dict[str, Any], value: list[Any], path: str) -> None:
    if "minItems" in schema and len(value) < schema["minItems"]:
        raise _fail(
            path, f"must have at least {_plural(schema['minItems'], 'item')} (got {len(value)})"
        )
    if "maxItems" in schema and len(value) > schema["maxItems"]:
        raise _fail(
            path, f"must have at most {_plural(schema['maxItems'], 'item')} (got {len(value)})"
        )
    items = schema.get("items")
    if items is not None:
        for i, item in enumerate(value):
            _validate(items, item, f"{path}[{i}]")
    if schema.get("uniqueItems"):
        seen: dict[Any, int] = {}
        for i, item in enumerate(value):
            key = _canon(item)
            if key in seen:
                raise _fail(path, f"items {seen[key]} and {i} are equal; items must be unique")
            seen[key] = i


def _check_object(schema: dict[str, Any], value: dict[str, Any], path: str) -> None:
    properties: dict[str, Any] = schema.get("properties", {})
    for name in schema.get("required", ()):
        if name not in value:
            raise _fail(path, f"missing required field {name!r}", _child(path, name))
    extra = schema.get("additionalProperties", True)
    for key, item in value.items():
        sub = properties.get(key)
        where = _child(path, str(key))
        if sub is not None:
            _validate(sub, item, where)
        elif extra is False:
            hint = difflib.get_close_matches(str(key)[:100], list(properties), n=1)
            suffix = f" (did you mean {hint[0]!r}?)" if hint else ""
            raise InvalidParams(f"{where}: unknown field{suffix}", field=where)
        elif extra is not True:
            _validate(extra, item, where)


def _check_any_of(branches: list[Any], value: Any, path: str) -> None:
    failures: list[InvalidParams] = []
    for branch in branches:
        try:
            _validate(branch, value, path)
        except InvalidParams as exc:
            failures.append(exc)
        else:
            return
    raise _no_branch(branches, value, path, failures)


def _check_one_of(branches: list[Any], value: Any, path: str) -> None:
    failures: list[InvalidParams] = []
    matched: list[int] = []
    for i, branch in enumerate(branches):
        try:
            _validate(branch, value, path)
        except InvalidParams as exc:
            failures.append(exc)
        else:
            matched.append(i)
    if len(matched) == 1:
        return
    if matched:
        raise _fail(
            path,
            f"matches more than one of the allowed forms (forms {matched[0]} and {matched[1]}); "
            "it must match exactly one",
        )
    raise _no_branch(branches, value, path, failures)


def _no_branch(
    branches: list[Any], value: Any, path: str, failures: list[InvalidParams]
) -> InvalidParams:
    # When exactly one branch admits the value's type, its complaint is the useful one
    # (anyOf [string with pattern, null] given a bad string should talk about the pattern).
    typed = [
        exc
        for branch, exc in zip(branches, failures, strict=True)
        if isinstance(branch, dict) and "type" in branch and _branch_admits_type(branch, value)
    ]
    if len(typed) == 1:
        return typed[0]
    reasons = "; ".join(str(exc).removeprefix(f"{path}: ") for exc in failures[:3])
    return _fail(path, f"does not match any of the allowed forms ({reasons})")


def _branch_admits_type(branch: dict[str, Any], value: Any) -> bool:
    types = branch["type"]
    names = [types] if isinstance(types, str) else list(types)
    return any(_is_type(value, n) for n in names)


# --------------------------------------------------------------------------------------------
# Registration-time checks


def check_schema(schema: Any) -> None:
    """Refuse a schema this validator would not enforce exactly as written.

    Raises:
        SchemaError: an unknown or unsupported keyword (with a suggestion for a likely typo), a
            keyword with a value of the wrong kind, a pattern that does not compile, a required
            field that ``additionalProperties: false`` makes impossible, or nesting deeper than
            :data:`MAX_SCHEMA_DEPTH`.
    """
    _check_schema(schema, "schema", 1)


def _bad(where: str, message: str) -> SchemaError:
    return SchemaError(f"{where}: {message}")


def _check_schema(schema: Any, where: str, depth: int) -> None:
    if depth > MAX_SCHEMA_DEPTH:
        raise _bad(where, f"nests deeper than {MAX_SCHEMA_DEPTH} levels")
    if isinstance(schema, bool):
        return
    if not isinstance(schema, dict):
        raise _bad(where, f"a schema must be an object or a boolean, got {_type_of(schema)}")
    for key in schema:
        if key in _KEYWORDS or key in _ANNOTATIONS or key.startswith("x-"):
            continue
        hint = difflib.get_close_matches(key, sorted(_KEYWORDS | _ANNOTATIONS), n=1)
        suffix = f" (did you mean {hint[0]!r}?)" if hint else ""
        raise _bad(where, f"unsupported JSON Schema keyword {key!r}{suffix}")

    if "type" in schema:
        types = schema["type"]
        names = [types] if isinstance(types, str) else types
        if not isinstance(names, list) or not names or not all(n in _TYPE_NAMES for n in names):
            raise _bad(where, f"'type' must be one of {sorted(_TYPE_NAMES)} or a list of them")

    for key in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
        if key in schema and not _is_type(schema[key], "number"):
            raise _bad(where, f"{key!r} must be a number")
    for key in ("minLength", "maxLength", "minItems", "maxItems"):
        if key in schema and not (_is_type(schema[key], "integer") and schema[key] >= 0):
            raise _bad(where, f"{key!r} must be a non-negative integer")
    if "uniqueItems" in schema and not isinstance(schema["uniqueItems"], bool):
        raise _bad(where, "'uniqueItems' must be a boolean")
    if "pattern" in schema:
        if not isinstance(schema["pattern"], str):
            raise _bad(where, "'pattern' must be a string")
        try:
            re.compile(schema["pattern"])
        except re.error as exc:
            raise _bad(where, f"'pattern' does not compile: {exc}") from None
    if "enum" in schema and not (isinstance(schema["enum"], list) and schema["enum"]):
        raise _bad(where, "'enum' must be a non-empty array")

    properties = schema.get("properties", {})
    if not isinstance(properties, dict):
        raise _bad(where, "'properties' must be an object")
    for name, sub in properties.items():
        _check_schema(sub, f"{where}.properties.{name}", depth + 1)
    required = schema.get("required", [])
    if not (isinstance(required, list) and all(isinstance(r, str) for r in required)):
        raise _bad(where, "'required' must be an array of strings")
    extra = schema.get("additionalProperties", True)
    if extra is False:
        impossible = [r for r in required if r not in properties]
        if impossible:
            raise _bad(
                where,
                f"required field {impossible[0]!r} is not in 'properties' and "
                "additionalProperties is false, so no value could ever pass",
            )
    if not isinstance(extra, bool):
        _check_schema(extra, f"{where}.additionalProperties", depth + 1)
    if "items" in schema:
        if isinstance(schema["items"], list):
            raise _bad(where, "'items' must be one schema (tuple-form arrays are not supported)")
        _check_schema(schema["items"], f"{where}.items", depth + 1)
    for key in ("anyOf", "oneOf"):
        if key in schema:
            branches = schema[key]
            if not (isinstance(branches, list) and branches):
                raise _bad(where, f"{key!r} must be a non-empty array of schemas")
            for i, branch in enumerate(branches):
                _check_schema(branch, f"{where}.{key}[{i}]", depth + 1)
