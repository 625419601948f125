"""Electrode reversals as clinicians name them, and what each does to the recorded leads.

With the limb electrodes on the right arm (RA), left arm (LA) and left leg (LL),

    I = LA - RA,  II = LL - RA,  III = LL - LA,
    aVR = RA - (LA + LL) / 2,  aVL = LA - (RA + LL) / 2,  aVF = LL - (RA + LA) / 2.

Exchanging two electrodes therefore does not only reorder leads, it also inverts some:

- LA/RA reversal: the channel labelled I records -I, II records III, III records II, aVR and aVL
  are exchanged, aVF is unchanged;
- LA/LL reversal: I records II, II records I, III records -III, aVL and aVF are exchanged;
- RA/LL reversal: I records -III, II records -II, III records -I, aVR and aVF are exchanged;
- a precordial reversal of neighbours (V1/V2, ..., V5/V6) exchanges the two leads.

A :class:`Reversal` maps each affected header lead to the true lead its channel carries and a
sign. ``apply`` builds a reversed recording from a correct one (for tests and the labelling
study); ``undo`` is what ``leadtune label`` tests as a hypothesis. The lead-identification model
was trained on correctly polarised leads only: an inverted lead is not a class of its own. A
reversal that inverts leads is recognised by undoing it (re-inverting and relabelling) and asking
whether the model then agrees with the header better than with any other labelling.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from leadtune.trainables.data.leads import LEADS


@dataclass(frozen=True)
class Reversal:
    key: str  # short, for CSV and JSON: "LA-RA"
    name: str  # as a clinician says it: "LA/RA reversal"
    # header lead -> (true lead its channel records, sign)
    carries: tuple[tuple[str, str, int], ...]

    @property
    def mapping(self) -> dict[str, tuple[str, int]]:
        return {header: (true, sign) for header, true, sign in self.carries}

    @property
    def leads(self) -> tuple[str, ...]:
        """The header leads this reversal changes (all must be present to recognise it)."""
        return tuple(header for header, true, sign in self.carries if (true, sign) != (header, 1))

    def apply(self, signal: np.ndarray, leads: tuple[str, ...] = LEADS) -> np.ndarray:
        """A recording with this reversal, from a correct (K, T) one in ``leads`` order: row j,
        still named ``leads[j]``, records what the reversal puts there."""
        out = np.array(signal, copy=True)
        position = {lead: i for i, lead in enumerate(leads)}
        for header, true, sign in self.carries:
            if header in position:
                out[position[header]] = sign * signal[position[true]]
        return out

    def undo(self, header_leads: list[str | None]) -> tuple[list[str | None], np.ndarray]:
        """For channels named ``header_leads``: the true lead of each under this reversal, and
        the sign (+1/-1) that restores each channel's polarity."""
        mapping = self.mapping
        labels, signs = [], np.ones(len(header_leads))
        for i, lead in enumerate(header_leads):
            if lead in mapping:
                true, sign = mapping[lead]
                labels.append(true)
                signs[i] = sign
            else:
                labels.append(lead)
        return labels, signs


def _precordial(a: str, b: str) -> Reversal:
    return Reversal(f"{a}-{b}", f"{a}/{b} precordial reversal", ((a, b, 1), (b, a, 1)))


REVERSALS: tuple[Reversal, ...] = (
    Reversal(
        "LA-RA",
        "LA/RA reversal",
        (("I", "I", -1), ("II", "III", 1), ("III", "II", 1), ("aVR", "aVL", 1), ("aVL", "aVR", 1)),
    ),
    Reversal(
        "LA-LL",
        "LA/LL reversal",
        (("I", "II", 1), ("II", "I", 1), ("III", "III", -1), ("aVL", "aVF", 1), ("aVF", "aVL", 1)),
    ),
    Reversal(
        "RA-LL",
        "RA/LL reversal",
        (
            ("I", "III", -1),
            ("II", "II", -1),
            ("III", "I", -1),
            ("aVR", "aVF", 1),
            ("aVF", "aVR", 1),
        ),
    ),
    *(_precordial(f"V{i}", f"V{i + 1}") for i in range(1, 6)),
)
BY_KEY = {reversal.key: reversal for reversal in REVERSALS}
