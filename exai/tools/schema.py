"""Tool argument validation: JSON Schema (draft 2020-12) through ``jsonschema``, with messages
that name the field.

:func:`check_schema` runs when a tool is registered (:meth:`exai.tools.base.ToolRegistry.register`):
the schema must be valid against the 2020-12 metaschema, and a keyword that is not JSON Schema
(a typo such as ``minLenght``) is refused with the closest valid name instead of being silently
ignored. Every keyword of the draft is then honoured — ``$ref``/``$defs``, ``multipleOf``,
``patternProperties``, ``if``/``then``/``else``, … — by a validator compiled once per schema.

:func:`validate` runs on every ``tools/call`` before the handler; the first problem becomes
JSON-RPC -32602 naming the field by a dotted path (``arguments.files[2]``), with a message a
person can act on::

    arguments: missing required field 'prompt'
    arguments.temperature: must be at most 1 (got 3)
    arguments.modle: unknown field (did you mean 'model'?)

What exai adds to JSON Schema, because the values are hostile and the check runs on the event
loop:

* before the schema is looked at, one pass over the value refuses nesting deeper than
  :data:`MAX_VALUE_DEPTH`, a string that is not valid Unicode (a lone surrogate such as
  ``"\\ud800"``: it could not be sent on as UTF-8), a number that is not finite and an integer
  of more than :data:`MAX_INTEGER_BITS` bits (Python would not even print it);
* caps first: an array over its ``maxItems`` (a string over its ``maxLength``) is refused by the
  cap before any item is validated (any pattern run), so a client cannot make the check walk
  half a million file paths a schema allows a hundred of;
* ``uniqueItems`` in linear time (jsonschema's fallback is quadratic), with JSON equality
  (``true`` is not ``1``; ``1`` equals ``1.0``);
* messages built from bounded renderings of the value (a 4 MiB string or a 10,000-digit integer
  is never printed);
* ``integer`` means a JSON integer (``3``, not ``3.0``), so handlers can rely on a Python
  ``int``; booleans are never numbers;
* ``anyOf``/``oneOf``: when exactly one branch admits the value's type, its complaint is the one
  reported (``anyOf [string with a pattern, null]`` given a bad string talks about the pattern);
* only local ``$ref`` (``#…``): a schema never makes the daemon fetch anything, and a schema
  whose references go round without reaching a schema is refused at registration.

The keywords exai implements for this, and the validator class, are in
:mod:`exai.tools.schema_keywords`; this module checks schemas and values.
"""

from __future__ import annotations

import difflib
import json
import math
import re
from collections import OrderedDict
from typing import Any, Final

from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError as _JsonSchemaError

from exai.errors import InvalidParams
from exai.tools.schema_keywords import (
    OWN_KEYWORDS,
    ToolArgumentsValidator,
    child_path,
    describe,
    is_type,
    type_of,
)

__all__ = [
    "MAX_INTEGER_BITS",
    "MAX_SCHEMA_DEPTH",
    "MAX_VALUE_DEPTH",
    "SchemaError",
    "check_schema",
    "compiled",
    "validate",
]

MAX_VALUE_DEPTH: Final = 32
#: Largest integer accepted in a value, in bits (about 3,900 decimal digits).
MAX_INTEGER_BITS: Final = 13_000
#: Deepest nesting of subschemas accepted by :func:`check_schema`.
MAX_SCHEMA_DEPTH: Final = 16
#: Compiled validators kept (tool schemas are few; ad-hoc schemas come and go).
_CACHE_MAX: Final = 256
#: every keyword of draft 2020-12 (applicators, assertions, core, annotations)
_KEYWORDS: Final = frozenset(
    {
        *Draft202012Validator.VALIDATORS,
        "$schema",
        "$id",
        "$anchor",
        "$dynamicAnchor",
        "$vocabulary",
        "$comment",
        "$defs",
        "then",
        "else",
        "title",
        "description",
        "default",
        "examples",
        "deprecated",
        "readOnly",
        "writeOnly",
        "contentEncoding",
        "contentMediaType",
        "contentSchema",
        "maxContains",
        "minContains",
    }
)
#: keywords whose value is a map of name → schema
_SCHEMA_MAPS: Final = ("properties", "patternProperties", "$defs", "dependentSchemas")
#: keywords whose value is one schema
_SCHEMA_ONE: Final = (
    "additionalProperties",
    "items",
    "contains",
    "propertyNames",
    "not",
    "if",
    "then",
    "else",
    "unevaluatedItems",
    "unevaluatedProperties",
    "contentSchema",
)
#: keywords whose value is a list of schemas
_SCHEMA_LISTS: Final = ("allOf", "anyOf", "oneOf", "prefixItems")


class SchemaError(ValueError):
    """A tool's schema is not valid JSON Schema, or uses something exai refuses (a keyword
    that is not JSON Schema, a non-local ``$ref``, absurd nesting)."""


# --------------------------------------------------------------------------------------------
# Validation


def _check_value(value: Any, path: str) -> None:
    """One pass over the value: nesting, Unicode, finite numbers (see the module docstring)."""
    stack: list[tuple[Any, int, str]] = [(value, 1, path)]
    while stack:
        node, depth, where = stack.pop()
        if depth > MAX_VALUE_DEPTH:
            raise InvalidParams(
                f"{where}: nests deeper than the limit of {MAX_VALUE_DEPTH} levels", field=where
            )
        if isinstance(node, str):
            if not node.isascii():
                try:
                    node.encode("utf-8")
                except UnicodeEncodeError as exc:
                    raise InvalidParams(
                        f"{where}: is not valid Unicode text (a lone surrogate at character "
                        f"{exc.start})",
                        field=where,
                    ) from None
        elif isinstance(node, float):
            if not math.isfinite(node):
                raise InvalidParams(f"{where}: must be a finite number", field=where)
        elif isinstance(node, int) and not isinstance(node, bool):
            if abs(node).bit_length() > MAX_INTEGER_BITS:
                # Python will not even print it (4,300 digits), and no tool needs one
                raise InvalidParams(
                    f"{where}: is a very large integer (more than {MAX_INTEGER_BITS} bits)",
                    field=where,
                )
        elif isinstance(node, dict):
            for key, child in node.items():
                stack.append((child, depth + 1, child_path(where, str(key))))
        elif isinstance(node, list):
            for i, child in enumerate(node):
                stack.append((child, depth + 1, f"{where}[{i}]"))


_VALIDATORS: OrderedDict[int, tuple[dict[str, Any], Any]] = OrderedDict()


def compiled(schema: dict[str, Any]) -> Any:
    """The validator for ``schema``, built once (at most :data:`_CACHE_MAX` are kept; the schema
    object is held with it, so its identity stays a valid key)."""
    key = id(schema)
    hit = _VALIDATORS.get(key)
    if hit is not None and hit[0] is schema:
        _VALIDATORS.move_to_end(key)
        return hit[1]
    validator = ToolArgumentsValidator(schema)
    _VALIDATORS[key] = (schema, validator)
    if len(_VALIDATORS) > _CACHE_MAX:
        _VALIDATORS.popitem(last=False)
    return validator


_EMPTY_VALID: OrderedDict[int, tuple[dict[str, Any], bool]] = OrderedDict()


def _empty_is_valid(schema: dict[str, Any]) -> bool:
    """Whether ``{}`` conforms to ``schema``, decided once per schema (kept as :func:`compiled`
    keeps its validators)."""
    key = id(schema)
    hit = _EMPTY_VALID.get(key)
    if hit is not None and hit[0] is schema:
        return hit[1]
    try:
        ok = next(compiled(schema).iter_errors({}), None) is None
    except RecursionError:
        ok = False  # (validate answers it, as for any value)
    _EMPTY_VALID[key] = (schema, ok)
    if len(_EMPTY_VALID) > _CACHE_MAX:
        _EMPTY_VALID.popitem(last=False)
    return ok


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
    if type(value) is dict and not value and _empty_is_valid(schema):
        return  # (no arguments for a tool that needs none: checked once per schema)
    _check_value(value, path)
    try:
        error = next(compiled(schema).iter_errors(value), None)
    except RecursionError:
        # a schema whose references go round without reaching a schema for this value (the
        # pure cycles are refused at registration): the tool's fault, answered, not a crash
        raise InvalidParams(
            f"{path}: cannot be checked: the tool's schema refers to itself without end",
            field=path,
        ) from None
    if error is None:
        return
    where = path
    for step in error.absolute_path:
        where = f"{where}[{step}]" if isinstance(step, int) else child_path(where, str(step))
    field = where
    if error.validator == "required" and isinstance(error.validator_value, str):
        field = child_path(where, error.validator_value)
    message = error.message
    if error.validator not in OWN_KEYWORDS and len(message) > 200:
        message = message[:199] + "…"  # jsonschema's own wording, for the rarer keywords
    raise InvalidParams(f"{where}: {message}", field=field)


# --------------------------------------------------------------------------------------------
# Registration-time checks


def check_schema(schema: Any) -> None:
    """Refuse a schema that is not valid JSON Schema, or that exai would not honour as written.

    Raises:
        SchemaError: not valid against the draft 2020-12 metaschema (a keyword with a value of
            the wrong kind, a pattern that does not compile, ``items`` as an array, …); a
            keyword that is not JSON Schema (with the closest valid one); a ``$ref`` that is
            not local (``#…``) or does not resolve; a required field that
            ``additionalProperties: false`` makes impossible; nesting deeper than
            :data:`MAX_SCHEMA_DEPTH`.
    """
    try:
        key: str | None = json.dumps(schema, sort_keys=True)
    except (TypeError, ValueError):
        key = None  # not JSON at all: the checks below say what is wrong
    if key is not None and key in _CHECKED:
        _CHECKED.move_to_end(key)
        return
    _walk(schema, "schema", 1)
    try:
        # (the metaschema check costs milliseconds: each distinct schema is checked once)
        Draft202012Validator.check_schema(schema)
    except _JsonSchemaError as exc:
        where = "schema" + "".join(
            f"[{p}]" if isinstance(p, int) else f".{p}" for p in exc.absolute_path
        )
        raise SchemaError(f"{where}: {_schema_complaint(exc)}") from None
    _check_refs(schema)
    _check_terminates(schema)
    if key is not None:
        _CHECKED[key] = None
        if len(_CHECKED) > _CACHE_MAX:
            _CHECKED.popitem(last=False)


#: the schemas (as sorted JSON) that passed :func:`check_schema`
_CHECKED: OrderedDict[str, None] = OrderedDict()


def _schema_complaint(exc: _JsonSchemaError) -> str:
    keyword = exc.absolute_path[-1] if exc.absolute_path else None
    message = exc.message if len(exc.message) <= 200 else exc.message[:199] + "…"
    if keyword is not None:
        return f"{keyword!r} is not valid JSON Schema: {message}"
    return message


def _bad(where: str, message: str) -> SchemaError:
    return SchemaError(f"{where}: {message}")


def _walk(schema: Any, where: str, depth: int) -> None:
    """exai's own checks, on every subschema: depth, keywords that are not JSON Schema,
    impossible required fields, local ``$ref`` only, compilable patterns."""
    if depth > MAX_SCHEMA_DEPTH:
        raise _bad(where, f"nests deeper than {MAX_SCHEMA_DEPTH} levels")
    if isinstance(schema, bool):
        return
    if not isinstance(schema, dict):
        raise _bad(where, f"a schema must be an object or a boolean, got {type_of(schema)}")
    for key in schema:
        if key in _KEYWORDS or key.startswith("x-"):
            continue
        hint = difflib.get_close_matches(key, sorted(_KEYWORDS), n=1)
        suffix = f" (did you mean {hint[0]!r}?)" if hint else ""
        raise _bad(where, f"unsupported JSON Schema keyword {key!r}{suffix}")
    _check_kinds(schema, where)
    ref = schema.get("$ref")
    if ref is not None and not (isinstance(ref, str) and ref.startswith("#")):
        raise _bad(where, f"'$ref' must be local to the schema ('#…'), got {describe(ref)}")
    properties = schema.get("properties", {})
    required = schema.get("required", [])
    if (
        schema.get("additionalProperties", True) is False
        and isinstance(properties, dict)
        and isinstance(required, list)
        and not schema.get("patternProperties")
    ):
        impossible = [r for r in required if isinstance(r, str) and r not in properties]
        if impossible:
            raise _bad(
                where,
                f"required field {impossible[0]!r} is not in 'properties' and "
                "additionalProperties is false, so no value could ever pass",
            )
    for key in _SCHEMA_MAPS:
        sub = schema.get(key)
        if isinstance(sub, dict):
            for name, child in sub.items():
                _walk(child, f"{where}.{key}.{name}", depth + 1)
    for key in _SCHEMA_ONE:
        if key in schema and not isinstance(schema[key], list):
            _walk(schema[key], f"{where}.{key}", depth + 1)
    for key in _SCHEMA_LISTS:
        branches = schema.get(key)
        if isinstance(branches, list):
            for i, child in enumerate(branches):
                _walk(child, f"{where}.{key}[{i}]", depth + 1)


_TYPE_NAMES: Final = frozenset(
    {"object", "string", "integer", "number", "boolean", "array", "null"}
)


def _check_kinds(schema: dict[str, Any], where: str) -> None:
    """The common mistakes, each with a message that says what is expected (the metaschema
    catches the rest, in its own words)."""
    if "type" in schema:
        types = schema["type"]
        names = [types] if isinstance(types, str) else types
        if not isinstance(names, list) or not names or not all(n in _TYPE_NAMES for n in names):
            raise _bad(where, f"'type' must be one of {sorted(_TYPE_NAMES)} or a list of them")
    for key in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf"):
        if key in schema and not is_type(schema[key], "number"):
            raise _bad(where, f"{key!r} must be a number")
    for key in ("minLength", "maxLength", "minItems", "maxItems", "minProperties", "maxProperties"):
        if key in schema and not (is_type(schema[key], "integer") and schema[key] >= 0):
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
    if "properties" in schema and not isinstance(schema["properties"], dict):
        raise _bad(where, "'properties' must be an object")
    required = schema.get("required", [])
    if not (isinstance(required, list) and all(isinstance(r, str) for r in required)):
        raise _bad(where, "'required' must be an array of strings")
    if isinstance(schema.get("items"), list):
        raise _bad(where, "'items' must be one schema (for tuple-form arrays use 'prefixItems')")
    for key in _SCHEMA_LISTS:
        if key in schema and not (isinstance(schema[key], list) and schema[key]):
            raise _bad(where, f"{key!r} must be a non-empty array of schemas")


#: values every schema is tried on at registration (a ``$ref`` cycle that reaches no schema
#: recurses on any of them)
_PROBES: Final[tuple[Any, ...]] = (None, True, 0, 0.5, "", [], {})


def _check_terminates(schema: Any) -> None:
    """Refuse a schema whose ``$ref`` chain never reaches a schema (``a`` → ``a``): jsonschema
    would recurse until Python gives up, on every call."""
    validator = ToolArgumentsValidator(schema)
    for probe in _PROBES:
        try:
            next(validator.iter_errors(probe), None)
        except RecursionError:
            raise SchemaError(
                "schema: it refers to itself without end (a '$ref' cycle that never reaches a "
                "schema)"
            ) from None


def _check_refs(schema: Any) -> None:
    """Every ``$ref`` resolves inside the schema (checked once, here, not on a call)."""
    validator = ToolArgumentsValidator(schema)
    stack: list[Any] = [schema]
    seen = 0
    while stack and seen < 10_000:
        node = stack.pop()
        seen += 1
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str):
                try:
                    validator._resolver.lookup(ref)
                except Exception as exc:  # referencing's Unresolvable and friends
                    raise SchemaError(f"schema: '$ref' {ref!r} does not resolve ({exc})") from None
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
