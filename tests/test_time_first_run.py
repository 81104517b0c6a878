"""scripts/time_first_run.py against a stand-in repository whose `make demo` serves /readyz after a delay: it
clones HEAD, times both runs until /readyz answers, stops the server by its process group and writes the JSON."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from project_scripts import load_script

REPO = Path(__file__).resolve().parents[1]

SERVER = """\
import argparse, http.server, pathlib, time
parser = argparse.ArgumentParser()
parser.add_argument("--port", type=int)
args = parser.parse_args()
first = not pathlib.Path("served-once").exists()
pathlib.Path("served-once").write_text("")
time.sleep(1.5 if first else 0.2)  # the first run "installs and trains"

class Ready(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/readyz" else 404)
        self.end_headers()

    def log_message(self, *args):
        pass

http.server.HTTPServer(("127.0.0.1", args.port), Ready).serve_forever()
"""


def test_times_both_runs_and_stops_the_server(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "server.py").write_text(SERVER)
    (repo / "Makefile").write_text(f"demo:\n\t{sys.executable} server.py $(DEMO_ARGS)\n")
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "--quiet"], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "--quiet", "-m", "stand-in"], check=True)

    out = tmp_path / "times.json"
    status = load_script("time_first_run").main(["--repo", str(repo), "--workdir", str(tmp_path / "work"), "--out", str(out),
                                 "--data-root", str(tmp_path), "--timeout", "60"])  # fmt: skip
    assert status == 0, capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["first"]["outcome"] == report["rerun"]["outcome"] == "ready"
    assert report["first"]["seconds"] >= 1.5 > report["rerun"]["seconds"] >= 0.2
    assert report["mode"] == "shared" and report["mmrec_data_root"] == str(tmp_path)
    assert "load average" in report["uptime_before"] and "load average" in report["uptime_after"]
    with socket.socket() as s:  # the server was stopped: its port is free again
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", report["port"]))
    printed = capsys.readouterr().out
    assert f'"first": {report["first"]["seconds"]}' in printed and f"wrote {out}" in printed
