"""Stage logic per level. Importing this package registers every built-in level."""

from levels import level1  # noqa: F401
