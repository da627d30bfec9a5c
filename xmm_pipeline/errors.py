"""Errors shared by every floor of the package."""


class UserError(Exception):
    """A problem the user can fix (bad argument, missing file, unknown target).

    The command-line entry prints it as one line and exits with status 2.
    """


class ProductError(Exception):
    """A pipeline product that cannot be used: names the file and the problem.

    Ingestion catches it, records the detection in the quarantine table with the message as reason,
    and goes on with the other spectra.
    """

    def __init__(self, path: object, problem: str) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")
