"""Requests that every responder answers (the NATS service API's ``$SRV`` pings): the tests count the answers.

Why a helper: nats-py's ``request`` returns the first answer only, and a count needs each replica's.
"""

from __future__ import annotations

import asyncio
import json

import nats.errors


async def ask(nc, subject: str, expect: int, timeout: float = 5.0, linger: float = 0.3) -> list[dict]:
    """Sends one request to ``subject`` and collects the JSON replies of every responder: up to
    ``timeout`` seconds for the ``expect`` replies, then ``linger`` seconds for any extra (bounded)."""
    loop = asyncio.get_running_loop()
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    replies: list[dict] = []
    try:
        await nc.publish(subject, b"", reply=inbox)
        deadline = loop.time() + timeout
        for _ in range(expect + 10):
            wait = (deadline - loop.time()) if len(replies) < expect else linger
            if wait <= 0:
                break
            try:
                msg = await sub.next_msg(timeout=wait)
            except nats.errors.TimeoutError:
                break
            replies.append(json.loads(msg.data))
    finally:
        await sub.unsubscribe()
    return replies
