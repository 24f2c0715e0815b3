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
SMTP 4xx replies, timeouts and dropped connections are transient; 5xx are permanent
(an invalid or unknown address is 550/553, a rejected message 554).
"""

from __future__ import annotations

import hashlib
import re
import ssl
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

    async def send(self, job: Job) -> Sent:
        if not self.host:
            raise PermanentError("email: not configured (CHURNGUARD_NOTIFY_SMTP_HOST is unset)")
        msg = self.build(job)
        try:
            _errors, reply = await aiosmtplib.send(
                msg,
                sender=parseaddr(self.sender)[1],
                hostname=self.host,
                port=self.port,
                username=self.username,
                password=self.password,
                use_tls=self.security == "tls",
                start_tls=self.security == "starttls",
                tls_context=self.tls_context,
                timeout=self.timeout_s,
            )
        except aiosmtplib.SMTPRecipientsRefused as exc:
            refused = exc.recipients[0] if exc.recipients else None
            code = refused.code if refused else 550
            text = f"{code} {refused.message if refused else exc}"
            if 400 <= code < 500:
                raise TransientError(f"email: recipient deferred: {text}", response=text) from None
            raise PermanentError(f"email: invalid address: {text}", response=text) from None
        except aiosmtplib.SMTPResponseException as exc:
            text = f"{exc.code} {exc.message}"
            if 400 <= exc.code < 500:
                raise TransientError(f"email: {text}", response=text) from None
            raise PermanentError(f"email: {text}", response=text) from None
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            # connection refused or dropped, timeouts, TLS handshake failures
            raise TransientError(f"email: {type(exc).__name__}: {exc}") from None
        return Sent("delivered", response=reply.strip()[:500])
