"""TLS and SuperNode-auth credentials for a Flower 1.42 deployment.

The SuperLink serves HTTPS on one port and, with ``--enable-supernode-auth``, admits only
SuperNodes whose OpenSSH EC public key was registered (``flwr supernode register``).
``create_credentials`` writes everything such a deployment needs::

    out_dir/ca.crt ca.key                     # CA the SuperNodes trust (--root-certificates)
    out_dir/server.crt server.key             # SuperLink --ssl-certfile / --ssl-keyfile
    out_dir/supernodes/node-<i> node-<i>.pub  # --auth-supernode-private-key / register KEY.pub

The checks catch the usual deployment mistakes (expired certificate, missing SAN, swapped
keys, wrong CA) before Flower reports them as a failed handshake. Credentials are secrets:
never write them inside the repository.

Size: writing the credentials and checking them (expiry, SANs, key/certificate match,
OpenSSH node keys) share this module's parsing helpers, so they stay together.
"""

import datetime as dt
import ipaddress
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedrec.errors import FedrecError

# The SuperLink's own processes connect back to it over TLS on loopback.
ALWAYS_HOSTS = ("127.0.0.1", "localhost")
# Backdate validity so a SuperNode whose clock runs a little slow still accepts the cert.
CLOCK_SKEW = dt.timedelta(minutes=5)
CURVE = ec.SECP384R1()  # a NIST curve: `flwr supernode register` rejects others
_OURS = {"ca.crt", "ca.key", "server.crt", "server.key", "supernodes"}
_LABEL = r"(?!-)[a-z0-9-]{1,63}(?<!-)"
_DNS_NAME = re.compile(rf"^{_LABEL}(\.{_LABEL})*$")
_NO_PASSWORD = serialization.NoEncryption()  # keys are protected by file mode 0600
_PEM_KEY = partial(serialization.load_pem_private_key, password=None)
_SSH_KEY = partial(serialization.load_ssh_private_key, password=None)
_RECREATE = "re-run `fedrec certs create --force`"

Host = ipaddress.IPv4Address | ipaddress.IPv6Address | str  # str: a lower-case DNS name


@dataclass(frozen=True)
class Credentials:
    """Paths of one credential set, laid out as ``create_credentials`` writes it."""

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    node_keys: list[Path]
    node_pubs: list[Path]

    @classmethod
    def in_dir(cls, out_dir: Path, nodes: int) -> "Credentials":
        d = Path(out_dir)
        keys = [d / "supernodes" / f"node-{i}" for i in range(nodes)]
        pubs = [k.with_name(k.name + ".pub") for k in keys]
        return cls(d / "ca.crt", d / "ca.key", d / "server.crt", d / "server.key", keys, pubs)


def parse_host(host: str) -> Host:
    """An IP address or a DNS name; anything else (a port, a URL, a wildcard) is an error."""
    text = host.strip().removeprefix("[").removesuffix("]")
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        name = text.lower().rstrip(".")
    if not _DNS_NAME.match(name):
        raise FedrecError(
            f"host {host!r} is neither an IP address nor a DNS name; give bare names or IPs "
            "without scheme or port, e.g. --hosts superlink.example.org,10.0.0.5"
        )
    return name


def create_credentials(
    out_dir: Path, hosts: list[str], nodes: int, *, days: int = 365, force: bool = False
) -> Credentials:
    """Write a CA, a SuperLink certificate for ``hosts`` and ``nodes`` SuperNode key pairs.

    The server certificate always also covers 127.0.0.1 and localhost. Everything is written
    to a temporary directory beside ``out_dir`` and renamed into place, so an interrupted run
    leaves no half-written set. Existing credentials are replaced only with ``force``.
    """
    out_dir = Path(out_dir).absolute()
    if nodes < 0:
        raise FedrecError(f"--nodes must be >= 0, got {nodes}")
    if days < 1:
        raise FedrecError(f"--days must be >= 1, got {days}")
    sans = list(dict.fromkeys(parse_host(h) for h in [*hosts, *ALWAYS_HOSTS]))
    _check_replaceable(out_dir, force)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    old = tmp.with_name(tmp.name + "-old")
    try:
        _write_all(Credentials.in_dir(tmp, nodes), sans, days)
        if out_dir.exists():
            out_dir.rename(old)
        tmp.rename(out_dir)
    except BaseException:
        if old.exists() and not out_dir.exists():
            old.rename(out_dir)  # interrupted between the two renames: keep the old set
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return Credentials.in_dir(out_dir, nodes)


def check_server_credentials(
    ca_cert: Path,
    server_cert: Path,
    server_key: Path,
    hosts: tuple[str, ...] | list[str] = ("127.0.0.1",),
    now: dt.datetime | None = None,
) -> None:
    """Raise FedrecError unless the SuperLink's TLS files are usable for ``hosts`` at ``now``.

    Checks that the files parse, both certificates are within their validity period, the
    server certificate has a SAN for every host, the key matches it, and the CA signed it.
    """
    now = now or dt.datetime.now(dt.UTC)
    now = now if now.tzinfo else now.replace(tzinfo=dt.UTC)  # naive means UTC
    ca = _load(Path(ca_cert), x509.load_pem_x509_certificate, "a PEM certificate")
    cert = _load(Path(server_cert), x509.load_pem_x509_certificate, "a PEM certificate")
    key = _load(Path(server_key), _PEM_KEY, "an unencrypted PEM private key")
    _check_validity(cert, server_cert, now)
    _check_validity(ca, ca_cert, now)

    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        have = {n.lower() for n in san.get_values_for_type(x509.DNSName)}
        have |= set(san.get_values_for_type(x509.IPAddress))
    except x509.ExtensionNotFound:
        have = set()
    for host in hosts:
        if parse_host(host) not in have:
            listed = ", ".join(sorted(map(str, have))) or "none"
            raise FedrecError(
                f"{server_cert}: no SubjectAlternativeName for host '{host}' (has: {listed}); "
                f"re-run `fedrec certs create --force` with '{host}' in --hosts"
            )

    if _spki(key.public_key()) != _spki(cert.public_key()):
        raise FedrecError(
            f"{server_key}: does not match the public key in {server_cert}; "
            f"use the key created with that certificate or {_RECREATE}"
        )
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        raise FedrecError(
            f"{server_cert}: not signed by the CA in {ca_cert}; "
            f"use the CA from the same `fedrec certs create` run or {_RECREATE}"
        ) from None


def check_node_key(path: Path) -> None:
    """Raise FedrecError unless ``path`` is an OpenSSH EC private key matching ``path``.pub."""
    path = Path(path)
    pub_path = path.with_name(path.name + ".pub")
    key = _load(path, _SSH_KEY, "an OpenSSH EC private key")
    pub = _load(pub_path, serialization.load_ssh_public_key, "an OpenSSH EC public key")
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise FedrecError(f"{path}: not an EC key (Flower node auth needs one); {_RECREATE}")
    if _spki(key.public_key()) != _spki(pub):
        raise FedrecError(
            f"{pub_path}: does not match the private key {path}; "
            "keep each node-<i> with its own node-<i>.pub"
        )


# --- writing --------------------------------------------------------------------------


def _check_replaceable(out_dir: Path, force: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise FedrecError(f"{out_dir} exists and is not a directory; choose another --out")
    entries = {p.name for p in out_dir.iterdir()} if out_dir.exists() else set()
    if entries and not force:
        raise FedrecError(f"credentials already exist in {out_dir}; pass --force to replace them")
    if entries - _OURS:  # --force replaces the whole directory: never delete unrelated files
        raise FedrecError(
            f"{out_dir} holds files that are not fedrec credentials "
            f"({', '.join(sorted(entries - _OURS))}); choose an empty or new --out directory"
        )


def _write_all(creds: Credentials, sans: list[Host], days: int) -> None:
    start = dt.datetime.now(dt.UTC) - CLOCK_SKEW
    end = start + CLOCK_SKEW + dt.timedelta(days=days)
    ca_key, server_key = ec.generate_private_key(CURVE), ec.generate_private_key(CURVE)
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedrec CA")])
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())

    def builder(subject: x509.Name, key: ec.EllipticCurvePrivateKey, is_ca: bool):
        # Both certificates: issued by the CA, same validity, SKI (strict X.509 wants it).
        cert = x509.CertificateBuilder(
            issuer_name=ca_name,
            subject_name=subject,
            public_key=key.public_key(),
            serial_number=x509.random_serial_number(),
            not_valid_before=start,
            not_valid_after=end,
        )
        constraints = x509.BasicConstraints(ca=is_ca, path_length=0 if is_ca else None)
        ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        return (
            cert.add_extension(constraints, critical=True)
            .add_extension(_key_usage(is_ca), critical=True)
            .add_extension(ski, critical=False)
        )

    ca = builder(ca_name, ca_key, is_ca=True).sign(ca_key, hashes.SHA384())
    names = [x509.DNSName(h) if isinstance(h, str) else x509.IPAddress(h) for h in sans]
    server_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, str(sans[0]))])
    server = (
        builder(server_name, server_key, is_ca=False)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False
        )
        .sign(ca_key, hashes.SHA384())
    )

    pem, pkcs8 = serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8
    _write(creds.ca_cert, ca.public_bytes(pem), 0o644)
    _write(creds.ca_key, ca_key.private_bytes(pem, pkcs8, _NO_PASSWORD), 0o600)
    _write(creds.server_cert, server.public_bytes(pem), 0o644)
    _write(creds.server_key, server_key.private_bytes(pem, pkcs8, _NO_PASSWORD), 0o600)
    if creds.node_keys:
        creds.node_keys[0].parent.mkdir(mode=0o700)
    for i, (key_path, pub_path) in enumerate(zip(creds.node_keys, creds.node_pubs, strict=True)):
        private, public = _node_keypair(comment=f"fedrec-node-{i}")
        _write(key_path, private, 0o600)
        _write(pub_path, public, 0o644)


def _key_usage(is_ca: bool) -> x509.KeyUsage:
    no = False
    return x509.KeyUsage(
        digital_signature=True, key_cert_sign=is_ca, crl_sign=is_ca, content_commitment=no,
        key_encipherment=no, data_encipherment=no, key_agreement=no, encipher_only=no,
        decipher_only=no,
    )  # fmt: skip


def _node_keypair(comment: str) -> tuple[bytes, bytes]:
    key = ec.generate_private_key(CURVE)
    pem, openssh = serialization.Encoding.PEM, serialization.Encoding.OpenSSH
    private = key.private_bytes(pem, serialization.PrivateFormat.OpenSSH, _NO_PASSWORD)
    public = key.public_key().public_bytes(openssh, serialization.PublicFormat.OpenSSH)
    return private, public + f" {comment}\n".encode()


def _write(path: Path, data: bytes, mode: int) -> None:
    # Create with the final mode so a private key is never readable by others, even briefly.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, mode)  # os.open's mode was filtered by the umask


# --- checking -------------------------------------------------------------------------


def _load(path: Path, loader, what: str):
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise FedrecError(f"{path}: file not found; create it with `fedrec certs create`") from None
    except OSError as err:
        raise FedrecError(f"{path}: cannot read it ({err.strerror})") from None
    try:
        return loader(data)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise FedrecError(f"{path}: not {what}; {_RECREATE}") from None


def _check_validity(cert: x509.Certificate, path: Path, now: dt.datetime) -> None:
    if now < cert.not_valid_before_utc:
        raise FedrecError(
            f"{path}: not valid until {cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC; "
            "check this machine's clock"
        )
    if now > cert.not_valid_after_utc:
        raise FedrecError(
            f"{path}: expired on {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC; {_RECREATE}"
        )


def _spki(public_key) -> bytes:
    return public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
