"""A real clamd for tests and the lab, offline: started with a temporary config, a unix socket
in its own directory and a database of our own signatures only (ClamAV .ndb body signatures,
``Name:TargetType:Offset:HexSignature``; never EICAR, no download of the official databases).
Unix sockets are file-system objects, so a gateway in any network namespace reaches it."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

TEST_SIGNATURE = "Kanmon.Test.Signature"
# The bytes our test signature matches: a made-up marker, harmless anywhere.
TEST_MARKER = b"KANMON-TEST-SIGNATURE-7f3c9a1e-not-a-virus"


def clamd_binary() -> str | None:
    return shutil.which("clamd") or ("/usr/sbin/clamd" if Path("/usr/sbin/clamd").exists() else None)


@dataclass
class LabClamd:
    workdir: Path
    signatures: dict[str, bytes] = field(default_factory=lambda: {TEST_SIGNATURE: TEST_MARKER})
    stream_max: str = "60M"
    proc: subprocess.Popen | None = None

    @property
    def socket_path(self) -> Path:
        return self.workdir / "clamd.sock"

    def start(self, timeout: float = 90) -> "LabClamd":
        binary = clamd_binary()
        if binary is None:
            raise RuntimeError("clamd is not installed (apt-get install --no-install-recommends clamav-daemon)")
        d = self.workdir
        (d / "db").mkdir(parents=True, exist_ok=True)
        (d / "db" / "kanmon-test.ndb").write_text(
            "".join(f"{name}:0:*:{marker.hex()}\n" for name, marker in self.signatures.items()))
        (d / "clamd.conf").write_text(
            f"LocalSocket {self.socket_path}\nDatabaseDirectory {d / 'db'}\nForeground yes\n"
            f"LogFile {d / 'clamd.log'}\nTemporaryDirectory {d}\nStreamMaxLength {self.stream_max}\nUser root\n")
        self.proc = subprocess.Popen([binary, "-c", str(d / "clamd.conf")], stdout=open(d / "clamd.out", "w"),
                                     stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("clamd died: " + (d / "clamd.out").read_text(errors="replace"))
            if self.ping():
                return self
            time.sleep(0.2)
        self.stop()
        raise RuntimeError("clamd did not answer PING")

    def ping(self) -> bool:
        if not self.socket_path.exists():
            return False
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(2)
            try:
                s.connect(str(self.socket_path))
                s.sendall(b"zPING\0")
                return s.recv(16).startswith(b"PONG")
            except OSError:
                return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None
