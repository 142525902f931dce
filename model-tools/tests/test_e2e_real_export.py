"""End to end with the real agent: record features with `outpost run`,
`outpost export` them, train iforest and autoencoder packages, and have the
agent load them with tract: `$OUTPOST_BIN model verify DIR` must exit 0.

OUTPOST_BIN names the binary (scripts/test sets it). The test fails, never
skips, when the binary or its `model verify` subcommand is missing. It takes
about 90 s; deselect it with `-m 'not e2e'`."""

import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from outpost_model import cli, package, train

REPO = Path(__file__).resolve().parents[2]
OUTPOST = Path(os.environ.get("OUTPOST_BIN", REPO / "target" / "debug" / "outpost"))
RUN_SECONDS = 75

CONFIG = """\
[agent]
node_id = "model-tools-e2e"
state_dir = "{state}"
sample_interval_ms = 200

[store]
flush_interval = "5s"

[features]
window = "5s"
step = "1s"
"""


@pytest.mark.e2e
def test_end_to_end_real_export(tmp_path, monkeypatch):
    assert OUTPOST.is_file(), f"outpost binary not found at {OUTPOST} (set OUTPOST_BIN)"
    probe = subprocess.run([str(OUTPOST), "model", "verify", "--help"],
                           capture_output=True, text=True)
    assert probe.returncode == 0, (
        f"{OUTPOST} has no `model verify` subcommand (exit {probe.returncode}: "
        f"{probe.stderr.strip()[:300]}); this test needs an agent that implements "
        "`outpost model verify DIR` from the model package spec")

    cfg = tmp_path / "outpost.toml"
    cfg.write_text(CONFIG.format(state=tmp_path / "state"))
    log = open(tmp_path / "run.log", "w")
    agent = subprocess.Popen([str(OUTPOST), "run", "--config", str(cfg)], stdout=log,
                             stderr=subprocess.STDOUT)
    try:
        time.sleep(RUN_SECONDS)
        assert agent.poll() is None, (tmp_path / "run.log").read_text()[-2000:]
    finally:
        agent.send_signal(signal.SIGINT)
        try:
            agent.wait(timeout=30)
        except subprocess.TimeoutExpired:
            agent.kill()
            agent.wait()
        log.close()

    export = tmp_path / "export.csv"
    r = subprocess.run([str(OUTPOST), "export", "--config", str(cfg), "--since", "1h",
                        "--out", str(export)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    header = export.read_text().splitlines()[0].split(",")
    assert header[0] == "ts_ms" and any(h.endswith(".mean_5s") for h in header[1:])

    for kind in ("iforest", "autoencoder"):
        out = tmp_path / f"e2e-{kind}"
        t = train.train(str(export), kind, str(out), false_alarm_rate=0.01)
        assert t.manifest["window"]["window_s"] == 5
        assert t.manifest["window"]["step_s"] == 1
        assert package.verify(str(out)) == []
        argv = [str(OUTPOST), "model", "verify", str(out)]
        v = subprocess.run(argv, capture_output=True, text=True)
        assert v.returncode == 0, (argv, v.returncode, v.stdout, v.stderr)
        # The same through outpost-model verify, which passes the code through.
        monkeypatch.setenv("OUTPOST_BIN", str(OUTPOST))
        assert cli.main(["verify", str(out)]) == 0

    # Install the iforest on the node in shadow, watch it score, promote it;
    # then three broken packages are each refused with exit 2 while the
    # promoted model keeps running.
    _install_promote_and_refuse(tmp_path, cfg)


def _outpost(*args):
    return subprocess.run([str(OUTPOST), *args], capture_output=True, text=True)


def _live_models(cfg):
    r = _outpost("status", "--json", "--config", str(cfg))
    assert r.returncode == 0, r.stderr
    live = json.loads(r.stdout).get("live") or {}
    return live.get("models") or []


def _wait_for(what, pred, timeout=30):
    deadline = time.time() + timeout
    while True:
        got = pred()
        if got:
            return got
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


def _install_promote_and_refuse(tmp_path, cfg):
    log = open(tmp_path / "run2.log", "w")
    agent = subprocess.Popen([str(OUTPOST), "run", "--config", str(cfg)], stdout=log,
                             stderr=subprocess.STDOUT)
    try:
        _wait_for("the agent's control socket",
                  lambda: _outpost("status", "--json", "--config", str(cfg)).returncode == 0
                  and json.loads(_outpost("status", "--json", "--config", str(cfg)).stdout)["running"])
        pkg = tmp_path / "e2e-iforest"
        r = _outpost("model", "install", "--config", str(cfg), str(pkg))
        assert r.returncode == 0, (r.stdout, r.stderr)
        assert "shadow" in r.stdout

        def shadow_scoring():
            return [m for m in _live_models(cfg) if m["role"] == "shadow" and m["steps"] >= 3]
        shadow = _wait_for("the shadow model to score", shadow_scoring)
        label = shadow[0]["label"]

        r = _outpost("model", "promote", "--config", str(cfg))
        assert r.returncode == 0, (r.stdout, r.stderr)
        # The live status is refreshed by the agent's loop: wait for it to
        # show the promoted model as the active one.
        active = _wait_for("the promoted model to be active",
                           lambda: [m for m in _live_models(cfg) if m["role"] == "active"])
        assert [m["label"] for m in active] == [label]

        broken = {}
        truncated = tmp_path / "broken-truncated"
        shutil.copytree(pkg, truncated)
        onnx = (truncated / "model.onnx").read_bytes()
        (truncated / "model.onnx").write_bytes(onnx[: len(onnx) // 2])
        broken["truncated onnx"] = truncated

        digest = tmp_path / "broken-digest"
        shutil.copytree(pkg, digest)
        manifest = (digest / "model.toml").read_text()
        sha = re.search(r'sha256 = "([0-9a-f]{64})"', manifest).group(1)
        wrong = ("0" if sha[0] != "0" else "1") + sha[1:]
        (digest / "model.toml").write_text(manifest.replace(sha, wrong))
        broken["wrong digest"] = digest

        unknown = tmp_path / "broken-feature"
        shutil.copytree(pkg, unknown)
        manifest = (unknown / "model.toml").read_text()
        first = re.search(r'name = "([^"]+\.mean_5s)"', manifest).group(1)
        (unknown / "model.toml").write_text(
            manifest.replace(f'name = "{first}"', 'name = "host.not_a_signal.mean_5s"'))
        broken["unknown feature"] = unknown

        registry_before = _outpost("model", "list", "--json", "--config", str(cfg)).stdout
        for what, path in broken.items():
            r = _outpost("model", "install", "--config", str(cfg), str(path))
            assert r.returncode == 2, (what, r.returncode, r.stdout, r.stderr)
            assert r.stderr.strip(), f"{what}: refused without a message"
        after = json.loads(_outpost("model", "list", "--json", "--config", str(cfg)).stdout)
        assert after["registry"] == json.loads(registry_before)["registry"]
        steps_before = [m for m in _live_models(cfg) if m["role"] == "active"][0]["steps"]
        _wait_for("the promoted model to keep scoring",
                  lambda: [m for m in _live_models(cfg)
                           if m["role"] == "active" and m["label"] == label
                           and m["steps"] > steps_before])
    finally:
        agent.send_signal(signal.SIGINT)
        try:
            agent.wait(timeout=30)
        except subprocess.TimeoutExpired:
            agent.kill()
            agent.wait()
        log.close()
