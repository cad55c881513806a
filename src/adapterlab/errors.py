"""The one error type users see: the CLI prints its message on one line and exits non-zero."""


class AdapterlabError(ValueError):
    """Bad input (recipe, data, backbone, adapter files), with a message that names the problem."""
