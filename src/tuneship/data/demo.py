"""The demo task: job posting -> JSON `{"title", "company", "location", "remote"}`.

Generated deterministically from a seed: many templates, multi-word titles, companies and places, so the
tuned model must read the posting rather than memorize positions.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from tuneship.artifacts import atomic_dir, write_record
from tuneship.data.hashing import dataset_dir_sha256

SYSTEM_PROMPT = (
    "Extract the job title, company, location and whether the job is remote from the posting. "
    'Answer with JSON only, with keys "title", "company", "location" and "remote" (true or false).'
)

TITLES = [
    "Data Engineer",
    "Senior Data Engineer",
    "Backend Developer",
    "Frontend Engineer",
    "Product Manager",
    "Machine Learning Engineer",
    "Site Reliability Engineer",
    "UX Designer",
    "QA Analyst",
    "DevOps Engineer",
    "Staff Software Engineer",
    "Technical Writer",
    "Sales Associate",
    "Account Executive",
    "Nurse Practitioner",
    "Registered Nurse",
    "Warehouse Supervisor",
    "Line Cook",
    "Pastry Chef",
    "Electrician",
    "Civil Engineer",
    "Financial Analyst",
    "Tax Accountant",
    "Marketing Coordinator",
    "Content Strategist",
    "HR Generalist",
    "Recruiter",
    "Customer Success Manager",
    "Security Analyst",
    "Cloud Architect",
    "Mobile Developer",
    "Research Scientist",
    "Lab Technician",
    "Graphic Designer",
    "Project Coordinator",
    "Operations Manager",
    "Truck Driver",
    "Pharmacist",
    "Physical Therapist",
    "Data Analyst",
    "Support Engineer",
    "Barista",
    "Store Manager",
    "Paralegal",
    "Legal Counsel",
    "Database Administrator",
    "Game Designer",
    "Copywriter",
]
COMPANIES = [
    "Acme Corp",
    "Globex",
    "Initech",
    "Umbrella Health",
    "Stark Industries",
    "Wayne Logistics",
    "Hooli",
    "Pied Piper",
    "Vandelay Imports",
    "Soylent Foods",
    "Cyberdyne Systems",
    "Tyrell Labs",
    "Wonka Confections",
    "Blue Harbor Bank",
    "Northwind Traders",
    "Contoso",
    "Fabrikam",
    "Tailspin Toys",
    "Litware",
    "Adatum",
    "Green Valley Farms",
    "Redwood Analytics",
    "Silver Peak Software",
    "Orbit Media",
    "Lumen Dynamics",
    "Riverbend Hospital",
    "Cedar & Pine Legal",
    "Brightpath Education",
    "Quantum Leap AI",
    "Harbor Freight Co",
    "Maple Street Bakery",
    "Ironclad Security",
    "Evergreen Energy",
    "Polaris Games",
    "Summit Outdoor",
    "Nimbus Cloud",
    "Atlas Robotics",
    "Coral Reef Travel",
    "Helios Solar",
    "Granite Construction Group",
]
LOCATIONS = [
    "Berlin",
    "Munich",
    "London",
    "Manchester",
    "Paris",
    "Lyon",
    "Amsterdam",
    "Madrid",
    "Barcelona",
    "Lisbon",
    "New York",
    "San Francisco",
    "Austin",
    "Chicago",
    "Seattle",
    "Boston",
    "Denver",
    "Toronto",
    "Vancouver",
    "Sydney",
    "Melbourne",
    "Singapore",
    "Tokyo",
    "Dublin",
    "Stockholm",
    "Zurich",
    "Vienna",
    "Warsaw",
    "Prague",
    "Copenhagen",
    "Oslo",
    "Helsinki",
    "Mexico City",
    "Sao Paulo",
    "Cape Town",
    "Bangalore",
]

# {t}=title {c}=company {l}=location {r}=remote phrase (may be empty for on-site)
TEMPLATES = [
    "{c} is hiring a {t} in {l}. {r}",
    "Job opening: {t} at {c}, based in {l}. {r}",
    "We are looking for a {t} to join {c} in {l}! {r}",
    "{t} wanted. Company: {c}. Location: {l}. {r}",
    "Position: {t}\nEmployer: {c}\nCity: {l}\n{r}",
    "Join our team at {c} as a {t}. The role is in {l}. {r}",
    "{c} ({l}) seeks an experienced {t}. {r}",
    "Hiring now - {t} | {c} | {l}. {r}",
    "Are you a great {t}? {c} wants you in {l}. {r}",
    "{l}: {c} has an open role for a {t}. {r}",
    "Role: {t}. Team: {c}. Office: {l}. {r} Apply today.",
    "Exciting opportunity! {c} needs a {t} for its {l} office. {r}",
    "New vacancy at {c}: {t}, {l}. {r} Competitive salary.",
    "{t} ({l}) - {c} is growing fast. {r}",
    "Come work with us! {c} is recruiting a {t} in {l}. {r} Benefits included.",
    "Our client {c} is searching for a {t} located in {l}. {r}",
]
REMOTE_YES = [
    "This is a fully remote position.",
    "Remote work is possible.",
    "You can work from home.",
    "100% remote.",
    "The job is remote-friendly.",
    "Work remotely from anywhere.",
]
REMOTE_NO = [
    "This role is on-site.",
    "No remote work.",
    "You must work in the office.",
    "On-site only.",
    "The position requires being in the office every day.",
    "",
]


def make_rows(n: int = 720, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows, seen = [], set()
    while len(rows) < n:
        t, c, loc = rng.choice(TITLES), rng.choice(COMPANIES), rng.choice(LOCATIONS)
        remote = rng.random() < 0.4
        r = rng.choice(REMOTE_YES if remote else REMOTE_NO)
        text = rng.choice(TEMPLATES).format(t=t, c=c, l=loc, r=r).strip()
        if text in seen:
            continue
        seen.add(text)
        out = {"title": t, "company": c, "location": loc, "remote": remote}
        rows.append({"input": text, "output": out, "id": f"job-{len(rows):04d}"})
    return rows


def write_demo_data(
    out: str | Path, n: int = 720, seed: int = 0, fractions=(0.8, 0.1, 0.1), overwrite: bool = False
) -> dict:
    """Write train/valid/test JSONL splits of the demo task into `out`, atomically; return a summary."""
    rows = make_rows(n, seed)
    rng = random.Random(seed + 1)
    rng.shuffle(rows)
    n_train = int(round(fractions[0] * n))
    n_valid = int(round(fractions[1] * n))
    splits = {
        "train": rows[:n_train],
        "valid": rows[n_train : n_train + n_valid],
        "test": rows[n_train + n_valid :],
    }
    with atomic_dir(out, overwrite=overwrite) as tmp:
        for name, part in splits.items():
            with open(tmp / f"{name}.jsonl", "w", encoding="utf-8") as f:
                for row in part:
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")
        (tmp / "system_prompt.txt").write_text(SYSTEM_PROMPT + "\n")
        digest = dataset_dir_sha256(tmp)
        write_record(
            tmp,
            "dataset",
            sha256=digest,
            splits={k: len(v) for k, v in splits.items()},
            seed=seed,
            system_prompt=SYSTEM_PROMPT,
            task="job-posting-extraction",
        )
    return {"out": str(out), "splits": {k: len(v) for k, v in splits.items()}, "sha256": digest}
