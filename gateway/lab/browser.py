"""A scripted headless Chromium for end-to-end tests, run inside a device namespace.

    ip netns exec <device ns> python -m gateway.lab.browser --script steps.json --ca CA.pem

Drives Debian's /usr/bin/chromium with Playwright (pip playwright; its own browser downloads
are never used). The device reaches every web site through the gateway, which intercepts TLS
with its own CA, so the browser trusts that CA the way a phone enrolled by MDM would: the CA
goes into a fresh NSS database under a temporary HOME (certutil from Debian's libnss3-tools),
which is where Chromium on Linux reads user-installed roots. No certificate errors are ignored.

The script is a JSON list of steps, run in order until one fails (the rest are "skipped"):

    {"action": "goto", "url": "https://example.test/"}
    {"action": "fill", "selector": "#username", "value": "alice"}
    {"action": "click", "selector": "#login-submit"}
    {"action": "wait_for_url", "pattern": "https://example.test/cb?**"}   (Playwright glob)
    {"action": "wait_for_url", "regex": "/cb\\?code="}
    {"action": "text", "selector": "#error"}
    {"action": "screenshot", "path": "/tmp/x.png"}
    {"action": "url"}
    {"action": "cookies"}
    {"action": "viewport", "width": 390, "height": 844}    (a phone-sized window from here on)
    {"action": "overflow"}    ([scrollWidth, clientWidth] of the page: a horizontal overflow when the first is larger)
    {"action": "eval", "expression": "() => document.title"}   (its JSON result; DOM assertions, same-origin fetch)
    {"action": "select", "selector": "#reason", "value": "lost"}
    {"action": "signal", "path": "/tmp/ready"}      (creates the file: the test knows the page is there)
    {"action": "wait_file", "path": "/tmp/go"}     (waits until the test creates it, then goes on)

Any step may carry "timeout" (seconds). Output (stdout): one JSON document
``{"ok": bool, "steps": [{"action", "ok", "url", "value"?, "error"?}], "responses": [{"url",
"status", "location"}], "failures": [{"url", "error"}], "final_url": str}``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",                    # runs as root inside a namespace
    "--disable-gpu",
    "--disable-quic",                  # HTTP/3 would bypass the gateway's TCP interception path
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ACTIONS = ("goto", "fill", "click", "wait_for_url", "text", "screenshot", "url", "cookies", "viewport", "overflow",
           "eval", "select", "signal", "wait_file")


class BrowserScriptError(Exception):
    pass


def validate_steps(steps: object) -> list[dict]:
    """The script as a list of steps, or BrowserScriptError naming the first bad one."""
    if not isinstance(steps, list):
        raise BrowserScriptError("a browser script is a JSON list of steps")
    required = {"goto": ("url",), "fill": ("selector", "value"), "click": ("selector",), "text": ("selector",),
                "screenshot": ("path",), "wait_for_url": (), "url": (), "cookies": (), "viewport": (), "overflow": (),
                "eval": ("expression",), "select": ("selector", "value"), "signal": ("path",), "wait_file": ("path",)}
    for i, step in enumerate(steps):
        if not isinstance(step, dict) or step.get("action") not in ACTIONS:
            raise BrowserScriptError(f"step {i}: expected an object with action one of {', '.join(ACTIONS)}: {step!r}")
        for key in required[step["action"]]:
            if not isinstance(step.get(key), str):
                raise BrowserScriptError(f"step {i} ({step['action']}): {key} must be a string")
        if step["action"] == "viewport" and not all(isinstance(step.get(k), int) and 0 < step[k] <= 10000
                                                    for k in ("width", "height")):
            raise BrowserScriptError(f"step {i} (viewport): width and height must be whole numbers of pixels")
        if step["action"] == "wait_for_url" and not (isinstance(step.get("pattern"), str) or isinstance(step.get("regex"), str)):
            raise BrowserScriptError(f"step {i} (wait_for_url): needs pattern (glob) or regex")
    return steps


def trust_ca(home: Path, ca_path: Path | list[Path]) -> None:
    """Create ``home``/.pki/nssdb with the CA (or CAs) as trusted roots for TLS servers."""
    if shutil.which("certutil") is None:
        raise BrowserScriptError("certutil missing (apt-get install libnss3-tools)")
    db = home / ".pki" / "nssdb"
    db.mkdir(parents=True)
    subprocess.run(["certutil", "-N", "-d", f"sql:{db}", "--empty-password"], check=True, capture_output=True)
    for i, path in enumerate(ca_path if isinstance(ca_path, list) else [ca_path]):
        name = "kanmon-interception-ca" if i == 0 else f"kanmon-ca-{i}"
        subprocess.run(["certutil", "-A", "-d", f"sql:{db}", "-n", name, "-t", "C,,", "-i", str(path)],
                       check=True, capture_output=True)


def _run_step(page, context, step: dict, default_timeout: float):
    timeout_ms = float(step.get("timeout", default_timeout)) * 1000
    action = step["action"]
    if action == "goto":
        response = page.goto(step["url"], timeout=timeout_ms)
        return response.status if response is not None else None
    if action == "fill":
        page.fill(step["selector"], step["value"], timeout=timeout_ms)
        return None
    if action == "click":
        page.click(step["selector"], timeout=timeout_ms)
        return None
    if action == "wait_for_url":
        target = re.compile(step["regex"]) if "regex" in step else step["pattern"]
        page.wait_for_url(target, timeout=timeout_ms, wait_until="commit")
        return page.url
    if action == "text":
        return page.text_content(step["selector"], timeout=timeout_ms)
    if action == "screenshot":
        page.screenshot(path=step["path"], timeout=timeout_ms)
        return step["path"]
    if action == "url":
        return page.url
    if action == "viewport":
        page.set_viewport_size({"width": step["width"], "height": step["height"]})
        return None
    if action == "overflow":
        return page.evaluate("() => [document.documentElement.scrollWidth, document.documentElement.clientWidth]")
    if action == "eval":
        return page.evaluate(step["expression"])
    if action == "select":
        page.select_option(step["selector"], step["value"], timeout=timeout_ms)
        return None
    if action == "signal":
        Path(step["path"]).touch()
        return None
    if action == "wait_file":
        import time
        deadline = time.monotonic() + timeout_ms / 1000
        while not Path(step["path"]).exists():
            if time.monotonic() > deadline:
                from playwright.sync_api import TimeoutError as PlaywrightTimeout
                raise PlaywrightTimeout(f"{step['path']} did not appear")
            time.sleep(0.01)
        return None
    if action == "cookies":
        return [{k: c.get(k) for k in ("name", "value", "domain", "path", "secure", "httpOnly", "sameSite", "expires")}
                for c in context.cookies()]
    raise BrowserScriptError(f"unknown action {action}")


def run_script(steps: list[dict], ca_path: Path | None, timeout: float = 20) -> dict:
    from playwright.sync_api import Error as PlaywrightError
    from playwright.sync_api import sync_playwright

    home = Path(tempfile.mkdtemp(prefix="kanmon-browser-"))
    result: dict = {"ok": True, "steps": [], "responses": [], "failures": [], "final_url": None}
    try:
        if ca_path is not None:
            trust_ca(home, ca_path)
        env = dict(os.environ, HOME=str(home), XDG_CONFIG_HOME=str(home / ".config"),
                   XDG_CACHE_HOME=str(home / ".cache"))
        with sync_playwright() as pw:
            # launch_persistent_context: a fresh user-data-dir of our own (inside the temp HOME)
            context = pw.chromium.launch_persistent_context(
                str(home / "user-data"), executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS, env=env,
                ignore_https_errors=False, timeout=timeout * 1000)
            try:
                page = context.pages[0] if context.pages else context.new_page()
                page.on("response", lambda r: result["responses"].append(
                    {"url": r.url, "status": r.status, "location": r.headers.get("location")}))
                page.on("requestfailed", lambda r: result["failures"].append({"url": r.url, "error": r.failure}))
                for step in steps:
                    if not result["ok"]:
                        result["steps"].append({"action": step["action"], "ok": False, "skipped": True})
                        continue
                    record = {"action": step["action"], "ok": True}
                    try:
                        value = _run_step(page, context, step, timeout)
                        if value is not None:
                            record["value"] = value
                    except PlaywrightError as exc:
                        record["ok"] = False
                        record["error"] = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                        result["ok"] = False
                    record["url"] = page.url
                    result["steps"].append(record)
                result["final_url"] = page.url
            finally:
                context.close()
    finally:
        shutil.rmtree(home, ignore_errors=True)
    return result


def run_browser(device, steps: list[dict], timeout: float = 60, step_timeout: float = 20,
                trust_ca: bool = True) -> dict:
    """Run ``steps`` in a headless Chromium inside ``device``'s namespace (a
    gateway.lab.topology.Device), trusting the gateway's interception CA (unless
    ``trust_ca`` is False). Returns the script's JSON result (see the module docstring);
    raises BrowserScriptError for a malformed script, LabError when the browser crashed."""
    from gateway.lab.topology import LabError, _project_root, run

    validate_steps(steps)
    script = Path(tempfile.mkstemp(prefix="browser-steps-", suffix=".json", dir=device.lab.workdir)[1])
    script.write_text(json.dumps(steps))
    env = dict(os.environ, PYTHONPATH=_project_root())
    cmd = device.ns.cmd(sys.executable, "-m", "gateway.lab.browser", "--script", str(script),
                        "--step-timeout", str(step_timeout),
                        *(("--ca", str(device.lab.interception_ca)) if trust_ca else ()))
    try:
        proc = run(cmd, check=False, timeout=timeout, env=env)
    except subprocess.TimeoutExpired as exc:
        raise LabError(f"the scripted browser did not finish within {timeout}s") from exc
    finally:
        script.unlink(missing_ok=True)
    try:
        return json.loads(proc.stdout)
    except json.JSONDecodeError as exc:
        raise LabError(f"the scripted browser failed ({proc.returncode}): {proc.stderr.strip()[-3000:]}") from exc


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Run a JSON script of browser steps in headless Chromium.")
    ap.add_argument("--script", type=Path, required=True)
    ap.add_argument("--ca", type=Path, action="append",
                    help="a CA certificate to trust (the gateway's interception CA); may be repeated")
    ap.add_argument("--step-timeout", type=float, default=20)
    args = ap.parse_args(argv)
    try:
        steps = validate_steps(json.loads(args.script.read_text()))
    except (OSError, json.JSONDecodeError, BrowserScriptError) as exc:
        print(f"{args.script}: {exc}", file=sys.stderr)
        return 2
    result = run_script(steps, args.ca, args.step_timeout)
    json.dump(result, sys.stdout, ensure_ascii=False)
    print()
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
