"""The one exception type a user sees as a one-line message and a non-zero exit.

Raise `PipelineError` (or a subclass) for bad input: a bad param, a missing or corrupt file, a
dataset without the split a stage needs. Its message names the bad value and what is allowed.
Stages catch it in `pipeline.cli.run_stage`; anything else is a bug and keeps its traceback.
"""


class PipelineError(Exception):
    """Bad input that the user can fix; `str()` is one line."""
