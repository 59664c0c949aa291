"""One source of truth for the spec: spec.FIELDS and spec.RULES against everything that restates them.

- the CRD's schema (types, bounds, enums, defaults) and its CEL rules, both ways, and the chart's copy;
- the README's resource table;
- the runtime's own parsing of the environment the builders write, at each field's bounds;
- a property test: specs generated from the CRD's own schema, defaulted as the API server defaults them
  and filtered by the CRD's own CEL rules (evaluated by cel-python), must parse, build, and give a
  runtime environment the runtime accepts.

Fields the CRD leaves free-form and Kubernetes validates in the child (resources, nodeSelector,
tolerations, image names) are generated from valid Kubernetes values only: a bad quantity there is the
Deployment API's to reject (the operator reports it as ChildRejected), not the runtime's.
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import celpy
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from phi3_operator.builders import BuildContext, Owner, build_children
from phi3_operator.spec import FIELDS, FIELDS_BY_PATH, RULES, Field, SpecError, parse_spec
from phi3_serving.batching import batch_options_from_env
from phi3_serving.chat import GenerationDefaults
from phi3_serving.cpus import ENV_CPU_THREADS
from phi3_serving.engine import max_concurrency_from_env
from phi3_serving.guard import ENV_API_KEYS_DIR, ENV_MAX_QUEUED_REQUESTS, ENV_MAX_REQUEST_BYTES, GuardSettings

ROOT = Path(__file__).resolve().parents[2]
CRD_PATH = ROOT / "crds" / "phi3.ai_phi3models.yaml"
CHART_CRD_PATH = ROOT / "charts" / "phi3-operator" / "crds" / "phi3.ai_phi3models.yaml"
README = ROOT / "README.md"
CRD = yaml.safe_load(CRD_PATH.read_text())
SPEC_SCHEMA: dict[str, Any] = CRD["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
BOUND_KEYS = ("minimum", "maximum", "exclusiveMinimum", "default", "enum")


def schema_at(path: str) -> dict[str, Any]:
    schema = SPEC_SCHEMA
    for key in path.split("."):
        schema = schema["properties"][key]
    return schema


def walk(schema: Mapping[str, Any], path: str = "") -> Iterator[tuple[str, Mapping[str, Any]]]:
    yield path, schema
    for key, child in (schema.get("properties") or {}).items():
        yield from walk(child, f"{path}.{key}" if path else key)


def runtime_accepts(env: Mapping[str, str]) -> None:
    """What the runtime does with its environment at start-up (phi3_serving.loading): raises if it refuses."""
    GenerationDefaults.from_env(env)
    max_concurrency_from_env(env)
    batch_options_from_env(env)
    GuardSettings.from_env(env)


def runtime_env(raw_spec: Mapping[str, Any]) -> dict[str, str]:
    spec = parse_spec(raw_spec)
    ctx = BuildContext(owner=Owner("m", "ns", "uid"), spec=spec, image="runtime:cpu", model_uri="models:/m/1",
                       tracking_uri=spec.model.tracking_uri or "http://mlflow:5000", onnx_variant="cpu-int4")
    deployment = next(c for c in build_children(ctx) if c["kind"] == "Deployment")
    container = next(c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == "runtime")
    return {e["name"]: e["value"] for e in container["env"] if "value" in e}


# --------------------------------------------------------------------------- the CRD


@pytest.mark.parametrize("spec_field", FIELDS, ids=[f.path for f in FIELDS])
def test_the_crd_states_each_field_as_the_table_does(spec_field: Field) -> None:
    schema = schema_at(spec_field.path)
    assert schema["type"] == spec_field.type
    assert schema.get("minimum") == spec_field.minimum
    assert schema.get("maximum") == spec_field.maximum
    assert bool(schema.get("exclusiveMinimum", False)) is spec_field.exclusive_minimum
    assert tuple(schema.get("enum", ())) == spec_field.enum
    crd_default = spec_field.default if spec_field.crd_default else None
    assert schema.get("default") == crd_default, f"default of spec.{spec_field.path}"


def test_every_bounded_or_defaulted_crd_field_is_in_the_table() -> None:
    bounded = {path for path, schema in walk(SPEC_SCHEMA) if path and any(k in schema for k in BOUND_KEYS)}
    # Objects with a default and open maps are not scalars; the table holds scalars only.
    assert bounded - set(FIELDS_BY_PATH) == set(), "add these to spec.FIELDS"


def crd_rules() -> set[tuple[str, str, str]]:
    return {(path, rule["rule"], rule["message"])
            for path, schema in walk(SPEC_SCHEMA) for rule in schema.get("x-kubernetes-validations", [])}


def test_the_crd_has_exactly_the_table_rules() -> None:
    assert crd_rules() == {(rule.path, rule.cel, rule.message) for rule in RULES}


def test_the_chart_carries_the_crd_unchanged() -> None:
    assert CHART_CRD_PATH.read_bytes() == CRD_PATH.read_bytes(), "run hack/sync-chart-crds"


def test_the_builders_name_the_guards_variables() -> None:
    assert FIELDS_BY_PATH["serving.maxRequestBytes"].env == ENV_MAX_REQUEST_BYTES
    assert FIELDS_BY_PATH["serving.maxQueuedRequests"].env == ENV_MAX_QUEUED_REQUESTS
    assert FIELDS_BY_PATH["serving.cpuThreads"].env == ENV_CPU_THREADS
    env = runtime_env({"model": {"uri": "models:/m/1"}, "hardware": {"target": "cpu"},
                       "auth": {"apiKeySecretRef": {"name": "keys"}}})
    assert GuardSettings.from_env(env).api_keys_dir == Path(env[ENV_API_KEYS_DIR])


# --------------------------------------------------------------------------- the README


def readme_cells(spec_field: Field) -> str:
    """The start of the README row for a field: name, default and allowed values, from the table."""
    default = "none" if spec_field.default is None else f"`{spec_field.default}`"
    if spec_field.path == "hardware.target":
        default = "required"
    allowed = (", ".join(f"`{v}`" for v in spec_field.enum) if spec_field.enum
               else spec_field.range_text() if spec_field.type != "string" else "string")
    return f"| `{spec_field.path}` | {default} | {allowed} |"


@pytest.mark.parametrize("spec_field", FIELDS, ids=[f.path for f in FIELDS])
def test_the_readme_table_states_each_field_as_the_table_does(spec_field: Field) -> None:
    rows = [line for line in README.read_text().splitlines() if line.startswith(f"| `{spec_field.path}` |")]
    assert len(rows) == 1, f"README needs one row for spec.{spec_field.path}"
    assert rows[0].startswith(readme_cells(spec_field)), f"README row should start {readme_cells(spec_field)!r}"


# --------------------------------------------------------------------------- the runtime


def edge_values(spec_field: Field) -> list[float]:
    assert spec_field.minimum is not None and spec_field.maximum is not None
    low = math.nextafter(spec_field.minimum, math.inf) if spec_field.exclusive_minimum else spec_field.minimum
    if spec_field.type == "integer":
        low = math.ceil(low)
    values = [low, spec_field.maximum]
    return [int(v) for v in values] if spec_field.type == "integer" else values


RUNTIME_FIELDS = [f for f in FIELDS if f.env]


@pytest.mark.parametrize("spec_field", RUNTIME_FIELDS, ids=[f.path for f in RUNTIME_FIELDS])
def test_the_runtime_accepts_each_field_at_its_bounds(spec_field: Field) -> None:
    section, _, key = spec_field.path.partition(".")
    for value in edge_values(spec_field):
        env = runtime_env({"model": {"uri": "models:/m/1"}, "hardware": {"target": "cpu"}, section: {key: value}})
        assert spec_field.env in env
        runtime_accepts(env)


@pytest.mark.parametrize("spec_field", RUNTIME_FIELDS, ids=[f.path for f in RUNTIME_FIELDS])
def test_the_parser_refuses_what_the_table_refuses(spec_field: Field) -> None:
    section, _, key = spec_field.path.partition(".")
    assert spec_field.minimum is not None and spec_field.maximum is not None
    below = spec_field.minimum if spec_field.exclusive_minimum else spec_field.minimum - 1
    for value in (below, spec_field.maximum + 1):
        with pytest.raises(SpecError, match=re.escape(f"spec.{spec_field.path} must be")):
            parse_spec({"model": {"uri": "models:/m/1"}, "hardware": {"target": "cpu"}, section: {key: value}})


# --------------------------------------------------------------------------- generated from the CRD

CEL = celpy.Environment()
CRD_PROGRAMS = [(path, rule["rule"], CEL.program(CEL.compile(rule["rule"])))
                for path, schema in walk(SPEC_SCHEMA) for rule in schema.get("x-kubernetes-validations", [])]

LABEL = st.from_regex(r"[a-z0-9]([-a-z0-9]{0,10}[a-z0-9])?", fullmatch=True)
QUANTITY = st.sampled_from(["1", "250m", "2", "512Mi", "2Gi", "8Gi"])
TOLERATION = st.sampled_from([{"key": "dedicated", "operator": "Exists", "effect": "NoSchedule"},
                              {"key": "gpu", "operator": "Equal", "value": "a100"}])
SELECTOR = st.fixed_dictionaries({}, optional={
    "matchLabels": st.dictionaries(LABEL, LABEL, max_size=2),
    "matchExpressions": st.lists(st.fixed_dictionaries({"key": LABEL, "operator": st.sampled_from(["In", "NotIn"]),
                                                         "values": st.lists(LABEL, min_size=1, max_size=2)}),
                                 max_size=1)})
# A peer may lack both selectors: the CRD's CEL rule refuses that, and the rule's test generates it.
PEER = st.fixed_dictionaries({}, optional={"namespaceSelector": SELECTOR, "podSelector": SELECTOR})
# Free-form in the CRD, validated by Kubernetes in the child: generated from valid values only.
FREE_FORM: dict[str, st.SearchStrategy[Any]] = {
    "network.allowFrom": st.lists(PEER, max_size=3),
    "resources": st.fixed_dictionaries({}, optional={
        "requests": st.dictionaries(st.sampled_from(["cpu", "memory"]), QUANTITY, max_size=2),
        "limits": st.dictionaries(st.sampled_from(["cpu", "memory"]), QUANTITY, max_size=2)}),
    "hardware.nodeSelector": st.dictionaries(LABEL, LABEL, max_size=2),
    "hardware.tolerations": st.lists(TOLERATION, max_size=2),
    "image.override": st.sampled_from(["", "registry.local:5000/runtime:1", "runtime@sha256:" + "a" * 64]),
    "image.registry": st.sampled_from(["", "registry.local:5000"]),
}
STRING_RULES = {path: re.search(r"self\.matches\('(.*)'\)$", rule).group(1).replace("\\\\", "\\")  # type: ignore[union-attr]
                for path, rule, _ in CRD_PROGRAMS if rule.startswith("self.matches(")}


def from_schema(schema: Mapping[str, Any], path: str = "") -> st.SearchStrategy[Any]:
    """Values of a structural schema, as a client could send them."""
    if path in FREE_FORM:
        return FREE_FORM[path]
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    if schema.get("x-kubernetes-int-or-string"):
        return st.one_of(st.integers(0, 5), st.sampled_from(["1", "50%"]))
    kind = schema.get("type")
    if kind == "object":
        properties = schema.get("properties") or {}
        required = set(schema.get("required", ()))
        sub = {key: from_schema(child, f"{path}.{key}" if path else key) for key, child in properties.items()}
        return st.fixed_dictionaries({k: v for k, v in sub.items() if k in required},
                                     optional={k: v for k, v in sub.items() if k not in required})
    if kind == "integer":
        low = int(schema.get("minimum", -(2**31)))
        return st.integers(low, int(schema.get("maximum", low + 10**6)))
    if kind == "number":
        low, high = float(schema.get("minimum", -1e9)), float(schema.get("maximum", 1e9))
        floats = st.floats(low, high, exclude_min=bool(schema.get("exclusiveMinimum")), allow_nan=False)
        ints = st.integers(math.ceil(low), math.floor(high)).filter(
            lambda v: not schema.get("exclusiveMinimum") or v > low)
        return st.one_of(floats, ints)
    if kind == "string":
        if path in STRING_RULES:
            strings = st.from_regex(STRING_RULES[path], fullmatch=True)
        else:
            strings = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=20)
        return strings.filter(lambda s: schema.get("minLength", 0) <= len(s) <= schema.get("maxLength", 10**6))
    raise AssertionError(f"no strategy for spec.{path}: {schema}")


def apply_defaults(schema: Mapping[str, Any], value: Any) -> Any:
    """The API server's structural defaulting: an absent property with a default gets it, recursively."""
    if not isinstance(value, dict):
        return value
    for key, child in (schema.get("properties") or {}).items():
        if key not in value and "default" in child:
            value[key] = copy.deepcopy(child["default"])
        if key in value:
            value[key] = apply_defaults(child, value[key])
    return value


def at(obj: Any, path: str) -> Any:
    for key in path.split(".") if path else ():
        if not isinstance(obj, Mapping) or key not in obj:
            return None
        obj = obj[key]
    return obj


def admitted(spec: Mapping[str, Any]) -> bool:
    """Every CEL rule of the CRD, evaluated by cel-python where its field is present."""
    for path, _, program in CRD_PROGRAMS:
        value = at(spec, path)
        if value is not None and not bool(program.evaluate({"self": celpy.json_to_cel(value)})):
            return False
    return True


ADMITTED_SPECS = from_schema(SPEC_SCHEMA).map(lambda s: apply_defaults(SPEC_SCHEMA, s)).filter(admitted)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(ADMITTED_SPECS)
def test_every_admitted_spec_parses_builds_and_starts(raw: dict[str, Any]) -> None:
    env = runtime_env(raw)  # parse_spec raising SpecError fails the test: the CRD admitted it
    runtime_accepts(env)
    spec = parse_spec(raw)
    for spec_field in FIELDS:
        if spec_field.env and at(raw, spec_field.path) is not None:
            assert spec_field.env in env, f"spec.{spec_field.path} reaches the runtime"
    assert spec.generation.top_p > 0


def rule_values(rule_path: str) -> st.SearchStrategy[Any]:
    """Inputs for one rule, including ones that break it (not filtered by the CRD)."""
    schema = schema_at(rule_path)
    if schema.get("type") == "string":
        return st.one_of(from_schema(schema, rule_path), st.text(max_size=30),
                         st.sampled_from(["ftp://x", "models:/", "models:/a", "nvidia.com/", "http:/x", "file:"]))
    if rule_path == "network":
        return st.fixed_dictionaries({"allowFrom": FREE_FORM["network.allowFrom"]})
    keys = list((schema.get("properties") or {}).keys())
    values = {key: st.integers(1, 6) if key not in ("target",) else st.sampled_from(["cpu", "cuda"]) for key in keys}
    required = {k: v for k, v in values.items() if k in schema.get("required", ())}
    return st.fixed_dictionaries(required, optional={k: v for k, v in values.items() if k not in required})


@pytest.mark.parametrize("index", range(len(RULES)), ids=[f"{r.path}:{i}" for i, r in enumerate(RULES)])
def test_the_python_rule_agrees_with_the_crd_cel(index: int) -> None:
    rule = RULES[index]
    program = CEL.program(CEL.compile(rule.cel))
    check: Callable[[Any], bool] = rule.holds

    @settings(max_examples=200, deadline=None)
    @given(rule_values(rule.path))
    def agree(value: Any) -> None:
        assert bool(program.evaluate({"self": celpy.json_to_cel(value)})) is check(value), value

    agree()
