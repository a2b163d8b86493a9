"""What a plain message asks of memory: "what do you know about me?", "forget that", and
direct questions that a note answers ("What is my cat called?" -> the ``pet:cat`` note).

A direct question is answered from the note itself, the way "remember that" is
acknowledged: a 135M model given the note in its prompt cannot be relied on to repeat it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_LIST = re.compile(
    r"^\s*(?:so\s+|ok\s+|hey\s+)?(?:what|tell me what|show me what|list what|what else)\s+(?:do|did|else do)?\s*"
    r"(?:you\s+)?(?:know|remember|have|keep|store|stored|kept)\s+(?:about|on|of)\s+me\b.*$"
    r"|^\s*(?:what are|show me|list|show)\s+(?:my|all my|your)\s+(?:notes|memories)\b.*$"
    r"|^\s*what have you (?:remembered|learned|learnt|kept|stored)(?: about me)?\s*\??\s*$",
    re.I,
)
_FORGET_THAT = re.compile(
    r"^\s*(?:please\s+|pls\s+|ok\s+|actually,?\s+|no,?\s+|oops,?\s+)?(?:forget|delete|erase|remove|don't remember|"
    r"do not remember|never mind|scratch)\s+(?:that|this|it|what i (?:just )?(?:said|told you)|that note|the last"
    r"(?: note)?|my last (?:message|note))\s*(?:please)?[.!]*\s*$",
    re.I,
)


_REQUEST = re.compile(
    r"^\s*(?:any|suggest|recommend|give|help|plan|tell|write|show|find|what|how|which|where|when|should|can|could|"
    r"would|is|are|do|does|ideas?|tips?)\b",
    re.I,
)


def asks_something(text: str) -> bool:
    """Whether ``text`` asks a question or for something (an answer can start from a note)."""
    return "?" in text or bool(_REQUEST.match(text))


def asks_to_list(text: str) -> bool:
    """ "what do you know about me?" """
    return bool(_LIST.match(text.strip()))


def asks_to_forget_that(text: str) -> bool:
    """ "forget that" """
    return bool(_FORGET_THAT.match(text.strip()))


@dataclass(frozen=True)
class Asked:
    """A direct question about the user: the note kinds and slots that answer it."""

    slots: tuple[str, ...]  # exact slots ("pet:cat") or kinds followed by ":" ("allergy:") or whole kinds ("home")


_REL = (
    r"wife|husband|partner|boyfriend|girlfriend|fianc[ée]e?|spouse|son|daughter|kid|child|baby|mother|mom|mum|"
    r"father|dad|brother|sister|grandmother|grandma|granny|grandfather|grandpa|aunt|uncle|cousin|niece|nephew|"
    r"best friend|friend|boss|roommate|flatmate|twin|pet|cat|dog|kitten|puppy|rabbit|bunny|hamster|parrot|bird|"
    r"budgie|fish|goldfish|horse|pony|tortoise|turtle|guinea pig|snake|lizard|gecko|ferret|chinchilla|rat|mouse"
)
_PETS = {
    "pet",
    "cat",
    "dog",
    "kitten",
    "puppy",
    "rabbit",
    "bunny",
    "hamster",
    "parrot",
    "bird",
    "budgie",
    "fish",
    "goldfish",
    "horse",
    "pony",
    "tortoise",
    "turtle",
    "guinea pig",
    "snake",
    "lizard",
    "gecko",
    "ferret",
    "chinchilla",
    "rat",
    "mouse",
}
_Q = (
    r"^\s*(?:(?:so|and|ok|okay|hey|quick question|remind me)[,:]?\s+)*"
    r"(?:do you (?:know|remember)\s+|can you tell me\s+)?"
)
_QUESTIONS: list[tuple[re.Pattern[str], str]] = [
    (
        re.compile(
            _Q + r"(?:what(?:'s| is) my name|who am i|what do you call me|what should you call me|"
            r"(?:do you (?:know|remember) )?my name)\b",
            re.I,
        ),
        "name",
    ),
    (
        re.compile(
            _Q + r"(?:where do i live|where am i (?:based|living)|what (?:city|town|country) (?:do i live|am i)"
            r"(?: in)?|where(?:'s| is) my home|where did i move)\b",
            re.I,
        ),
        "home",
    ),
    (re.compile(_Q + r"(?:where am i from|where was i born|where did i grow up)\b", re.I), "origin"),
    (
        re.compile(
            _Q + r"(?:what do i do(?: for (?:work|a living))?|what(?:'s| is) my (?:job|profession|occupation|"
            r"work)|where do i work|what is my line of work)\s*\??\s*$",
            re.I,
        ),
        "work",
    ),
    (re.compile(_Q + r"(?:what am i (?:studying|learning)|what do i study)\b", re.I), "study"),
    (
        re.compile(
            _Q + r"(?:what am i allergic to|am i allergic to|do i have (?:any )?(?:food )?allergies|what are my "
            r"allergies|what allergies do i have)\b",
            re.I,
        ),
        "allergy:",
    ),
    (
        re.compile(
            _Q + r"(?:what(?:'s| is) my diet|am i (?:a )?(?:vegetarian|vegan|pescatarian)|what (?:can't|can i not|"
            r"don't|do i not) i? ?eat|do i eat meat|what do i (?:not )?eat)\b",
            re.I,
        ),
        "diet",
    ),
    (re.compile(_Q + r"(?:how old am i|what(?:'s| is) my age)\b", re.I), "age"),
    (re.compile(_Q + r"(?:what are my hobbies|what do i do for fun)\b", re.I), "hobby:"),
    (re.compile(_Q + r"(?:what do i (?:like|love|enjoy|hate|dislike))\s*\??\s*$", re.I), "taste:"),
]
_NAMED = re.compile(
    _Q + rf"(?:what(?:'s| is| was) (?:the name of )?my (?P<a>{_REL})(?:'s name| called| named)?|what did (?:i|we) "
    rf"(?:call|name) (?:my|our) (?P<b>{_REL})|who(?:'s| is) my (?P<c>{_REL})|(?:do you (?:know|remember) )?my "
    rf"(?P<d>{_REL})'s name)\s*\??\s*$",
    re.I,
)
_BIRTHDAY = re.compile(
    _Q + rf"when(?:'s| is| was) (?:my|our) (?:(?P<rel>{_REL})'s )?(?P<what>birthday|anniversary)"
    r"|when was i born",
    re.I,
)
_WHEN_IS = re.compile(_Q + r"when(?:'s| is| was) my (?P<v>(?:[\w-]+ )?[\w-]+)\s*\??\s*$", re.I)
_FAVOURITE = re.compile(_Q + r"what(?:'s| is) my favou?rite (?P<v>[\w-]+(?: [\w-]+)?)\s*\??\s*$", re.I)


def direct_question(text: str) -> Asked | None:
    """The slots a direct question about the user asks for, if it is one."""
    text = text.strip()
    if not text.endswith("?") and not re.match(r"^\s*(?:remind me|tell me)\b", text, re.I):
        return None
    if match := _NAMED.match(text):
        rel = next(v for v in match.groupdict().values() if v).lower()
        return Asked((f"pet:{rel}",) if rel in _PETS else (f"family:{rel}",))
    if match := _BIRTHDAY.match(text):
        if match.group("what") and match.group("what").lower() == "anniversary":
            return Asked(("anniversary",))
        rel = (match.group("rel") or "self").lower()
        return Asked((f"birthday:{rel}",))
    if match := _FAVOURITE.match(text):
        return Asked((f"favourite:{match.group('v').lower()}",))
    for pattern, slot in _QUESTIONS:
        if pattern.match(text):
            return Asked((slot,))
    if match := _WHEN_IS.match(text):
        return Asked((f"plan:{match.group('v').lower()}",))
    return None


def answers(asked: Asked, slot: str) -> bool:
    """Whether a note kept under ``slot`` answers ``asked``."""
    for wanted in asked.slots:
        if wanted.endswith(":") and slot.startswith(wanted):
            return True
        if slot == wanted or slot.split(":", 1)[0] == wanted:
            return True
        if wanted.startswith("plan:") and slot.startswith("plan:") and wanted[5:].split()[-1] in slot[5:].split():
            return True
    return False
