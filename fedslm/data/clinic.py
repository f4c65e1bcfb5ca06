"""A synthetic clinic domain: patient questions answered in each clinic's house style.

Everything is generated from a seed, so no download is needed and runs repeat. The sites
differ the way real clinics do (non-IID): each has its own mix of conditions and its own
way of answering. Answers follow from the question (condition facts are fixed), so a
model can actually learn the domain and the held-out loss is meaningful.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

SYSTEM_PROMPT = "You are a clinic assistant. Answer the patient's question."  # used in training and the demo


@dataclass(frozen=True)
class Condition:
    name: str
    symptom: str
    advice: str
    warning: str
    medication: str


CONDITIONS = [
    Condition("high blood pressure", "headaches and a pounding pulse", "cut down on salt and walk 30 minutes a day",
              "chest pain or a reading above 180/120", "an ACE inhibitor such as lisinopril"),
    Condition("type 2 diabetes", "thirst and frequent urination", "check your sugar each morning and limit sweet drinks",
              "confusion or a sugar reading above 300", "metformin with meals"),
    Condition("iron deficiency anemia", "tiredness and pale skin", "eat beans, spinach and red meat",
              "fainting or a racing heart", "ferrous sulfate tablets once a day"),
    Condition("acid reflux", "burning in the chest after meals", "avoid late meals and raise the head of the bed",
              "trouble swallowing or black stools", "omeprazole before breakfast"),
    Condition("asthma", "wheezing and a tight chest", "keep the rescue inhaler close and avoid smoke",
              "lips turning blue or no relief from the inhaler", "a salbutamol inhaler"),
    Condition("an ear infection", "ear pain and a mild fever", "use a warm compress and rest",
              "fever above 39 C for two days or fluid from the ear", "amoxicillin for seven days"),
    Condition("the flu", "fever, aches and a dry cough", "drink plenty of fluids and stay home",
              "shortness of breath or a fever that returns", "oseltamivir if started within two days"),
    Condition("eczema", "dry, itchy patches of skin", "use a thick unscented moisturiser twice a day",
              "skin that weeps, crusts or spreads fast", "a mild hydrocortisone cream"),
    Condition("hay fever", "sneezing and itchy eyes", "keep windows closed on high pollen days",
              "wheezing or swelling of the face", "a daily antihistamine such as cetirizine"),
    Condition("acne", "spots on the face and back", "wash twice a day with a gentle cleanser",
              "painful cysts or scarring", "a benzoyl peroxide gel"),
    Condition("insomnia", "trouble falling asleep", "keep a fixed bedtime and no screens after 9 pm",
              "falling asleep while driving", "a short course of melatonin"),
    Condition("a sprained ankle", "swelling and pain when walking", "rest, ice, compress and raise the ankle",
              "being unable to put any weight on it", "ibuprofen for the pain"),
]


@dataclass(frozen=True)
class Site:
    name: str
    weights: dict[str, float]  # condition name -> share of this clinic's questions
    style: str


# Three clinics with different specialties and voices; sites beyond three reuse them
# with their own seed, so any federation size gets a non-IID mix.
SITES = [
    Site("Riverside Internal Medicine",
         {"high blood pressure": 5, "type 2 diabetes": 5, "iron deficiency anemia": 3, "acid reflux": 3, "insomnia": 1},
         "formal"),
    Site("Northside Children's Clinic",
         {"asthma": 5, "an ear infection": 5, "the flu": 4, "eczema": 2, "hay fever": 2},
         "parent"),
    Site("Harbor Skin and Family Practice",
         {"eczema": 5, "acne": 5, "hay fever": 3, "a sprained ankle": 3, "insomnia": 2},
         "brief"),
]

_QUESTIONS = [
    "I have had {symptom} for {days} days. Could it be {name}?",
    "My doctor said I have {name}. What should I do at home?",
    "What helps with {name}? I am {age} and I get {symptom}.",
    "I was diagnosed with {name} last week. When should I worry?",
]

_PARENT_QUESTIONS = [
    "My {age_child}-year-old has {symptom}. Is it {name}?",
    "Our child has {name}. How can we help at home?",
]

_ANSWERS = {
    "formal": ("Assessment: findings consistent with {name}. Plan: {advice}. "
               "Medication: {medication}. Return precautions: {warning}."),
    "parent": ("This sounds like {name}, which is common in children. At home, {advice}. "
               "The usual treatment is {medication}. Call us right away if you notice {warning}."),
    "brief": "Likely {name}. Do: {advice}. Treat: {medication}. Urgent if: {warning}.",
}


def site_profile(site: int) -> Site:
    return SITES[site % len(SITES)]


def generate_site(site: int, n: int, seed: int) -> list[dict]:
    """`n` instruction/answer records for one site, deterministic in (site, seed)."""
    profile = site_profile(site)
    rng = random.Random(f"clinic|{seed}|{site}")
    by_name = {c.name: c for c in CONDITIONS}
    names = list(profile.weights)
    weights = [profile.weights[k] for k in names]
    templates = _PARENT_QUESTIONS + _QUESTIONS[:2] if profile.style == "parent" else _QUESTIONS
    records = []
    for _ in range(n):
        cond = by_name[rng.choices(names, weights)[0]]
        fill = dict(
            name=cond.name, symptom=cond.symptom, advice=cond.advice, warning=cond.warning,
            medication=cond.medication, days=rng.randint(2, 21), age=rng.randint(19, 84),
            age_child=rng.randint(2, 12),
        )
        question = rng.choice(templates).format(**fill)
        answer = _ANSWERS[profile.style].format(**fill)
        records.append({"prompt": question, "answer": answer, "topic": cond.name})
    return records


def site_splits(site: int, train: int, eval_: int, seed: int) -> tuple[list[dict], list[dict]]:
    """Train and held-out eval records of one site (eval questions never seen in train)."""
    records = generate_site(site, 2 * train + 4 * eval_, seed)
    seen: set[str] = set()
    train_recs, eval_recs = [], []
    # Hold out the first distinct questions, so eval measures generalisation to new
    # wording/patients rather than recall of identical strings.
    for rec in records:
        if len(eval_recs) < eval_ and rec["prompt"] not in seen:
            eval_recs.append(rec)
            seen.add(rec["prompt"])
    train_recs = [r for r in records if r["prompt"] not in seen][:train]
    return train_recs, eval_recs


def demo_question(seed: int = 0) -> dict:
    """A fresh question from no site's data, for showing base vs federated answers."""
    rng = random.Random(f"demo|{seed}")
    profile = SITES[0]
    cond = next(c for c in CONDITIONS if c.name == "high blood pressure")
    question = f"I have had {cond.symptom} for {rng.randint(2, 21)} days. Could it be {cond.name}?"
    return {"prompt": question, "answer": _ANSWERS[profile.style].format(**vars(cond))}
