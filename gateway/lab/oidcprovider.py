"""A real OpenID Connect provider in the lab's internet namespace (issue #9 test infrastructure).

The provider is the npm package ``oidc-provider`` (pinned with gateway/lab/oidc/package-lock.json)
run by our own gateway/lab/oidc/idp.mjs: issuer ``https://idp.test`` over HTTPS with a certificate
from the lab's test CA, one confidential client, PKCE (S256) required, test users with and
without a second factor, and a test-control endpoint (plain HTTP, reachable only inside the
namespace) that switches how later ID tokens are spoiled:

    none         tokens as the provider issues them
    tamper       one byte of the ID token signature flipped
    wrong-aud    aud is another client (re-signed with the provider's real key)
    wrong-iss    iss is another issuer (re-signed with the real key)
    expired      exp one hour in the past (re-signed with the real key)
    rotate-keys  signed with a new key whose kid appears in the JWKS only from now on (valid token)
    replay-nonce the nonce of the ID token issued before this one (a replayed earlier sign-in)

Install once (bootstrap, or the first test run): ``python -m gateway.lab.oidcprovider --install``.
Needs node >= 18 and npm on PATH.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import quote_plus

SOURCE_DIR = Path(__file__).resolve().parent / "oidc"
DEFAULT_CACHE_DIR = Path("/var/cache/kanmon-lab/oidc")
IDP_HOST = "idp.test"
ISSUER = f"https://{IDP_HOST}"
CONTROL_HOST, CONTROL_PORT = "127.0.0.1", 9999
MODES = ("none", "tamper", "wrong-aud", "wrong-iss", "expired", "rotate-keys", "replay-nonce")
ACR_PASSWORD = "urn:kanmon:pwd"
ACR_MFA = "urn:kanmon:mfa"
# oidc-provider 8.8.1 (the last 8.x) supports Node 18 LTS and later; 9.x wants Node 22 LTS and
# warns on the Node 20 installed here, so the lockfile pins 8.8.1.
MIN_NODE = (18, 0)


class OidcProviderError(Exception):
    pass


@dataclass(frozen=True)
class TestUser:
    __test__ = False                # not a pytest test class
    username: str
    password: str
    sub: str
    email: str
    name: str
    groups: tuple[str, ...]
    otp: str | None = None          # the one-time code asked after the password (MFA users only)

    @property
    def mfa(self) -> bool:
        return self.otp is not None

    def to_json(self) -> dict:
        out = {"sub": self.sub, "password": self.password, "email": self.email, "name": self.name,
               "groups": list(self.groups)}
        if self.otp:
            out["otp"] = self.otp
        return out


TEST_USERS: dict[str, TestUser] = {
    "alice": TestUser("alice", "alice-pass", "0b9f1c3e-a11c-4e00-9000-00000000a11c", "alice@city.kanmon.example.jp",
                      "Alice Sato", ("staff", "finance"), otp="246810"),
    "bob": TestUser("bob", "bob-pass", "0b9f1c3e-b0b0-4e00-9000-00000000b0b0", "bob@city.kanmon.example.jp",
                    "Bob Suzuki", ("staff",)),
    "carol": TestUser("carol", "carol-pass", "0b9f1c3e-ca01-4e00-9000-00000000ca01", "carol@city.kanmon.example.jp",
                      "Carol Tanaka", ("contractors",)),
}


@dataclass(frozen=True)
class OidcClient:
    client_id: str = "kanmon-gateway"
    # "+", "/", "=" as in base64-made secrets, and "%41": a relying party that does not
    # form-encode Basic credentials (RFC 6749 2.3.1) is refused by oidc-provider, which decodes them.
    client_secret: str = "kanmon-lab+client/secret=%41"
    redirect_uris: tuple[str, ...] = ("https://example.test/cb",)
    token_endpoint_auth_method: str = "client_secret_basic"   # or client_secret_post
    post_logout_redirect_uris: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.token_endpoint_auth_method not in ("client_secret_basic", "client_secret_post"):
            raise OidcProviderError(f"token_endpoint_auth_method {self.token_endpoint_auth_method!r}: "
                                    "expected client_secret_basic or client_secret_post")
        if not self.redirect_uris:
            raise OidcProviderError("an OIDC client needs at least one redirect URI")

    def to_json(self) -> dict:
        out = asdict(self)
        out["redirect_uris"] = list(self.redirect_uris)
        out["post_logout_redirect_uris"] = list(self.post_logout_redirect_uris)
        return out


# -- installation -----------------------------------------------------------------------------
def node_version(node: str = "node") -> tuple[int, int, int] | None:
    exe = shutil.which(node)
    if exe is None:
        return None
    out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=30).stdout.strip()
    try:
        major, minor, patch = (int(part) for part in out.lstrip("v").split(".")[:3])
    except ValueError:
        return None
    return major, minor, patch


def oidc_prerequisites() -> list[str]:
    """What is missing to run the lab IdP (empty when it can run)."""
    missing = []
    version = node_version()
    if version is None:
        missing.append("node (>= 18)")
    elif version[:2] < MIN_NODE:
        missing.append(f"node >= 18 (found {'.'.join(map(str, version))})")
    if shutil.which("npm") is None:
        missing.append("npm")
    return missing


def lock_key() -> str:
    """Cache key: the lockfile and package.json, and the node major version they were installed for."""
    digest = hashlib.sha256()
    for name in ("package.json", "package-lock.json"):
        digest.update((SOURCE_DIR / name).read_bytes())
    version = node_version() or (0, 0, 0)
    return f"{digest.hexdigest()[:16]}-node{version[0]}"


def ensure_installed(cache_dir: Path | None = None) -> Path:
    """The directory holding node_modules for the pinned lockfile; `npm ci` only the first time.

    Installs into a temporary sibling and renames it into place, so two test runs starting
    at once never see a half-installed tree."""
    missing = oidc_prerequisites()
    if missing:
        raise OidcProviderError("the lab OIDC provider needs " + ", ".join(missing)
                                + " (Node.js 18+ with npm: apt-get install nodejs npm)")
    cache_dir = Path(cache_dir or DEFAULT_CACHE_DIR)
    target = cache_dir / lock_key()
    if (target / "node_modules" / "oidc-provider" / "package.json").exists():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".install-", dir=cache_dir))
    try:
        for name in ("package.json", "package-lock.json"):
            shutil.copy(SOURCE_DIR / name, staging / name)
        proc = subprocess.run(["npm", "ci", "--omit=dev", "--ignore-scripts", "--no-audit", "--no-fund"],
                              cwd=staging, capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            raise OidcProviderError(f"npm ci for the lab OIDC provider failed ({proc.returncode}):\n"
                                    + (proc.stderr.strip() or proc.stdout.strip())[-3000:])
        try:
            staging.rename(target)
        except OSError:
            if not (target / "node_modules").exists():   # not "another run won the race"
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


# -- the running provider ---------------------------------------------------------------------
@dataclass
class OidcProvider:
    """The IdP in namespace ``ns`` (gateway.lab.topology.Netns) on ``address``:443."""

    ns: object
    workdir: Path
    address: str
    cert_path: Path
    key_path: Path
    ca_path: Path                                      # to verify the IdP from inside the namespace
    client: OidcClient = field(default_factory=OidcClient)
    users: dict[str, TestUser] = field(default_factory=lambda: dict(TEST_USERS))
    cache_dir: Path | None = None
    proc: subprocess.Popen | None = None

    issuer = ISSUER

    def __post_init__(self) -> None:
        self.workdir = Path(self.workdir)

    @property
    def log_path(self) -> Path:
        return self.workdir / "idp.log"

    @property
    def config_path(self) -> Path:
        return self.workdir / "idp-config.json"

    def config(self) -> dict:
        return {
            "issuer": ISSUER,
            "listen": {"host": self.address, "port": 443},
            "tls": {"cert": str(self.cert_path), "key": str(self.key_path)},
            "control": {"host": CONTROL_HOST, "port": CONTROL_PORT},
            "client": self.client.to_json(),
            "users": {name: user.to_json() for name, user in self.users.items()},
            "acr": {"password": ACR_PASSWORD, "mfa": ACR_MFA},
        }

    def start(self, timeout: float = 30) -> "OidcProvider":
        installed = ensure_installed(self.cache_dir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        # Node resolves imports next to the script: give this run its own copy of idp.mjs with
        # node_modules linked from the shared cache.
        shutil.copy(SOURCE_DIR / "idp.mjs", self.workdir / "idp.mjs")
        shutil.copy(SOURCE_DIR / "package.json", self.workdir / "package.json")
        link = self.workdir / "node_modules"
        if link.is_symlink() and link.readlink() != installed / "node_modules":
            link.unlink()                 # left by a run with another lockfile
        if not link.is_symlink():
            link.symlink_to(installed / "node_modules", target_is_directory=True)
        self.config_path.write_text(json.dumps(self.config(), indent=2))
        log = open(self.log_path, "w")
        self.proc = self.ns.popen("node", str(self.workdir / "idp.mjs"), str(self.config_path), stdout=log)
        deadline = time.monotonic() + timeout
        while "idp ready" not in self.log_path.read_text(errors="replace"):
            if self.proc.poll() is not None:
                raise OidcProviderError("the lab OIDC provider exited:\n" + self.log_path.read_text(errors="replace")[-3000:])
            if time.monotonic() > deadline:
                self.stop()
                raise OidcProviderError(f"the lab OIDC provider did not start within {timeout}s")
            time.sleep(0.05)
        discovery = self.discovery()
        if discovery.get("issuer") != ISSUER:
            raise OidcProviderError(f"unexpected discovery document: {discovery}")
        return self

    def stop(self, timeout: float = 5) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=5)
        except ProcessLookupError:
            pass

    # -- HTTP inside the namespace (curl, like the rest of the lab) -----------------------------
    def _curl(self, *args: str, timeout: float = 15) -> tuple[int, str]:
        proc = self.ns.run("curl", "-sS", "--max-time", str(timeout), "-w", "\n%{http_code}", *args,
                           check=False, timeout=timeout + 10)
        if proc.returncode != 0:
            raise OidcProviderError(f"curl {' '.join(args)}: {proc.stderr.strip()}")
        body, _, code = proc.stdout.rpartition("\n")
        return int(code), body

    def _idp(self, path: str, *args: str) -> tuple[int, str]:
        return self._curl("--resolve", f"{IDP_HOST}:443:{self.address}", "--cacert", str(self.ca_path), *args,
                          ISSUER + path)

    def _control(self, method: str, path: str, body: dict | None = None) -> dict:
        args = ["-X", method, f"http://{CONTROL_HOST}:{CONTROL_PORT}{path}"]
        if body is not None:
            args[:0] = ["-H", "Content-Type: application/json", "--data-binary", json.dumps(body)]
        code, text = self._curl(*args)
        doc = json.loads(text)
        if code != 200:
            raise OidcProviderError(f"IdP control {method} {path}: {code} {doc.get('error', text)}")
        return doc

    def discovery(self) -> dict:
        code, text = self._idp("/.well-known/openid-configuration")
        if code != 200:
            raise OidcProviderError(f"discovery answered {code}: {text[:500]}")
        return json.loads(text)

    def jwks(self) -> dict:
        code, text = self._idp("/jwks")
        if code != 200:
            raise OidcProviderError(f"jwks answered {code}: {text[:500]}")
        return json.loads(text)

    def set_mode(self, mode: str) -> None:
        if mode not in MODES:
            raise OidcProviderError(f"unknown token-mangling mode {mode!r} (one of {', '.join(MODES)})")
        self._control("PUT", "/mode", {"mode": mode})

    def mode(self) -> str:
        return self._control("GET", "/mode")["mode"]

    def token_log(self) -> list[dict]:
        """Token requests seen so far: t, client_id, grant_type, status, mode, and either
        id_token_kid + id_token_claims (as sent, after mangling) or error + error_description."""
        return self._control("GET", "/token-log")["requests"]

    def clear_token_log(self) -> None:
        self._control("DELETE", "/token-log")

    def keys(self) -> dict:
        """{primary_kid, rotated_kid, rotated_published}."""
        return self._control("GET", "/keys")

    def exchange_code(self, code: str, code_verifier: str, redirect_uri: str | None = None,
                      client: OidcClient | None = None) -> tuple[int, dict]:
        """POST the token endpoint from inside the namespace, as a relying party would."""
        client = client or self.client
        form = {"grant_type": "authorization_code", "code": code, "code_verifier": code_verifier,
                "redirect_uri": redirect_uri or client.redirect_uris[0]}
        args: list[str] = []
        if client.token_endpoint_auth_method == "client_secret_basic":
            args += ["-u", f"{quote_plus(client.client_id)}:{quote_plus(client.client_secret)}"]  # RFC 6749 2.3.1
        else:
            form |= {"client_id": client.client_id, "client_secret": client.client_secret}
        for key, value in form.items():
            args += ["--data-urlencode", f"{key}={value}"]
        status, text = self._idp("/token", *args)
        return status, json.loads(text)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Install the lab OIDC provider's pinned npm packages into the cache.")
    ap.add_argument("--install", action="store_true", required=True)
    ap.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR)
    args = ap.parse_args(argv)
    try:
        print(ensure_installed(args.cache_dir))
    except OidcProviderError as exc:
        print(exc, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
