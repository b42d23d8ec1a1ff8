"""Domain errors of the tuners package; the server maps them to HTTP codes in one place."""


class TunerError(ValueError):
    """A tuner config or method is invalid."""


class ArtifactError(ValueError):
    """An artifact is malformed. ``problems`` lists every problem found, not only the first."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        count = f"{len(problems)} problem" + ("" if len(problems) == 1 else "s")
        super().__init__(f"invalid artifact ({count}): " + "; ".join(problems))

    def __reduce__(self) -> tuple:
        return (type(self), (self.problems,))  # pickles as itself (across Ray replicas), message intact


class IncompatibleBackboneError(ValueError):
    """An artifact was trained on other backbone weights than the ones loaded."""
