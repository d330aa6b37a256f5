"""Who may do what on NATS: one table of roles, and the nats-server ``accounts`` block made from it.

Why a table in code: the subjects a process uses are named in ``stablealign.nats.subjects``; the
permissions, and what crosses between the accounts, are built from the same constants, so renaming a stream or
a subject changes the server's configuration with it (``deploy/k8s/base/nats-auth.conf`` is generated
from here, and a test fails when the committed file is stale).

What the roles guard (issue 10): only the world may publish interaction records and memories and
create or write the worlds' streams and the ``SANDBOX_WORLDS`` bucket, so a leaked agent or CLI
password cannot forge a record or turn a failed world back to running; agents and observers only
take their own requests (queue groups) and answer them, and read what their answers need (memories,
world specs); the CLI reads records and calls the world and trainer APIs; the trainer owns
``trainer.>`` and its job bucket. JetStream's API is itself subjects (``$JS.API.<verb>.<stream>``),
so "may create the records stream" is "may publish ``$JS.API.STREAM.CREATE.SANDBOX_RECORDS``".

Replies: a responder answers through ``allow_responses`` on the reply subject of a request it received,
with no limit on the number of messages, because a replica sends heartbeats there while it works
(``subjects.LIVENESS_HEADER``), for up to ``RESPONSE_WINDOW`` after the request (longer than the slowest local
model call, ``local_llm_deadline_seconds``). The server lets it publish to *any* reply subject a request
names, not only inboxes: ``allow_responses`` is checked after, and wins over, the publish allow and deny
lists (issue 19: a get with the reply ``$KV.SANDBOX_WORLDS.<id>`` overwrote a world). That a reply goes to an
inbox (or to the server's own reply subject of a request from another account) is enforced by the responders
themselves (``stablealign.nats.reply_subjects``: every other reply subject is dropped); the deny lists below
guard what a role publishes on its own.

Accounts (issue 19): the JetStream API answers to the reply subject its request names, unchecked too, so in
one account a read right would be a right to have the server write that answer into any stream of the account.
So each service that writes streams has an account of its own, with JetStream, holding its streams only: ``WORLD``
(the world: records, memories, memory pools, the ``SANDBOX_WORLDS`` bucket) and ``TRAINER`` (the trainer: job
logs, the jobs bucket). Each keeps its push consumers on its own bucket there (deliveries of a push consumer do
not cross accounts) and calls its own JetStream as ``$JS.API``. The roles that only read (cli, agent, observer)
are users of ``CLIENTS``, which has no JetStream. What a user of one account may publish that another answers
crosses as a service import (``crossing``): into ``CLIENTS`` the world's and the trainer's request and ``$SRV``
subjects under the same names, and each one's JetStream API under a prefix of its own (``$JS.API.>`` imported
``to`` ``$JS.WORLD.API.>`` and ``$JS.TRAINER.API.>``: one account cannot import one subject from two), which a
reader's client connects with (``Role.client_settings``: ``STABLEALIGN_NATS_WORLD_JS_PREFIX``, ...); into
``WORLD`` the agents' and observers' request subjects. Nothing crosses between ``WORLD`` and ``TRAINER``. The
server sends every answer of an imported request back to the asker's account, and an answer of a JetStream API
call inside a service's account stays in that account, where only that service's own streams listen, whatever
reply subject the asker named: neither service can have an answer written into the other's streams.

Consumers (issue 19): a consumer's deliver subject is in the create request's payload, which no
permission sees, so whoever may create a consumer may have the server publish a stream's messages to
any subject — into another stream or bucket — past its own deny list. The roles that only read (cli,
agent, observer) therefore get no consumer at all: they read with message gets and batched direct gets
(``stablealign.nats.direct``). The world and the trainer keep ephemeral consumers on their own bucket
only (nats-py's watch and key listing of a bucket), which they may write anyway.

Deny lists (``Role.publish_deny``): every role is denied the protected subjects its allow list does not
reach — ``$KV.>``, ``$JS.>``, each JetStream API (``$JS.API`` and both import prefixes) whole or else its
verbs that write, delete or purge (per stream where the role owns another), consumers (every verb for a
reader; other streams' creates for an owner; durable ones for everyone), and the data subjects of records,
memories, memory pools and job logs — so a future allow entry that reaches one of them by a wildcard is
caught by the server (and by a test), not
silently granted. Every role subscribes
only its own reply inboxes, ``_INBOX_<role>.>`` (``natsauth.inbox_prefix_for``: the prefix its clients
connect with, so its requests', JetStream API calls', fetches' and KV watches' replies land there):
one role's credentials cannot read the replies addressed to another (an agent's password the CLI's
records), which a shared ``_INBOX.>`` allowed.

``python -m stablealign.nats.permissions`` (``make nats-config``) prints or writes the block.
An unsecured server (``make run``, the embedded one) has no users and one account; none of this applies there,
and every client calls JetStream as ``$JS.API`` (its prefix settings empty).
"""

from __future__ import annotations

import argparse
import json
import re
import secrets
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from stablealign.nats import subjects
from stablealign.nats.auth import DEFAULT_JS_API, inbox_prefix_for
from stablealign.nats.subjects import POOL_STREAM

JS_API = DEFAULT_JS_API
JS_API_ALL = f"{JS_API}.>"
# How long a responder may keep answering (heartbeats, then the reply) one request it received:
# longer than local_llm_deadline_seconds (25 min), the slowest step a request may wait for.
RESPONSE_WINDOW = "30m"
# The nats-server variable holding a role's password, e.g. $NATS_WORLD_PASSWORD (from a Secret in k8s).
PASSWORD_VARIABLE = "NATS_{role}_PASSWORD"
WORLDS_KV = subjects.kv_stream(subjects.WORLDS_BUCKET)
JOBS_KV = subjects.kv_stream(subjects.JOBS_BUCKET)


def kv_subjects(bucket: str) -> str:
    """The subjects a KV bucket's entries are written to (a put is a publish there)."""
    return subjects.kv_key_prefix(bucket) + ">"


def stream_reads(stream: str, api: str = JS_API) -> tuple[str, ...]:
    """Read-only JetStream API of one stream: its info and message gets, direct (batched, any replica:
    ``stablealign.nats.direct``) and through the leader. Nothing that writes, and no consumer: a consumer's
    deliver subject is in the request's payload, which a permission cannot see, so a right to create one
    is a right to make the server publish the stream anywhere (issue 19). ``api``: the prefix the reader
    calls it under (``imported_reads``)."""
    return (
        f"{api}.STREAM.INFO.{stream}",
        f"{api}.STREAM.MSG.GET.{stream}",
        f"{api}.DIRECT.GET.{stream}",
        f"{api}.DIRECT.GET.{stream}.>",
    )


def stream_consumers(stream: str) -> tuple[str, ...]:
    """Ephemeral consumers on one stream, with their flow control and acks: only for a service on a stream it
    owns and may write anyway, where its own code picks the consumer's configuration (a bucket's watch or
    key listing in nats-py)."""
    return (
        f"{JS_API}.CONSUMER.CREATE.{stream}",
        f"{JS_API}.CONSUMER.CREATE.{stream}.>",
        f"{JS_API}.CONSUMER.INFO.{stream}.*",
        f"{JS_API}.CONSUMER.DELETE.{stream}.*",
        f"{JS_API}.CONSUMER.MSG.NEXT.{stream}.*",
        f"$JS.ACK.{stream}.>",
        f"$JS.FC.{stream}.>",
    )


def stream_owner(stream: str) -> tuple[str, ...]:
    """Creating and updating one stream (idempotent ensure-stream at start), plus reading it."""
    return (f"{JS_API}.STREAM.CREATE.{stream}", f"{JS_API}.STREAM.UPDATE.{stream}", *stream_reads(stream))


# The accounts (module docstring): one per service that writes streams, with JetStream and its streams, and the one
# of the roles that only read, without. ``OWNER_ACCOUNTS``: each JetStream owner of ``natsauth`` (whose
# ``nats_<owner>_js_prefix`` setting a reader sets) and its account.
WORLD_ACCOUNT = "WORLD"
TRAINER_ACCOUNT = "TRAINER"
CLIENTS_ACCOUNT = "CLIENTS"
ACCOUNTS = (WORLD_ACCOUNT, TRAINER_ACCOUNT, CLIENTS_ACCOUNT)
ACCOUNT_STREAMS: dict[str, tuple[str, ...]] = {
    WORLD_ACCOUNT: (subjects.RECORDS_STREAM, subjects.MEMORY_STREAM, POOL_STREAM, WORLDS_KV),
    TRAINER_ACCOUNT: (subjects.JOB_LOGS_STREAM, JOBS_KV),
}
OWNER_ACCOUNTS = {"world": WORLD_ACCOUNT, "trainer": TRAINER_ACCOUNT}


def api_prefix(account: str) -> str:
    """The prefix under which another account imports ``account``'s JetStream API (``$JS.WORLD.API``)."""
    return f"$JS.{account}.API"


def stream_account(stream: str) -> str:
    """The account that holds ``stream``."""
    return next(account for account, streams in ACCOUNT_STREAMS.items() if stream in streams)


def imported_reads(stream: str) -> tuple[str, ...]:
    """``stream_reads`` of a stream as a user of ``CLIENTS`` calls them: under its account's import prefix."""
    return stream_reads(stream, api_prefix(stream_account(stream)))


# What no role may publish on its own unless its allow list names it: the deny list of each role is the
# part of this that its allow list does not overlap (``publish_deny``). Generic entries come first; a
# role that needs one stream's entry of a verb gets the other streams' entries denied instead.
_STREAMS = (subjects.RECORDS_STREAM, subjects.MEMORY_STREAM, POOL_STREAM, WORLDS_KV, subjects.JOB_LOGS_STREAM, JOBS_KV)
_WRITE_VERBS = ("STREAM.CREATE", "STREAM.UPDATE", "STREAM.DELETE", "STREAM.PURGE", "STREAM.MSG.DELETE",
                "STREAM.RESTORE", "STREAM.SNAPSHOT", "STREAM.PEER.REMOVE", "STREAM.LEADER.STEPDOWN")
_APIS = (JS_API, *(api_prefix(account) for account in ACCOUNT_STREAMS))  # as its owner calls it, as readers do


def _protected_api(api: str) -> tuple[str, ...]:
    """The JetStream API verbs under ``api`` that write, delete or purge, or make consumers."""
    return (
        f"{api}.>",
        *(f"{api}.{verb}.*" for verb in _WRITE_VERBS),
        *(f"{api}.{verb}.{stream}" for verb in _WRITE_VERBS for stream in _STREAMS),
        f"{api}.CONSUMER.>", *(f"{api}.CONSUMER.CREATE.{stream}{tail}" for stream in _STREAMS for tail in ("", ".>")),
        f"{api}.CONSUMER.DURABLE.CREATE.>", f"{api}.ACCOUNT.PURGE.*", f"{api}.META.>", f"{api}.SERVER.>",
    )


PROTECTED_PUBLISH: tuple[str, ...] = (
    "$KV.>", "$JS.>",
    *(kv_subjects(bucket) for bucket in (subjects.WORLDS_BUCKET, subjects.JOBS_BUCKET)),
    *(entry for api in _APIS for entry in _protected_api(api)),
    subjects.RECORDS_SUBJECT.format(world_id=">"), "sandbox.memory.>", "sandbox.pools.>",
    subjects.JOB_LOGS_SUBJECT.format(job_id="*"),
)


def subjects_overlap(a: str, b: str) -> bool:
    """Whether some subject matches both patterns (``*``: one token, ``>``: one or more trailing tokens)."""
    left, right = a.split("."), b.split(".")
    for x, y in zip(left, right, strict=False):
        if x == ">" or y == ">":
            return True
        if x != y and "*" not in (x, y):
            return False
    return len(left) == len(right)


def subject_covers(general: str, specific: str) -> bool:
    """Whether every subject matching ``specific`` matches ``general`` too."""
    gen, spec = general.split("."), specific.split(".")
    for i, token in enumerate(gen):
        if token == ">":
            return len(spec) > i
        if i >= len(spec) or spec[i] == ">" or (token != "*" and token != spec[i]):
            return False
    return len(gen) == len(spec)


def publish_deny(allow: Sequence[str]) -> tuple[str, ...]:
    """The protected subjects that no entry of ``allow`` overlaps (a role's publish deny list), without
    those another denied entry covers already."""
    denied = [p for p in PROTECTED_PUBLISH if not any(subjects_overlap(p, a) for a in allow)]
    return tuple(p for p in denied if not any(q != p and subject_covers(q, p) for q in denied))


def inboxes(role: str) -> str:
    """The reply subjects ``role`` may subscribe: its own inbox prefix's (``_INBOX_<role>.>``), no other's."""
    return f"{inbox_prefix_for(role)}.>"


def service_api(service: str) -> tuple[str, ...]:
    """The NATS service API subjects one service answers (``stablealign.nats.discovery``): all, by name, by id."""
    name = f"stablealign-{service}"
    return ("$SRV.*", f"$SRV.*.{name}", f"$SRV.*.{name}.*")


# How long the server keeps the way back of a request that crossed accounts open while its responder is silent
# (a streamed response's threshold counts from its last message). A responder heartbeats a request that asks for
# it at least every 30 s (``stablealign.nats.server``); one that asks none (``client.request`` with its
# liveness at or above its timeout) must be answered within this, or its answer is lost. Longer would keep the
# way back of every crossed request, answered or not, that much longer in the server's memory.
CROSSING_SILENCE = "2m"


@dataclass(frozen=True)
class Role:
    """One NATS user: its account, the subjects it may publish to and subscribe to, and whether it answers
    requests."""

    name: str
    description: str
    publish: tuple[str, ...]
    subscribe: tuple[str, ...]
    responds: bool = False
    account: str = CLIENTS_ACCOUNT

    @property
    def publish_deny(self) -> tuple[str, ...]:
        return publish_deny(self.publish)

    @property
    def password_variable(self) -> str:
        return PASSWORD_VARIABLE.format(role=self.name.upper())

    @property
    def client_settings(self) -> dict[str, str]:
        """The settings its clients connect with besides the user and password: the JetStream API prefix of each
        account whose streams it reads from another account (``nats_world_js_prefix``: ``$JS.WORLD.API``)."""
        return {f"nats_{owner}_js_prefix": api_prefix(account) for owner, account in OWNER_ACCOUNTS.items()
                if any(p.startswith(api_prefix(account) + ".") for p in self.publish)}


WORLD_REQUESTS = (subjects.WORLD_CREATE, subjects.WORLD_GET, subjects.WORLD_LIST, subjects.WORLD_CANCEL, subjects.WORLD_RESUME)
TRAINER_REQUESTS = (subjects.TRAINER_SUBMIT, subjects.TRAINER_GET, subjects.TRAINER_LIST, subjects.TRAINER_CANCEL)
# With the batch subjects of the methods served with ``batch=True`` (nats_client.request_batch).
AGENT_REQUESTS = (subjects.AGENT_DRAFT, subjects.AGENT_FEEDBACK, subjects.batch_subject(subjects.AGENT_FEEDBACK),
                  subjects.AGENT_REVISE)
OBSERVER_REQUESTS = (subjects.OBSERVER_RATE, subjects.batch_subject(subjects.OBSERVER_RATE))
_RECORDS = subjects.RECORDS_SUBJECT.format(world_id=">")
_MEMORY = "sandbox.memory.>"
_POOLS = "sandbox.pools.>"

ROLES: dict[str, Role] = {role.name: role for role in (
    Role(
        "world",
        "The world service: the only writer of records, memories, memory pools and world state; "
        "sends agents' and observers' requests; answers the world API.",
        publish=(
            _RECORDS, _MEMORY, _POOLS, kv_subjects(subjects.WORLDS_BUCKET),
            *stream_owner(subjects.RECORDS_STREAM), *stream_owner(subjects.MEMORY_STREAM), *stream_owner(POOL_STREAM),
            *stream_owner(WORLDS_KV), *stream_consumers(WORLDS_KV),  # listing worlds: a watch of the bucket
            *AGENT_REQUESTS, *OBSERVER_REQUESTS,
        ),
        subscribe=(*WORLD_REQUESTS, *service_api("world"), inboxes("world")),
        responds=True,
        account=WORLD_ACCOUNT,
    ),
    Role(
        "agent",
        "Agent replicas: answer draft/feedback/revise; read memories, memory pools and world specs.",
        publish=(*imported_reads(subjects.MEMORY_STREAM), *imported_reads(POOL_STREAM), *imported_reads(WORLDS_KV)),
        subscribe=(*AGENT_REQUESTS, *service_api("agent"), inboxes("agent")),
        responds=True,
    ),
    Role(
        "observer",
        "Observer replicas: answer rating requests; read world specs.",
        publish=imported_reads(WORLDS_KV),
        subscribe=(*OBSERVER_REQUESTS, *service_api("observer"), inboxes("observer")),
        responds=True,
    ),
    Role(
        "trainer",
        "The trainer service: answers trainer.jobs.*, owns the job bucket and the job log stream.",
        publish=("trainer.>", kv_subjects(subjects.JOBS_BUCKET), *stream_owner(subjects.JOB_LOGS_STREAM),
                 *stream_owner(JOBS_KV), *stream_consumers(JOBS_KV)),  # listing jobs: the bucket's keys
        subscribe=(*TRAINER_REQUESTS, *service_api("trainer"), inboxes("trainer")),
        responds=True,
        account=TRAINER_ACCOUNT,
    ),
    Role(
        "cli",
        "A person's `stable-align` commands: call the world and trainer APIs, read records, world "
        "specs, job state and job logs (read-only), discover services. Never writes a stream.",
        publish=(*WORLD_REQUESTS, *TRAINER_REQUESTS, "$SRV.>",
                 *imported_reads(subjects.RECORDS_STREAM), *imported_reads(WORLDS_KV), *imported_reads(JOBS_KV),
                 *imported_reads(subjects.JOB_LOGS_STREAM)),
        subscribe=(inboxes("cli"),),
    ),
)}


def account_roles(account: str, roles: Mapping[str, Role] | None = None) -> tuple[Role, ...]:
    """The roles (users) of ``account``."""
    return tuple(r for r in (ROLES if roles is None else roles).values() if r.account == account)


def served(account: str, roles: Mapping[str, Role] | None = None) -> tuple[str, ...]:
    """What ``account`` answers: its responders' request and ``$SRV`` subjects, and, in an account with JetStream,
    the read-only API of each of its streams (its JetStream answers them)."""
    subjects_ = [s for r in account_roles(account, roles) if r.responds for s in r.subscribe
                 if not s.startswith(inbox_prefix_for(r.name))]
    subjects_ += [s for stream in ACCOUNT_STREAMS.get(account, ()) for s in stream_reads(stream)]
    return tuple(dict.fromkeys(subjects_))


def _as_answered(subject: str, source: str) -> str:
    """A subject a user of another account publishes, as ``source`` answers it: ``source``'s JetStream API is
    named under its import prefix there (``$JS.WORLD.API.X`` is ``$JS.API.X`` in ``WORLD``)."""
    prefix = api_prefix(source) + "."
    return f"{JS_API}.{subject.removeprefix(prefix)}" if subject.startswith(prefix) else subject


def crossing(source: str, target: str, roles: Mapping[str, Role] | None = None) -> tuple[str, ...]:
    """The subjects ``source`` answers that a user of ``target`` may publish, as ``source`` names them:
    ``source`` exports each as a service and ``target`` imports it (``imports``: the JetStream API under
    ``source``'s prefix, the rest unchanged). Nothing else crosses: no stream's subject, so a write that a
    user's permissions let through by mistake lands in its own account, where none of those streams listens."""
    # A user's plain $JS.API is its own account's JetStream: only the prefixed one is another's.
    publish = [_as_answered(p, source) for r in account_roles(target, roles) for p in r.publish
               if not p.startswith(JS_API + ".")]
    wanted = [s for s in served(source, roles) if any(subjects_overlap(s, p) for p in publish)]
    # The JetStream API crosses whole or not at all: nats-server answers a message get through an import of
    # the API's single subjects with "JetStream not enabled for account", through ``$JS.API.>`` with the
    # message. What a user may call of it is its permissions' to say (``imported_reads``).
    if any(s.startswith(JS_API + ".") for s in wanted):
        wanted = [s for s in wanted if not s.startswith(JS_API + ".")] + [JS_API_ALL]
    return tuple(wanted)


def exports(account: str, roles: Mapping[str, Role] | None = None) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """The services ``account`` exports: (subject, the accounts that import it), whatever crosses to another."""
    importers: dict[str, list[str]] = {}
    for other in ACCOUNTS:
        for subject in crossing(account, other, roles) if other != account else ():
            importers.setdefault(subject, []).append(other)
    return tuple((subject, tuple(others)) for subject, others in importers.items())


def imports(account: str, roles: Mapping[str, Role] | None = None) -> tuple[tuple[str, str, str], ...]:
    """The services ``account`` imports: (the account answering, its subject, the subject here) — the same
    subject, but for the JetStream API, which comes under the answering account's prefix (``api_prefix``)."""
    return tuple((other, s, f"{api_prefix(other)}.>" if s == JS_API_ALL else s)
                 for other in ACCOUNTS if other != account for s in crossing(other, account, roles))


@dataclass(frozen=True)
class ServerTls:
    """TLS on the client port: the server's certificate and key, and the CA that signs clients'
    certificates (``verify``: a client must present one, i.e. mutual TLS)."""

    cert_file: str
    key_file: str
    ca_file: str = ""
    verify: bool = False


_PASSWORD_REF = re.compile(r"^\$[A-Z_][A-Z0-9_]*$")
# nats-server parses a variable's value like config text: "12ab" is a number error, "a#b" a comment.
# A password that starts with a letter and holds only letters and digits is read as a plain string.
_SAFE_PASSWORD = re.compile(r"^[A-Za-z][A-Za-z0-9]{15,}$")


def new_password() -> str:
    """A random password that nats-server reads back unchanged from an environment variable."""
    return "p" + secrets.token_hex(24)


def check_password(role: str, password: str) -> None:
    """ValueError unless nats-server would read ``password`` from ``$NATS_<ROLE>_PASSWORD`` as given."""
    if not _SAFE_PASSWORD.match(password):
        raise ValueError(f"the password of {role} must start with a letter and hold 16 or more letters and "
                         f"digits only (nats-server parses the variable's value); make one with new_password()")


def _quoted(value: str) -> str:
    return json.dumps(value)  # a JSON string is a valid nats-server config string


def _password(value: str) -> str:
    # "$NAME" unquoted: nats-server substitutes the variable (from the environment); anything else
    # is a literal string.
    return value if _PASSWORD_REF.match(value) else _quoted(value)


def _subjects(subjects: Sequence[str], indent: str) -> str:
    items = "".join(f"\n{indent}  {_quoted(s)}" for s in dict.fromkeys(subjects))
    return f"[{items}\n{indent}]"


def _render_user(role: Role, password: str) -> str:
    responses = f"\n          allow_responses: {{max: -1, expires: {_quoted(RESPONSE_WINDOW)}}}" \
        if role.responds else ""
    return (f"      # {role.name}: {role.description}\n"
            f"      {{\n"
            f"        user: {_quoted(role.name)}\n"
            f"        password: {_password(password)}\n"
            f"        permissions: {{\n"
            f"          publish: {{allow: {_subjects(role.publish, '          ')}\n"
            f"          deny: {_subjects(role.publish_deny, '          ')}}}\n"
            f"          subscribe: {{allow: {_subjects(role.subscribe, '          ')}}}{responses}\n"
            f"        }}\n"
            f"      }}")


def _render_account(account: str, users: Sequence[str], roles: Mapping[str, Role]) -> str:
    # response_type stream: a request that crosses may be answered by many messages (heartbeats, batched
    # direct gets, every replica's $SRV answer).
    # An export names the accounts that import it: no other may.
    exported = "".join(f"\n      {{service: {_quoted(s)}, accounts: [{', '.join(others)}], response_type: stream, "
                       f"response_threshold: {_quoted(CROSSING_SILENCE)}}}" for s, others in exports(account, roles))
    imported = "".join(f"\n      {{service: {{account: {source}, subject: {_quoted(s)}}}"
                       + (f", to: {_quoted(local)}" if local != s else "") + "}"
                       for source, s, local in imports(account, roles))
    jetstream = "    jetstream: enabled\n" if account in ACCOUNT_STREAMS else ""
    return (f"  {account} {{\n"
            f"{jetstream}"
            f"    users = [\n" + "\n".join(users) + "\n    ]\n"
            f"    exports = [{exported}\n    ]\n"
            f"    imports = [{imported}\n    ]\n"
            f"  }}")


def render_authorization(passwords: Mapping[str, str] | None = None,
                         roles: Mapping[str, Role] | None = None) -> str:
    """The nats-server ``accounts { ... }`` block of ``roles`` (default: all of ROLES): each role a user of
    its account, each account's exports and imports.

    ``passwords`` maps a role to its password; missing roles get a reference to the server's
    environment variable ``$NATS_<ROLE>_PASSWORD`` (a value of the form ``$NAME`` is a reference too),
    so the committed configuration holds no secret.
    """
    roles = ROLES if roles is None else roles
    passwords = passwords or {}
    unknown = set(passwords) - set(roles)
    if unknown:
        raise ValueError(f"passwords for unknown roles {sorted(unknown)}; roles are {sorted(roles)}")
    lines = ["# Generated by `python -m stablealign.nats.permissions` (make nats-config) from",
             "# stablealign/nats/permissions.py: edit the table there, not this file.",
             f"# {WORLD_ACCOUNT}, {TRAINER_ACCOUNT}: each service that writes streams, with JetStream and its own streams",
             f"# only. {CLIENTS_ACCOUNT}: the users that only read them; they reach each one's JetStream API under its",
             "# prefix ($JS.WORLD.API, $JS.TRAINER.API; their permissions allow reads only) and the services only",
             "# through the imports below, so the server answers them into their own account, where no stream listens.",
             "# A client without a user and password is refused.",
             "accounts {"]
    for account in ACCOUNTS:
        users = [_render_user(role, passwords.get(role.name) or f"${role.password_variable}")
                 for role in account_roles(account, roles)]
        lines.append(_render_account(account, users, roles))
    lines.append("}")
    return "\n".join(lines) + "\n"


def render_tls(tls: ServerTls) -> str:
    """The nats-server ``tls { ... }`` block of the client port."""
    lines = ["tls {", f"  cert_file: {_quoted(tls.cert_file)}", f"  key_file: {_quoted(tls.key_file)}"]
    if tls.ca_file:
        lines.append(f"  ca_file: {_quoted(tls.ca_file)}")
    if tls.verify:
        lines.append("  verify: true")
    lines.append("  timeout: 5")
    lines.append("}")
    return "\n".join(lines) + "\n"


def render_config(passwords: Mapping[str, str] | None = None, tls: ServerTls | None = None) -> str:
    """The accounts block, and the TLS block when ``tls`` is given: what a server config includes."""
    return render_authorization(passwords) + (render_tls(tls) if tls else "")


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m stablealign.nats.permissions [--out FILE] [--tls-cert ... --tls-key ...]``."""
    parser = argparse.ArgumentParser(
        prog="python -m stablealign.nats.permissions",
        description="Write the nats-server accounts block (one user per role, passwords from "
                    "$NATS_<ROLE>_PASSWORD) generated from stablealign/nats/permissions.py.")
    parser.add_argument("--out", type=Path, help="File to write (default: standard output).")
    parser.add_argument("--tls-cert", default="", help="Server certificate file: adds a tls {} block.")
    parser.add_argument("--tls-key", default="", help="Server key file (with --tls-cert).")
    parser.add_argument("--tls-ca", default="", help="CA file of client certificates (with --tls-cert).")
    parser.add_argument("--tls-verify", action="store_true", help="Require client certificates (mutual TLS).")
    parser.add_argument("--list", action="store_true", help="Print the roles and their subjects as JSON instead.")
    parser.add_argument("--new-passwords", action="store_true",
                        help="Print ROLE=PASSWORD lines of new random passwords instead (for `kubectl create "
                             "secret generic nats-credentials --from-env-file=...`).")
    args = parser.parse_args(argv)
    if args.new_passwords:
        print("\n".join(f"{name}={new_password()}" for name in ROLES))
        return 0
    if args.list:
        print(json.dumps({name: {"publish": list(r.publish), "publish_deny": list(r.publish_deny),
                                 "subscribe": list(r.subscribe),
                                 "responds": r.responds, "password_variable": r.password_variable}
                          for name, r in ROLES.items()}, indent=2))
        return 0
    if bool(args.tls_cert) != bool(args.tls_key):
        parser.error("--tls-cert and --tls-key go together")
    if (args.tls_ca or args.tls_verify) and not args.tls_cert:
        parser.error("--tls-ca/--tls-verify need --tls-cert and --tls-key")
    tls = ServerTls(args.tls_cert, args.tls_key, args.tls_ca, args.tls_verify) if args.tls_cert else None
    text = render_config(tls=tls)
    if args.out is None:
        sys.stdout.write(text)
        return 0
    try:
        args.out.write_text(text, encoding="utf-8")
    except OSError as exc:
        print(f"error: cannot write {args.out}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
