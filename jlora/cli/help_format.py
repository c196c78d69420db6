"""How jlora's console scripts lay out `--help`: argparse's own help, with each option's default shown.

A required option, a flag (False) and an option whose default is None or empty say nothing: "(default: None)"
would only be noise. Used as `argparse.ArgumentParser(..., formatter_class=DefaultsHelpFormatter)`.
"""

from __future__ import annotations

import argparse


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """argparse.ArgumentDefaultsHelpFormatter without the defaults that say nothing (None, False, [])."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.required or action.default is None or action.default is False or action.default == []:
            return action.help
        return super()._get_help_string(action)
