"""Email over SMTP (aiosmtplib): Jinja2 HTML and plain-text parts, List-Unsubscribe.

Every message has:

* ``Message-ID: <sha256(command id)[:32]@CHURNGUARD_NOTIFY_SMTP_MESSAGE_ID_DOMAIN>``, the
  same for every attempt of one command, so a mail system that deduplicates by Message-ID
  (many do, per mailbox) drops an accidental second copy, and a person can match the
  message to the command;
* ``List-Unsubscribe`` (the HTTPS link to notify's ``/v1/unsubscribe`` with a signed
  token) and ``List-Unsubscribe-Post: List-Unsubscribe=One-Click`` (RFC 8058), which
  Gmail and Yahoo require of bulk senders;
* ``X-Churnguard-Action-Id``: the command id.

A contact who unsubscribed is suppressed before any SMTP connection is made.
Connections are pooled (one per busy worker). SMTP 4xx replies and failures to connect
are transient; 5xx are permanent (an invalid or unknown address is 550/553, a rejected
message 554); a connection lost *during* a message is ambiguous (the server may have
queued it), so that delivery is treated as in doubt and not sent again.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import ssl
import time
from collections.abc import Awaitable, Callable
from email.message import EmailMessage
from email.utils import formatdate, parseaddr
from typing import ClassVar, Literal
from urllib.parse import quote

import aiosmtplib

from churnguard.common.events.derived import NotificationRequested
from churnguard.notify.channels.base import (
    Channel,
    Job,
    PermanentError,
    Sent,
    Suppressed,
    TransientError,
)
from churnguard.notify.signing import unsubscribe_token
from churnguard.notify.templates import render_email

MAX_IDLE_S = 60.0
CHECK_AFTER_IDLE_S = 5.0

ADDRESS = re.compile(r"^[^@\s<>,;\"]+@[^@\s<>,;\"]+\.[^@\s<>,;\"]+$")


def message_id(command_id: str, domain: str) -> str:
    return f"<{hashlib.sha256(command_id.encode()).hexdigest()[:32]}@{domain}>"


class EmailChannel(Channel):
    lane: ClassVar[str] = "email"
    in_doubt_policy: ClassVar[str] = (
        "not sent again (SMTP cannot be asked whether a message arrived); outcome failed "
        "with the detail 'in doubt'. The Message-ID is deterministic, so a resend would "
        "be recognisable"
    )

    def __init__(
        self,
        *,
        host: str | None,
        port: int,
        security: Literal["none", "starttls", "tls"],
        username: str | None,
        password: str | None,
        sender: str,
        message_id_domain: str,
        public_url: str,
        unsubscribe_secret: str,
        is_unsubscribed: Callable[[str], Awaitable[bool]],
        timeout_s: float,
        ca_file: str | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.security = security
        self.username = username
        self.password = password
        self.sender = sender
        self.message_id_domain = message_id_domain
        self.public_url = public_url.rstrip("/")
        self.unsubscribe_secret = unsubscribe_secret
        self.is_unsubscribed = is_unsubscribed
        self.timeout_s = timeout_s
        self.tls_context = ssl.create_default_context(cafile=ca_file) if ca_file else None
        self._idle: list[tuple[aiosmtplib.SMTP, float]] = []

    def unsubscribe_url(self, address: str) -> str:
        token = unsubscribe_token(self.unsubscribe_secret, address)
        return f"{self.public_url}/v1/unsubscribe?token={quote(token)}"

    async def before_send(self, job: Job) -> Suppressed | None:
        assert isinstance(job.command, NotificationRequested)
        address = job.command.data.recipient.strip()
        if await self.is_unsubscribed(address.lower()):
            return Suppressed(f"{address} unsubscribed")
        return None

    def build(self, job: Job) -> EmailMessage:
        command = job.command
        assert isinstance(command, NotificationRequested)
        assert job.variables is not None
        address = command.data.recipient.strip()
        if not ADDRESS.match(address):
            raise PermanentError(f"email: invalid address {address!r}")
        unsubscribe = self.unsubscribe_url(address)
        rendered = render_email(command.data.template, job.variables, unsubscribe_url=unsubscribe)
        msg = EmailMessage()
        msg["From"] = self.sender
        msg["To"] = address
        msg["Subject"] = rendered.subject
        msg["Date"] = formatdate(localtime=False, usegmt=True)
        msg["Message-ID"] = message_id(command.id, self.message_id_domain)
        msg["List-Unsubscribe"] = f"<{unsubscribe}>"
        msg["List-Unsubscribe-Post"] = "List-Unsubscribe=One-Click"
        msg["X-Churnguard-Action-Id"] = command.id
        msg["X-Churnguard-Template"] = command.data.template
        msg.set_content(rendered.text)
        msg.add_alternative(rendered.html, subtype="html")
        return msg

    async def _connection(self) -> aiosmtplib.SMTP:
        """A connected, authenticated client: an idle pooled one, or a new one.

        One connection (EHLO, STARTTLS, AUTH) per message would cost a TLS handshake and
        several round trips each time; a pooled connection idle for a while is checked
        with NOOP first, so a server that closed it is noticed before a message is sent
        (a connection lost *during* a message is ambiguous, see :meth:`send`).
        """
        while self._idle:
            client, since = self._idle.pop()
            if not client.is_connected or time.monotonic() - since > MAX_IDLE_S:
                client.close()
                continue
            if time.monotonic() - since > CHECK_AFTER_IDLE_S:
                try:
                    await client.noop()
                except (aiosmtplib.SMTPException, OSError, TimeoutError):
                    client.close()
                    continue
            return client
        client = aiosmtplib.SMTP(
            hostname=self.host,
            port=self.port,
            username=self.username,
            password=self.password,
            use_tls=self.security == "tls",
            start_tls=self.security == "starttls",
            tls_context=self.tls_context,
            timeout=self.timeout_s,
        )
        await client.connect()
        return client

    async def send(self, job: Job) -> Sent:
        if not self.host:
            raise PermanentError("email: not configured (CHURNGUARD_NOTIFY_SMTP_HOST is unset)")
        msg = self.build(job)
        try:
            client = await self._connection()
        except aiosmtplib.SMTPAuthenticationError as exc:
            raise PermanentError(
                f"email: SMTP authentication failed ({exc.code} {exc.message}): check "
                "CHURNGUARD_NOTIFY_SMTP_USERNAME and _PASSWORD"
            ) from None
        except aiosmtplib.SMTPResponseException as exc:
            raise TransientError(f"email: connecting: {exc.code} {exc.message}") from None
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            # refused, unreachable, TLS failure: nothing was sent
            raise TransientError(f"email: connecting: {type(exc).__name__}: {exc}") from None
        try:
            _, reply = await client.send_message(msg, sender=parseaddr(self.sender)[1])
        except aiosmtplib.SMTPRecipientsRefused as exc:
            self._release(client)
            refused = exc.recipients[0] if exc.recipients else None
            code = refused.code if refused else 550
            text = f"{code} {refused.message if refused else exc}"
            if 400 <= code < 500:
                raise TransientError(f"email: recipient deferred: {text}", response=text) from None
            raise PermanentError(f"email: invalid address: {text}", response=text) from None
        except aiosmtplib.SMTPResponseException as exc:
            # the server answered (and so did not take the message): say it, reset, reuse
            self._release(client, reset=True)
            text = f"{exc.code} {exc.message}"
            if 400 <= exc.code < 500:
                raise TransientError(f"email: {text}", response=text) from None
            raise PermanentError(f"email: {text}", response=text) from None
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            # the connection died mid-transaction: the server may or may not have taken it
            client.close()
            raise TransientError(
                f"email: {type(exc).__name__} during the SMTP transaction: {exc}",
                ambiguous=True,
            ) from None
        self._release(client)
        return Sent("delivered", response=reply.strip()[:500])

    def _release(self, client: aiosmtplib.SMTP, *, reset: bool = False) -> None:
        if not client.is_connected:
            return
        if reset:  # after a refused MAIL or DATA: start the next message cleanly
            client.close()
            return
        self._idle.append((client, time.monotonic()))

    async def close(self) -> None:
        while self._idle:
            client, _ = self._idle.pop()
            with contextlib.suppress(Exception):
                await client.quit()
