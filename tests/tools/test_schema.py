"""Tool arguments are checked against the tool's schema; each failure names the field."""

from __future__ import annotations

from typing import Any

import pytest

from exai.errors import InvalidParams
from exai.tools.schema import MAX_VALUE_DEPTH, SchemaError, check_schema, compiled, validate

CHAT = {
    "type": "object",
    "properties": {
        "prompt": {"type": "string", "minLength": 1, "maxLength": 100},
        "model": {"type": "string", "pattern": "^[a-z0-9.-]+$"},
        "temperature": {"type": "number", "minimum": 0, "maximum": 1},
        "thinking_mode": {"enum": ["minimal", "low", "medium", "high", "max"]},
        "use_websearch": {"type": "boolean", "default": True},
        "continuation_id": {"type": ["string", "null"]},
        "files": {"type": "array", "items": {"type": "string"}, "maxItems": 3, "uniqueItems": True},
        "step_number": {"type": "integer", "exclusiveMinimum": 0, "exclusiveMaximum": 10},
        "kind": {"const": "chat"},
        "options": {
            "type": "object",
            "properties": {"depth": {"type": "integer", "minimum": 1}},
            "additionalProperties": {"type": "string"},
        },
        "stance": {"anyOf": [{"type": "string", "enum": ["for", "against"]}, {"type": "null"}]},
        "size": {"oneOf": [{"type": "integer"}, {"type": "string", "pattern": "^[0-9]+k$"}]},
    },
    "required": ["prompt"],
    "additionalProperties": False,
}


def test_the_chat_schema_is_accepted_at_registration() -> None:
    check_schema(CHAT)


@pytest.mark.parametrize(
    "args",
    [
        {"prompt": "hi"},
        {
            "prompt": "hi",
            "model": "glm-4.6",
            "temperature": 0.5,
            "thinking_mode": "high",
            "use_websearch": False,
            "continuation_id": None,
            "files": ["/a", "/b"],
            "step_number": 9,
            "kind": "chat",
            "options": {"depth": 2, "flavour": "x"},
            "stance": None,
            "size": "32k",
        },
        {"prompt": "hi", "temperature": 1, "continuation_id": "abc", "stance": "for", "size": 3},
        {"prompt": "hi", "temperature": 0.0},
    ],
)
def test_conforming_arguments_pass(args: dict[str, Any]) -> None:
    validate(CHAT, args)


@pytest.mark.parametrize(
    ("args", "field", "message"),
    [
        ({}, "arguments.prompt", "arguments: missing required field 'prompt'"),
        ([], "arguments", "arguments: must be an object (got an array)"),
        ("hi", "arguments", 'arguments: must be an object (got a string "hi")'),
        (
            {"prompt": 5},
            "arguments.prompt",
            "arguments.prompt: must be a string (got an integer 5)",
        ),
        ({"prompt": ""}, "arguments.prompt", "must be at least 1 character long (got 0)"),
        (
            {"prompt": "x" * 101},
            "arguments.prompt",
            "must be at most 100 characters long (got 101)",
        ),
        (
            {"prompt": "hi", "temperature": 3},
            "arguments.temperature",
            "arguments.temperature: must be at most 1 (got 3)",
        ),
        ({"prompt": "hi", "temperature": -0.5}, "arguments.temperature", "must be at least 0"),
        (
            {"prompt": "hi", "temperature": True},
            "arguments.temperature",
            "must be a number (got a boolean true)",
        ),
        ({"prompt": "hi", "temperature": "0.5"}, "arguments.temperature", "must be a number"),
        (
            {"prompt": "hi", "temperature": float("nan")},
            "arguments.temperature",
            "must be a finite number",
        ),
        (
            {"prompt": "hi", "modle": "x"},
            "arguments.modle",
            "unknown field (did you mean 'model'?)",
        ),
        ({"prompt": "hi", "zzz": 1}, "arguments.zzz", "arguments.zzz: unknown field"),
        (
            {"prompt": "hi", "thinking_mode": "extreme"},
            "arguments.thinking_mode",
            'must be one of "minimal", "low", "medium", "high", "max" (got "extreme")',
        ),
        ({"prompt": "hi", "model": "GLM 4"}, "arguments.model", "must match the pattern"),
        (
            {"prompt": "hi", "continuation_id": 3},
            "arguments.continuation_id",
            "must be a string or null (got an integer 3)",
        ),
        ({"prompt": "hi", "files": ["/a", 2]}, "arguments.files[1]", "must be a string"),
        (
            {"prompt": "hi", "files": ["/a", "/a"]},
            "arguments.files",
            "items 0 and 1 are equal",
        ),
        (
            {"prompt": "hi", "files": ["1", "2", "3", "4"]},
            "arguments.files",
            "must have at most 3 items (got 4)",
        ),
        ({"prompt": "hi", "step_number": 0}, "arguments.step_number", "must be greater than 0"),
        ({"prompt": "hi", "step_number": 10}, "arguments.step_number", "must be less than 10"),
        ({"prompt": "hi", "step_number": 2.0}, "arguments.step_number", "must be an integer"),
        ({"prompt": "hi", "step_number": False}, "arguments.step_number", "must be an integer"),
        ({"prompt": "hi", "kind": "review"}, "arguments.kind", 'must be "chat" (got "review")'),
        ({"prompt": "hi", "options": {"depth": 0}}, "arguments.options.depth", "at least 1"),
        ({"prompt": "hi", "options": {"x": 1}}, "arguments.options.x", "must be a string"),
        (
            {"prompt": "hi", "options": {"my key": 1}},
            'arguments.options["my key"]',
            "must be a string",
        ),
        ({"prompt": "hi", "stance": "maybe"}, "arguments.stance", "must be one of"),
        ({"prompt": "hi", "stance": 1}, "arguments.stance", "does not match any of the allowed"),
        ({"prompt": "hi", "size": "big"}, "arguments.size", "must match the pattern"),
        ({"prompt": "hi", "size": 1.5}, "arguments.size", "does not match any of the allowed"),
    ],
)
def test_each_problem_is_invalid_params_naming_the_field(
    args: Any, field: str, message: str
) -> None:
    with pytest.raises(InvalidParams) as caught:
        validate(CHAT, args)

    assert caught.value.field == field
    assert caught.value.to_error_data()["field"] == field
    assert message in caught.value.message


def test_enum_and_const_use_json_equality() -> None:
    schema = {"enum": [1, "a", [1, 2]]}

    validate(schema, 1.0)  # 1 and 1.0 are the same JSON number
    validate(schema, [1, 2])
    with pytest.raises(InvalidParams):
        validate(schema, True)  # true is not 1
    with pytest.raises(InvalidParams):
        validate({"const": False}, 0)


def test_unique_items_tells_true_from_1_and_equal_objects_apart() -> None:
    schema = {"type": "array", "uniqueItems": True}

    validate(schema, [1, True, "1", [1], {"a": 1}])
    with pytest.raises(InvalidParams, match="items 0 and 1 are equal"):
        validate(schema, [{"a": 1, "b": 2}, {"b": 2, "a": 1}])
    with pytest.raises(InvalidParams, match="items 0 and 1 are equal"):
        validate(schema, [1, 1.0])


def test_one_of_refuses_a_value_matching_two_forms() -> None:
    schema = {"oneOf": [{"type": "number"}, {"type": "integer"}]}

    validate(schema, 1.5)
    with pytest.raises(InvalidParams, match="more than one of the allowed forms"):
        validate(schema, 2)


def test_additional_properties_default_to_allowed() -> None:
    validate({"type": "object", "properties": {"a": {"type": "string"}}}, {"b": [1, 2]})


def test_the_path_prefix_can_be_chosen() -> None:
    with pytest.raises(InvalidParams) as caught:
        validate({"type": "string"}, 1, path="params.name")

    assert caught.value.field == "params.name"


def test_a_value_nested_past_the_limit_is_refused_before_anything_else() -> None:
    value: Any = "leaf"
    for _ in range(MAX_VALUE_DEPTH):
        value = [value]

    with pytest.raises(InvalidParams, match="nests deeper than the limit") as caught:
        validate({"type": "object"}, {"a": value})

    assert caught.value.field.startswith("arguments.a[0][0]")


def test_a_very_deep_value_never_recurses_without_limit() -> None:
    value: Any = []
    for _ in range(100_000):
        value = [value]

    with pytest.raises(InvalidParams, match="nests deeper"):
        validate({"type": "array", "uniqueItems": True}, value)


def test_huge_integers_are_described_without_printing_them() -> None:
    with pytest.raises(InvalidParams, match="a very large integer"):
        validate({"type": "integer", "maximum": 10}, 10**5000)


def test_long_strings_are_clipped_in_messages() -> None:
    with pytest.raises(InvalidParams) as caught:
        validate({"type": "string", "pattern": "^a$"}, "b" * 100_000)

    assert len(caught.value.message) < 200


# --------------------------------------------------------------------------------- check_schema


@pytest.mark.parametrize(
    ("schema", "says"),
    [
        ({"type": "string", "minLenght": 1}, "unsupported JSON Schema keyword 'minLenght'"),
        ({"type": "string", "minLenght": 1}, "did you mean 'minLength'?"),
        ({"$ref": "#/$defs/x"}, "'$ref' '#/$defs/x' does not resolve"),
        ({"$ref": "https://example.com/schema.json"}, "'$ref' must be local to the schema"),
        ({"type": "number", "multipleOf": 0}, "'multipleOf' is not valid JSON Schema"),
        ({"type": "number", "multipleOf": "2"}, "'multipleOf' must be a number"),
        ({"type": "strin"}, "'type' must be one of"),
        ({"type": []}, "'type' must be one of"),
        ({"type": "string", "pattern": "("}, "'pattern' does not compile"),
        ({"type": "string", "minLength": -1}, "'minLength' must be a non-negative integer"),
        ({"type": "number", "maximum": "1"}, "'maximum' must be a number"),
        ({"enum": []}, "'enum' must be a non-empty array"),
        ({"anyOf": []}, "'anyOf' must be a non-empty array"),
        ({"type": "array", "items": [{"type": "string"}]}, "tuple-form arrays"),
        (
            {"properties": {"a": {"type": "string", "maxItem": 3}}},
            "schema.properties.a: unsupported",
        ),
        ({"required": "a"}, "'required' must be an array of strings"),
        (
            {"properties": {}, "required": ["prompt"], "additionalProperties": False},
            "required field 'prompt' is not in 'properties'",
        ),
        ("object", "a schema must be an object or a boolean"),
        ({"uniqueItems": "yes"}, "'uniqueItems' must be a boolean"),
    ],
)
def test_check_schema_rejects_what_could_not_be_honoured_as_written(schema: Any, says: str) -> None:
    with pytest.raises(SchemaError) as caught:
        check_schema(schema)

    assert says in str(caught.value)


def test_check_schema_accepts_annotations_and_vendor_keys() -> None:
    check_schema(
        {
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "type": "object",
            "title": "Chat",
            "description": "d",
            "properties": {
                "model": {"type": "string", "format": "model-name", "x-mcp-header": "Model"},
                "n": {"type": "integer", "default": 1, "examples": [1, 2], "deprecated": False},
            },
            "additionalProperties": {"type": "string"},
        }
    )


def test_check_schema_refuses_absurd_nesting() -> None:
    schema: dict[str, Any] = {"type": "string"}
    for _ in range(40):
        schema = {"type": "array", "items": schema}

    with pytest.raises(SchemaError, match="nests deeper"):
        check_schema(schema)


def test_a_string_that_is_not_unicode_is_refused_naming_the_field():
    schema = {"type": "object", "properties": {"prompt": {"type": "string"}}}
    with pytest.raises(InvalidParams) as info:
        validate(schema, {"prompt": "caf\u00e9 \ud800 x"})
    assert info.value.field == "arguments.prompt"
    assert "lone surrogate at character 5" in str(info.value)
    validate(schema, {"prompt": "caf\u00e9 \U0001f600"})  # real non-ASCII text is fine


# ------------------------------------------------------------------ every keyword is honoured


def test_multiple_of_in_a_schema_is_enforced_naming_the_field() -> None:
    schema = {"type": "object", "properties": {"n": {"type": "integer", "multipleOf": 5}}}
    check_schema(schema)
    validate(schema, {"n": 15})
    with pytest.raises(InvalidParams) as caught:
        validate(schema, {"n": 7})
    assert caught.value.field == "arguments.n"
    assert "must be a multiple of 5 (got 7)" in caught.value.message


def test_a_local_ref_is_followed() -> None:
    schema = {
        "type": "object",
        "$defs": {"path": {"type": "string", "pattern": "^/"}},
        "properties": {"files": {"type": "array", "items": {"$ref": "#/$defs/path"}}},
    }
    check_schema(schema)
    validate(schema, {"files": ["/a", "/b"]})
    with pytest.raises(InvalidParams) as caught:
        validate(schema, {"files": ["/a", "b"]})
    assert caught.value.field == "arguments.files[1]"
    assert "must match the pattern" in caught.value.message


def test_keywords_exai_writes_no_message_for_are_still_enforced() -> None:
    schema = {
        "type": "object",
        "properties": {"mode": {"type": "string"}, "depth": {"type": "integer"}},
        "if": {"properties": {"mode": {"const": "deep"}}},
        "then": {"required": ["depth"]},
        "propertyNames": {"maxLength": 5},
    }
    check_schema(schema)
    validate(schema, {"mode": "deep", "depth": 3})
    with pytest.raises(InvalidParams, match="missing required field 'depth'"):
        validate(schema, {"mode": "deep"})
    with pytest.raises(InvalidParams) as caught:
        validate(schema, {"mode": "quick", "longname": 1})
    assert caught.value.field == "arguments"


def test_a_registry_refuses_a_plugin_schema_it_could_not_honour() -> None:
    from exai.tools.base import ToolRegistry, ToolResult, ToolSpec

    async def handler(args: dict[str, Any], ctx: Any) -> ToolResult:
        return ToolResult(text="")

    def spec(schema: dict[str, Any]) -> ToolSpec:
        return ToolSpec(name="plugin", description="", input_schema=schema, handler=handler)

    registry = ToolRegistry()
    with pytest.raises(SchemaError, match="did you mean 'maxLength'"):
        registry.register(spec({"type": "object", "properties": {"a": {"maxLenght": 3}}}))
    with pytest.raises(SchemaError, match="must be local"):
        registry.register(spec({"$ref": "http://example.com/x.json"}))
    registry.register(spec({"type": "object", "properties": {"n": {"multipleOf": 2}}}))
    assert "plugin" in registry


def test_an_array_over_its_cap_is_refused_by_the_cap_before_any_item_is_checked() -> None:
    schema = {"type": "array", "items": {"type": "integer"}, "uniqueItems": True, "maxItems": 3}
    with pytest.raises(InvalidParams, match="must have at most 3 items") as caught:
        validate(schema, ["x"] * 500_000)  # every item is wrong too, and all are equal
    assert caught.value.field == "arguments"


def test_a_string_over_its_cap_is_refused_by_the_cap_before_the_pattern_runs() -> None:
    schema = {"type": "string", "pattern": "^(a|aa)+$", "maxLength": 10}
    with pytest.raises(InvalidParams, match="must be at most 10 characters long"):
        validate(schema, "a" * 100_000 + "b")  # the pattern would backtrack for ages


# ------------------------------------------------------------------ found attacking this check


def test_a_schema_whose_ref_never_reaches_a_schema_is_refused_at_registration() -> None:
    with pytest.raises(SchemaError, match="refers to itself"):
        check_schema({"$defs": {"a": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"})


def test_a_recursive_schema_over_a_finite_value_is_fine() -> None:
    tree = {
        "$defs": {
            "node": {
                "type": "object",
                "properties": {"children": {"type": "array", "items": {"$ref": "#/$defs/node"}}},
            }
        },
        "$ref": "#/$defs/node",
    }
    check_schema(tree)
    validate(tree, {"children": [{"children": []}, {}]})


def test_an_integer_too_long_to_print_is_refused_before_any_keyword_prints_it() -> None:
    schema = {"type": "object", "properties": {"n": {"not": {"type": "integer"}}}}
    with pytest.raises(InvalidParams, match="a very large integer") as caught:
        validate(schema, {"n": 10**5000})
    assert caught.value.field == "arguments.n"


@pytest.mark.parametrize(
    "schema",
    [
        {"type": "object"},
        {"type": "object", "properties": {}, "additionalProperties": False},
        {"type": "object", "required": ["a"], "properties": {"a": {"type": "string"}}},
        {"type": "object", "minProperties": 1},
        {"type": "array"},
        {"type": "object", "not": {"maxProperties": 0}},
    ],
)
def test_empty_arguments_are_judged_as_the_validator_judges_them(schema: dict[str, Any]) -> None:
    # (validate skips the validator for {} once it knows the schema takes it)
    expected = next(compiled(schema).iter_errors({}), None) is None
    for _ in range(2):  # the first call decides, the second uses what was decided
        if expected:
            validate(schema, {})
        else:
            with pytest.raises(InvalidParams):
                validate(schema, {})
