"""Placeholder, replaced below."""

from hydra.experimental.callback import Callback


class MultirunReport(Callback):
    pass
