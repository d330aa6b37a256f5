"""How a process proves who it is to NATS, and how NATS failures are said without leaking a secret.

- ``NatsClientOptions``: one object with a client's credentials (user + password, or a ``.creds``
  file) and TLS material (the CA that signed the server's certificate; optionally a client
  certificate for mutual TLS). Services build it from their settings (``STABLEALIGN_NATS_USER``,
  ``..._PASSWORD`` or ``..._PASSWORD_FILE``, ``..._CREDS``, ``..._CA``, ``..._TLS_CERT``, ``..._TLS_KEY``),
  the CLI from the same variables or its ``--nats-*`` flags; ``bus.connect`` takes it.
- Every log line and error message that names a NATS server shows it through
  ``stablealign.core.redaction.redact_url`` (``nats://user:secret@host:4222`` -> ``nats://***@host:4222``).
- ``refusal``: what nats-py reports when the server refuses the credentials ("Authorization
  Violation") or the TLS handshake fails, turned into one clear error instead of "cannot reach".
- Reply inboxes per user: a client's replies (its own requests', JetStream API calls', pull fetches',
  KV watches') arrive on subjects under its inbox prefix, ``_INBOX_<user>`` (``inbox_prefix_for``), and
  the server lets each user subscribe only its own prefix (``stablealign.nats.permissions``). With one
  shared ``_INBOX.>``, any role's credentials could read the replies addressed to another role (an
  agent's password reading the CLI's records and world API replies). ``STABLEALIGN_NATS_INBOX_PREFIX``
  overrides the derived prefix (a ``.creds`` user, whose name the client does not know; a server with
  its own permissions that allow ``_INBOX.>`` only: set it to ``_INBOX``).
- JetStream API prefixes: the world's and the trainer's streams live in accounts of their own on a secured
  server, and the users that only read them (cli, agent, observer) reach each account's JetStream API under its
  own prefix (``$JS.WORLD.API``, ``$JS.TRAINER.API``: ``stablealign.nats.permissions``), set by
  ``STABLEALIGN_NATS_WORLD_JS_PREFIX`` and ``..._TRAINER_JS_PREFIX``; empty (an unsecured server, one account,
  or the owner's own user): ``$JS.API``. ``NatsClientOptions.jetstream_prefix`` says which, and
  ``stablealign.nats.client.jetstream`` opens a context with it.
"""

from __future__ import annotations

import re
import ssl
from contextvars import ContextVar, Token
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from stablealign.core.config import NatsClientSettings, env_name, load_settings
from stablealign.core.errors import ConfigError, StableAlignError
from stablealign.core.redaction import redact_url

# The settings (and CLI flags) that carry a client's NATS credentials, by option field.
SETTING_NAMES = ("nats_user", "nats_password", "nats_password_file", "nats_creds", "nats_ca", "nats_tls_cert",
                 "nats_tls_key", "nats_inbox_prefix", "nats_world_js_prefix", "nats_trainer_js_prefix")
# nats-py's own default: the prefix of a client that has no user name (no credentials, a .creds file).
DEFAULT_INBOX_PREFIX = "_INBOX"
INBOX_PREFIX_SETTING = "STABLEALIGN_NATS_INBOX_PREFIX"
# JetStream's own API prefix: what a client of the account that holds the streams uses.
DEFAULT_JS_API = "$JS.API"
# The services whose streams a client may read through a prefix of their own (an account each when secured).
JETSTREAM_OWNERS = ("world", "trainer")
# A subject of one or more tokens: no wildcard, no whitespace, no empty token.
_SUBJECT = re.compile(r"^[^\s.*>]+(\.[^\s.*>]+)*$")


def inbox_prefix_for(user: str) -> str:
    """The reply inbox prefix of NATS user ``user`` (``_INBOX_agent``): the server lets that user
    subscribe ``<prefix>.>`` and nothing of another user's prefix (``stablealign.nats.permissions``)."""
    return f"{DEFAULT_INBOX_PREFIX}_{user}"


def js_prefix_setting(owner: str) -> str:
    """The variable of the JetStream API prefix of ``owner``'s streams (``STABLEALIGN_NATS_WORLD_JS_PREFIX``)."""
    return f"STABLEALIGN_NATS_{owner.upper()}_JS_PREFIX"


def _checked_js_prefix(prefix: str, owner: str) -> str:
    if prefix and not _SUBJECT.match(prefix):
        raise ConfigError(f"{js_prefix_setting(owner)}: {prefix[:100]!r} cannot be a JetStream API prefix (one or "
                          f"more dot-separated tokens, no '*', '>' or whitespace), e.g. $JS.{owner.upper()}.API")
    return prefix


def _checked_prefix(prefix: str, source: str) -> str:
    if not _SUBJECT.match(prefix):
        raise ConfigError(f"{source}: {prefix[:100]!r} cannot be a NATS reply inbox prefix (one or more "
                          f"dot-separated tokens, no '*', '>' or whitespace); set {INBOX_PREFIX_SETTING}")
    return prefix


class NotAuthorizedError(StableAlignError):
    """NATS refused this client's credentials (or none were given where they are required).

    Not an UnavailableError: trying again with the same credentials cannot help, so a command says so
    at once (exit code ``EXIT_CODE``) instead of "cannot reach NATS" after its give-up time."""

    code = 403
    EXIT_CODE = 3


def _readable_file(path: str, setting: str) -> str:
    if not path:
        return ""
    file = Path(path).expanduser()
    if not file.is_file():
        raise ConfigError(f"{setting}: no such file {file}")
    try:
        with file.open("rb"):
            pass
    except OSError as exc:
        raise ConfigError(f"{setting}: cannot read {file} ({exc.strerror or exc})") from None
    return str(file)


@dataclass(frozen=True)
class NatsClientOptions:
    """Credentials and TLS material of one NATS client; empty fields: not used.

    The password is kept out of ``repr`` (and so out of any log that prints the options).
    """

    user: str = ""
    password: str = field(default="", repr=False)
    creds: str = ""  # a .creds file (JWT + NKey seed): nats-py's user_credentials
    ca: str = ""  # PEM file of the CA that signed the server's certificate
    tls_cert: str = ""  # client certificate (mutual TLS)
    tls_key: str = ""
    inbox_prefix: str = ""  # "" : derived from the user (inbox_prefix_for), else nats-py's _INBOX
    world_js_prefix: str = ""  # the world's streams' JetStream API; "": $JS.API
    trainer_js_prefix: str = ""  # the trainer's streams' JetStream API; "": $JS.API

    @classmethod
    def build(cls, *, user: str | None = None, password: str | None = None, password_file: str | None = None,
              creds: str | None = None, ca: str | None = None, tls_cert: str | None = None,
              tls_key: str | None = None, inbox_prefix: str | None = None, world_js_prefix: str | None = None,
              trainer_js_prefix: str | None = None) -> NatsClientOptions:
        """Checked options: ConfigError (one line, naming the variable) for a file that is not there,
        a password without a user, both a password and a password file, a certificate without its key,
        or a user name, inbox prefix or JetStream API prefix that cannot name a subject."""
        user, password, password_file = user or "", password or "", password_file or ""
        world_js_prefix = _checked_js_prefix((world_js_prefix or "").strip(), "world")
        trainer_js_prefix = _checked_js_prefix((trainer_js_prefix or "").strip(), "trainer")
        inbox_prefix = (inbox_prefix or "").strip()
        if inbox_prefix:
            _checked_prefix(inbox_prefix, INBOX_PREFIX_SETTING)
        elif user:
            _checked_prefix(inbox_prefix_for(user), "STABLEALIGN_NATS_USER")
        if password and password_file:
            raise ConfigError("give STABLEALIGN_NATS_PASSWORD or STABLEALIGN_NATS_PASSWORD_FILE, not both")
        if password_file:
            path = _readable_file(password_file, "STABLEALIGN_NATS_PASSWORD_FILE")
            password = Path(path).read_text(encoding="utf-8").rstrip("\r\n")
            if not password:
                raise ConfigError(f"STABLEALIGN_NATS_PASSWORD_FILE: {path} is empty")
        if password and not user:
            raise ConfigError("STABLEALIGN_NATS_PASSWORD needs STABLEALIGN_NATS_USER")
        creds = _readable_file(creds or "", "STABLEALIGN_NATS_CREDS")
        if creds and user:
            raise ConfigError("give STABLEALIGN_NATS_CREDS or STABLEALIGN_NATS_USER, not both")
        if bool(tls_cert) != bool(tls_key):
            raise ConfigError("STABLEALIGN_NATS_TLS_CERT and STABLEALIGN_NATS_TLS_KEY go together")
        return cls(user=user, password=password, creds=creds, ca=_readable_file(ca or "", "STABLEALIGN_NATS_CA"),
                   tls_cert=_readable_file(tls_cert or "", "STABLEALIGN_NATS_TLS_CERT"),
                   tls_key=_readable_file(tls_key or "", "STABLEALIGN_NATS_TLS_KEY"), inbox_prefix=inbox_prefix,
                   world_js_prefix=world_js_prefix, trainer_js_prefix=trainer_js_prefix)

    @classmethod
    def from_settings(cls, settings: Any) -> NatsClientOptions:
        """From a settings object with the ``nats_*`` fields of ``ServiceSettings`` (missing ones: empty)."""
        values = {name: getattr(settings, name, "") or "" for name in SETTING_NAMES}
        return cls.build(**{name.removeprefix("nats_"): value for name, value in values.items()})

    @property
    def tls(self) -> bool:
        return bool(self.ca or self.tls_cert)

    def ssl_context(self) -> ssl.SSLContext | None:
        """The client's TLS context when a CA or a client certificate is configured, else None
        (a ``tls://`` URL then uses the system's trusted CAs)."""
        if not self.tls:
            return None
        try:
            context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=self.ca or None)
            if self.tls_cert:
                context.load_cert_chain(self.tls_cert, self.tls_key)
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError(f"NATS TLS files (STABLEALIGN_NATS_CA / _TLS_CERT / _TLS_KEY) are not usable: "
                              f"{getattr(exc, 'reason', None) or exc}") from None
        return context

    def reply_inbox_prefix(self, url: str = "") -> str:
        """The prefix of this client's reply subjects: ``inbox_prefix`` when set, else that of the user
        (given here, or in ``url`` as ``nats://user:pass@host``), else nats-py's ``_INBOX``."""
        if self.inbox_prefix:
            return self.inbox_prefix
        user = self.user
        if not user and url and not self.creds:
            try:
                user = unquote(urlsplit(url).username or "")
            except ValueError:  # not a URL nats-py could use either: it says so when connecting
                user = ""
        return _checked_prefix(inbox_prefix_for(user), "the NATS user") if user else DEFAULT_INBOX_PREFIX

    def jetstream_prefix(self, owner: str) -> str:
        """The JetStream API prefix of the streams ``owner`` (world or trainer) keeps: the one set for it, else
        ``$JS.API`` (an unsecured server, or the owner's own user)."""
        if owner not in JETSTREAM_OWNERS:
            raise ValueError(f"no JetStream of {owner!r}: the owners are {', '.join(JETSTREAM_OWNERS)}")
        return getattr(self, f"{owner}_js_prefix") or DEFAULT_JS_API

    def connect_kwargs(self, url: str = "") -> dict[str, Any]:
        """Keyword arguments of ``nats.connect`` for these options (``url``: the server's, for a user
        named in it)."""
        kwargs: dict[str, Any] = {"inbox_prefix": self.reply_inbox_prefix(url)}
        if self.user:
            kwargs["user"] = self.user
            kwargs["password"] = self.password
        if self.creds:
            kwargs["user_credentials"] = self.creds
        context = self.ssl_context()
        if context is not None:
            kwargs["tls"] = context
        return kwargs

    def describe(self) -> str:
        """Which credentials are in use, for log lines: never a secret."""
        who = f"user {self.user}" if self.user else ("creds file" if self.creds else "no credentials")
        return who + (", TLS with a client certificate" if self.tls_cert else (", TLS" if self.ca else ""))


# The options a client connects with when its caller gives none: set once per command by the CLI's
# rules (stablealign_app/cli/rules.py) from its --nats-* flags and STABLEALIGN_NATS_* variables, so no
# command that connects can forget them. A context variable, so that it ends with the command.
_CLIENT_OPTIONS: ContextVar[NatsClientOptions | None] = ContextVar("nats_client_options", default=None)


def use_client_options(options: NatsClientOptions) -> Token:
    """Makes ``options`` what ``bus.connect`` uses when given none; ``reset_client_options`` undoes it."""
    return _CLIENT_OPTIONS.set(options)


def reset_client_options(token: Token) -> None:
    _CLIENT_OPTIONS.reset(token)


def settings_in_environment() -> list[str]:
    """The variables of the NATS client settings (``STABLEALIGN_NATS_USER``, ...) set in this process's
    environment, whatever the command's flags say."""
    given = load_settings(NatsClientSettings)
    return [env_name(name) for name in SETTING_NAMES if getattr(given, name).strip()]


def client_options() -> NatsClientOptions:
    """The options set by ``use_client_options`` in this context, else none (no credentials, no TLS)."""
    return _CLIENT_OPTIONS.get() or NatsClientOptions()


def is_authorization_violation(exc: BaseException) -> bool:
    """The server refused the credentials (none given, a wrong password, an unknown user)."""
    import nats.errors

    return isinstance(exc, nats.errors.AuthorizationError) or "authorization violation" in str(exc).lower()


def is_permissions_violation(exc: BaseException) -> bool:
    """A publish or subscribe the credentials do not allow (the connection stays up)."""
    return "permissions violation" in str(exc).lower()


def is_tls_failure(exc: BaseException) -> bool:
    """The TLS handshake failed: the server's certificate is not trusted, or the server wants one from us."""
    return isinstance(exc, ssl.SSLError)


def refusal(exc: BaseException, url: str) -> StableAlignError | None:
    """The error to raise at once for a connection attempt that failed this way, or None when it is
    worth trying again (the server is not up yet, the network is down)."""
    where = redact_url(url)
    if is_authorization_violation(exc):
        return NotAuthorizedError(f"NATS at {where} refused the credentials (authorization violation): check "
                                  f"STABLEALIGN_NATS_USER and STABLEALIGN_NATS_PASSWORD (or _CREDS)")
    if isinstance(exc, ssl.SSLCertVerificationError):
        reason = exc.verify_message or exc.reason or "certificate verify failed"
        return ConfigError(f"NATS at {where}: TLS handshake failed, the server's certificate is not trusted "
                           f"({reason}): set STABLEALIGN_NATS_CA to the CA that signed it")
    if is_tls_failure(exc):
        reason = getattr(exc, "reason", None) or str(exc) or type(exc).__name__
        return ConfigError(f"NATS at {where}: TLS handshake failed ({reason}); check STABLEALIGN_NATS_CA, "
                           f"_TLS_CERT and _TLS_KEY")
    return None
