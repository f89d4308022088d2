"""The tools of an OpenAI Responses request: function tools as they are, namespaces
flattened into their functions (the names mapped back on output), custom (freeform)
tools as a function of one string argument; hosted tools are not ours to run."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from blockserve.server.errors import invalid
from blockserve.server.fields import ToolChoice, boolean, check_tools, log, take, tool_choice
from blockserve.server.limits import Limits, over

MAX_NAME = 128
NAMESPACE_SEP = "__"  # a namespace's function "fn" of "ns" reaches the model as "ns__fn"

_HOSTED = {"web_search", "web_search_preview", "web_search_2025_08_26", "file_search",
           "code_interpreter", "image_generation", "computer_use_preview", "computer",
           "mcp", "local_shell", "shell", "apply_patch", "tool_search"}


@dataclass(frozen=True)
class ToolRef:
    """What the model's flat tool name stands for in the client's tool list."""

    kind: str  # "function" or "custom"
    name: str
    namespace: str | None = None


@dataclass
class Tools:
    """The request's client tools in the template's shape, and their names' meaning."""

    template: list[dict] = field(default_factory=list)
    refs: dict[str, ToolRef] = field(default_factory=dict)
    limit: int = Limits.max_tools  # function tools, after namespaces are flattened

    def flat(self, name: str, namespace: str | None) -> str:
        """The flat name the model knows a (namespace, name) tool by."""
        return f"{namespace}{NAMESPACE_SEP}{name}" if namespace else name

    def called(self, name: str, namespace: str | None) -> str:
        """The flat name of a call sent back: namespaced if that tool is, else as named
        (a client may label plain tools with a namespace of its own)."""
        flat = self.flat(name, namespace)
        return flat if flat in self.refs else name

    def ref(self, flat: str) -> ToolRef:
        """What a name the model called stands for (an unknown one: itself)."""
        return self.refs.get(flat) or ToolRef("function", flat)

    def add(self, ref: ToolRef, description: Any, parameters: Any) -> None:
        flat = self.flat(ref.name, ref.namespace)
        if flat in self.refs:
            raise invalid(f"'tools': the name {flat!r} is given twice", param="tools")
        if len(self.refs) >= self.limit:
            raise over("'tools' functions (namespaces flattened)", len(self.refs) + 1,
                       self.limit, "tools")
        self.refs[flat] = ref
        self.template.append({"type": "function", "function": {
            "name": flat, "description": description, "parameters": parameters}})


def name_of(v: Any, where: str, param: str) -> str:
    """A tool's (or call's) name, bounded; a 400 naming ``param`` otherwise."""
    if not isinstance(v, str) or not v or len(v) > MAX_NAME:
        raise invalid(f"{where}: 'name' must be a string of 1 to {MAX_NAME} characters",
                      param=param)
    return v


def _function_tool(t: dict, where: str) -> tuple[str, Any, Any]:
    name = name_of(t.get("name"), where, "tools")
    desc = t.get("description")
    if desc is not None and not isinstance(desc, str):
        raise invalid(f"{where}: 'description' must be a string", param="tools")
    params = t.get("parameters")
    if params is None:
        params = {"type": "object", "properties": {}}
    if not isinstance(params, dict):
        raise invalid(f"{where}: 'parameters' must be a JSON schema object", param="tools")
    return name, desc or "", params


def _custom_description(t: dict, where: str) -> str:
    """A freeform tool's description, with its grammar (the model writes to it)."""
    desc = t.get("description") or ""
    fmt = t.get("format")
    if fmt is None or (isinstance(fmt, dict) and fmt.get("type") == "text"):
        return desc
    if not isinstance(fmt, dict) or fmt.get("type") != "grammar" or not isinstance(
            fmt.get("definition"), str) or not isinstance(desc, str):
        raise invalid(f"{where}: 'format' must be text or a grammar with a definition",
                      param="tools")
    syntax = fmt.get("syntax") if isinstance(fmt.get("syntax"), str) else "lark"
    return f"{desc}\n\nThe input must follow this {syntax} grammar:\n{fmt['definition']}"


def parse_tools(tools: Any, limits: Limits) -> Tools:
    """Function tools as they are, namespaces flattened into their functions, custom
    tools as a function of one string ``input``; hosted tools are not ours to run."""
    out = Tools(limit=limits.max_tools)
    if check_tools(tools, limits) is None:
        return out
    hosted = []
    for i, t in enumerate(tools):
        where = f"tools[{i}]"
        kind = t.get("type") if isinstance(t, dict) else None
        if not isinstance(kind, str):
            raise invalid(f"{where}: each tool must be an object with a 'type'", param="tools")
        if kind == "function":
            name, desc, params = _function_tool(t, where)
            out.add(ToolRef("function", name), desc, params)
        elif kind == "namespace":
            ns = name_of(t.get("name"), where, "tools")
            inner = t.get("tools")
            if not isinstance(inner, list):
                raise invalid(f"{where}: a namespace needs a list of 'tools'", param="tools")
            for j, f in enumerate(inner):
                if not isinstance(f, dict) or f.get("type") != "function":
                    raise invalid(f"{where}.tools[{j}]: a namespace holds function tools",
                                  param="tools")
                name, desc, params = _function_tool(f, f"{where}.tools[{j}]")
                out.add(ToolRef("function", name, ns), desc, params)
        elif kind == "custom":
            name = name_of(t.get("name"), where, "tools")
            out.add(ToolRef("custom", name), _custom_description(t, where), {
                "type": "object", "properties": {"input": {"type": "string"}},
                "required": ["input"]})
        else:
            hosted.append(kind if kind in _HOSTED else f"{kind} (unknown)")
    if hosted:
        log.warning("responses: ignoring hosted tool(s) %s: only client tools run here",
                    ", ".join(hosted))
    return out


def parse_tool_choice(body: dict, tools: Tools) -> ToolChoice:
    """``tool_choice`` by the one policy of every API; a named custom or namespaced
    function is forced by its flat name."""
    choice = take(body, "tool_choice", {"type": ["string", "object", "null"]})
    parallel = boolean(body, "parallel_tool_calls", True)
    if isinstance(choice, dict):
        kind = choice.get("type")
        if kind not in ("function", "custom"):
            raise invalid(f"'tool_choice' of type {kind!r} is not supported here (auto, "
                          "none, required, or a function or custom tool by name)",
                          param="tool_choice")
        name = choice.get("name")
        ns = choice.get("namespace")
        if isinstance(name, str) and isinstance(ns, str):
            name = tools.called(name, ns)
        return tool_choice("function", name, tools.template or None, parallel)
    if choice is not None and not isinstance(choice, str):
        raise invalid("'tool_choice' must be a string or an object", param="tool_choice")
    return tool_choice(choice, None, tools.template or None, parallel)
