"""Credentials for the SuperLink's TLS and SuperNode auth: creation, checks, a real handshake."""

import datetime as dt
import ipaddress
import shutil
import socket
import ssl
import stat
import threading

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from fedrec.deployment import transport
from fedrec.deployment.transport import (
    Credentials,
    check_node_key,
    check_server_credentials,
    create_credentials,
)
from fedrec.errors import FedrecError

HOSTS = ["superlink.example.org", "10.0.0.5", "::1"]


@pytest.fixture(scope="module")
def creds(tmp_path_factory) -> Credentials:
    """One read-only credential set shared by the tests that do not modify it."""
    return create_credentials(tmp_path_factory.mktemp("a") / "certs", HOSTS, nodes=2)


@pytest.fixture(scope="module")
def other(tmp_path_factory) -> Credentials:
    """A second, independent set: another CA, other keys."""
    return create_credentials(tmp_path_factory.mktemp("b") / "certs", HOSTS, nodes=1)


def _cert(path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _check(c: Credentials, **kwargs) -> None:
    check_server_credentials(c.ca_cert, c.server_cert, c.server_key, **kwargs)


def test_creates_every_file_with_private_keys_0600(creds):
    out = creds.ca_cert.parent
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == [
        "ca.crt", "ca.key", "server.crt", "server.key",
        "supernodes/node-0", "supernodes/node-0.pub", "supernodes/node-1", "supernodes/node-1.pub",
    ]  # fmt: skip
    for key in [creds.ca_key, creds.server_key, *creds.node_keys]:
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, key
    assert creds.node_pubs == [k.with_name(k.name + ".pub") for k in creds.node_keys]
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temp dirs left


def test_server_cert_has_sans_for_given_hosts_and_loopback(creds):
    cert = _cert(creds.server_cert)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"superlink.example.org", "localhost"}
    assert set(san.get_values_for_type(x509.IPAddress)) == {
        ipaddress.ip_address(h) for h in ["10.0.0.5", "::1", "127.0.0.1"]
    }
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


def test_server_cert_chains_to_the_ca(creds):
    ca = _cert(creds.ca_cert)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert ca.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign
    _cert(creds.server_cert).verify_directly_issued_by(ca)  # raises if not
    _check(creds, hosts=HOSTS + ["localhost", "127.0.0.1"])


def test_node_keys_are_openssh_ec_keys_matching_their_pub(creds):
    for key_path, pub_path in zip(creds.node_keys, creds.node_pubs, strict=True):
        assert key_path.read_bytes().startswith(b"-----BEGIN OPENSSH PRIVATE KEY-----")
        key = serialization.load_ssh_private_key(key_path.read_bytes(), password=None)
        pub = serialization.load_ssh_public_key(pub_path.read_bytes())
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        assert isinstance(key.curve, ec.SECP384R1)
        assert key.public_key().public_numbers() == pub.public_numbers()
        check_node_key(key_path)


def test_node_key_with_someone_elses_pub_is_rejected(tmp_path, creds, other):
    key = tmp_path / "node-0"
    shutil.copy(creds.node_keys[0], key)
    shutil.copy(other.node_pubs[0], tmp_path / "node-0.pub")
    with pytest.raises(FedrecError, match="node-0.pub: does not match"):
        check_node_key(key)
    (tmp_path / "node-0.pub").unlink()
    with pytest.raises(FedrecError, match="node-0.pub: file not found"):
        check_node_key(key)


def test_refuses_to_overwrite_without_force(tmp_path):
    out = tmp_path / "certs"
    first = create_credentials(out, [], nodes=1)
    ca_before = first.ca_cert.read_bytes()
    with pytest.raises(FedrecError, match=rf"already exist in {out}.*--force"):
        create_credentials(out, [], nodes=1)
    assert first.ca_cert.read_bytes() == ca_before

    second = create_credentials(out, ["10.1.2.3"], nodes=3, force=True)
    assert second.ca_cert.read_bytes() != ca_before
    assert len(list((out / "supernodes").glob("node-*.pub"))) == 3  # old set fully replaced
    _check(second, hosts=["10.1.2.3"])
    assert [p.name for p in tmp_path.iterdir()] == ["certs"]  # no temp dirs left


def test_force_never_deletes_unrelated_files(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FedrecError, match="notes.txt"):
        create_credentials(tmp_path, [], nodes=0, force=True)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_interrupted_run_leaves_nothing_behind(tmp_path, monkeypatch):
    calls = []

    def failing_keypair(comment):
        calls.append(comment)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(comment)

    real = transport._node_keypair
    monkeypatch.setattr(transport, "_node_keypair", failing_keypair)
    with pytest.raises(KeyboardInterrupt):
        create_credentials(tmp_path / "certs", [], nodes=3)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("bad", ["superlink:8000", "https://superlink", "*.example.org", ""])
def test_rejects_hosts_that_are_not_names_or_ips(tmp_path, bad):
    with pytest.raises(FedrecError, match="neither an IP address nor a DNS name"):
        create_credentials(tmp_path / "certs", [bad], nodes=0)
    assert list(tmp_path.iterdir()) == []


def test_expired_or_not_yet_valid_cert_names_the_file(creds):
    expiry = _cert(creds.server_cert).not_valid_after_utc
    with pytest.raises(FedrecError, match=rf"server.crt: expired on {expiry:%Y-%m-%d}.*--force"):
        _check(creds, now=expiry + dt.timedelta(days=1))
    with pytest.raises(FedrecError, match="server.crt: not valid until"):
        _check(creds, now=dt.datetime.now(dt.UTC) - dt.timedelta(days=1))


def test_short_lived_cert_expires_after_its_days(tmp_path):
    c = create_credentials(tmp_path / "certs", [], nodes=0, days=1)
    _check(c, now=dt.datetime.now(dt.UTC) + dt.timedelta(hours=23))
    with pytest.raises(FedrecError, match="server.crt: expired"):
        _check(c, now=dt.datetime.now(dt.UTC) + dt.timedelta(days=2))


def test_missing_san_names_the_host(creds):
    for host in ["other.example.org", "10.0.0.6"]:
        expected = f"server.crt: no SubjectAlternativeName for host '{host}'"
        with pytest.raises(FedrecError, match=expected):
            _check(creds, hosts=["127.0.0.1", host])


def test_key_that_does_not_match_the_cert_is_rejected(creds, other):
    with pytest.raises(FedrecError, match="server.key: does not match the public key"):
        check_server_credentials(creds.ca_cert, creds.server_cert, other.server_key)


def test_cert_signed_by_another_ca_is_rejected(creds, other):
    with pytest.raises(FedrecError, match="server.crt: not signed by the CA"):
        check_server_credentials(other.ca_cert, creds.server_cert, creds.server_key)


@pytest.mark.parametrize("name", ["ca_cert", "server_cert", "server_key"])
def test_corrupt_or_missing_pem_names_the_file(tmp_path, creds, name):
    paths = {n: getattr(creds, n) for n in ["ca_cert", "server_cert", "server_key"]}
    paths[name] = tmp_path / f"corrupt-{name}.pem"
    paths[name].write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    with pytest.raises(FedrecError, match=f"corrupt-{name}.pem: not "):
        check_server_credentials(**paths)
    paths[name].unlink()
    with pytest.raises(FedrecError, match=f"corrupt-{name}.pem: file not found"):
        check_server_credentials(**paths)


def test_real_tls_handshake_on_loopback(creds, other):
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(creds.server_cert, creds.server_key)
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(5)
    port = listener.getsockname()[1]
    stop = threading.Event()

    def serve():
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:  # timeout, or the listener closed at the end of the test
                continue
            try:
                with server_ctx.wrap_socket(conn, server_side=True) as tls:
                    tls.sendall(b"ok")
            except (ssl.SSLError, OSError):
                pass  # the client refused our certificate
            finally:
                conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()

    def connect(cafile):
        ctx = ssl.create_default_context(cafile=cafile)
        ctx.verify_flags |= ssl.VERIFY_X509_STRICT  # Python >= 3.13 sets this by default
        with (
            socket.create_connection(("127.0.0.1", port), timeout=5) as sock,
            ctx.wrap_socket(sock, server_hostname="127.0.0.1") as tls,
        ):
            return tls.recv(2)

    try:
        assert connect(creds.ca_cert) == b"ok"
        with pytest.raises(ssl.SSLCertVerificationError):
            connect(other.ca_cert)
    finally:
        stop.set()
        listener.close()
        thread.join(timeout=10)
    assert not thread.is_alive()
