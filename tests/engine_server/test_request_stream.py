"""The handler's view of one request: delta outputs, merged when several queued up before it read them."""

from __future__ import annotations

import asyncio

from kubellm.engine.outputs import CompletionOutput, RequestOutput
from kubellm.engine.server.async_engine import RequestStream


def _delta(text: str, tokens: list[int], finished: bool = False) -> RequestOutput:
    reason = "length" if finished else None
    return RequestOutput("r", None, [1], [CompletionOutput(0, text, tokens, finish_reason=reason)], finished)


def test_deltas_queued_before_the_handler_reads_arrive_merged_in_order():
    async def scenario() -> list[tuple[str, list[int], bool]]:
        stream = RequestStream("r")
        for item in (_delta("a", [1]), _delta("b", [2]), _delta("c", [3])):
            stream.queue.put_nowait(item)
        seen = []
        updates = stream.updates()
        first = await anext(updates)
        seen.append((first.outputs[0].text, list(first.outputs[0].token_ids), first.finished))
        stream.queue.put_nowait(_delta("d", [4], finished=True))
        async for out in updates:
            seen.append((out.outputs[0].text, list(out.outputs[0].token_ids), out.finished))
        return seen

    assert asyncio.run(scenario()) == [("abc", [1, 2, 3], False), ("d", [4], True)]
