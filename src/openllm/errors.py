"""The one base class of every error that users should see as a message, not a traceback."""


class OpenLLMError(Exception):
    """A problem with the user's input, data or files; the CLI prints it as one line."""


class TrainingInterrupted(OpenLLMError):
    """SIGTERM/SIGINT arrived during training; the state was saved and a rerun resumes from it."""
