"""Built-in passes, importable as `rewrite.passes`. Importing this package registers them by name."""
from .cleanup import cleanup
from .fold_bn import fold_bn

__all__ = ["cleanup", "fold_bn"]
