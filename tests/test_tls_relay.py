"""tlsd's TLS session, sans I/O (pyipc/daemons/_tls_relay.py): two relays
talk through their memory BIOs only, with certificates from trustme."""

from __future__ import annotations

import datetime
import ssl
import struct

import pytest

import trustme  # a test dependency (pyproject's test extra): missing, the run fails

from pyipc.daemons._tls_relay import TlsRelay, TlsRelayError  # noqa: E402
from conftest import frame


@pytest.fixture(scope="module")
def ca() -> "trustme.CA":
    return trustme.CA()


def contexts(ca, *, server_ca=None, expired=False):
    """(server, client) SSL contexts; the client trusts `ca`."""
    issuer = server_ca or ca
    if expired:
        past = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(days=1)
        cert = issuer.issue_cert("localhost", not_before=past - datetime.timedelta(days=2),
                                 not_after=past)
    else:
        cert = issuer.issue_cert("localhost")
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    cert.configure_cert(server)
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ca.configure_trust(client)
    return server, client


def shuttle(a: TlsRelay, b: TlsRelay) -> None:
    """Move what each side has to write to the other, once."""
    out = a.take_output()
    if out:
        b.feed(out)
    out = b.take_output()
    if out:
        a.feed(out)


def connected(ca, **kw):
    server_ctx, client_ctx = contexts(ca, **kw)
    server = TlsRelay(server_ctx, server_side=True)
    client = TlsRelay(client_ctx, server_side=False, server_hostname="localhost")
    for _ in range(10):
        done_c = client.handshake()
        shuttle_handshake(client, server)
        done_s = server.handshake()
        shuttle_handshake(server, client)
        if done_c and done_s:
            server.framed = client.framed = True
            return server, client
    raise AssertionError("handshake did not finish")


def shuttle_handshake(src: TlsRelay, dst: TlsRelay) -> None:
    out = src.take_output()
    if out:
        dst.incoming.write(out)


def test_payloads_cross_in_order_whatever_the_split(ca):
    server, client = connected(ca)
    payloads = [b"", b"x", b"y" * 70000, b"z" * 5]
    records = b"".join(client.encrypt(p) for p in payloads)
    got = []
    for i in range(0, len(records), 777):      # ciphertext cut anywhere
        server.feed(records[i:i + 777])
        while (p := server.next_payload()) is not None:
            got.append(p)
    assert got == payloads
    assert server.buffered() == 0


def test_next_payload_takes_each_whole_payload_then_none(ca):
    server, client = connected(ca)
    server.feed(client.encrypt(b"one") + client.encrypt(b"two"))
    assert server.next_payload() == b"one"
    assert server.next_payload() == b"two"
    assert server.next_payload() is None


def test_a_frame_over_the_limit_is_refused_before_it_is_whole(ca):
    server, client = connected(ca)
    server.max_message_size = 100
    server.feed(client.encrypt_raw(struct.pack(">I", 101)))
    with pytest.raises(TlsRelayError, match="exceeds the limit of 100"):
        server.next_payload()


def test_a_frame_at_the_limit_passes(ca):
    server, client = connected(ca)
    server.max_message_size = 100
    server.feed(client.encrypt(b"a" * 100))
    assert server.next_payload() == b"a" * 100


def test_whole_frames_stop_before_a_partial_frame(ca):
    server, client = connected(ca)
    server.feed(client.encrypt_raw(frame(b"a") + frame(b"bb") + frame(b"ccc")[:5]))
    assert server.whole_frames() == (len(frame(b"a") + frame(b"bb")), None)
    assert server.buffered() == len(frame(b"a") + frame(b"bb")) + 5


def test_buffer_grown_for_a_large_message_is_given_back(ca):
    server, client = connected(ca)
    server.feed(client.encrypt(b"L" * (1 << 20)))
    assert server.next_payload() == b"L" * (1 << 20)
    assert len(server._plain.buf) == 0          # an idle connection holds no MiB
    server.feed(client.encrypt(b"small"))
    assert server.next_payload() == b"small"


def test_many_messages_through_a_reused_buffer(ca):
    server, client = connected(ca)
    sent = [bytes([i % 256]) * (i * 37 % 5000) for i in range(2000)]
    got = []
    for i in range(0, len(sent), 7):            # several frames per feed, some split
        server.feed(b"".join(client.encrypt(p) for p in sent[i:i + 7]))
        while (payload := server.next_payload()) is not None:
            got.append(payload)
    assert got == sent and server.buffered() == 0


def test_close_notify_between_frames_is_a_clean_end(ca):
    server, client = connected(ca)
    server.feed(client.encrypt(b"last") + client.close_notify())
    assert server.closed
    assert server.next_payload() == b"last"


def test_end_inside_a_frame_is_an_error_not_a_short_message(ca):
    server, client = connected(ca)
    server.feed(client.encrypt_raw(frame(b"cut here")[:6]))
    with pytest.raises(TlsRelayError, match="inside a message"):
        server.feed(client.close_notify())


def test_ragged_eof_between_frames_ends_the_stream(ca):
    server, client = connected(ca)
    server.feed(client.encrypt(b"bye"))
    server.feed(b"")        # TCP end without close_notify
    assert server.closed and server.next_payload() == b"bye"


def test_goodbye_is_a_close_notify_the_peer_takes_as_a_clean_end(ca):
    server, client = connected(ca)
    client.feed(server.encrypt(b"last") + server.goodbye())
    assert client.closed and client.next_payload() == b"last"


def test_a_broken_session_says_no_goodbye(ca):
    server, client = connected(ca)
    server.max_message_size = 100
    server.feed(client.encrypt_raw(struct.pack(">I", 101)))
    with pytest.raises(TlsRelayError):
        server.next_payload()
    assert server.failed and server.goodbye() == b""


def test_tampered_record_is_a_tls_error(ca):
    server, client = connected(ca)
    records = bytearray(client.encrypt(b"secret"))
    records[-1] ^= 1
    with pytest.raises(TlsRelayError, match="TLS error"):
        server.feed(bytes(records))


def test_server_certificate_from_another_ca_is_refused(ca):
    server_ctx, client_ctx = contexts(ca, server_ca=trustme.CA())
    server = TlsRelay(server_ctx, server_side=True)
    client = TlsRelay(client_ctx, server_side=False, server_hostname="localhost")
    client.handshake()
    shuttle_handshake(client, server)
    server.handshake()
    shuttle_handshake(server, client)
    with pytest.raises(ssl.SSLCertVerificationError):
        client.handshake()


def test_expired_server_certificate_is_refused(ca):
    server_ctx, client_ctx = contexts(ca, expired=True)
    server = TlsRelay(server_ctx, server_side=True)
    client = TlsRelay(client_ctx, server_side=False, server_hostname="localhost")
    client.handshake()
    shuttle_handshake(client, server)
    server.handshake()
    shuttle_handshake(server, client)
    with pytest.raises(ssl.SSLCertVerificationError, match="expired"):
        client.handshake()


def test_plaintext_is_not_a_handshake(ca):
    server_ctx, _ = contexts(ca)
    server = TlsRelay(server_ctx, server_side=True)
    server.incoming.write(b"pong\n")
    with pytest.raises(ssl.SSLError):
        server.handshake()


def test_an_emptied_large_buffer_is_kept_for_the_next_read_not_by_the_connection(
        ca, monkeypatch):
    """A buffer grown past KEEP_BUFFER_BELOW leaves the connection once all of
    it is taken (an idle connection holds none), but is kept once for the
    process: the next read that needs room takes it instead of allocating,
    zeroing and faulting in a new one."""
    from pyipc.daemons import _tls_relay
    monkeypatch.setattr(_tls_relay, "_spares", [])
    server, client = connected(ca)
    server.feed(client.encrypt(b"L" * 300_000))
    assert server.next_payload() == b"L" * 300_000
    assert len(server._plain.buf) == 0
    (spare,) = _tls_relay._spares
    assert len(spare) > _tls_relay.KEEP_BUFFER_BELOW
    server.feed(client.encrypt(b"small"))
    assert server._plain.buf is spare and not _tls_relay._spares
    assert server.next_payload() == b"small"
    assert _tls_relay._spares == [spare] and len(server._plain.buf) == 0


def test_no_spare_is_kept_past_its_bound(ca, monkeypatch):
    from pyipc.daemons import _tls_relay
    monkeypatch.setattr(_tls_relay, "_spares", [])
    server, client = connected(ca)
    server.feed(client.encrypt(b"L" * (_tls_relay.SPARE_AT_MOST + 1)))
    assert server.next_payload() == b"L" * (_tls_relay.SPARE_AT_MOST + 1)
    assert len(server._plain.buf) == 0 and _tls_relay._spares == []
