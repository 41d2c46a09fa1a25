"""The exception family.

Every error diffbake raises on purpose is a :class:`DiffbakeError`. Each subclass also inherits the closest
built-in, so callers that already catch ``ValueError`` or ``FileNotFoundError`` keep working. Messages say what
failed, what was expected, what was found and what to do.
"""

from __future__ import annotations


class DiffbakeError(Exception):
    """Base class of every error diffbake raises on purpose."""


class RecipeError(DiffbakeError, ValueError):
    """A recipe is malformed or asks for something this host or model cannot do."""


class SourceError(DiffbakeError, ValueError):
    """The recipe's source (Hub id, local folder or built-in tiny pipeline) cannot be used."""


class SourceNotFoundError(SourceError, FileNotFoundError):
    """The recipe's source does not exist."""


class BuildError(DiffbakeError, RuntimeError):
    """A build stage (export, compile, packaging) failed."""


class VerificationError(BuildError):
    """Compiled code disagrees with eager beyond the tolerance for its dtype."""


class RebindError(BuildError):
    """New weights do not fit an artifact's compiled code (another architecture, other transforms)."""


class ArtifactError(DiffbakeError, ValueError):
    """An artifact folder is malformed, incomplete, corrupted or from another format."""


class ArtifactNotFoundError(ArtifactError, FileNotFoundError):
    """An artifact folder or one of its files does not exist."""


class IntegrityError(ArtifactError):
    """A file of an artifact differs from what its manifest records."""


class SelfTestError(ArtifactError):
    """The compiled code, replaying the call recorded at build, returned something else on this host."""


class CompatibilityError(DiffbakeError, RuntimeError):
    """An artifact was built for another host (device, torch version, platform)."""


class InputMismatchError(DiffbakeError, ValueError):
    """A call does not fit the shapes, dtypes or devices an artifact was compiled for."""


class TrustError(DiffbakeError, PermissionError):
    """A remote artifact was asked for without the opt-in and the pinned commit that loading native code needs."""


class HubError(DiffbakeError, RuntimeError):
    """The Hub refused or failed a request (push, listing, download) for a reason other than a missing repo."""


class BenchError(DiffbakeError, RuntimeError):
    """A benchmark could not be made: a measurement process failed, or the artifact named cannot be used."""


class ServeError(DiffbakeError, ValueError):
    """An artifact the images API cannot serve (a pipeline that needs an input image, or takes no prompt), or
    serving options that do not fit together."""
