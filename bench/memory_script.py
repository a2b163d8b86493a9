"""The scripted conversations of bench/memory.py: simulated users who state facts in passing.

Each user has a handful of facts (where they live, their work, diet, pet, allergy, a
relative's birthday, a taste, a plan, what to call them), drawn with their own values.
Over about 100 everyday messages they state each fact once, in one of several phrasing
styles: plain, chatty (inside a longer message), terse lowercase, two facts in one
message, or asked to be remembered ("remember that ...", "/remember ..."); some facts are
corrected later ("I moved to Porto"). Then come the questions: ``direct`` ones about a
fact ("Where do I live?"), ``meaning`` ones that need a fact but share no word with it
("Any dinner ideas?" for a vegetarian), and ``none`` that need no fact.

**The matching rule.** A fact lists its key words as groups of alternatives ("March" or
"Mar", and "3" or "3rd"). A text (a note, a prompt's notes, a reply) *contains* the fact
when, compared case-insensitively on whole words, it holds at least one alternative of
every group. A question counts as ``meaning`` only if no word of it (less stop words, two
letters or fewer, and words shorter than four letters that differ) is a word of the
statement that told the fact.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field

from storage.stop_words import STOP_WORDS

_WORD = re.compile(r"[\w']+")


@dataclass
class Fact:
    kind: str
    keys: list[list[str]]  # groups of alternatives: every group must be found
    statements: dict[str, str]  # phrasing style -> the message that states it
    direct: list[str]
    meaning: list[str]
    correction: tuple[str, list[list[str]]] | None = None  # a later message and the keys it makes true
    old_keys: list[list[str]] = field(default_factory=list)  # after a correction: what must be gone


@dataclass
class Turn:
    text: str
    kind: str = "chat"  # chat, statement, correction, direct, meaning, none
    facts: tuple[int, ...] = ()  # the user's facts it states or asks about (indexes)


@dataclass
class User:
    name: str
    facts: list[Fact]
    turns: list[Turn]


def contains(text: str, keys: list[list[str]]) -> bool:
    """The matching rule: every group of key words has an alternative among ``text``'s words."""
    words = {w.lower().strip("'") for w in _WORD.findall(text)}
    joined = " " + " ".join(_WORD.findall(text.lower())) + " "
    return all(any((a.lower() in words) if " " not in a else (f" {a.lower()} " in joined) for a in group)
               for group in keys)  # fmt: skip


def content_words(text: str) -> set[str]:
    return {w.lower() for w in _WORD.findall(text) if len(w) > 2 and w.lower() not in STOP_WORDS}


def shares_a_word(question: str, statement: str) -> bool:
    asked, said = content_words(question), content_words(statement)
    return any(a == s or (len(a) >= 4 and len(s) >= 4 and a[:4] == s[:4]) for a in asked for s in said)


CITIES = ["Lisbon", "Porto", "Oslo", "Nairobi", "Toronto", "Kyoto", "Valencia", "Krakow", "Dublin", "Austin",
          "Melbourne", "Edinburgh", "Tallinn", "Montevideo"]  # fmt: skip
PET_NAMES = ["Zorblax", "Biscuit", "Mochi", "Pepper", "Nimbus", "Waffles", "Gizmo", "Tofu", "Pickles", "Bramble"]
PETS = ["cat", "dog", "rabbit", "parrot"]
JOBS = ["nurse", "teacher", "electrician", "pharmacist", "chef", "accountant", "architect", "librarian"]
DIETS = ["vegetarian", "vegan", "pescatarian"]
ALLERGENS = ["peanuts", "shellfish", "sesame", "eggs", "almonds"]
NAMES = ["Sam", "Priya", "Tomasz", "Aiko", "Dee", "Marco", "Ines", "Kofi"]
RELATIVES = ["wife", "husband", "mother", "sister", "brother"]
MONTHS = ["January", "March", "April", "June", "July", "September", "October", "November"]
TASTES = [  # (what they love, a question it helps with that shares no word with it)
    ("jazz", "Can you recommend some music for a quiet evening?"),
    ("hiking", "Any ideas for something to do outdoors this weekend?"),
    ("chess", "Suggest a board game I could get better at."),
    ("gardening", "What could I do with a free Sunday afternoon?"),
    ("sushi", "Where should we go out to eat on Friday?"),
]
PLANS = [  # (what, direct question, meaning question)
    ("job interview", "When is my interview?", "Any tips to calm my nerves before meeting a hiring manager?"),
    (
        "dentist appointment",
        "When is my dentist appointment?",
        "Should I avoid coffee before getting my teeth checked?",
    ),
    ("marathon", "When is my marathon?", "How should I taper my running in the last week?"),
]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday"]

CHAT = [
    "Can you explain how photosynthesis works?", "Tell me a joke.", "How do I fix a flat bike tire?",
    "What's a good book to read on a rainy day?", "I'm a bit tired today.", "Thanks, that helps!",
    "How many planets are in the solar system?", "What is the difference between weather and climate?",
    "I think it might rain later.", "Give me a fun fact about octopuses.", "How do I boil an egg properly?",
    "What does a router do?", "I wonder if cats dream.", "Can you summarize the plot of Hamlet?",
    "What's a polite way to decline an invitation?", "I'd like to learn more about Rome.",
    "How do vaccines work?", "Why is the sky blue?", "What is a haiku? Write one about autumn.",
    "I was thinking about learning to draw.", "How long should I steep green tea?", "Ok cool.",
    "What are some good stretches for the morning?", "How does compound interest work?",
    "I like your answer.", "Can you help me write a short thank-you note to a colleague?",
    "What's the tallest mountain in Africa?", "How do noise-cancelling headphones work?",
    "Is it better to rent or buy a car?", "That's interesting, tell me more.",
    "What should I know about houseplants that need little light?", "How do I remove a coffee stain?",
    "Explain blockchain like I'm five.", "What's the best way to memorize vocabulary?",
    "Haha, nice one.", "How do I make my laptop battery last longer?", "What causes hiccups?",
    "Can you suggest a name for a book club?", "How do I write a good cover letter?",
    "What's the capital of Australia?", "Any tips for a long flight?", "Why do leaves change colour?",
    "I love it!", "How do I clean a cast iron pan?", "What's a good warm-up before a run?",
    "Tell me something interesting about the Roman Empire.", "What's the rule of thirds in photography?",
    "How does a heat pump work?", "What's an easy way to start journaling?", "Good morning!",
]  # fmt: skip
NONE = [
    "How do I change a car tire?", "Explain how a rainbow forms.", "What's the capital of Canada?",
    "How do I convert Celsius to Fahrenheit?", "Tell me a fun fact about space.", "How do bees make honey?",
    "What is the Pythagorean theorem?", "How can I improve my handwriting?", "What is a black hole?",
    "How do I back up my phone?", "Explain what inflation is.", "Who painted the Mona Lisa?",
    "How do I tie a bowline knot?", "What's the difference between a virus and bacteria?",
]  # fmt: skip


def _facts(rng: random.Random) -> list[Fact]:
    city, city2 = rng.sample(CITIES, 2)
    pet, pet_name = rng.choice(PETS), rng.choice(PET_NAMES)
    job, job2 = rng.sample(JOBS, 2)
    diet, allergen, name = rng.choice(DIETS), rng.choice(ALLERGENS), rng.choice(NAMES)
    relative, month, day = rng.choice(RELATIVES), rng.choice(MONTHS), rng.randint(2, 27)
    taste, taste_q = rng.choice(TASTES)
    plan, plan_direct, plan_meaning = rng.choice(PLANS)
    weekday = rng.choice(DAYS)
    a_job = ("an " if job[0] in "aeiou" else "a ") + job
    suffix = {1: "st", 2: "nd", 3: "rd", 21: "st", 22: "nd", 23: "rd"}.get(day, "th")
    facts = [
        Fact(
            "home",
            [[city]],
            {
                "plain": f"I live in {city}.",
                "chatty": f"Ugh, long week at last. By the way, I live in {city}, so the weather talk makes sense.",
                "terse": f"i live in {city.lower()} btw",
            },
            ["Where do I live?", "What city do I live in?"],
            ["What's the weather usually like around here in winter?", "Recommend a place to visit nearby."],
            correction=(f"Big news: I moved to {city2} last month.", [[city2]]),
            old_keys=[[city]],
        ),
        Fact(
            "work",
            [[job]],
            {
                "plain": f"I work as {a_job}.",
                "chatty": f"Today was hectic. I'm {a_job}, so long days are normal for me.",
                "terse": f"i work as {a_job}",
            },
            ["What do I do for work?", "What is my job?"],
            ["How can I unwind after a stressful shift?", "Any advice for staying sharp at the end of a long day?"],
            correction=(f"I changed careers, I'm {('an ' if job2[0] in 'aeiou' else 'a ') + job2} now.", [[job2]]),
            old_keys=[[job]],
        ),
        Fact(
            "diet",
            [[diet]],
            {
                "plain": f"I am {diet}.",
                "chatty": f"Quick heads up, I'm {diet}, and I love trying new recipes.",
                "terse": f"i'm {diet} fyi",
            },
            ["Am I vegetarian?", "What's my diet?"],
            ["What should I cook for dinner tonight?", "Any ideas for a quick lunch?"],
        ),
        Fact(
            "pet",
            [[pet_name]],
            {
                "plain": f"My {pet} is called {pet_name}.",
                "chatty": f"Haha, my {pet} {pet_name} just knocked my coffee over. My {pet} is called {pet_name}, "
                f"by the way.",
                "terse": f"my {pet}'s name is {pet_name}",
            },
            [f"What is my {pet} called?", f"What's my {pet}'s name?"],
            ["My little companion seems bored, any toy ideas?", "How often should I take my furry friend to the vet?"],
        ),
        Fact(
            "allergy",
            [[allergen]],
            {
                "plain": f"I'm allergic to {allergen}.",
                "chatty": f"Careful with suggestions, I'm allergic to {allergen}, it's quite serious.",
                "terse": f"allergic to {allergen}, i'm allergic to {allergen}",
            },
            ["What am I allergic to?", "Do I have any allergies?"],
            ["Can you suggest a snack for a long train ride?", "What should I bake for a party?"],
        ),
        Fact(
            "birthday",
            [[month, month[:3]], [str(day), f"{day}{suffix}"]],
            {
                "plain": f"My {relative}'s birthday is on {month} {day}.",
                "chatty": f"Oh, I need to plan ahead: my {relative}'s birthday is on {month} {day}{suffix}.",
                "terse": f"my {relative}'s birthday is {day} {month}",
            },
            [f"When is my {relative}'s birthday?"],
            ["Help me plan a celebration for someone I love.", "What present would make a special day memorable?"],
        ),
        Fact(
            "name",
            [[name]],
            {
                "plain": f"My name is {name}.",
                "chatty": f"We haven't been introduced properly, call me {name}.",
                "terse": f"call me {name}",
            },
            ["What's my name?", "Do you remember my name?"],
            ["How should you address me?", "Write a short greeting for me."],
        ),
        Fact(
            "taste",
            [[taste]],
            {
                "plain": f"I love {taste}.",
                "chatty": f"Fun fact about me: I really love {taste}, it's my favourite way to relax.",
                "terse": f"i love {taste}",
            },
            ["What do I love?"],
            [taste_q],
        ),
        Fact(
            "plan",
            [[plan.split()[-1]]],
            {
                "plain": f"I have a {plan} next {weekday}.",
                "chatty": f"Feeling a bit nervous, I have a {plan} next {weekday}.",
                "terse": f"got a {plan} next {weekday.lower()}, i have a {plan} next {weekday.lower()}",
            },
            [plan_direct],
            [plan_meaning],
        ),
    ]
    return facts


def make_user(index: int, seed: int, messages: int = 100, n_facts: int = 6) -> User:
    rng = random.Random(seed * 1000 + index)
    every = _facts(rng)
    facts = rng.sample(every, n_facts)
    styles = ["plain", "chatty", "terse", "explicit", "command"]
    statements: list[Turn] = []
    for i, fact in enumerate(facts):
        style = styles[(index + i) % len(styles)]
        said = fact.statements["plain" if style in ("explicit", "command") else style]
        if style == "explicit":
            said = "remember that " + said[0].lower() + said[1:]
        elif style == "command":
            said = "/remember " + said
        statements.append(Turn(said, "statement", (i,)))
    plain = [t for t in statements if not t.text.startswith(("/", "remember"))]
    if len(plain) >= 2 and index % 3 == 0:  # two facts in one message
        first, second = plain[0], plain[1]
        joined = Turn(first.text.rstrip(".") + ", and " + second.text[0].lower() + second.text[1:], "statement",
                      first.facts + second.facts)  # fmt: skip
        statements = [joined] + [t for t in statements if t is not first and t is not second]
    corrections = [Turn(f.correction[0], "correction", (i,)) for i, f in enumerate(facts) if f.correction and
                   rng.random() < 0.5]  # fmt: skip
    chat = [Turn(t) for t in rng.choices(CHAT, k=messages - len(statements) - len(corrections) - 10)]
    body = chat[:]
    for turn in statements:  # facts are stated in the first two thirds, in passing
        body.insert(rng.randint(0, max(len(body) * 2 // 3, 1)), turn)
    for turn in corrections:
        stated = next(i for i, t in enumerate(body) if t.kind == "statement" and turn.facts[0] in t.facts)
        body.insert(rng.randint(stated + 1, len(body)), turn)
    questions: list[Turn] = []
    for i, fact in enumerate(facts):
        statement = next(t.text for t in statements if i in t.facts)
        questions.append(Turn(rng.choice(fact.direct), "direct", (i,)))
        meaning = [q for q in fact.meaning if not shares_a_word(q, statement)]
        if meaning:
            questions.append(Turn(rng.choice(meaning), "meaning", (i,)))
    questions += [Turn(q, "none") for q in rng.sample(NONE, 4)]
    rng.shuffle(questions)
    return User(f"user{index}", facts, body + questions)


def current_keys(fact: Fact, corrected: bool) -> list[list[str]]:
    return fact.correction[1] if corrected and fact.correction else fact.keys
