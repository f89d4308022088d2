"""The output parser: reasoning, content and tool calls out of streamed text, the same
wherever the stream is split. Markers and the tool parser are mlx-lm's own."""

import json

import pytest
from mlx_lm.tool_parsers import json_tools, qwen3_coder

from blockserve.engine.text.output import Markers, OutputParser

QWEN = Markers("<think>", "</think>", json_tools.tool_call_start, json_tools.tool_call_end,
               json_tools.parse_tool_call)
CALL_A = '<tool_call>\n{"name": "read", "arguments": {"path": "a.py"}}\n</tool_call>'
CALL_B = '<tool_call>\n{"name": "ls", "arguments": {"dir": "src", "all": true}}\n</tool_call>'


def summary(deltas):
    """Merge adjacent deltas of a kind: (kind, text or (name, arguments as an object))."""
    out = []
    for d in deltas:
        if d.kind == "tool_call":
            out.append(("tool_call", (d.name, json.loads(d.arguments))))
        elif out and out[-1][0] == d.kind:
            out[-1] = (d.kind, out[-1][1] + d.text)
        elif d.text:
            out.append((d.kind, d.text))
    return out


def parse(pieces, markers=QWEN, truncated=False, **kw):
    p = OutputParser(markers, **{"parse_tools": True, **kw})
    deltas = []
    for piece in pieces:
        deltas += p.feed(piece)
    return summary(deltas + p.finish(truncated)), p


def every_split(text):
    """The text in one piece, and cut at every possible place into two and three."""
    yield [text]
    for i in range(1, len(text)):
        yield [text[:i], text[i:]]
    for i in range(1, len(text), 7):
        for j in range(i + 1, len(text), 5):
            yield [text[:i], text[i:j], text[j:]]


REPLY = "<think>\nThe file first.\n</think>\n\nLet me look." + CALL_A + "\n" + CALL_B


def test_reasoning_text_and_two_calls_at_every_split():
    # The newlines at the edges are the template's (see the module): trimmed.
    expected = [("reasoning", "The file first."), ("content", "Let me look."),
                ("tool_call", ("read", {"path": "a.py"})),
                ("tool_call", ("ls", {"dir": "src", "all": True}))]
    for pieces in every_split(REPLY):
        got, p = parse(pieces)
        assert got == expected, pieces
        assert p.calls == 2


def test_per_character_stream_matches_the_whole():
    assert parse(list(REPLY))[0] == parse([REPLY])[0]


def test_a_call_cut_off_comes_back_as_text():
    text = "Sure.\n" + CALL_A[:30]
    for pieces in every_split(text):
        got, p = parse(pieces, truncated=True)
        assert got == [("content", text)]
        assert p.calls == 0


def test_a_call_that_does_not_parse_comes_back_as_text():
    bad = "<tool_call>\n{not json}\n</tool_call>"
    got, p = parse(["ok\n", bad, " done\n"])
    assert got == [("content", "ok\n" + bad + " done\n")] and p.calls == 0
    no_name = '<tool_call>\n{"arguments": {}}\n</tool_call>'
    assert parse([no_name])[0] == [("content", no_name)]


def test_start_in_reasoning_when_the_template_opened_the_block():
    p = OutputParser(QWEN, parse_tools=True, state="reasoning")
    deltas = p.feed("plan it</th") + p.feed("ink>answer") + p.finish()
    assert summary(deltas) == [("reasoning", "plan it"), ("content", "answer")]


def test_without_tools_a_call_is_plain_text():
    got, p = parse([REPLY], parse_tools=False)
    assert got == [("reasoning", "The file first."),
                   ("content", "Let me look." + CALL_A + "\n" + CALL_B)]
    assert p.calls == 0


def test_no_markers_passes_everything_through():
    assert parse(["<think>x</think>", CALL_A], markers=Markers())[0] == \
        [("content", "<think>x</think>" + CALL_A)]


def test_a_marker_prefix_that_is_not_a_marker_is_released():
    got, _ = parse(["a <thin", "g> b <tool", "box>"])
    assert got == [("content", "a <thing> b <toolbox>")]


@pytest.mark.parametrize("split", [1, 9, 40])
def test_another_family_qwen3_coder(split):
    markers = Markers(None, None, qwen3_coder.tool_call_start, qwen3_coder.tool_call_end,
                      qwen3_coder.parse_tool_call)
    call = ("<tool_call>\n<function=read>\n<parameter=path>\na.py\n</parameter>\n"
            "</function>\n</tool_call>")
    tools = [{"type": "function", "function": {"name": "read", "parameters": {
        "type": "object", "properties": {"path": {"type": "string"}}}}}]
    text = "Reading." + call
    got, p = parse([text[:split], text[split:]], markers, tools=tools)
    assert got == [("content", "Reading."), ("tool_call", ("read", {"path": "a.py"}))]
