"""The project's one user-error type, and the line between the user's mistakes and ours.

A `UserError` says what the user gave or set up that cannot work (a config value, a file,
a path, a request's field, a credential, a cluster address) and how to fix it, in its
message. The command line prints that message and exits 2; Serve answers with a 4xx in
OpenAI's error shape. Every other exception is a bug of ours: the command line shows its
traceback (exit 1), Serve answers 500 and logs it. Each room's errors derive from it
(`ConfigError`, `InputError`, `S3Error`, `ConversionError`, `StackError`, ...).
"""


class UserError(Exception):
    """Something the user can fix, named in the message."""


class InputError(UserError):
    """A call's arguments that cannot work: a prompt, an image, a sampling setting."""
