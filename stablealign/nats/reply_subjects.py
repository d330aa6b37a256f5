"""Which reply subjects a responder may publish to: the reply inboxes, nothing else.

Why: a request names its own reply subject, and nats-server lets the responder publish there
whatever its permissions say (``allow_responses`` is checked after, and wins over, the publish
allow and deny lists). A request carrying the reply subject ``$KV.SANDBOX_WORLDS.<id>`` or
``sandbox.records.<x>`` would make the world service overwrite a world or add a record with its
own rights. So every responder (``bus.RequestServer``'s replies, error replies and heartbeats,
``discovery``'s ``$SRV`` answers) checks the subject here first and drops anything else.

The inbox namespaces: nats-py's and the ``nats`` CLI's ``_INBOX.<...>``, and the per-user prefixes
``_INBOX_<user>.<...>`` (``natsauth.inbox_prefix_for``), i.e. a first token that is ``_INBOX`` or starts
with ``_INBOX_``. A client configured with another inbox prefix (``STABLEALIGN_NATS_INBOX_PREFIX``)
gets no replies from our services unless that prefix is in this namespace too.
"""

from __future__ import annotations

from stablealign.nats.auth import DEFAULT_INBOX_PREFIX


def is_reply_inbox(subject: str) -> bool:
    """True for a literal subject under an inbox prefix (``_INBOX.x``, ``_INBOX_cli.x.1``), else False."""
    if not subject or any(c in subject for c in " \t\r\n*>"):
        return False
    first, dot, rest = subject.partition(".")
    if not dot or not rest or "" in rest.split("."):
        return False
    return first == DEFAULT_INBOX_PREFIX or (first.startswith(DEFAULT_INBOX_PREFIX + "_")
                                             and len(first) > len(DEFAULT_INBOX_PREFIX) + 1)
