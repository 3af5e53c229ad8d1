"""What every ``grand`` command shares: user errors become one line on stderr and exit code 2.

Kept apart from ``cli.py`` so that plugin command groups (``grand glamm``) use the same rule
without importing the main CLI, which mounts them.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import wraps
from typing import Any

import typer


def user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions a user causes (bad path, bad config, unknown name, bad input file)."""
    from grand_pipeline.config import ConfigError
    from grand_pipeline.engine.driver import NothingToRun
    from grand_pipeline.models.weights import ModelSourceError
    from grand_pipeline.registry import UnknownNameError
    from grand_pipeline.sources.base import SourceError
    from grand_pipeline.store import StoreError

    return (ConfigError, NothingToRun, ModelSourceError, UnknownNameError, SourceError, StoreError)


#: OS errors that name a path the user chose; other OSErrors (a full disk, a lost connection)
#: keep their traceback.
_PATH_ERRORS = (PermissionError, NotADirectoryError, IsADirectoryError, FileExistsError)


def friendly(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn user-caused errors into one line on stderr and exit code 2; bugs keep their traceback."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except user_errors() as exc:
            typer.echo(f"grand: error: {exc}", err=True)
            raise typer.Exit(2) from None
        except _PATH_ERRORS as exc:
            # A path the user gave that cannot be used (a file where a folder must be, no
            # permission, /proc): the path and the reason are the whole story.
            where = f"{exc.filename}: " if exc.filename else ""
            typer.echo(f"grand: error: {where}{exc.strerror or exc}", err=True)
            raise typer.Exit(2) from None

    return wrapper
