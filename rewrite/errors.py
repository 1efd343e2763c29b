"""The error hierarchy. Every error a user can see derives from RewriteError and names a place."""


class RewriteError(Exception):
    """Base of every error raised by rewrite. `where` names the module, node or file concerned."""

    def __init__(self, message: str, where: str | None = None):
        self.where = where
        super().__init__(f"{where}: {message}" if where else message)


class TraceError(RewriteError):
    """The model could not be captured as a graph (tracing failed)."""


class EquivalenceError(RewriteError):
    """A rewritten model's outputs differ from the original's beyond the tolerance."""


class ModelLoadError(RewriteError):
    """A model file or model reference could not be loaded, or is malformed."""


class RuleError(RewriteError):
    """A rule is malformed: a parameter that names no capture, or a result that is not a Value."""


class PassError(RewriteError):
    """A pass misbehaved: unknown name, fixpoint not reached, or an internal rule error."""
