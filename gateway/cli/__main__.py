"""`python -m gateway.cli [--registry-url URL] <kanmon arguments>`: the `kanmon` command;
`--registry-url` first gives the shared registry on the command line instead of
`registry.url` in the config (the lab's two-node tests start their nodes this way)."""

import os
import sys

from gateway.cli import main
from gateway.registry.factory import REGISTRY_URL_ENV


def launch(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--registry-url"]:
        os.environ[REGISTRY_URL_ENV] = argv[1]
        argv = argv[2:]
    return main(argv)


if __name__ == "__main__":
    sys.exit(launch())
