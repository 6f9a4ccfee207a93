"""The one base class of every error that users should see as a message, not a traceback."""


class OpenLLMError(Exception):
    """A problem with the user's input, data or files; the CLI prints it as one line."""


class TrainingInterrupted(OpenLLMError):
    """SIGTERM/SIGINT arrived during training; the state was saved and a rerun resumes from it."""


def exit_status(run) -> int:
    """Call ``run()``; print a user error as one ``error: ...`` line and return the exit status."""
    import sys

    try:
        run()
        return 0
    except TrainingInterrupted as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 143
    except OpenLLMError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
