#!/usr/bin/env python3
"""Writes seeds/command/: command envelopes as the fleet sends them.

Signed ones use the key [7; 32] (fuzz_targets/command.rs trusts it), so the
fuzzer starts from envelopes that open. Run from agent/fuzz/seeds/ with
python3 and the `cryptography` package; the output is committed.
"""
import base64
import hashlib
import json
import os

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

KEY = Ed25519PrivateKey.from_private_bytes(bytes([7] * 32))
PUB = "ed25519:" + base64.b64encode(
    KEY.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
).decode()
OUT = "command"
EXPIRES = 1796240000000


def dumps(v):
    return json.dumps(v, separators=(",", ":")).encode()


def command(cmd, args=None, **extra):
    c = {"id": f"req-{cmd}", "cmd": cmd}
    if args is not None:
        c["args"] = args
    c.update(expires_ms=EXPIRES, nonce=f"nonce-{cmd}-0001")
    c.update(extra)
    return dumps(c)


def signed(body):
    return dumps(
        {
            "v": 1,
            "body": base64.b64encode(body).decode(),
            "key": PUB,
            "sig": base64.b64encode(KEY.sign(body)).decode(),
        }
    )


def unsigned(body):
    return dumps({"v": 1, "body": base64.b64encode(body).decode()})


def write(name, data):
    with open(os.path.join(OUT, name), "wb") as f:
        f.write(data)


def main():
    os.makedirs(OUT, exist_ok=True)
    toml = '[agent]\nnode_id = "edge-1"\n'
    with open("package_tar/pca.tar", "rb") as f:
        tar = f.read()
    bodies = {
        "approve": command("approve", {"action": 42}),
        "deny": command("deny", {"action": 7}),
        "pause": command("pause", {"reason": "maintenance"}),
        "resume": command("resume"),
        "status": command("status", {}),
        "run": command("run", {"target": "nginx", "do": "restart"}, node="edge-1"),
        "config-apply": command(
            "config.apply",
            {"toml": toml, "sha256": hashlib.sha256(toml.encode()).hexdigest()},
        ),
        "model-install": command(
            "model.install",
            {
                "package_b64": base64.b64encode(tar).decode(),
                "sha256": hashlib.sha256(tar).hexdigest(),
                "target": "host",
            },
        ),
        "model-promote": command("model.promote", {"target": "host"}),
        "model-rollback": command(
            "model.rollback", None, v=1, max_concurrency=2, group_size=10, slot_ms=500
        ),
    }
    for name, body in bodies.items():
        write(f"signed-{name}.json", signed(body))
    write("unsigned-status.json", unsigned(bodies["status"]))
    write("unsigned-pause.json", unsigned(bodies["pause"]))
    write("body-run.json", bodies["run"])
    bad = json.loads(signed(bodies["approve"]))
    bad["sig"] = base64.b64encode(bytes(64)).decode()
    write("bad-signature.json", dumps(bad))
    write("key-line.txt", PUB.encode())


if __name__ == "__main__":
    main()
