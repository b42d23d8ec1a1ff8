"""Domain errors of the tuners package; the server maps them to HTTP codes in one place."""


def counted(n: int, noun: str) -> str:
    """``1 problem``, ``3 problems``: a count for a message."""
    return f"{n} {noun}" + ("" if n == 1 else "s")


class TunerError(ValueError):
    """A tuner config or method is invalid."""


class ArtifactError(ValueError):
    """An artifact is malformed. ``problems`` lists every problem found, not only the first."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__(f"invalid artifact ({counted(len(problems), 'problem')}): " + "; ".join(problems))

    def __reduce__(self) -> tuple:
        return (type(self), (self.problems,))  # pickles as itself (across Ray replicas), message intact


class IncompatibleBackboneError(ValueError):
    """An artifact was trained on other backbone weights than the ones loaded."""
