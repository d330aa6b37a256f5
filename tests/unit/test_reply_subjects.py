"""Which reply subjects a responder answers: the inboxes of nats-py, the nats CLI and our per-user prefixes."""

from __future__ import annotations

import pytest

from stablealign.nats.auth import NatsClientOptions
from stablealign.nats.permissions import ROLES, inboxes
from stablealign.nats.reply_subjects import is_reply_inbox


@pytest.mark.parametrize("subject", [
    "_INBOX.abc", "_INBOX.abc.1", "_INBOX_cli.xyz.7", "_INBOX_world.n", "_INBOX_my-team.x",
    "_R_.0rQbmC.EZHNg9",  # the server's reply of a request imported from another account
])
def test_inboxes_are_answered(subject):
    assert is_reply_inbox(subject)


@pytest.mark.parametrize("subject", [
    "", "_INBOX", "_INBOX.", "_INBOX..x", "_INBOX_.x", "_INBOXES.x", "_INBOX.x.", "x._INBOX.y",
    "$KV.SANDBOX_WORLDS.victim", "sandbox.records.w1", "sandbox.memory.w.0", "trainer.jobs.j.log",
    "$JS.API.STREAM.DELETE.SANDBOX_RECORDS", "$SRV.PING", "_INBOX.*", "_INBOX.>", "_INBOX.a b",
    "_R_", "_R_.", "_R_.*", "_R_.>", "_R_..x", "_R_x.y", "x._R_.y",
])
def test_everything_else_is_not(subject):
    assert not is_reply_inbox(subject)


def test_every_roles_own_inbox_is_answered():
    """A reply to any role's client (the prefix it connects with) reaches it."""
    for name in ROLES:
        prefix = NatsClientOptions.build(user=name, password="p" * 16).reply_inbox_prefix()
        assert inboxes(name) == f"{prefix}.>"
        assert is_reply_inbox(f"{prefix}.Zq9.12")
