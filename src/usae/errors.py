"""The one exception type the library raises for bad input.

Every message is a single line that names the file, field or argument at fault, so the CLI can
print it as ``usae: error: <message>`` without a traceback.
"""


class UsaeError(Exception):
    """Bad input or a broken artifact; the message is one line naming what is wrong."""
