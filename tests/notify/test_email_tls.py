"""Email over STARTTLS and implicit TLS with AUTH, against a real aiosmtpd server with a
certificate the client must verify (a self-signed one, given as the CA file)."""

from __future__ import annotations

import shutil
import ssl
import subprocess
from datetime import UTC, datetime
from pathlib import Path

import pytest

from churnguard.common.events.derived import NotificationRequested, NotificationRequestedData
from churnguard.devstack.standins import SmtpSink
from churnguard.notify.channels.base import Job, TransientError
from churnguard.notify.channels.email import EmailChannel
from churnguard.notify.templates import validate
from tests.notify.conftest import PAYMENT_VARIABLES

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


def server_context(cert: Path, key: Path) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    return context


def job(address: str) -> Job:
    command = NotificationRequested(
        id=f"cmd-tls-{address}",
        source="/playbooks",
        time=datetime.now(UTC),
        subject="acct_1",
        data=NotificationRequestedData(
            channel="email",
            template="payment_failed",
            recipient=address,
            playbook="p",
            decision_id="d",
            priority=0,
            variables=PAYMENT_VARIABLES,
        ),
    )
    variables = validate("payment_failed", "email", PAYMENT_VARIABLES)
    return Job(1, command, variables, 1)


def channel(port: int, security: str, ca_file: Path | None, password: str = "pw") -> EmailChannel:
    async def never(_: str) -> bool:
        return False

    return EmailChannel(
        host="127.0.0.1",
        port=port,
        security=security,  # type: ignore[arg-type]
        username="notify",
        password=password,
        sender="Acme <success@acme.test>",
        message_id_domain="acme.test",
        public_url="https://notify.acme.test",
        unsubscribe_secret="k",
        is_unsubscribed=never,
        timeout_s=10,
        ca_file=str(ca_file) if ca_file else None,
    )


@pytest.mark.parametrize("security", ["starttls", "tls"])
async def test_tls_with_auth_delivers_and_verifies_the_server(
    certificate: tuple[Path, Path], security: str
) -> None:
    cert, key = certificate
    context = server_context(cert, key)
    sink = SmtpSink(
        username="notify",
        password="pw",
        tls_context=context if security == "starttls" else None,
        implicit_tls_context=context if security == "tls" else None,
    ).start()
    try:
        email = channel(sink.port, security, cert)
        sent = await email.send(job("a@acme.test"))
        await email.send(job("b@acme.test"))  # over the pooled connection
        await email.close()
        assert sent.status == "delivered"
        assert [str(m["To"]) for m in sink.messages] == ["a@acme.test", "b@acme.test"]
        assert sink.encrypted == [True, True]

        untrusted = channel(sink.port, security, None)  # the system CAs do not know it
        with pytest.raises(TransientError, match="connecting"):
            await untrusted.send(job("c@acme.test"))
        assert len(sink.messages) == 2
    finally:
        sink.stop()
