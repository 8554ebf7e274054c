"""Matryoshka Representation Learning: the library shared by the training and evaluation scripts."""


class UserError(Exception):
    """A problem with the user's input (flags, data, paths): the scripts print it as one line and exit."""
