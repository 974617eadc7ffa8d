"""Errors of the gateway process that the CLI reports (bilingual text, exit 1)."""

from gateway.i18n import Text


class StartupError(Exception):
    """The gateway refused to start (fail closed: nothing is forwarded); ``text`` says why, in
    Japanese and English (a plain message reads the same in both)."""

    def __init__(self, message: "str | Text") -> None:
        self.text = message if isinstance(message, Text) else Text(message, message)
        super().__init__(self.text.en)
