"""Real mail servers for the lab's internet namespace: Postfix (SMTP 25, submission 465 with
implicit TLS and 587), Dovecot (IMAP 143/993, POP3 110/995) and clamd, all started with
configuration files written into the lab's work dir — never the system ones — and listening
only on the lab's mail address inside the namespace.

Postfix delivers to virtual Maildirs (``<dir>/vmail/<domain>/<user>/``) that Dovecot serves,
so a message submitted over SMTP can be read back over IMAP/POP3, and a test can put corpus
messages straight into a Maildir. Debian packages: postfix, dovecot-imapd, dovecot-pop3d,
clamav-daemon.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

MAIL_DOMAIN = "city.kanmon.example.jp"       # the organization of policies/mail.yaml
MAIL_HOST = "mail.city.kanmon.example.jp"
PRIVATE_MAIL_HOST = "mail.private-mail.test"  # a "private" mail server (not the organization's)
MAIL_USERS = {"taro": "taro-pass", "hanako": "hanako-pass"}
VMAIL_USER = "nobody"


def mail_prerequisites() -> list[str]:
    missing = []
    for tool, where in (("postfix", "/usr/sbin/postfix"), ("dovecot", "/usr/sbin/dovecot"), ("clamd", "/usr/sbin/clamd")):
        if shutil.which(tool) is None and not Path(where).exists():
            missing.append(tool)
    return missing


@dataclass
class MailServers:
    """Postfix + Dovecot + clamd in ``ns`` (a gateway.lab.topology.Netns) on ``addresses``."""

    ns: object
    workdir: Path
    addresses: tuple[str, ...]
    cert_path: Path
    key_path: Path
    clamd_signatures: dict[str, bytes] = field(default_factory=dict)   # name -> marker bytes
    procs: list[subprocess.Popen] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.workdir = Path(self.workdir)
        # Configuration files go to the work dir (the test's temp dir). What the daemons use
        # after dropping root (queues, Maildirs, sockets, logs) must be reachable by the
        # postfix/dovecot/nobody users; test temp dirs are 0700 and other pytest sessions
        # reset their root to 0700 at any time, so that lives in its own 0711 directory.
        self.runtime = Path(tempfile.mkdtemp(prefix="kanmon-lab-mail-", dir="/var/tmp"))
        self.runtime.chmod(0o711)
        self.postfix_config = self.workdir / "postfix"
        self.dovecot_config = self.workdir / "dovecot"
        self.postfix_dir = self.runtime / "postfix"
        self.dovecot_dir = self.runtime / "dovecot"
        self.clamd_dir = self.workdir / "clamd"
        self.vmail = self.runtime / "vmail"

    @property
    def clamd_socket(self) -> Path:
        return self.clamd_dir / "clamd.sock"

    def maildir(self, user: str) -> Path:
        return self.vmail / MAIL_DOMAIN / user

    # -- start ---------------------------------------------------------------------------
    def start(self) -> "MailServers":
        self.workdir.mkdir(parents=True, exist_ok=True)
        for path in (self.postfix_config, self.dovecot_config, self.postfix_dir, self.dovecot_dir):
            path.mkdir(parents=True, exist_ok=True)
        uid, gid = pwd.getpwnam(VMAIL_USER).pw_uid, pwd.getpwnam(VMAIL_USER).pw_gid
        for user in MAIL_USERS:
            for sub in ("new", "cur", "tmp"):
                (self.maildir(user) / sub).mkdir(parents=True, exist_ok=True)
        for path in [self.vmail, *self.vmail.rglob("*")]:
            os.chown(path, uid, gid)
        self._start_clamd()
        self._start_dovecot(uid, gid)
        self._start_postfix(uid, gid)
        for port in (25, 465, 587, 110, 143, 993, 995):
            self._wait_port(port)
        return self

    def _wait_port(self, port: int, timeout: float = 90) -> None:
        code = (f"import socket,sys\ns=socket.socket();s.settimeout(1)\n"
                f"sys.exit(0 if s.connect_ex(({self.addresses[0]!r},{port}))==0 else 1)")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.ns.python(code, check=False).returncode == 0:
                return
            time.sleep(0.2)
        raise RuntimeError(f"mail server port {port} on {self.addresses[0]} did not open:\n{self.logs()}")

    def _start_clamd(self) -> None:
        d = self.clamd_dir
        (d / "db").mkdir(parents=True, exist_ok=True)
        # Our own signatures (ClamAV .ndb: Name:TargetType:Offset:HexSignature), never EICAR.
        (d / "db" / "kanmon-lab.ndb").write_text(
            "".join(f"{name}:0:*:{marker.hex()}\n" for name, marker in self.clamd_signatures.items()) or
            "Kanmon.Lab.Placeholder:0:*:4b414e4d4f4e2d4c41422d504c414345484f4c444552\n")
        (d / "clamd.conf").write_text(
            f"LocalSocket {self.clamd_socket}\nDatabaseDirectory {d / 'db'}\nForeground yes\n"
            f"LogFile {d / 'clamd.log'}\nTemporaryDirectory {d}\nStreamMaxLength 60M\nUser root\n")
        log = open(d / "clamd.out", "w")
        proc = subprocess.Popen(["clamd", "-c", str(d / "clamd.conf")], stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        self.procs.append(proc)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError("clamd died: " + (d / "clamd.out").read_text(errors="replace"))
            if self.clamd_socket.exists():
                with socket.socket(socket.AF_UNIX) as s:
                    try:
                        s.connect(str(self.clamd_socket))
                        s.sendall(b"zPING\0")
                        if s.recv(16).startswith(b"PONG"):
                            return
                    except OSError:
                        pass
            time.sleep(0.2)
        raise RuntimeError("clamd did not answer PING")

    def _start_dovecot(self, uid: int, gid: int) -> None:
        d = self.dovecot_dir
        for sub in ("run", "state"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        c = self.dovecot_config
        # The password file is read by the auth process after it dropped root: runtime dir.
        (d / "users").write_text("".join(f"{u}@{MAIL_DOMAIN}:{{PLAIN}}{p}\n" for u, p in MAIL_USERS.items()))
        (c / "dovecot.conf").write_text(f"""
base_dir = {d / 'run'}
state_dir = {d / 'state'}
log_path = {d / 'dovecot.log'}
listen = {', '.join(self.addresses)}
protocols = imap pop3
ssl = yes
ssl_cert = <{self.cert_path}
ssl_key = <{self.key_path}
disable_plaintext_auth = no
auth_mechanisms = plain login
auth_username_format = %Lu
default_internal_user = dovecot
default_login_user = dovenull
first_valid_uid = 1
mail_location = maildir:{self.vmail}/%d/%n
mail_plugins = zlib
pop3_uidl_format = %08Xu%08Xv
passdb {{
  driver = passwd-file
  args = scheme=PLAIN {d / 'users'}
}}
userdb {{
  driver = static
  args = uid={uid} gid={gid} home={self.vmail}/%d/%n
}}
protocol imap {{
  mail_plugins = $mail_plugins imap_zlib
  mail_max_userip_connections = 100
}}
service imap-login {{
  inet_listener imap {{
    port = 143
  }}
  inet_listener imaps {{
    port = 993
    ssl = yes
  }}
}}
service pop3-login {{
  inet_listener pop3 {{
    port = 110
  }}
  inet_listener pop3s {{
    port = 995
    ssl = yes
  }}
}}
""")
        log = open(d / "dovecot.out", "w")
        proc = self.ns.popen("dovecot", "-F", "-c", str(c / "dovecot.conf"), stdout=log)
        self.procs.append(proc)
        time.sleep(0.3)
        if proc.poll() is not None:
            raise RuntimeError("dovecot died: " + (d / "dovecot.out").read_text(errors="replace"))

    def _start_postfix(self, uid: int, gid: int) -> None:
        d = self.postfix_dir
        for sub in ("spool", "data"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        postfix_user = pwd.getpwnam("postfix")
        os.chown(d / "data", postfix_user.pw_uid, postfix_user.pw_gid)
        c = self.postfix_config
        # Lookup tables are opened by daemons that dropped root: runtime dir.
        (d / "vmailbox").write_text("".join(f"{u}@{MAIL_DOMAIN} {MAIL_DOMAIN}/{u}/\n" for u in MAIL_USERS))
        (c / "main.cf").write_text(f"""
compatibility_level = 3.6
queue_directory = {d / 'spool'}
data_directory = {d / 'data'}
mail_owner = postfix
setgid_group = postdrop
maillog_file = {d / 'postfix.log'}
maillog_file_prefixes = {d}
myhostname = {MAIL_HOST}
mydomain = {MAIL_DOMAIN}
myorigin = $myhostname
mydestination = localhost
inet_interfaces = {', '.join(self.addresses)}
inet_protocols = ipv4
mynetworks = 127.0.0.0/8 198.51.100.0/24
alias_maps =
alias_database =
local_recipient_maps =
smtpd_peername_lookup = no
disable_dns_lookups = yes
smtp_dns_support_level = disabled
biff = no
virtual_mailbox_domains = {MAIL_DOMAIN}
virtual_mailbox_base = {self.vmail}
virtual_mailbox_maps = texthash:{d / 'vmailbox'}
virtual_uid_maps = static:{uid}
virtual_gid_maps = static:{gid}
virtual_minimum_uid = 1
smtpd_tls_cert_file = {self.cert_path}
smtpd_tls_key_file = {self.key_path}
smtpd_tls_security_level = may
smtpd_recipient_restrictions = permit_mynetworks, reject_unauth_destination
message_size_limit = 60000000
virtual_mailbox_limit = 0
# The lab has no internet: mail for any other domain waits in the queue (deferred, never
# attempted, so no name is looked up); tests read the queue and the log (issue #20).
defer_transports = smtp
""")
        services = [
            ("smtp", "inet", "n", "-", "smtpd", ""),
            ("465", "inet", "n", "-", "smtpd", " -o smtpd_tls_wrappermode=yes -o smtpd_tls_security_level=encrypt"),
            ("587", "inet", "n", "-", "smtpd", ""),
            ("cleanup", "unix", "n", "-", "cleanup", ""),
            ("qmgr", "unix", "n", "300", "qmgr", ""), ("tlsmgr", "unix", "-", "1000?", "tlsmgr", ""),
            ("rewrite", "unix", "-", "-", "trivial-rewrite", ""), ("bounce", "unix", "-", "-", "bounce", ""),
            ("defer", "unix", "-", "-", "bounce", ""), ("trace", "unix", "-", "-", "bounce", ""),
            ("verify", "unix", "-", "-", "verify", ""), ("flush", "unix", "n", "1000?", "flush", ""),
            ("proxymap", "unix", "-", "-", "proxymap", ""), ("smtp", "unix", "-", "-", "smtp", ""),
            ("relay", "unix", "-", "-", "smtp", ""), ("error", "unix", "-", "-", "error", ""),
            ("retry", "unix", "-", "-", "error", ""), ("discard", "unix", "-", "-", "discard", ""),
            ("local", "unix", "-", "-", "local", ""), ("virtual", "unix", "-", "-", "virtual", ""),
            ("lmtp", "unix", "-", "-", "lmtp", ""), ("anvil", "unix", "-", "-", "anvil", ""),
            ("scache", "unix", "-", "-", "scache", ""), ("postlog", "unix-dgram", "n", "-", "postlogd", ""),
            ("showq", "unix", "n", "-", "showq", ""),
        ]
        unpriv = {"local": "n", "virtual": "n", "pipe": "n"}
        lines = []
        for name, kind, private, wakeup, command, args in services:
            maxproc = "1" if command in ("qmgr", "tlsmgr", "anvil", "scache", "postlogd", "verify") else "-"
            if command in ("cleanup", "bounce", "flush"):
                maxproc = "0"
            lines.append(f"{name} {kind} {private} {unpriv.get(command, '-')} n {wakeup} {maxproc} {command}{args}")
        (c / "master.cf").write_text("\n".join(lines) + "\n")
        out = self.ns.run("postfix", "-c", str(c), "check", check=False)
        log = open(d / "postfix.out", "w")
        log.write(out.stdout + out.stderr)
        log.flush()
        proc = self.ns.popen("postfix", "-c", str(c), "start-fg", stdout=log)
        self.procs.append(proc)
        time.sleep(0.5)
        if proc.poll() is not None:
            raise RuntimeError("postfix died: " + (d / "postfix.out").read_text(errors="replace"))

    # -- helpers for tests ---------------------------------------------------------------
    def put_message(self, user: str, name: str, raw: bytes) -> Path:
        """Drop a message into a user's Maildir (as a delivery agent would)."""
        uid, gid = pwd.getpwnam(VMAIL_USER).pw_uid, pwd.getpwnam(VMAIL_USER).pw_gid
        path = self.maildir(user) / "new" / f"{int(time.time())}.{name}.lab"
        tmp = self.maildir(user) / "tmp" / path.name
        tmp.write_bytes(raw)
        os.chown(tmp, uid, gid)
        os.rename(tmp, path)
        return path

    def delivered(self, user: str) -> list[bytes]:
        """Messages Postfix delivered to the user's Maildir, oldest first."""
        files = [p for sub in ("new", "cur") for p in (self.maildir(user) / sub).glob("*") if ".lab" not in p.name]
        return [p.read_bytes() for p in sorted(files, key=lambda p: p.stat().st_mtime_ns)]

    def clear_mailbox(self, user: str) -> None:
        for sub in ("new", "cur"):
            for p in (self.maildir(user) / sub).glob("*"):
                p.unlink()

    def logs(self) -> str:
        out = []
        for path in (self.postfix_dir / "postfix.log", self.postfix_dir / "postfix.out",
                     self.dovecot_dir / "dovecot.log", self.dovecot_dir / "dovecot.out", self.clamd_dir / "clamd.out"):
            if path.exists():
                out.append(f"== {path.name}\n{path.read_text(errors='replace')[-3000:]}")
        return "\n".join(out)

    def stop(self) -> None:
        subprocess.run(["postfix", "-c", str(self.postfix_config), "stop"], capture_output=True, timeout=30)
        for proc in self.procs:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                    proc.wait(timeout=10)
                except (ProcessLookupError, subprocess.TimeoutExpired):
                    try:
                        os.killpg(proc.pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
        logs = self.workdir / "logs"
        logs.mkdir(exist_ok=True)
        for path in (self.postfix_dir / "postfix.log", self.dovecot_dir / "dovecot.log"):
            if path.exists():
                shutil.copy(path, logs / path.name)
        shutil.rmtree(self.runtime, ignore_errors=True)
