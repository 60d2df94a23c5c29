"""Clinical notes written from a case's stated findings, in each hospital's style and language.

A finding the note states appears either positively ("hypertension") or negatively ("no
diabetes"); a finding the hospital left out (truth.MISSING) is not mentioned at all, so a reader
can tell "no" from "unknown", as the posterior in :mod:`truth` assumes. Notes never name the
label or the mechanism. Each style has several phrasings per finding, drawn at random.
"""

from __future__ import annotations

import numpy as np

from ecg_r1.simulate.truth import COMPLAINTS, MISSING, TEXT_FINDINGS

_CAT = {f.name: f.categories for f in TEXT_FINDINGS}
_RISKS = ("hypertension", "diabetes", "smoker", "dyslipidemia")
_HISTORY = ("prior_mi_pci", "cardiomyopathy", "pacing_history", "sport", "qt_drug")

# Phrase banks: for each style, finding -> (positive phrasings, negative phrasings).
_EN = {
    "hypertension": (
        ["hypertension", "arterial hypertension", "high blood pressure"],
        ["no hypertension", "normotensive"],
    ),
    "diabetes": (
        ["type 2 diabetes", "diabetes mellitus", "diabetic on metformin"],
        ["no diabetes", "not diabetic"],
    ),
    "smoker": (["current smoker", "smokes 20/day", "active smoker"], ["non-smoker", "never smoked"]),
    "dyslipidemia": (
        ["hypercholesterolaemia", "dyslipidaemia on statin", "high LDL"],
        ["normal lipids", "no dyslipidaemia"],
    ),
    "prior_mi_pci": (
        ["prior MI", "PCI to the LAD some years ago", "previous myocardial infarction with stent"],
        ["no prior coronary events", "no previous MI or PCI"],
    ),
    "cardiomyopathy": (
        [
            "known hypertrophic cardiomyopathy",
            "known cardiomyopathy on echo",
            "thickened LV on previous echo",
        ],
        ["no known cardiomyopathy", "previous echo normal"],
    ),
    "pacing_history": (
        [
            "pacemaker in situ, currently in intrinsic rhythm",
            "recent RV pacing, pacemaker now inhibited",
            "ablation last month with intermittent LBBB",
        ],
        ["no pacemaker", "never paced"],
    ),
    "sport": (
        ["competitive footballer", "trains daily (marathon runner)", "professional cyclist"],
        ["no regular sport", "sedentary"],
    ),
    "qt_drug": (
        ["on amiodarone", "takes digoxin", "on sotalol", "started citalopram and haloperidol"],
        ["no QT-prolonging drugs", "no relevant medication"],
    ),
}
_DE = {
    "hypertension": (["arterielle Hypertonie", "Bluthochdruck"], ["keine Hypertonie", "normoton"]),
    "diabetes": (["Diabetes mellitus Typ 2", "Diabetiker"], ["kein Diabetes"]),
    "smoker": (["Raucher", "Nikotinabusus"], ["Nichtraucher"]),
    "dyslipidemia": (["Hypercholesterinämie", "Dyslipidämie unter Statin"], ["Lipide normal"]),
    "prior_mi_pci": (["Z.n. Myokardinfarkt", "Z.n. PCI mit Stent"], ["kein Infarkt oder PCI bekannt"]),
    "cardiomyopathy": (
        ["bekannte hypertrophe Kardiomyopathie", "bekannte Kardiomyopathie"],
        ["keine Kardiomyopathie bekannt"],
    ),
    "pacing_history": (
        ["Schrittmacher, aktuell Eigenrhythmus", "Z.n. Ablation mit intermittierendem LSB"],
        ["kein Schrittmacher"],
    ),
    "sport": (["Leistungssportler (Fußball)", "trainiert täglich (Marathon)"], ["kein regelmäßiger Sport"]),
    "qt_drug": (
        ["unter Amiodaron", "nimmt Digoxin", "unter Sotalol"],
        ["keine QT-verlängernden Medikamente"],
    ),
}
_COMPLAINT = {
    "en": {
        "chest_pain": [
            "chest pain",
            "retrosternal chest pain",
            "chest tightness on exertion",
            "central chest discomfort",
        ],
        "dyspnea": ["shortness of breath", "dyspnoea on exertion", "breathlessness"],
        "palpitations": ["palpitations", "a racing heart"],
        "syncope": ["syncope", "a collapse", "dizziness and near-syncope"],
        "none": ["a routine ECG", "pre-operative assessment", "a screening ECG"],
    },
    "de": {
        "chest_pain": ["Thoraxschmerz", "retrosternalem Druckgefühl", "Brustschmerz bei Belastung"],
        "dyspnea": ["Dyspnoe", "Luftnot bei Belastung"],
        "palpitations": ["Palpitationen", "Herzrasen"],
        "syncope": ["Synkope", "Schwindel mit Beinahe-Synkope"],
        "none": ["Routine-EKG", "präoperativer Abklärung"],
    },
}
_TERSE = {
    "hypertension": ("HTN", "HTN-"),
    "diabetes": ("DM2", "DM-"),
    "smoker": ("smoker", "NS"),
    "dyslipidemia": ("HLD", "HLD-"),
    "prior_mi_pci": ("hx MI/PCI", "no CAD hx"),
    "cardiomyopathy": ("known CMP", "no CMP"),
    "pacing_history": ("PPM in situ", "no PPM"),
    "sport": ("athlete", "no sport"),
    "qt_drug": ("QT-drug", "no QT drugs"),
}
_TERSE_COMPLAINT = {
    "chest_pain": "CP",
    "dyspnea": "SOB",
    "palpitations": "palps",
    "syncope": "syncope",
    "none": "routine",
}


class _Pick:
    """Deterministic phrase choice from a row of pre-drawn uniforms (one per slot)."""

    def __init__(self, u: np.ndarray) -> None:
        self.u = u
        self.i = 0

    def __call__(self, options: list[str] | tuple[str, ...]) -> str:
        v = self.u[self.i % len(self.u)]
        self.i += 1
        return options[int(v * len(options))]


def _troponin(value: int, pick: _Pick, draw: float, lang: str) -> str | None:
    cat = _CAT["troponin"][value]
    if cat == "not_done":
        return (
            pick(["troponin not measured", "no troponin drawn"])
            if lang == "en"
            else "Troponin nicht bestimmt"
        )
    ng = int(20 + draw * 300) if cat == "elevated" else int(3 + draw * 10)
    if lang == "de":
        return f"hs-Troponin T {ng} ng/l" + (" (erhöht)" if cat == "elevated" else " (normal)")
    flag = (
        pick([" (elevated)", " (above the 99th centile)", " H"])
        if cat == "elevated"
        else pick(["", " (normal)", " (negative)"])
    )
    return f"hs-troponin {ng} ng/L{flag}"


def _potassium(value: int, draw: float, lang: str) -> str:
    k = 2.6 + draw * 0.7 if value == 1 else 3.7 + draw * 1.2
    return f"Kalium {k:.1f} mmol/l".replace(".", ",") if lang == "de" else f"K+ {k:.1f} mmol/L"


def _upper_first(text: str) -> str:
    return text[:1].upper() + text[1:]


def write_note(
    style: str, age: int, male: bool, stated: dict[str, int], uniforms: np.ndarray, draw: float
) -> str:
    """One note.

    Args:
        style: en_prose | en_terse | en_structured | de.
        age: years. male: sex.
        stated: finding name -> category index, or truth.MISSING when the note leaves it out.
        uniforms: pre-drawn uniforms in [0, 1) choosing the phrasings.
        draw: a uniform setting lab values within their category.

    Returns:
        The note text.
    """
    pick = _Pick(uniforms)
    lang = note_language(style)
    bank = _DE if lang == "de" else _EN
    complaint = stated["complaint"]
    cpl = None if complaint == MISSING else COMPLAINTS[complaint]
    risks_pos = [r for r in _RISKS if stated[r] == 1]
    risks_neg = [r for r in _RISKS if stated[r] == 0]
    hist_pos = [h for h in _HISTORY if stated[h] == 1]
    hist_neg = [h for h in _HISTORY if stated[h] == 0]
    trop = None if stated["troponin"] == MISSING else _troponin(stated["troponin"], pick, draw, lang)
    kal = None if stated["hypokalemia"] == MISSING else _potassium(stated["hypokalemia"], draw, lang)

    if style == "en_terse":
        parts = [f"{'M' if male else 'F'} {age}"]
        if cpl:
            parts.append(_TERSE_COMPLAINT[cpl])
        parts += [_TERSE[r][0] for r in risks_pos + hist_pos] + [_TERSE[r][1] for r in risks_neg + hist_neg]
        if trop:
            parts.append(trop.replace("hs-troponin", "trop"))
        if kal:
            parts.append(kal.replace(" mmol/L", ""))
        return ". ".join(parts) + "."
    if style == "en_structured":
        fields = [f"Age: {age}", f"Sex: {'male' if male else 'female'}"]
        if cpl:
            fields.append(f"Presenting complaint: {pick(_COMPLAINT['en'][cpl])}")
        rf = [pick(bank[r][0]) for r in risks_pos] + [pick(bank[r][1]) for r in risks_neg]
        if rf:
            fields.append("Risk factors: " + ", ".join(rf))
        hx = [pick(bank[h][0]) for h in hist_pos] + [pick(bank[h][1]) for h in hist_neg]
        if hx:
            fields.append("History/medication: " + "; ".join(hx))
        labs = [x for x in (trop, kal) if x]
        if labs:
            fields.append("Labs: " + ", ".join(labs))
        return " | ".join(fields)
    if lang == "de":
        who = f"{age}-jährige{'r Patient' if male else ' Patientin'}"
        text = [f"{who} mit {pick(_COMPLAINT['de'][cpl])}." if cpl else f"{who}."]
    else:
        who = f"{age}-year-old {'man' if male else 'woman'}"
        opener = (
            pick(["referred for", "seen for"])
            if cpl == "none"
            else pick(["presenting with", "referred with", "complaining of"])
        )
        text = [f"{who} {opener} {pick(_COMPLAINT['en'][cpl])}." if cpl else f"{who}."]
    rf = [pick(bank[r][0]) for r in risks_pos] + [pick(bank[r][1]) for r in risks_neg]
    if rf:
        text.append(
            (
                "Risikofaktoren: "
                if lang == "de"
                else pick(["Risk factors: ", "PMH: ", "Cardiovascular risk: "])
            )
            + ", ".join(rf)
            + "."
        )
    hx = [pick(bank[h][0]) for h in hist_pos] + [pick(bank[h][1]) for h in hist_neg]
    if hx:
        text.append(_upper_first("; ".join(hx)) + ".")
    labs = [x for x in (trop, kal) if x]
    if labs:
        text.append(_upper_first(", ".join(labs)) + ".")
    return " ".join(text)


# The training hospitals' language and the style of a note rewritten in it: the counterfactual
# note of a hospital writing in another language (truth's ``note_english``), so a comparison can
# show how much of a held-out hospital's drop is its language.
ENGLISH_STYLE = "en_prose"


def note_language(style: str) -> str:
    """``de`` for the German style, ``en`` for the English ones."""
    return "de" if style == "de" else "en"


def write_notes(
    rng: np.random.Generator,
    styles: tuple[str, ...],
    age: np.ndarray,
    male: np.ndarray,
    stated: dict[str, np.ndarray],
) -> dict[str, list[str]]:
    """Notes for a batch (see :func:`write_note`) in each of the given styles: the same stated
    findings, lab values and phrase draws, so each style's note says the same about the case."""
    n = len(age)
    uniforms = rng.random((n, 24))
    draws = rng.random(n)
    return {
        style: [
            write_note(
                style,
                int(age[i]),
                bool(male[i]),
                {k: int(v[i]) for k, v in stated.items()},
                uniforms[i],
                draws[i],
            )
            for i in range(n)
        ]
        for style in dict.fromkeys(styles)
    }
