"""The commands of a real Flower 1.42 deployment, built in one place.

The scripts in simulations/deploy/, `fedrec certs create`'s hints and the end-to-end
test all use these, so the documented commands are the tested ones:

1. SuperLink (the server machine): HTTPS on one port for the Fleet API (SuperNodes),
   the Control API (`flwr` CLI) and its own ServerApp process, which connects back over
   TLS on 127.0.0.1 (hence that SAN). ``--enable-supernode-auth`` admits registered keys
   only::

     flower-superlink --ssl-ca-certfile ca.crt --ssl-certfile server.crt
         --ssl-keyfile server.key --enable-supernode-auth --host 0.0.0.0 --port 8000

2. The operator's `flwr` CLI: a connection in ``$FLWR_HOME/config.toml`` that trusts the
   CA, then one ``flwr supernode register node-<i>.pub <connection>`` per device.
3. Each device: ``flower-supernode --superlink HOST:8000 --root-certificates ca.crt
   --auth-supernode-private-key node-<i> --node-config "data-dir='/device/dir'"``
   (fedrec.data.device documents the directory); ``--port`` is the SuperNode's local
   runtime API, distinct for SuperNodes sharing a host.
4. ``flwr run . <connection> --run-config deploy.toml --stream`` with fed.min-nodes > 0.

Every process is stopped by pid together with its descendants (`stop_tree`).
"""

import os
import shlex
import signal
import sys
import time
from pathlib import Path

from fedrec.deployment.transport import (
    check_node_key,
    check_server_credentials,
    create_credentials,
)
from fedrec.errors import FedrecError
from fedrec.federation.simulate import _alive, descendants
from fedrec.files import write_text_atomic

SUPERLINK_PORT = 8000   # Flower's default for the SuperLink's single HTTPS port
CONNECTION = "fedrec"   # the connection name in $FLWR_HOME/config.toml


def flwr_bin(name: str) -> str:
    """A Flower executable from this interpreter's environment."""
    return str(Path(sys.executable).parent / name)


def deploy_env(flwr_home: Path, **extra: str) -> dict[str, str]:
    """Environment of a Flower process: its own FLWR_HOME, no `uv sync`, no telemetry."""
    env = dict(os.environ)
    bin_dir = str(Path(sys.executable).parent)
    env.update({"FLWR_HOME": str(flwr_home),
                "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
                "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
                "PATH": os.pathsep.join([bin_dir, env.get("PATH", "")]),
                "PYTHONUNBUFFERED": "1", **extra})
    return env


def superlink_args(creds_dir: Path, host: str = "0.0.0.0", port: int = SUPERLINK_PORT,
                   database: Path | None = None) -> list[str]:
    d = Path(creds_dir).absolute()
    args = [flwr_bin("flower-superlink"), "--ssl-ca-certfile", str(d / "ca.crt"),
            "--ssl-certfile", str(d / "server.crt"), "--ssl-keyfile", str(d / "server.key"),
            "--enable-supernode-auth", "--host", host, "--port", str(port)]
    return args + (["--database", str(database)] if database else [])


def node_config_arg(node_config: dict[str, str]) -> str:
    """`--node-config` text: key='value' pairs in Flower's TOML-value syntax."""
    parts = []
    for key, value in node_config.items():
        value = str(value)
        if "'" not in value:
            parts.append(f"{key}='{value}'")
        elif '"' not in value and "\\" not in value:
            parts.append(f'{key}="{value}"')
        else:
            raise FedrecError(f"node-config {key}: {value!r} holds both quote kinds; "
                              "rename the path or pass a node-config TOML file")
    return " ".join(parts)


def supernode_args(superlink: str, ca_cert: Path | None, key: Path | None, port: int,
                   node_config: dict[str, str], *, insecure: bool = False,
                   max_retries: int | None = None) -> list[str]:
    """A SuperNode trusting `ca_cert` (or plain HTTP with `insecure`), authenticated by
    `key`; `port` is its local runtime API (distinct per SuperNode on one host)."""
    args = [flwr_bin("flower-supernode"), "--superlink", superlink, "--port", str(port)]
    args += ["--insecure"] if insecure else ["--root-certificates", str(ca_cert)]
    if key is not None:
        args += ["--auth-supernode-private-key", str(key)]
    if node_config:
        args += ["--node-config", node_config_arg(node_config)]
    if max_retries is not None:
        args += ["--max-retries", str(max_retries)]
    return args


def connection_toml(address: str, ca_cert: Path, name: str = CONNECTION) -> str:
    """A `flwr` CLI connection to a TLS SuperLink (root-certificates must be absolute)."""
    return (f'[superlink.{name}]\naddress = "{address}"\n'
            f'root-certificates = "{Path(ca_cert).absolute()}"\n')


def write_connection(flwr_home: Path, address: str, ca_cert: Path,
                     name: str = CONNECTION) -> Path:
    """Add the connection to $FLWR_HOME/config.toml (created with it as the default)."""
    path = Path(flwr_home) / "config.toml"
    text = path.read_text() if path.is_file() else f'[superlink]\ndefault = "{name}"\n'
    if f"[superlink.{name}]" in text:
        raise FedrecError(f"{path}: already has a connection '{name}'; edit it there")
    return write_text_atomic(path, text.rstrip("\n") + "\n\n" + connection_toml(address, ca_cert, name))


def stop_tree(pids: list[int], grace: float = 10.0) -> list[int]:
    """TERM `pids` and their descendants, wait up to `grace` s, KILL what is left."""
    tree = [p for p in descendants(pids) if p != os.getpid()]
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 2.0)):
        live = [p for p in tree if _alive(p)]
        for pid in live:
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and any(_alive(p) for p in live):
            time.sleep(0.1)
    return tree


def create_deployment_credentials(out: str, hosts: str, nodes: int, days: int,
                                  force: bool) -> tuple[list[tuple[str, str]], str]:
    """`fedrec certs create`: write and verify the credentials; return (file, where it
    goes) rows and the next steps, as copy-pasteable commands."""
    names = [h.strip() for h in hosts.split(",") if h.strip()]
    if not names:
        raise FedrecError("--hosts: give at least one name or IP, e.g. --hosts 10.0.0.5")
    creds = create_credentials(Path(out), names, nodes, days=days, force=force)
    check_server_credentials(creds.ca_cert, creds.server_cert, creds.server_key, names)
    for key in creds.node_keys:
        check_node_key(key)
    files = [("ca.crt", "every SuperNode (--root-certificates) and the flwr CLI connection"),
             ("server.crt, server.key", "the SuperLink only (key: mode 0600)"),
             ("ca.key", "nowhere: keep offline, it signs server certificates")]
    files += [(f"supernodes/{key.name}, {pub.name}",
               f"device {i} (private key) / `flwr supernode register` (.pub)")
              for i, (key, pub) in enumerate(zip(creds.node_keys, creds.node_pubs))]

    def show(args):  # one copy-pasteable line; --node-config keeps its inner quotes
        return " ".join(f'"{a}"' if "'" in a and not set('"$`\\') & set(a) else shlex.quote(a)
                        for a in [Path(args[0]).name, *args[1:]])
    addr = f"{names[0]}:{SUPERLINK_PORT}"
    pub0 = shlex.quote(str(creds.node_pubs[0])) if nodes else "KEY.pub"
    steps = "\n".join([
        "next:\n1. on the SuperLink machine:\n   " + show(superlink_args(
            creds.ca_cert.parent, port=SUPERLINK_PORT, database=Path("state.db"))),
        (f"2. add to $FLWR_HOME/config.toml of the flwr CLI:\n"
         f"{connection_toml(addr, creds.ca_cert)}   then, per device:  "
         f"flwr supernode register {pub0} {CONNECTION}"),
        "3. on each device (its own key and data directory):\n   " + show(supernode_args(
            addr, Path("ca.crt"), Path("node-0" if not nodes else creds.node_keys[0].name), 9094,
            {"data-dir": "/path/to/device"})),
        f"4. flwr run . {CONNECTION} --run-config simulations/deploy/deploy.toml --stream"])
    return files, steps
