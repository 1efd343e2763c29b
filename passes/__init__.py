"""Built-in passes, importable as `rewrite.passes`. Importing this package registers them by name."""
from .cleanup import cleanup
from .fold_bn import fold_bn
from .fuse_branches import fuse_branches
from .remove_residual import remove_residual
from .remove_channels import remove_channels

__all__ = ["cleanup", "fold_bn", "fuse_branches", "remove_residual", "remove_channels"]
