"""The one table of training phases: `config.phase` names one of its entries.

A leaf module (it imports nothing of the package) so that the config can check a phase name
and the phases can register themselves without an import circle. `bidirlm.runtime.training`
registers the built-in phases (`training.phases`) when it is imported, which happens before any
config is parsed; a new phase is one module with a `Phase` class and a `register_phase` call.
"""

from __future__ import annotations

from typing import Any

PHASES: dict[str, Any] = {}  # name -> Phase class (`training.phases.base.Phase`), in order


def register_phase(phase: Any) -> Any:
    """Add a phase class (it has a `name`) to the table; returns it (usable as a decorator).

    Registering a name again replaces the entry (a test or a plugin may override a phase).
    """
    name = getattr(phase, "name", None)
    if not isinstance(name, str) or not name:
        raise ValueError(f"register_phase: {phase!r} has no `name` (a non-empty string)")
    PHASES[name] = phase
    return phase


def phase_names() -> tuple[str, ...]:
    return tuple(PHASES)


def get_phase(name: str) -> Any:
    """The phase class named `name`; a ValueError listing the registered names otherwise."""
    if name not in PHASES:
        choices = ", ".join(repr(n) for n in PHASES)
        raise ValueError(f"phase: {name!r} is not one of {choices}")
    return PHASES[name]
