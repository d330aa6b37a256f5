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

And the server's own replies ``_R_.<...>``: a request that crossed from one account to another (the secured
server's accounts, ``stablealign.nats.permissions``) reaches its responder with a reply subject the server
made, which the server maps back to the asker's reply subject in the asker's account. A client cannot name
one itself: nats-server refuses every client publish whose reply starts with ``_R_.`` (a publish violation,
"reserved reply"; a test holds it). So a ``_R_.`` reply leads only to the asker's own account: the readers',
where no stream of ours listens, or the world's (its requests to agents and observers), whose user writes those
streams anyway; whatever reply subject the asker named stays on its side.
"""

from __future__ import annotations

from stablealign.nats.auth import DEFAULT_INBOX_PREFIX

# The first token of the reply subjects nats-server makes for a request imported from another account.
SERVICE_REPLY_PREFIX = "_R_"


def is_reply_inbox(subject: str) -> bool:
    """True for a literal subject under an inbox prefix (``_INBOX.x``, ``_INBOX_cli.x.1``) or the server's
    reply of a request from another account (``_R_.x.y``), else False."""
    if not subject or any(c in subject for c in " \t\r\n*>"):
        return False
    first, dot, rest = subject.partition(".")
    if not dot or not rest or "" in rest.split("."):
        return False
    if first in (DEFAULT_INBOX_PREFIX, SERVICE_REPLY_PREFIX):
        return True
    return first.startswith(DEFAULT_INBOX_PREFIX + "_") and len(first) > len(DEFAULT_INBOX_PREFIX) + 1
