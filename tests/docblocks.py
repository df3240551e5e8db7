"""The ```python blocks of the README and docs, as written, for the tests that run them.

Example::

    >>> any("gradsparse.ddp.register" in b for b in python_blocks("README.md"))
    True
    >>> "MPICommunicator()" in block_with("docs/horovod.md", "MPICommunicator()")
    True
"""

import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def python_blocks(path: str) -> list[str]:
    """Every ```python block of ``path`` (relative to the repository root), in order."""
    with open(os.path.join(ROOT, path)) as f:
        return re.findall(r"```python\n(.*?)```", f.read(), flags=re.S)


def block_with(path: str, marker: str) -> str:
    """The first ```python block of ``path`` that contains ``marker``."""
    return next(b for b in python_blocks(path) if marker in b)
