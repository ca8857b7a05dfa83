"""The JSON Schema keywords exai implements itself on top of ``jsonschema``, and the validator
class they make (:data:`ToolArgumentsValidator`): draft 2020-12 with

* messages built from bounded renderings of the value (jsonschema's print the whole value: a
  4 MiB string, a 500,000-item array, or a 10,000-digit integer, which ``repr`` refuses);
* caps first: ``items`` (and ``prefixItems``, ``contains``, ``uniqueItems``) skip an array over
  its ``maxItems``, ``pattern`` a string over its ``maxLength`` — the cap reports it;
* ``uniqueItems`` in linear time, with JSON equality (``true`` is not ``1``, ``1`` is ``1.0``);
* ``integer`` meaning a JSON integer (``3``, not ``3.0``);
* ``anyOf``/``oneOf`` reporting the complaint of the one branch that admits the value's type;
* a planned fast path (:func:`_plan`): a subschema made only of these keywords is checked
  without building a jsonschema validator for it (which costs more than the checks: a tool's
  per-field schemas are such).

Every other keyword (``$ref``, ``allOf``, ``not``, ``if``/``then``/``else``,
``patternProperties``, ``propertyNames``, ``dependentRequired``, …) is jsonschema's own.
"""

from __future__ import annotations

import difflib
import json
import re
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any, Final

import jsonschema
from jsonschema import Draft202012Validator, ValidationError

__all__ = ["OWN_KEYWORDS", "ToolArgumentsValidator", "child_path", "describe", "type_of"]

#: patterns and plans kept (tool schemas are few; ad-hoc schemas come and go)
_CACHE_MAX: Final = 256
_IDENT: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


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


def _describe_for_type(value: Any) -> str:
    kind = _type_of(value)
    if kind in ("object", "array"):
        return _ARTICLE[kind]
    return f"{_ARTICLE.get(kind, kind)} {_short(value)}" if kind != "null" else "null"


def _num(bound: float) -> str:
    return str(int(bound)) if isinstance(bound, float) and bound.is_integer() else str(bound)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _canon(value: Any) -> Any:
    """A hashable form in which two values are equal exactly when they are equal as JSON
    (values are depth-checked first, so the recursion is bounded)."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return (_type_of(value), value)
    if isinstance(value, int | float):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        return ("number", value)
    if isinstance(value, list):
        return ("array", tuple(_canon(v) for v in value))
    if isinstance(value, dict):
        return ("object", frozenset((k, _canon(v)) for k, v in value.items()))
    return ("other", id(value))


# --------------------------------------------------------------------------------------------
# Keywords whose jsonschema implementation prints the whole value, is quadratic, or walks
# items a cap already refuses: exai's own, with bounded messages. Everything else (properties,
# items, $ref, allOf, not, if/then/else, multipleOf, patternProperties, …) is jsonschema's.


def _type(validator: Any, types: Any, instance: Any, schema: Any) -> Iterator[ValidationError]:
    names = [types] if isinstance(types, str) else list(types)
    if not any(_is_type(instance, n) for n in names):
        wanted = " or ".join(_ARTICLE.get(n, n) for n in names)
        yield ValidationError(f"must be {wanted} (got {_describe_for_type(instance)})")


def _const(validator: Any, const: Any, instance: Any, schema: Any) -> Iterator[ValidationError]:
    if _canon(instance) != _canon(const):
        yield ValidationError(f"must be {_short(const)} (got {_short(instance)})")


def _enum(validator: Any, options: Any, instance: Any, schema: Any) -> Iterator[ValidationError]:
    key = _canon(instance)
    if not any(key == _canon(o) for o in options):
        shown = ", ".join(_short(o, 30) for o in options[:12])
        more = ", …" if len(options) > 12 else ""
        yield ValidationError(f"must be one of {shown}{more} (got {_short(instance)})")


def _bound(word: str, passes: Any) -> Any:
    def check(validator: Any, bound: Any, instance: Any, schema: Any) -> Iterator[ValidationError]:
        if _is_type(instance, "number") and not passes(instance, bound):
            yield ValidationError(f"must be {word} {_num(bound)} (got {_short(instance)})")

    return check


def _multiple_of(
    validator: Any, factor: Any, instance: Any, schema: Any
) -> Iterator[ValidationError]:
    if not _is_type(instance, "number"):
        return
    if isinstance(factor, float) or isinstance(instance, float):
        quotient = instance / factor
        try:
            bad = int(quotient) != quotient
        except OverflowError:
            bad = True
    else:
        bad = instance % factor != 0
    if bad:
        yield ValidationError(f"must be a multiple of {_num(factor)} (got {_short(instance)})")


def _min_length(validator: Any, n: Any, instance: Any, schema: Any) -> Iterator[ValidationError]:
    if _is_type(instance, "string") and len(instance) < n:
        yield ValidationError(
            f"must be at least {_plural(n, 'character')} long (got {len(instance)})"
        )


def _max_length(validator: Any, n: Any, instance: Any, schema: Any) -> Iterator[ValidationError]:
    if _is_type(instance, "string") and len(instance) > n:
        yield ValidationError(
            f"must be at most {_plural(n, 'character')} long (got {len(instance)})"
        )


def _over_cap(instance: Any, schema: Any, key: str) -> bool:
    cap = schema.get(key)
    return isinstance(cap, int) and len(instance) > cap


def _pattern(validator: Any, source: Any, instance: Any, schema: Any) -> Iterator[ValidationError]:
    if not _is_type(instance, "string") or _over_cap(instance, schema, "maxLength"):
        return  # (the length cap reports it, without running the pattern on it)
    if _compiled_pattern(source).search(instance) is None:
        yield ValidationError(f"must match the pattern {source!r} (got {_short(instance)})")


_PATTERNS: OrderedDict[str, re.Pattern[str]] = OrderedDict()


def _compiled_pattern(source: str) -> re.Pattern[str]:
    compiled = _PATTERNS.get(source)
    if compiled is None:
        compiled = _PATTERNS[source] = re.compile(source)
        if len(_PATTERNS) > _CACHE_MAX:
            _PATTERNS.popitem(last=False)
    return compiled


def _min_items(validator: Any, n: Any, instance: Any, schema: Any) -> Iterator[ValidationError]:
    if _is_type(instance, "array") and len(instance) < n:
        yield ValidationError(f"must have at least {_plural(n, 'item')} (got {len(instance)})")


def _max_items(validator: Any, n: Any, instance: Any, schema: Any) -> Iterator[ValidationError]:
    if _is_type(instance, "array") and len(instance) > n:
        yield ValidationError(f"must have at most {_plural(n, 'item')} (got {len(instance)})")


#: keywords a planned schema may hold: exai's own keywords, and annotations (no ``$ref``,
#: ``$id`` or a jsonschema keyword: those schemas go through jsonschema's ``descend``)
_LEAF_OK: Final = frozenset(
    {
        "type",
        "const",
        "enum",
        "minimum",
        "maximum",
        "exclusiveMinimum",
        "exclusiveMaximum",
        "multipleOf",
        "minLength",
        "maxLength",
        "pattern",
        "minItems",
        "maxItems",
        "uniqueItems",
        "required",
        "minProperties",
        "maxProperties",
        "properties",
        "items",
        "additionalProperties",
        "anyOf",
        "oneOf",
        "title",
        "description",
        "default",
        "examples",
        "deprecated",
        "readOnly",
        "writeOnly",
        "$comment",
    }
)
_PLANS: OrderedDict[int, tuple[Any, list[tuple[str, Any, Any]] | None]] = OrderedDict()


def _plan(schema: Any) -> list[tuple[str, Any, Any]] | None:
    """For a schema holding only exai's own keywords and annotations, its checks in order;
    ``None`` for any other (jsonschema descends into it)."""
    key = id(schema)
    hit = _PLANS.get(key)
    if hit is not None and hit[0] is schema:
        return hit[1]
    plan: list[tuple[str, Any, Any]] | None = None
    if isinstance(schema, dict) and all(k in _LEAF_OK or k.startswith("x-") for k in schema):
        plan = [(k, _PLANNED[k], v) for k, v in schema.items() if k in _PLANNED]
    _PLANS[key] = (schema, plan)
    if len(_PLANS) > 16 * _CACHE_MAX:
        _PLANS.popitem(last=False)
    return plan


def _apply(
    validator: Any, schema: Any, instance: Any, path: str | int
) -> Iterator[ValidationError]:
    """``validator.descend(instance, schema, path=path)``, without building a validator for a
    schema :func:`_plan` has planned: a tool's per-field schemas are such, and building a
    validator for each costs more than their checks."""
    plan = _plan(schema)
    if plan is None:
        yield from validator.descend(instance, schema, path=path)
        return
    for keyword, check, value in plan:
        for error in check(validator, value, instance, schema):
            error._set(
                validator=keyword,
                validator_value=value,
                instance=instance,
                schema=schema,
                type_checker=validator.TYPE_CHECKER,
            )
            error.schema_path.appendleft(keyword)
            error.path.appendleft(path)
            yield error


def _properties(
    validator: Any, properties: Any, instance: Any, schema: Any
) -> Iterator[ValidationError]:
    if not isinstance(instance, dict):
        return
    for name, sub in properties.items():
        if name in instance:
            yield from _apply(validator, sub, instance[name], name)


def _items(validator: Any, items: Any, instance: Any, schema: Any) -> Iterator[ValidationError]:
    if not isinstance(instance, list) or _over_cap(instance, schema, "maxItems"):
        return  # (maxItems reports it, before a single item is looked at)
    start = len(schema.get("prefixItems", ()))
    for i in range(start, len(instance)):
        yield from _apply(validator, items, instance[i], i)


def _capped(keyword: str) -> Any:
    """jsonschema's ``keyword`` applicator, skipped for an array over its ``maxItems``."""
    inner = Draft202012Validator.VALIDATORS[keyword]

    def check(validator: Any, value: Any, instance: Any, schema: Any) -> Iterator[ValidationError]:
        if _is_type(instance, "array") and _over_cap(instance, schema, "maxItems"):
            return  # (maxItems reports it, before a single item is looked at)
        yield from inner(validator, value, instance, schema) or ()

    return check


def _unique_items(
    validator: Any, unique: Any, instance: Any, schema: Any
) -> Iterator[ValidationError]:
    if not unique or not _is_type(instance, "array"):
        return
    if _over_cap(instance, schema, "maxItems"):
        return
    seen: dict[Any, int] = {}
    for i, item in enumerate(instance):
        key = _canon(item)
        if key in seen:
            yield ValidationError(f"items {seen[key]} and {i} are equal; items must be unique")
            return
        seen[key] = i


def _required(validator: Any, names: Any, instance: Any, schema: Any) -> Iterator[ValidationError]:
    if not _is_type(instance, "object"):
        return
    for name in names:
        if name not in instance:
            # the missing field's name rides as the error's value: it becomes `field`
            yield ValidationError(f"missing required field {name!r}", validator_value=name)
            return


def _min_properties(
    validator: Any, n: Any, instance: Any, schema: Any
) -> Iterator[ValidationError]:
    if _is_type(instance, "object") and len(instance) < n:
        yield ValidationError(f"must have at least {_plural(n, 'field')} (got {len(instance)})")


def _max_properties(
    validator: Any, n: Any, instance: Any, schema: Any
) -> Iterator[ValidationError]:
    if _is_type(instance, "object") and len(instance) > n:
        yield ValidationError(f"must have at most {_plural(n, 'field')} (got {len(instance)})")


def _additional_properties(
    validator: Any, extra: Any, instance: Any, schema: Any
) -> Iterator[ValidationError]:
    if not _is_type(instance, "object"):
        return
    properties = schema.get("properties", {})
    patterns = [_compiled_pattern(p) for p in schema.get("patternProperties", {})]
    for key in instance:
        if key in properties or any(p.search(key) for p in patterns):
            continue
        if extra is False:
            hint = difflib.get_close_matches(str(key)[:100], list(properties), n=1)
            suffix = f" (did you mean {hint[0]!r}?)" if hint else ""
            yield ValidationError(f"unknown field{suffix}", path=[key])
            return
        if extra is not True:
            for error in _apply(validator, extra, instance[key], key):
                yield error
                return


def _branches(
    validator: Any, branches: Any, instance: Any
) -> tuple[list[int], list[tuple[Any, ValidationError]]]:
    """The branches ``instance`` matches, and the first complaint of each one it does not."""
    matched: list[int] = []
    failed: list[tuple[Any, ValidationError]] = []
    for i, branch in enumerate(branches):
        first = next(validator.descend(instance, branch, schema_path=i), None)
        if first is None:
            matched.append(i)
        else:
            failed.append((branch, first))
    return matched, failed


def _no_branch(instance: Any, failed: list[tuple[Any, ValidationError]]) -> ValidationError:
    # When exactly one branch admits the value's type, its complaint is the useful one.
    typed = [
        error
        for branch, error in failed
        if isinstance(branch, dict) and "type" in branch and _admits_type(branch, instance)
    ]
    if len(typed) == 1:
        return typed[0]
    reasons = "; ".join(_relative(error) for _, error in failed[:3])
    return ValidationError(f"does not match any of the allowed forms ({reasons})")


def _relative(error: ValidationError) -> str:
    where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error.path)
    return f"{where.lstrip('.')}: {error.message}" if where else error.message


def _admits_type(branch: dict[str, Any], instance: Any) -> bool:
    types = branch["type"]
    names = [types] if isinstance(types, str) else list(types)
    return any(_is_type(instance, n) for n in names)


def _any_of(validator: Any, branches: Any, instance: Any, schema: Any) -> Iterator[ValidationError]:
    matched, failed = _branches(validator, branches, instance)
    if not matched:
        yield _no_branch(instance, failed)


def _one_of(validator: Any, branches: Any, instance: Any, schema: Any) -> Iterator[ValidationError]:
    matched, failed = _branches(validator, branches, instance)
    if len(matched) > 1:
        yield ValidationError(
            f"matches more than one of the allowed forms (forms {matched[0]} and {matched[1]}); "
            "it must match exactly one"
        )
    elif not matched:
        yield _no_branch(instance, failed)


def _is_type(value: Any, name: str) -> bool:
    if name == "number":
        return isinstance(value, int | float) and not isinstance(value, bool)
    if name == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    return _type_of(value) == name


#: exai's assertions (the ones a leaf schema's plan runs directly)
_ASSERTIONS: Final[dict[str, Any]] = {
    "type": _type,
    "const": _const,
    "enum": _enum,
    "minimum": _bound("at least", lambda v, b: v >= b),
    "maximum": _bound("at most", lambda v, b: v <= b),
    "exclusiveMinimum": _bound("greater than", lambda v, b: v > b),
    "exclusiveMaximum": _bound("less than", lambda v, b: v < b),
    "multipleOf": _multiple_of,
    "minLength": _min_length,
    "maxLength": _max_length,
    "pattern": _pattern,
    "minItems": _min_items,
    "maxItems": _max_items,
    "uniqueItems": _unique_items,
    "required": _required,
    "minProperties": _min_properties,
    "maxProperties": _max_properties,
}

#: what a plan may run: the assertions and exai's applicators
_PLANNED: Final[dict[str, Any]] = {
    **_ASSERTIONS,
    "properties": _properties,
    "items": _items,
    "additionalProperties": _additional_properties,
    "anyOf": _any_of,
    "oneOf": _one_of,
}

_TYPES = Draft202012Validator.TYPE_CHECKER.redefine(
    "integer", lambda checker, value: _is_type(value, "integer")
)

#: draft 2020-12 with exai's bounded keywords (see the module docstring)
ToolArgumentsValidator: Any = jsonschema.validators.extend(
    Draft202012Validator,
    validators={
        **_ASSERTIONS,
        "items": _items,
        "properties": _properties,
        "prefixItems": _capped("prefixItems"),
        "contains": _capped("contains"),
        "additionalProperties": _additional_properties,
        "anyOf": _any_of,
        "oneOf": _one_of,
    },
    type_checker=_TYPES,
)


#: keywords whose messages exai writes itself (bounded, naming the field)
OWN_KEYWORDS: Final = frozenset(_PLANNED)
child_path = _child
describe = _short
type_of = _type_of
is_type = _is_type
