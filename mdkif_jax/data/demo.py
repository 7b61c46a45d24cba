"""The embedded demo corpus: a few hundred short examples covering all 12 skills.

Written for this project from general medical knowledge (one small fact table below), not
copied from any dataset, so the default run works on a fresh machine without ../shared/data.
Answers are short and regular on purpose: a short training run should show every skill's loss
falling. Not clinical advice; the facts are textbook-level and simplified.
"""

from __future__ import annotations

from collections.abc import Iterator

from mdkif_jax.data.example import Example
from mdkif_jax.data.skills import format_list

# disease, another name, organ or system, typical symptom, a common drug, its class, category
FACTS: tuple[tuple[str, str, str, str, str, str, str], ...] = (
  (
    "hypertension",
    "high blood pressure",
    "blood vessels",
    "headache",
    "lisinopril",
    "ACE inhibitor",
    "cardiovascular",
  ),
  (
    "type 2 diabetes",
    "adult-onset diabetes",
    "pancreas",
    "frequent urination",
    "metformin",
    "biguanide",
    "metabolic",
  ),
  (
    "asthma",
    "reactive airway disease",
    "lungs",
    "wheezing",
    "salbutamol",
    "beta-2 agonist",
    "respiratory",
  ),
  (
    "migraine",
    "sick headache",
    "brain",
    "throbbing headache",
    "sumatriptan",
    "triptan",
    "neurological",
  ),
  (
    "hypothyroidism",
    "underactive thyroid",
    "thyroid gland",
    "tiredness",
    "levothyroxine",
    "thyroid hormone",
    "endocrine",
  ),
  (
    "gastroesophageal reflux disease",
    "acid reflux",
    "esophagus",
    "heartburn",
    "omeprazole",
    "proton pump inhibitor",
    "digestive",
  ),
  (
    "rheumatoid arthritis",
    "RA",
    "joints",
    "swollen joints",
    "methotrexate",
    "antimetabolite",
    "autoimmune",
  ),
  (
    "epilepsy",
    "seizure disorder",
    "brain",
    "seizures",
    "levetiracetam",
    "anticonvulsant",
    "neurological",
  ),
  (
    "tuberculosis",
    "TB",
    "lungs",
    "chronic cough",
    "isoniazid",
    "antitubercular agent",
    "infectious",
  ),
  (
    "gout",
    "podagra",
    "joints",
    "sudden pain in the big toe",
    "allopurinol",
    "xanthine oxidase inhibitor",
    "metabolic",
  ),
  (
    "Parkinson's disease",
    "paralysis agitans",
    "brain",
    "resting tremor",
    "levodopa",
    "dopamine precursor",
    "neurological",
  ),
  (
    "heart failure",
    "cardiac failure",
    "heart",
    "shortness of breath",
    "furosemide",
    "loop diuretic",
    "cardiovascular",
  ),
  (
    "atrial fibrillation",
    "AF",
    "heart",
    "palpitations",
    "warfarin",
    "anticoagulant",
    "cardiovascular",
  ),
  (
    "major depressive disorder",
    "clinical depression",
    "brain",
    "persistent low mood",
    "sertraline",
    "SSRI",
    "psychiatric",
  ),
  (
    "urinary tract infection",
    "UTI",
    "urinary bladder",
    "burning on urination",
    "nitrofurantoin",
    "antibacterial",
    "infectious",
  ),
  (
    "iron deficiency anemia",
    "sideropenic anemia",
    "blood",
    "pale skin",
    "ferrous sulfate",
    "iron supplement",
    "hematological",
  ),
  (
    "psoriasis",
    "psoriasis vulgaris",
    "skin",
    "scaly plaques",
    "calcipotriol",
    "vitamin D analogue",
    "dermatological",
  ),
  ("conjunctivitis", "pink eye", "eye", "red eye", "chloramphenicol", "antibiotic", "infectious"),
  (
    "influenza",
    "flu",
    "respiratory tract",
    "high fever",
    "oseltamivir",
    "neuraminidase inhibitor",
    "infectious",
  ),
  (
    "angina pectoris",
    "stable angina",
    "heart",
    "chest pain on exertion",
    "nitroglycerin",
    "nitrate",
    "cardiovascular",
  ),
  (
    "chickenpox",
    "varicella",
    "skin",
    "itchy blistering rash",
    "aciclovir",
    "antiviral",
    "infectious",
  ),
  (
    "Alzheimer's disease",
    "Alzheimer dementia",
    "brain",
    "memory loss",
    "donepezil",
    "cholinesterase inhibitor",
    "neurological",
  ),
  ("allergic rhinitis", "hay fever", "nose", "sneezing", "cetirizine", "antihistamine", "allergic"),
  (
    "bipolar disorder",
    "manic depression",
    "brain",
    "extreme mood swings",
    "lithium",
    "mood stabilizer",
    "psychiatric",
  ),
  (
    "herpes zoster",
    "shingles",
    "nerves and skin",
    "painful band-shaped rash",
    "valaciclovir",
    "antiviral",
    "infectious",
  ),
  ("acne vulgaris", "acne", "skin", "pimples", "isotretinoin", "retinoid", "dermatological"),
  (
    "hyperthyroidism",
    "overactive thyroid",
    "thyroid gland",
    "weight loss",
    "methimazole",
    "antithyroid agent",
    "endocrine",
  ),
  (
    "deep vein thrombosis",
    "DVT",
    "leg veins",
    "a swollen leg",
    "heparin",
    "anticoagulant",
    "cardiovascular",
  ),
  (
    "myocardial infarction",
    "heart attack",
    "heart",
    "crushing chest pain",
    "aspirin",
    "antiplatelet agent",
    "cardiovascular",
  ),
  (
    "anaphylaxis",
    "severe allergic reaction",
    "immune system",
    "throat swelling",
    "epinephrine",
    "sympathomimetic",
    "allergic",
  ),
  (
    "scabies",
    "sarcoptic itch",
    "skin",
    "itching at night",
    "permethrin",
    "scabicide",
    "infectious",
  ),
  (
    "kidney stones",
    "nephrolithiasis",
    "kidneys",
    "severe flank pain",
    "tamsulosin",
    "alpha blocker",
    "urological",
  ),
)

CATEGORIES = tuple(sorted({f[6] for f in FACTS}))
_RE_LABELS = "treats; causes; located in"


def _qa(i, d, syn, organ, sym, drug, cls, cat):
  return "", f"Which drug is commonly used to treat {d}?", drug


def _mcqa(i, d, syn, organ, sym, drug, cls, cat):
  n = len(FACTS)
  options = [FACTS[(i + k) % n][4] for k in (7, 13, 19)]
  options.insert(i % 4, drug)
  lines = [f"Which drug is commonly used to treat {d}?"]
  lines += [f"{'ABCD'[k]}. {o}" for k, o in enumerate(options)]
  return "", "\n".join(lines), "ABCD"[i % 4]


def _mc(i, d, syn, organ, sym, drug, cls, cat):
  query = f"Doctor, I have had {sym} for a few weeks. What could it be?"
  answer = (
    f"{sym[0].upper() + sym[1:]} can be a sign of {d}. "
    f"Please get it checked; {drug} is a common treatment."
  )
  return "", query, answer


def _mldc(i, d, syn, organ, sym, drug, cls, cat):
  j = (5 * i + 3) % len(FACTS)
  other = FACTS[j]
  context = (
    f"This note reviews {d}, which affects the {organ}, "
    f"and {other[0]}, which often causes {other[3]}."
  )
  query = f"Which disease categories does the text cover? Labels: {'; '.join(CATEGORIES)}."
  return context, query, format_list(sorted({cat, other[6]}))


def _mrc(i, d, syn, organ, sym, drug, cls, cat):
  context = (
    f"{d[0].upper() + d[1:]} affects the {organ}. A typical symptom is {sym}. "
    f"It is often treated with {drug}, a {cls}."
  )
  question, answer = [
    (f"What is a typical symptom of {d}?", sym),
    (f"Which drug class does {drug} belong to?", cls),
    (f"What does {d} affect?", organ),
  ][i % 3]
  return context, question, answer


def _nli(i, d, syn, organ, sym, drug, cls, cat):
  other = FACTS[(i + 1) % len(FACTS)][0]
  claim = d if i % 2 == 0 else other
  context = f"Text: The patient was diagnosed with {syn}.\nStatement: The patient has {claim}."
  return context, "Does the statement follow from the text?", "yes" if claim == d else "no"


def _ts(i, d, syn, organ, sym, drug, cls, cat):
  who = ("mother", "father", "brother", "sister")[i % 4]
  context = (
    f"Hello, my {who} was told last week that they have {d}. We have read a lot online and are "
    f"confused. Which medicine is usually given for it, and is it safe to take for a long time?"
  )
  return (
    context,
    "Summarize the question in one short question.",
    f"What is the usual treatment for {d}?",
  )


def _ner(i, d, syn, organ, sym, drug, cls, cat):
  context = f"The patient with {d} was started on {drug} after reporting {sym}."
  if i % 2 == 0:
    return context, "List the disease mentions in the text.", d
  return context, "List the chemical mentions in the text.", drug


def _re(i, d, syn, organ, sym, drug, cls, cat):
  context, answer = [
    (f"<< {drug} >> is prescribed for [[ {d} ]].", "treats"),
    (f"[[ {d} ]] commonly causes << {sym} >>.", "causes"),
    (f"[[ {d} ]] mainly involves the << {organ} >>.", "located in"),
  ][i % 3]
  query = (
    "What is the relation between the entity marked << >> and the entity marked [[ ]]? "
    f"Labels: {_RE_LABELS}."
  )
  return context, query, answer


def _ea(i, d, syn, organ, sym, drug, cls, cat):
  if i % 2 == 0:
    return "", f"What does '{d}' mainly affect?", organ
  return "", f"Which drug class does '{drug}' belong to?", cls


def _es(i, d, syn, organ, sym, drug, cls, cat):
  return "", f"What are other names for '{d}'?", syn


def _er(i, d, syn, organ, sym, drug, cls, cat):
  if i % 2 == 0:
    return "", f"How is '{drug}' related to '{d}'?", "treats"
  return "", f"How is '{d}' related to '{sym}'?", "presents"


_WRITERS = {
  "qa": _qa,
  "mcqa": _mcqa,
  "mc": _mc,
  "mldc": _mldc,
  "mrc": _mrc,
  "nli": _nli,
  "ts": _ts,
  "ner": _ner,
  "re": _re,
  "ea": _ea,
  "es": _es,
  "er": _er,
}


def examples() -> list[Example]:
  """All demo examples, skill by skill (len(FACTS) per skill)."""
  out = []
  for skill, write in _WRITERS.items():
    for i, fact in enumerate(FACTS):
      context, query, answer = write(i, *fact)
      out.append(Example(skill, context, query, answer, "demo", f"{skill}/{i}"))
  return out


def items() -> Iterator[tuple[str, str, Example]]:
  """(part, group, example) like a converter. Every fifth fact of each skill is part "eval",
  so each skill has the same split (26 train, 6 reserved) instead of a hash-split lottery."""
  for ex in examples():
    index = int(ex.id.rsplit("/", 1)[1])
    yield ("eval" if index % 5 == 4 else "train"), ex.id, ex
