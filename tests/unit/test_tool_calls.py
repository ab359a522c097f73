"""Which function calls wait for their output, from the upstream's events."""

import orjson

from relay.session.tool_calls import ToolCalls


def event(kind: str, **fields: object) -> bytes:
    return orjson.dumps({"type": kind, **fields})


def call(item_id: str, call_id: str, status: str = "completed") -> dict[str, str]:
    return {"id": item_id, "type": "function_call", "status": status, "call_id": call_id}


def output(call_id: str) -> dict[str, str]:
    return {"id": f"out_{call_id}", "type": "function_call_output", "call_id": call_id}


def test_a_call_waits_until_its_output_comes_or_it_is_deleted():
    tools = ToolCalls()
    done = event("response.done", response={"output": [call("f1", "c1"), call("f2", "c2"),
                                                        call("f3", "c3", "incomplete")]})  # fmt: skip
    assert not tools.observe("response.done", done)
    assert tools.waiting == {"f1": "c1", "f2": "c2"}
    assert not tools.observe("conversation.item.added", event("conversation.item.added",
                                                              item=output("c1")))  # fmt: skip
    assert not tools.observe("conversation.item.deleted", event("conversation.item.deleted",
                                                                item_id="f2"))  # fmt: skip
    assert tools.waiting == {}
    # The last one's output: the answer is asked for next.
    tools.observe("response.done", event("response.done", response={"output": [call("f4", "c4")]}))
    assert tools.observe("conversation.item.created", event("conversation.item.created",
                                                            item=output("c4")))  # fmt: skip
    assert tools.waiting == {}


def test_other_events_leave_the_calls_alone():
    tools = ToolCalls()
    text = {"id": "m1", "type": "message", "role": "assistant", "content": []}
    assert not tools.observe("response.done", event("response.done", response={"output": [text]}))
    tools.observe("response.done", event("response.done", response={"output": [call("f1", "c1")]}))
    assert not tools.observe("conversation.item.added", event("conversation.item.added",
                                                              item=output("other")))  # fmt: skip
    assert not tools.observe("conversation.item.added", b"not json")
    assert tools.waiting == {"f1": "c1"}
