"""What a person says about themselves, as notes: rules over their own words, no model.

:func:`extract_facts` finds the statements a user makes about themselves in an ordinary
message ("I live in Lisbon and I work as a nurse", "my cat is called Zorblax") and
returns each as a :class:`Fact`: a *kind* (home, work, pet...), a *slot* (what a newer
statement about the same thing replaces: "home", "pet:cat") and the note's text, a fact
about the user in the third person ("They live in Lisbon."), because a small model given
"I live in Lisbon" answers as if it were the user. ``retracts`` marks "I no longer live
in Lisbon": the slot's note is deleted.

Never kept: a clause that holds a secret (passwords, card and account numbers, what the
training redactor masks), questions, wishes and conditions, and what is said about other
people beyond their relation to the user (a relative's or pet's name and birthday).
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass

from agent_core.training.redact import CARD, EMAIL, PHONE

MAX_NOTE_CHARS = 500


@dataclass(frozen=True)
class Fact:
    # name, home, origin, work, study, diet, allergy, health, pet, family, birthday, taste, favourite, age, plan,
    # hobby, language, vehicle
    kind: str
    slot: str  # a newer fact with the same slot replaces the older note ("home", "pet:cat")
    text: str  # third person: "They live in Lisbon."
    retracts: bool = False  # "I no longer live in Lisbon": delete the slot's note, keep nothing


# --- first person to third, third to second ------------------------------------------

_THIRD = [  # (pattern, replacement), applied in order, case-insensitive, on whole words
    (r"\bI am\b|\bI'm\b|\bIm\b", "they are"),
    (r"\bI was\b", "they were"),
    (r"\bI've\b", "they have"),
    (r"\bI'll\b", "they will"),
    (r"\bI'd\b", "they would"),
    (r"\bI\b", "they"),
    (r"\bme\b", "them"),
    (r"\bmy\b", "their"),
    (r"\bmine\b", "theirs"),
    (r"\bmyself\b", "themselves"),
    (r"\bwe are\b|\bwe're\b", "they are"),
    (r"\bwe were\b", "they were"),
    (r"\bwe\b", "they"),
    (r"\bour\b", "their"),
    (r"\bus\b", "them"),
]
_SECOND = [
    (r"\bthey are\b", "you are"),
    (r"\bthey were\b", "you were"),
    (r"\bthey\b", "you"),
    (r"\bthemselves\b", "yourself"),
    (r"\bthem\b", "you"),
    (r"\btheirs\b", "yours"),
    (r"\btheir\b", "your"),
]


def _swap(text: str, table: list[tuple[str, str]]) -> str:
    for pattern, replacement in table:
        text = re.sub(pattern, replacement, text, flags=re.I)
    return text


def _sentence(text: str) -> str:
    text = re.sub(r"\s+", " ", text).strip().rstrip(",;:")
    if not text:
        return text
    text = text[0].upper() + text[1:]
    return text if text[-1] in ".!?" else text + "."


def third_person(text: str) -> str:
    """``"my cat is called Zorblax"`` -> ``"Their cat is called Zorblax."``"""
    return _sentence(_swap(text.rstrip(".!"), _THIRD))


def second_person(note: str) -> str:
    """A note as said to its user: ``"Their cat is called Zorblax."`` -> ``"your cat is called Zorblax."``"""
    text = _swap(note, _SECOND)
    return text[0].lower() + text[1:] if text[:2] != "I " else text


# --- what is never kept ------------------------------------------------------------------

_SECRET = re.compile(
    r"\b(?:pass ?words?|pass ?codes?|pass ?phrases?|pins?|pin codes?|security codes?|cvv|cvc|ssn|social security"
    r"|iban|account numbers?|card numbers?|credit cards?|debit cards?|sort codes?|routing numbers?|api keys?"
    r"|tokens?|secret (?:key|code|word|question|answer)s?|code ?words?|private key|login|username|user name"
    r"|seed phrase|recovery (?:code|phrase)s?)\b",
    re.I,
)


def holds_secret(text: str) -> bool:
    """Whether ``text`` names or holds a secret (never kept as a note)."""
    if _SECRET.search(text) or EMAIL.search(text):
        return True
    return bool(CARD.search(text) or any(len(re.sub(r"\D", "", m.group())) >= 7 for m in PHONE.finditer(text)))


# --- the rules ---------------------------------------------------------------------------

_LEAD = re.compile(
    r"^(?:(?:oh|ok|okay|well|also|btw|by the way|fyi|actually|anyway|so|and|but|now|just so you know|"
    r"for the record|for context|just to let you know|to be clear|as you know|you know what|hey|hi|hello|"
    r"quick note|note that|please note that|remember that|please remember that|in fact|honestly|yeah|yes|no)"
    r"[,:!]?\s+)+",
    re.I,
)
_NOT_A_STATEMENT = re.compile(
    r"^(?:if|when|whenever|unless|maybe|perhaps|what|where|who|whom|whose|why|how|which|do|does|did|is|are|am|"
    r"can|could|would|should|will|shall|may|might|i wish|i wonder|i wondered|i hope|i guess|i suppose|i think|"
    r"i thought|i want|i wanted|i would|i'd|i need|i'd like|i would like|imagine|suppose|pretend|let's|tell me|"
    r"say|write|give|show|help|explain)\b",
    re.I,
)
_CLAUSES = re.compile(
    r"(?<=[.!?;])(?<!\bDr\.)(?<!\bMr\.)(?<!\bMs\.)(?<!\bMrs\.)(?<!\bProf\.)(?<!\bSt\.)\s+|\n+"
    r"|\s*,?\s+(?:and|but|so|plus|though|although|since|because|as|cause)\s+"
    r"(?=(?:i|i'm|i've|my|we|we're|our|call me)\b)"
    r"|[,:]\s+(?=(?:i|i'm|i've|my|we|we're|our|call me)\b)|\s+-+\s+|\s*[—–]\s*",
    re.I,
)
# chatter at the end of a statement, left out of the note ("I live in Lisbon btw", "... last month")
_TRAILING = re.compile(
    r"(?:\s*,?\s+(?:btw|fyi|lol|haha|by the way|just so you know|these days|at the moment|right now|now|"
    r"last (?:week|month|year)|a (?:few|couple of) (?:weeks|months|years) ago|recently|actually|too|as well|"
    r"anyway|though|for (?:\w+|a few|a couple of) (?:years|months|weeks)|here))+\s*[.!]*$",
    re.I,
)
_NEGATED = re.compile(r"\b(?:no longer|not any ?more|anymore|any more)\b", re.I)

_RELATIONS = (
    r"wife|husband|partner|boyfriend|girlfriend|fianc[ée]e?|spouse|son|daughter|kid|child|baby|mother|mom|mum|"
    r"father|dad|brother|sister|grandmother|grandma|granny|grandfather|grandpa|aunt|uncle|cousin|niece|nephew|"
    r"best friend|friend|boss|roommate|flatmate|stepson|stepdaughter|twin"
)
_PETS = (
    r"pet|cat|dog|kitten|puppy|rabbit|bunny|hamster|parrot|bird|budgie|fish|goldfish|horse|pony|tortoise|"
    r"turtle|guinea pig|snake|lizard|gecko|ferret|chinchilla|rat|mouse"
)
_JOBS = (
    r"nurse|teacher|doctor|physician|surgeon|engineer|developer|programmer|coder|designer|student|lawyer|"
    r"attorney|accountant|chef|cook|driver|writer|author|artist|musician|scientist|researcher|manager|"
    r"consultant|pharmacist|dentist|architect|electrician|plumber|carpenter|farmer|firefighter|police officer|"
    r"paramedic|pilot|photographer|journalist|librarian|cashier|waiter|waitress|barista|baker|mechanic|"
    r"therapist|psychologist|social worker|vet|veterinarian|translator|professor|lecturer|tutor|freelancer|"
    r"entrepreneur|data scientist|analyst|receptionist|secretary|cleaner|nanny|caregiver|carer|soldier|banker|"
    r"economist|biologist|chemist|physicist|mathematician|editor|marketer|salesperson|sales rep|shop assistant|"
    r"midwife|optician|paralegal|judge|firefighter|gardener|builder|welder|tailor|hairdresser|barber|"
    r"civil servant|clerk|technician|intern|postdoc|phd student|pianist|guitarist|actor|actress|dancer|coach|"
    r"personal trainer|trainer|priest|pastor|rabbi|imam|retiree|homemaker|stay-at-home (?:mom|dad|parent)"
)
_DIETS = (
    r"vegetarian|vegan|pescatarian|pescetarian|keto|paleo|gluten[- ]free|dairy[- ]free|lactose[- ]intolerant|"
    r"coeliac|celiac|[\w]+[- ]intolerant|halal|kosher|teetotal|teetotaller|on a diet|on a \w+ diet|plant[- ]based"
)
_CONDITIONS = (
    r"(?:type [12] )?diabetes|diabetic|asthma|asthmatic|celiac disease|coeliac disease|high blood pressure|"
    r"migraines?|arthritis|adhd|anxiety|depression|epilepsy|a bad back|back pain|a bad knee|insomnia|ibs|"
    r"crohn's(?: disease)?|colour[- ]blind|color[- ]blind|dyslexia|dyslexic|autism|autistic|pregnant|"
    r"hearing loss|a heart condition|long covid|hay ?fever|eczema|psoriasis"
)
_MONTH = (
    r"jan(?:uary)?|feb(?:ruary)?|mar(?:ch)?|apr(?:il)?|may|june?|july?|aug(?:ust)?|sep(?:t(?:ember)?)?|oct(?:ober)?|"
    r"nov(?:ember)?|dec(?:ember)?"
)
_WHEN = re.compile(
    rf"\b(?:today|tonight|tomorrow|this (?:week|weekend|month|year|summer|winter|spring|autumn|fall|evening|morning|"
    rf"afternoon|monday|tuesday|wednesday|thursday|friday|saturday|sunday)|next (?:\w+)|in (?:\d+|a|two|three|a few) "
    rf"(?:days?|weeks?|months?|years?)|on (?:the )?\d|on (?:monday|tuesday|wednesday|thursday|friday|saturday|sunday)"
    rf"|(?:{_MONTH})\b|\d{{1,2}}(?:st|nd|rd|th)\b|\d{{4}}-\d\d-\d\d|soon|later this)",
    re.I,
)
_RELATIVE = re.compile(r"\b(?:today|tonight|tomorrow|this \w+|next \w+|in (?:\d+|a|two|three|a few) \w+|soon)\b", re.I)
_ABOUT_THE_BOT = re.compile(
    r"^(?:it|this|that|these|those|you|your|talking|chatting|the way you|how you|when you)\b", re.I
)
_NAME = r"(?P<v>[A-Z][\w'-]*(?:\s+[A-Z][\w'-]*)?)"
_OBJECT = r"(?P<v>[^,;]{2,80}?)"


def _key(words: str) -> str:
    words = re.sub(r"^(?:the|a|an|some|all|any|most|really|very)\s+", "", words.lower().strip(" .!"))
    return re.sub(r"[^\w]+", " ", words).strip()


@dataclass(frozen=True)
class _Rule:
    kind: str
    pattern: re.Pattern[str]
    slot: str  # a format string over the match's named groups, e.g. "pet:{rel}"
    text: str = ""  # the note, a format string over the groups as written ("They live in {v} now."); "": the clause


def _rule(kind: str, slot: str, pattern: str, text: str = "") -> _Rule:
    # what follows a comma that no rule reads ("..., so be careful") is left out of the note
    return _Rule(kind, re.compile(pattern + r"(?P<tail>\s*,.*?)?\s*[.!]*$", re.I), slot, text)


_RULES: list[_Rule] = [
    _rule(
        "name",
        "name",
        rf"^(?:my name is|my name's|call me|you can call me|please call me|i'm called|"
        rf"i am called|i go by|everyone calls me|people call me)\s+{_NAME}",
        "Their name is {v}.",
    ),
    _rule(
        "home",
        "home",
        rf"^(?:i|we)(?: now| currently| still)? (?:live|living|am living|are living|'m living|"
        rf"'re living|reside)(?: with [\w' ]{{2,30}}?)? (?:in|near|outside|just outside) {_OBJECT}",
    ),
    _rule(
        "home", "home", rf"^(?:i'm|i am|we're|we are)(?: now| currently)? (?:based|living) (?:in|near|out of) {_OBJECT}"
    ),
    _rule(
        "home",
        "home",
        rf"^(?:i|we)(?: just| recently| finally)? (?:moved|relocated) (?:to|back to) {_OBJECT}",
        "They live in {v} now.",
    ),
    _rule(
        "home",
        "home",
        rf"^(?:i|we)(?:'ve| have)(?: just| recently)? (?:moved|relocated) (?:to|back to) {_OBJECT}",
        "They live in {v} now.",
    ),
    _rule("origin", "origin", rf"^(?:i'm|i am|i come|i came) (?:originally )?from {_OBJECT}"),
    _rule("origin", "origin", rf"^(?:i was born|i grew up) in {_OBJECT}"),
    _rule("work", "work", rf"^i(?: now| currently)? work (?:as|at|for|in) {_OBJECT}"),
    _rule("work", "work", rf"^(?:my job is|my job's|my work is|i'm employed as|i am employed as|for work i) {_OBJECT}"),
    _rule(
        "work",
        "work",
        rf"^(?:i'm|i am)(?: now| currently)? (?:an? |the )?(?:[\w-]+ ){{0,2}}(?:{_JOBS})(?:\s+{_OBJECT})?",
    ),
    _rule(
        "work", "work", r"^(?:i'm|i am)(?: now)? (?:retired|unemployed|self-employed|between jobs|a stay-at-home \w+)"
    ),
    _rule("study", "study", rf"^i(?:'m| am)? (?:study|studying|major in|majoring in|learning|learn) {_OBJECT}"),
    _rule(
        "diet",
        "diet",
        rf"^(?:i'm|i am|i've been|i have been|i became|i went|we're|we are)(?: now| strictly| mostly"
        rf"| fully)? (?:a |an )?(?:strict |committed )?(?:{_DIETS})\b(?P<rest>.*)",
    ),
    _rule("diet", "diet:{v}", rf"^i (?:don't|do not|never|can't|cannot|won't|no longer) (?:eat|drink) {_OBJECT}"),
    _rule(
        "allergy",
        "allergy:{v}",
        rf"^(?:i'm|i am|i've always been|i have always been)(?: severely| very| deathly"
        rf"| mildly| badly| slightly| seriously)? allergic to {_OBJECT}",
    ),
    _rule("allergy", "allergy:{v}", rf"^i have (?:an? |a severe |a mild )?{_OBJECT} allergy"),
    _rule(
        "health",
        "health:{v}",
        rf"^i(?: have| have got|'ve got| got| suffer from| was diagnosed with| live with) "
        rf"(?P<v>{_CONDITIONS})",
    ),
    _rule("health", "health:{v}", rf"^(?:i'm|i am) (?P<v>{_CONDITIONS})"),
    _rule(
        "pet",
        "pet:{rel}",
        rf"^(?:my|our) (?P<rel>{_PETS})(?:'s name)? (?:is called|is named|'s called|'s named|is|'s) "
        rf"{_NAME}",
    ),
    _rule(
        "pet",
        "pet:{rel}",
        rf"^(?:i|we) (?:have|own|have got|'ve got) an? (?:\w+ )?(?P<rel>{_PETS}) "
        rf"(?:called|named) {_NAME}",
    ),
    _rule(
        "pet",
        "pets",
        rf"^(?:i|we) (?:have|own|have got|'ve got) (?:a|an|one|two|three|four|five|\d+) (?:\w+ )?"
        rf"(?:{_PETS})s?(?P<rest>.*)",
    ),
    _rule(
        "family",
        "family:{rel}",
        rf"^my (?P<rel>{_RELATIONS})(?:'s name)? (?:is called|is named|'s called|'s named"
        rf"|'s name is|name is) {_NAME}",
    ),
    _rule("family", "family:{rel}", rf"^my (?P<rel>{_RELATIONS})'s name is {_NAME}"),
    _rule(
        "family",
        "family:count:{rel}",
        r"^(?:i|we) (?:have|have got|'ve got) (?:a|an|one|two|three|four|five|six|"
        r"\d+) (?:(?:little|young|grown-up|older|younger|teenage|baby|twin) )?"
        r"(?P<rel>kids?|children|child|sons?|daughters?|brothers?|sisters?|"
        r"siblings?|grandchildren|grandkids|twins)(?P<rest>.*)",
    ),
    _rule(
        "family",
        "relationship",
        r"^(?:i'm|i am|we're|we are)(?: happily| recently| newly)? (?:married|single|"
        r"divorced|engaged|widowed|separated)(?P<rest>.*)",
    ),
    _rule(
        "family",
        "parent",
        r"^(?:i'm|i am) a (?:mom|mum|dad|mother|father|parent|grandparent|grandmother|"
        r"grandfather)(?P<rest>.*)",
    ),
    _rule("birthday", "birthday:{rel}", rf"^(?:my|our) (?P<rel>{_RELATIONS}|{_PETS})'s birthday is {_OBJECT}"),
    _rule("birthday", "birthday:self", rf"^my birthday is {_OBJECT}"),
    _rule("birthday", "birthday:self", rf"^i was born on {_OBJECT}"),
    _rule("birthday", "anniversary", rf"^(?:our|my) (?:wedding )?anniversary is {_OBJECT}"),
    _rule(
        "age",
        "age",
        r"^(?:i'm|i am|i just turned|i turned|i'll be|i will be) (?P<v>\d{1,3})(?: years old| yrs old"
        r"| years of age|)(?P<rest>.*)",
    ),
    _rule("favourite", "favourite:{what}", rf"^my (?:absolute )?favou?rite (?P<what>[\w-]+(?: [\w-]+)?) is {_OBJECT}"),
    _rule(
        "taste",
        "taste:{v}",
        rf"^(?:i|we) (?:really |absolutely |totally |just |do |simply )?(?:love|like|enjoy|"
        rf"adore|am into|'m into|am a (?:big |huge )?fan of|'m a (?:big |huge )?fan of|"
        rf"prefer) {_OBJECT}",
    ),
    _rule(
        "taste",
        "taste:{v}",
        rf"^(?:i'm|i am|we're|we are) (?:a (?:big |huge )?fan of|really into|into|crazy about|"
        rf"obsessed with|passionate about|fond of|keen on) {_OBJECT}",
    ),
    _rule(
        "taste",
        "taste:{v}",
        rf"^(?:i|we) (?:really |absolutely |totally |just |honestly )?(?:hate|dislike|"
        rf"can't stand|cannot stand|don't like|do not like|detest|loathe|am not a fan of|"
        rf"'m not a fan of|don't enjoy|do not enjoy) {_OBJECT}",
    ),
    _rule(
        "hobby",
        "hobby:{v}",
        r"^(?:i|we) (?:play|practi[cs]e|go|do|collect|paint|knit|sing|run|swim|climb|surf|"
        r"ride|bake|garden|hike) (?P<v>[^,;]{2,60}?)(?: (?:every|each|on|at|most|twice|once|"
        r"three times)\b.*)?",
    ),
    _rule(
        "plan",
        "plan:{v}",
        rf"^(?:i'm|i am|we're|we are|i'll be|we'll be) (?:going|flying|travel+ing|heading|"
        rf"driving|moving|off) (?:to|on) {_OBJECT}",
    ),
    _rule(
        "plan",
        "plan:{v}",
        rf"^(?:i|we) (?:have|'ve got|have got) (?:an?|my|our) {_OBJECT} (?:on|next|this|tomorrow|"
        rf"tonight|in|coming up)\b.*",
    ),
    _rule(
        "plan",
        "plan:{v}",
        r"^(?:my|our) (?P<v>(?:[\w-]+ )?(?:exam|interview|appointment|flight|trip|wedding|"
        r"surgery|operation|holiday|vacation|meeting|party|race|marathon|concert|date|deadline|"
        r"move|presentation|test|dentist appointment|doctor's appointment)) is (?P<rest>[^,;]{2,80}?)",
    ),
    # more ways of saying the same things
    _rule(
        "home", "home", rf"^(?:i|we)(?:'ve| have)(?: been)? (?:living|lived|based|settled) (?:in|near|out of) {_OBJECT}"
    ),
    _rule(
        "home",
        "home",
        rf"^(?:i|we)(?: just| recently| finally)? moved into (?:a |an |our |my )?(?:new |little |small )?"
        rf"(?:flat|apartment|house|place|home|condo|studio)s? (?:in|near) {_OBJECT}",
        "They live in {v} now.",
    ),
    _rule(
        "home", "home", rf"^(?:home (?:for me |for us )?is|my home(?: base)? is(?: in)?) {_OBJECT}", "They live in {v}."
    ),
    _rule("origin", "origin", rf"^my (?:home ?town|birthplace|home country) is {_OBJECT}"),
    _rule(
        "work",
        "work",
        rf"^i(?: now| currently| mostly| mainly| usually)? work(?: nights| days| night shifts| shifts| weekends|"
        rf" part[- ]time| full[- ]time| remotely| from home)+(?: as| at| for| in) {_OBJECT}",
    ),
    _rule(
        "work",
        "work",
        rf"^i(?: now| currently)? (?:teach|lecture|tutor|run|own|manage|nurse|design|edit|write for|drive for|cook at|"
        rf"volunteer at|volunteer as) {_OBJECT}",
    ),
    _rule("work", "work", rf"^i do {_OBJECT} for a living"),
    _rule(
        "pet",
        "pet:{rel}",
        rf"^(?:i|we)(?:'ve| have)? (?:got|have|own|adopted|just adopted|rescued) an? (?:[\w-]+ ){{0,2}}"
        rf"(?P<rel>{_PETS}|retriever|labrador|poodle|terrier|spaniel|beagle|husky|collie|tabby|kitty|pup)"
        rf",? (?:called|named) {_NAME}",
    ),
    _rule(
        "pet",
        "pet:{rel}",
        rf"^(?:my|our) (?P<rel>{_PETS}),? (?P<v>[A-Z][\w'-]*),? (?:is|was|just|has|loves|[a-z]+(?:ed|s))\b.*",
        "Their {rel} is called {v}.",
    ),
    _rule(
        "diet",
        "diet",
        r"^(?:i|we) (?:follow|eat|am on|'m on|keep|stick to|try to eat) (?:a |an )?(?:strict |mostly |"
        r"fully )?(?P<v>[\w-]+(?: [\w-]+)?) diet",
    ),
    _rule("diet", "diet:{v}", rf"^i (?:stopped|quit|gave up|cut out) (?:eating |drinking )?{_OBJECT}"),
    _rule("allergy", "allergy:{v}", rf"^i(?:'ve| have)? got an? (?:severe |mild |bad )?{_OBJECT} allergy"),
    _rule(
        "allergy",
        "allergy:{v}",
        r"^(?P<v>[\w -]{2,40}?) makes me (?:really |very |so |quite )?(?:sick|ill|itchy|break out)",
    ),
    _rule(
        "birthday",
        "birthday:{rel}",
        rf"^my (?P<rel>{_RELATIONS}|{_PETS}) turns (?:\d+|\w+) (?:on|in|next|this) {_OBJECT}",
    ),
    _rule("birthday", "birthday:self", rf"^it's my birthday (?:on|next|this|in) {_OBJECT}"),
    _rule(
        "name",
        "name",
        r"^(?:you can call me|call me|please call me|i go by|my name is)\s+"
        r"(?P<v>(?:dr|mr|mrs|ms|mx|prof)\.?\s+[A-Z][\w'-]*)",
        "Their name is {v}.",
    ),
    _rule("taste", "taste:{v}", rf"^(?:big|huge|massive|total) fan of {_OBJECT}(?: here)?"),
    _rule("plan", "plan:wedding", r"^(?:i'm|i am|we're|we are) getting married(?P<rest>.*)"),
    _rule("plan", "plan:{v}", rf"^(?:i'm|i am|we're|we are) (?:training|preparing|saving|studying) for {_OBJECT}"),
    _rule("family", "parent", r"^(?:i'm|i am) an? (?:[\w-]+ )?(?:mom|mum|dad|mother|father|parent)(?P<rest>.*)"),
    _rule("language", "language", rf"^i (?:speak|am fluent in|'m fluent in) {_OBJECT}"),
    _rule("vehicle", "vehicle", rf"^i (?:drive|ride) an? {_OBJECT}"),
    _rule(
        "hobby",
        "hobby:{v}",
        r"^(?:i|we)(?: usually| often| always| sometimes| regularly| love to| like to)? (?:play|practi[cs]e|go|do|"
        r"collect|paint|knit|sing|run|swim|climb|surf|ride|bake|garden|hike) (?P<v>[^,;]{2,60}?)(?: (?:every|each|"
        r"on|at|most|twice|once|three times)\b.*)?",
    ),
]
_NEEDS_WHEN = {"plan"}  # a plan is kept only with a time ("on Friday", "next week")
_FOOD_WORDS = re.compile(r"\b(?:meat|fish|pork|beef|chicken|dairy|eggs?|gluten|nuts?|sugar|alcohol|seafood)\b", re.I)


def _clauses(text: str) -> list[str]:
    return [c.strip() for c in _CLAUSES.split(text) if c and c.strip()]


def _clean(clause: str) -> str:
    clause = _LEAD.sub("", clause.strip().strip("\"'“”")).strip()
    clause = _TRAILING.sub("", clause.replace("’", "'")).strip()
    return re.sub(r"^i\b", "I", clause)


def extract_facts(text: str, *, now: float | None = None) -> list[Fact]:
    """The facts ``text`` states about its writer, in order; a later one about the same slot wins."""
    found: dict[str, Fact] = {}
    for raw in _clauses(text):
        clause = _clean(raw)
        if not clause or raw.rstrip().endswith("?") or _NOT_A_STATEMENT.match(clause) or holds_secret(clause):
            continue
        fact = _match(clause, now)
        if fact is not None:
            found.pop(fact.slot, None)
            found[fact.slot] = fact
    return list(found.values())


def _match(clause: str, now: float | None) -> Fact | None:
    negated = bool(_NEGATED.search(clause))
    plain = _NEGATED.sub("", clause).replace(" not ", " ").replace("n't ", " ") if negated else clause
    plain = re.sub(r"\s+", " ", plain).strip()
    for rule in _RULES:
        match = rule.pattern.match(plain)
        if match is None:
            continue
        groups = {k: _key(v) for k, v in match.groupdict().items() if v is not None}
        value = groups.get("v", "")
        if rule.kind == "taste" and (_ABOUT_THE_BOT.match(value) or not value):
            return None
        if rule.kind in _NEEDS_WHEN and not _WHEN.search(clause):
            return None
        slot = rule.slot.format(v=" ".join(value.split()[:4]), rel=groups.get("rel", ""), what=groups.get("what", ""))
        if negated and rule.kind not in ("diet",):
            return Fact(rule.kind, slot, third_person(clause), retracts=True)
        if negated:  # "I'm not vegetarian anymore": the diet note goes
            return Fact(
                rule.kind, slot, third_person(clause), retracts=slot == "diet" or not _FOOD_WORDS.search(clause)
            )
        said = {k: v.strip() for k, v in match.groupdict().items() if v is not None}
        kept = plain[: match.start("tail")] if said.get("tail") else plain
        note = _sentence(rule.text.format(**said)) if rule.text else third_person(kept)
        if rule.kind == "plan" and now is not None and _RELATIVE.search(clause):
            day = dt.date.fromtimestamp(now)
            note = f"{note[:-1]} (said on {day.day} {day:%B %Y})."
        return Fact(rule.kind, slot, note[:MAX_NOTE_CHARS])
    return None


# --- "remember that ..." -------------------------------------------------------------------

_REMEMBER = re.compile(
    r"^\s*(?:(?:hey|ok|okay|so|oh|also|and|btw|by the way)[,!]?\s+)?(?:please\s+|can you\s+|could you\s+|"
    r"pls\s+)?(?:remember|note|keep in mind|don't forget|do not forget|make a note)(?:\s+that|\s*:|,)\s+(?P<note>.+)$",
    re.I | re.S,
)


def explicit_note(text: str) -> tuple[str, str] | None:
    """``"remember that my cat is Tom. What food suits him?"`` -> ``("my cat is Tom", "What food suits him?")``:
    the note a "remember that ..." message asks to keep, and what else it says (a question
    to answer too); None if it is not one."""
    match = _REMEMBER.match(text)
    if not match:
        return None
    body = match.group("note").strip()
    parts = re.split(r"(?<=[.!;])\s+|\n+", body, maxsplit=1)
    note, rest = parts[0], parts[1] if len(parts) > 1 else ""
    if "?" in note and not rest:  # "remember that I'm vegan, what can I eat?"
        head, _, tail = note.rpartition(",")
        note, rest = (head, tail.strip()) if head and tail.strip().endswith("?") else (note, rest)
    note = note.strip().rstrip(".!;,")[:MAX_NOTE_CHARS]
    return (note, rest.strip()) if note else None
