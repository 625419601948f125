"""The 12 standard ECG lead names and the case-insensitive matching of header names to them."""

from __future__ import annotations

LEADS: tuple[str, ...] = ("I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6")

# Headers spell the same lead as "AVR", "aVR" or "avr" (PTB-XL uses upper case).
_BY_FOLDED_NAME = {name.casefold(): name for name in LEADS}


def canonical_lead(name: str) -> str | None:
    """The standard spelling of a lead name ("AVR" -> "aVR"), or None if it is not one of LEADS."""
    folded = "".join(str(name).split()).casefold()
    return _BY_FOLDED_NAME.get(folded)


def lead_index(name: str) -> int:
    """Position of a lead in LEADS, matching the name case-insensitively."""
    lead = canonical_lead(name)
    if lead is None:
        raise ValueError(f"{name!r} is not a standard ECG lead; expected one of {', '.join(LEADS)}")
    return LEADS.index(lead)
