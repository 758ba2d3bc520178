"""Policies: one thin callback per file, each wrapping a pure rule from :mod:`lightning_select.rules`.

See CONTRIBUTING.md for the pattern every policy follows.
"""

from lightning_select.policies.guided_negatives import GuidedNegatives

__all__ = ["GuidedNegatives"]
