"""The dev agent as a process of its own, for ``just bench``.

    python -m benchmarks.agent_process ADMIN_SOCKET SVID_TTL

A real SPIRE agent is a process of its own, with cores of its own. In the bench's process
the agent's work (answering 1,000 streams after a rotation) would share the event loop, or
the interpreter lock, with the client that times each publish, for either driver. This
process serves the Delegated Identity API on ADMIN_SOCKET and takes one command per line
on stdin; it writes ``ready`` once it serves, and one line for each command:

    rotate [SPIFFE_ID]        re-issue every SVID (of SPIFFE_ID), wake every stream at once
    rotate_gradually TTL      re-issue every SVID valid TTL seconds, wake the streams a few
                              per turn of the loop (DevAgent.rotate_gradually)
    stats                     {"answers": [...], "subscribe_count": N, "open_subscriptions": N}

``rotate`` answers ``ok`` once the SVIDs are issued and before any stream has sent them;
``answers`` are the seconds from each SubscribeToX509SVIDs handler starting to its first
response being handed to the connection. Benchmark code, never shipped.
"""

from __future__ import annotations

import json
import sys
import time

import trio

from trio_spirecsi._proto.spire.api.agent.delegatedidentity.v1 import delegatedidentity_pb2 as di
from trio_spirecsi.devagent.agent import DevAgent
from trio_spirecsi.grpc import ServerContext, StreamSender


class TimedDevAgent(DevAgent):
    """The dev agent, timing its own answer to every SubscribeToX509SVIDs: from the moment
    its handler starts to the first response handed to its connection."""

    def __init__(self, trust_domain: str, *, svid_ttl: int) -> None:
        super().__init__(trust_domain, svid_ttl=svid_ttl)
        self.answer_seconds: list[float] = []

    async def _subscribe_x509_svids(
        self,
        request: di.SubscribeToX509SVIDsRequest,
        context: ServerContext,
        send: StreamSender[di.SubscribeToX509SVIDsResponse],
    ) -> None:
        started = time.perf_counter()
        answered = False

        async def timed(response: di.SubscribeToX509SVIDsResponse) -> None:
            nonlocal answered
            await send(response)
            if not answered:
                answered = True
                self.answer_seconds.append(time.perf_counter() - started)

        await super()._subscribe_x509_svids(request, context, timed)


async def serve(admin_socket: str, svid_ttl: int) -> None:
    agent = TimedDevAgent("example.org", svid_ttl=svid_ttl)
    stdin = trio.lowlevel.FdStream(sys.stdin.fileno())
    async with trio.open_nursery() as nursery:
        await nursery.start(agent.serve, admin_socket)
        print("ready", flush=True)
        buffered = b""
        while chunk := await stdin.receive_some():
            buffered += chunk
            *lines, buffered = buffered.split(b"\n")
            for line in lines:
                print(_command(agent, nursery, line.decode().split()), flush=True)
        nursery.cancel_scope.cancel()


def _command(agent: TimedDevAgent, nursery: trio.Nursery, words: list[str]) -> str:
    match words:
        case ["rotate", *spiffe_id]:
            agent.rotate(spiffe_id[0] if spiffe_id else None)
        case ["rotate_gradually", ttl]:
            agent.svid_ttl = int(ttl)
            nursery.start_soon(agent.rotate_gradually)
        case ["stats"]:
            return json.dumps(
                {
                    "answers": agent.answer_seconds,
                    "subscribe_count": agent.subscribe_count,
                    "open_subscriptions": len(agent.open_svid_subscriptions),
                }
            )
        case _:
            return f"error: unknown command {' '.join(words)!r}"
    return "ok"


if __name__ == "__main__":
    trio.run(serve, sys.argv[1], int(sys.argv[2]))
