"""Errors meant for the user. Modules raise them and print nothing; the CLI's one printer
(:func:`hpsweep.cli.main`) writes the message on one line of stderr, without a traceback
(``--debug`` shows it), and exits with 2."""

from __future__ import annotations

__all__ = ["UserError", "UsageError", "SweepFileMissing", "TrackingUnreachable",
           "StorageUnreachable", "ClusterError", "UnknownJob", "CredentialRefused", "Unusable"]


class UserError(Exception):
    """A problem with the user's input (a file, a flag, an address): message only, exit code 2."""

    exit_code = 2


class UsageError(UserError):
    """A flag or an argument that cannot be used as given."""


class SweepFileMissing(UserError):
    """The sweep file named on the command line does not exist."""


class TrackingUnreachable(UserError):
    """No MLflow server answers at the tracking URI."""


class StorageUnreachable(UserError):
    """The storage (an S3 bucket) cannot be reached or does not exist."""


class ClusterError(UserError):
    """The Ray Jobs API cannot be reached, refuses the credentials, or refuses a job."""


class UnknownJob(ClusterError):
    """The cluster has no job with this id."""


class CredentialRefused(UserError):
    """A credential would leave the machine with a job (a credentials file, a token in a URL)."""


class Unusable(UserError):
    """Checked before launch and found unusable: a tracking URI MLflow cannot use, storage that
    cannot be written, data that does not exist, a local store for a sweep on a cluster."""
