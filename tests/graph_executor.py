"""A small stand-in for ComfyUI's executor, to run API-format workflows in tests without ComfyUI.

It does what matters for the pack: validates inputs the way ComfyUI does at queue time (required
inputs present, link types match the source's RETURN_TYPES, legacy combo values in their lists,
INT/FLOAT min/max unless VALIDATE_INPUTS names the input, VALIDATE_INPUTS itself, whose returned
message ComfyUI files once under each input it names, and whose exception it files once for the
node), runs only output nodes and their ancestors in dependency order, passes optional inputs only
when given and ``UNIQUE_ID`` as a hidden input, evaluates ``lazy`` inputs only when the node's
``check_lazy_status`` (called with the lazy inputs not run yet as None) asks for them, and keeps
ComfyUI's classic output cache between runs: a node whose class, constant inputs, IS_CHANGED value
and ancestors are unchanged is not run again (a NaN from IS_CHANGED never equals itself, so such
nodes always run).
"""

from __future__ import annotations

import inspect
import json
import math
from pathlib import Path


class PromptError(ValueError):
    """What ComfyUI would answer with HTTP 400 at queue time. ``errors``: the node errors as
    (node id, input name or None, details), one per entry ComfyUI would list."""

    def __init__(self, message: str, errors: list[tuple[str, str | None, str]] = ()) -> None:
        super().__init__(message)
        self.errors = list(errors)


def is_link(value) -> bool:
    return (
        isinstance(value, list)
        and len(value) == 2
        and isinstance(value[0], str)
        and isinstance(value[1], int)
    )


def load_api_workflow(path: str | Path) -> dict:
    return json.loads(Path(path).read_text())


def override(prompt: dict, changes: dict[str, dict]) -> dict:
    """A copy of ``prompt`` with ``{node_id: {input: value}}`` replaced."""
    out = json.loads(json.dumps(prompt))
    for node_id, inputs in changes.items():
        if node_id not in out:
            raise KeyError(f"workflow has no node {node_id!r}")
        out[node_id]["inputs"].update(inputs)
    return out


class GraphExecutor:
    def __init__(self, classes: dict[str, type]) -> None:
        self.classes = classes
        self.cache: dict[str, tuple[object, tuple]] = {}  # node id -> (signature, outputs)
        self.instances: dict[tuple[str, str], object] = {}
        self.executed: list[str] = []  # node ids run by the last execute()
        self.ui: dict[str, dict] = {}

    # ------------------------------------------------------------------ validation
    def validate(self, prompt: dict) -> list[str]:
        """Output node ids to execute; raises PromptError like ComfyUI's POST /prompt would."""
        outputs = []
        for node_id, node in prompt.items():
            cls = self.classes.get(node["class_type"])
            if cls is None:
                raise PromptError(
                    f"Cannot execute because node {node['class_type']} does not exist (node {node_id})"
                )
            if getattr(cls, "OUTPUT_NODE", False):
                outputs.append(node_id)
        if not outputs:
            raise PromptError("Prompt has no outputs")
        for node_id in outputs:
            self._validate_node(prompt, node_id, set())
        return outputs

    def _validate_node(self, prompt: dict, node_id: str, seen: set) -> None:
        if node_id in seen:
            return
        seen.add(node_id)
        node = prompt[node_id]
        cls = self.classes[node["class_type"]]
        spec = cls.INPUT_TYPES()
        required, optional = spec.get("required", {}), spec.get("optional", {})
        inputs = node["inputs"]
        validate_fn = getattr(cls, "VALIDATE_INPUTS", None)
        custom = set(inspect.signature(validate_fn).parameters) if validate_fn else set()
        for name in required:
            if name not in inputs:
                raise PromptError(
                    f"node {node_id} ({node['class_type']}): required input {name!r} is missing"
                )
        for name, value in inputs.items():
            if name not in required and name not in optional:
                continue  # ComfyUI ignores unknown inputs
            kind, opts = _split_spec(required.get(name) or optional.get(name))
            if is_link(value):
                src_id, idx = value
                if src_id not in prompt:
                    raise PromptError(f"node {node_id}: input {name!r} links to missing node {src_id}")
                src_cls = self.classes[prompt[src_id]["class_type"]]
                got = src_cls.RETURN_TYPES[idx]
                if not _types_match(got, kind):
                    raise PromptError(
                        f"node {node_id} ({node['class_type']}): input {name!r} wants {kind}, "
                        f"linked output is {got}"
                    )
                self._validate_node(prompt, src_id, seen)
                continue
            if isinstance(kind, list):
                if value not in kind:
                    raise PromptError(f"node {node_id}: Value not in list: {name}: {value!r} not in {kind}")
            elif kind in ("INT", "FLOAT") and name not in custom:
                if "min" in opts and value < opts["min"]:
                    raise PromptError(
                        f"node {node_id}: Value {value} smaller than min of {opts['min']}: {name}"
                    )
                if "max" in opts and value > opts["max"]:
                    raise PromptError(
                        f"node {node_id}: Value {value} bigger than max of {opts['max']}: {name}"
                    )
        if validate_fn is not None:
            args = {k: (None if is_link(inputs.get(k)) else inputs.get(k)) for k in custom if k in inputs}
            try:
                result = validate_fn(**args)
            except Exception as err:  # ComfyUI: one "Exception when validating node" for the node
                errors = [(node_id, None, str(err))]
            else:  # ComfyUI: one "Custom validation failed" per input VALIDATE_INPUTS names
                errors = [] if result is True else [(node_id, name, f"{name} - {result}") for name in args]
            if errors:
                details = "; ".join(detail for _, _, detail in errors)
                raise PromptError(f"node {node_id} ({node['class_type']}): {details}", errors)

    # ------------------------------------------------------------------ execution
    def execute(self, prompt: dict) -> dict[str, tuple]:
        """Run the prompt; returns {node id: outputs} of every node needed by an output node."""
        outputs = self.validate(prompt)
        self.executed = []
        self.ui = {}
        self.cache = {k: v for k, v in self.cache.items() if k in prompt}  # ComfyUI drops other nodes
        results: dict[str, tuple] = {}
        signatures: dict[str, object] = {}
        for node_id in outputs:
            self._run(prompt, node_id, results, signatures)
        return results

    def _run(self, prompt: dict, node_id: str, results: dict, signatures: dict) -> None:
        if node_id in results:
            return
        node = prompt[node_id]
        cls = self.classes[node["class_type"]]
        spec = cls.INPUT_TYPES()
        declared = {**spec.get("required", {}), **spec.get("optional", {})}
        lazy = {name for name, entry in declared.items() if len(entry) > 1 and entry[1].get("lazy")}
        args = {}
        for name, value in node["inputs"].items():
            if not is_link(value):
                args[name] = value
            elif name not in lazy:
                self._run(prompt, value[0], results, signatures)
                args[name] = results[value[0]][value[1]]
        signature = self._signature(prompt, node_id, signatures)  # covers lazy ancestors too
        cached = self.cache.get(node_id)
        if cached is not None and cached[0] == signature:
            results[node_id] = cached[1]
            return
        for name, kind in spec.get("hidden", {}).items():
            if kind == "UNIQUE_ID":
                args[name] = node_id
        key = (node_id, node["class_type"])
        instance = self.instances.setdefault(key, cls())
        # ComfyUI passes linked lazy inputs not run yet as None (unconnected ones not at all) and runs
        # those check_lazy_status names, then asks again, until it names none.
        missing = {name for name in lazy if is_link(node["inputs"].get(name))}
        args.update(dict.fromkeys(missing))
        while hasattr(instance, "check_lazy_status"):
            wanted = [name for name in instance.check_lazy_status(**args) if name in missing]
            if not wanted:
                break
            for name in wanted:
                src, idx = node["inputs"][name]
                self._run(prompt, src, results, signatures)
                args[name] = results[src][idx]
                missing.discard(name)
        out = getattr(instance, cls.FUNCTION)(**args)
        if isinstance(out, dict):
            if out.get("ui"):
                self.ui[node_id] = out["ui"]
            out = out.get("result", ())
        if len(out) != len(cls.RETURN_TYPES):
            raise AssertionError(
                f"{node['class_type']} returned {len(out)} values for {len(cls.RETURN_TYPES)} outputs"
            )
        results[node_id] = tuple(out)
        self.cache[node_id] = (signature, results[node_id])
        self.executed.append(node_id)

    def _signature(self, prompt: dict, node_id: str, signatures: dict) -> object:
        """A node's cache key: class, constant inputs, IS_CHANGED value and its ancestors' keys."""
        if node_id not in signatures:
            node = prompt[node_id]
            cls = self.classes[node["class_type"]]
            constants = {k: v for k, v in node["inputs"].items() if not is_link(v)}
            changed = cls.IS_CHANGED(**constants) if hasattr(cls, "IS_CHANGED") else None
            ancestors = tuple(
                (name, self._signature(prompt, v[0], signatures), v[1])
                for name, v in sorted(node["inputs"].items())
                if is_link(v)
            )
            signatures[node_id] = (
                node["class_type"],
                json.dumps(constants, sort_keys=True),
                _nan_safe(changed),
                ancestors,
            )
        return signatures[node_id]


class _NaN:
    """Stands for an IS_CHANGED NaN: never equal to anything, as in ComfyUI."""

    def __eq__(self, other) -> bool:
        return False

    __hash__ = None


def _nan_safe(value):
    if isinstance(value, float) and math.isnan(value):
        return _NaN()
    return value


def _split_spec(spec) -> tuple:
    kind = spec[0]
    opts = spec[1] if len(spec) > 1 else {}
    return kind, opts


def _types_match(got: str, wanted) -> bool:
    if isinstance(wanted, list):  # a combo fed by a link: ComfyUI accepts any COMBO source
        return True
    if "*" in (got, wanted):
        return True
    return bool(set(got.split(",")) & set(wanted.split(",")))
