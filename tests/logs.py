"""A logging handler that keeps what it is given, for tests that assert on log lines.

Example::

    >>> import logging
    >>> lines = LogLines(logging.WARNING)
    >>> log = logging.getLogger("gradsparse.example"); log.addHandler(lines)
    >>> log.warning("careful"); log.info("not kept")
    >>> lines.messages
    ['careful']
"""

import logging


class LogLines(logging.Handler):
    """Collects the message of every record at ``level`` or above (``lines`` and ``messages`` are the same list)."""

    def __init__(self, level: int = logging.INFO):
        super().__init__(level)
        self.lines: list[str] = []
        self.messages = self.lines

    def emit(self, record):
        self.lines.append(record.getMessage())
