"""Decoding-time style control: the local model's reply *has* the style it was asked for.

A 135M model barely follows "use a bulleted list" or "add a few emoji" in its system
prompt (measured: emoji 0 %, bullets 0-12 %), so the local backend does not only ask: it
steers each token choice. :class:`StyleControl` is a transformers ``LogitsProcessor``
for one request; it watches the reply as it grows and, before each token is sampled,
changes the scores:

- **format** ``bullets``: the reply opens with a list marker ("- "), and each sentence
  ends its item: a line break and the next marker follow it. A number straight after
  the marker ("- 1.") is blocked. ``prose``: no line breaks and no list markers, not
  even an inline "1. ... 2. ..." numbering.
- **emoji** ``some``: at the end of the first sentence (then every second one, at most
  three), the model writes an emoji, chosen by the model itself among common ones: the
  scores are restricted to a trie of their token sequences, so it picks the first token
  it finds most likely, then the continuations. If the reply would end with none, one
  closes it. ``none``: every token that would start an emoji is blocked.
- **tone** ``formal``: contractions, "!" and casual words are blocked, and sentences
  after the first lean (a logit bias) toward formal connectives ("However",
  "Furthermore", ...), at most every other sentence. ``casual``: formal connectives are
  blocked, contractions get a bias, and the first sentence ends with "!".
- **length** ``brief``: the reply stops at a sentence end once it has two or three
  sentences (a list: three items) or about 30 tokens; ``detailed``: it cannot stop
  before most of its token budget, and close to the budget sentence ends get a bias so
  it closes cleanly.

And for every request, styled or not, a **loop guard**: a token that would repeat a
4-gram of the reply (``no_repeat_ngram``) is blocked, so is a word (four letters or
more) that the last 16 tokens already hold twice, and so is a sentence opening with
the same word as the two before it ("Reflect. Reflect. Reflect.").

The content stays the model's: the controls force only list markers, line breaks, the
end of the reply and the choice of emoji; every word is the model's own most likely one
among those allowed. What the controls need to know about the tokenizer (which tokens
end a sentence, start an emoji, ...) is read once per tokenizer into a
:class:`StyleVocab`.
"""

from __future__ import annotations

import copy
import functools
import re
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from agent_core.llm.base import GenerationRequest
from agent_core.style import Style

# Common emoji that fit most everyday replies; the model picks among them.
EMOJI = "😊 🙂 😄 😉 👍 👏 🙌 💪 💡 ✨ 🌟 🎉 🚀 🎯 ✅ 📝 📚 💤 🌙 🌞 🌱 🍎 🥗 ☕ 💧 🏃 🧘 💰 🏠 🌍 🎵 🤔 ❤️ 🔥 😎"
CASUAL_WORDS = ("hey", "hi", "cool", "awesome", "yeah", "yep", "nope", "gonna", "wanna", "gotta", "okay", "ok",
                "stuff", "guys", "kinda", "sorta", "btw", "lol", "super", "totally")  # fmt: skip
FORMAL_WORDS = ("however", "furthermore", "moreover", "additionally", "therefore", "consequently", "thus", "hence",
                "certainly", "indeed", "regarding", "shall", "kindly", "sincerely", "nevertheless")  # fmt: skip
CONNECTIVES = ("However", "Furthermore", "Moreover", "Additionally", "Therefore", "Consequently", "Indeed")
CONTRACTION = re.compile(rb"^(?:'|\xe2\x80\x99)(?:s|re|ll|ve|m|d|t)$")

BRIEF_SENTENCES = 2  # a brief prose reply ends after this many sentences once it has BRIEF_TOKENS...
BRIEF_TOKENS = 30
BRIEF_MAX_SENTENCES = 3  # ...and after this many in any case
BRIEF_ITEMS = 3  # a list has at least this many items, and a brief one this many
ITEM_TOKENS = 14  # an item this long gets a bias toward its end, so that three fit a brief budget
DETAILED_SHARE = 0.85  # a detailed reply may not end before this share of its token budget...
DETAILED_MIN_TOKENS = 120  # ...nor need more than this many tokens to be allowed to end
CLOSING_TOKENS = 12  # this close to the budget, sentence ends get a bias...
RUN_ON_TOKENS = 40  # ...and so they do in a sentence this long
CLOSING_BIAS = 4.0
CONTRACTION_BIAS = 2.0
CONTRACTIONS = 3  # a casual reply leans toward contractions until it has this many
CONNECTIVE_BIAS = 3.0
OWED_CONNECTIVE_BIAS = 12.0
MAX_EMOJI = 3
LOOP_WINDOW = 16  # the loop guard: a word may occur at most twice in this many tokens
NEG = float("-inf")

# Emoji and pictographs: U+1F000 and up (F0 9F ..), and the symbols of U+2040-2FFF (E2 81-BF:
# arrows, technical symbols, dingbats, ☀ ✨ ⭐ ...; E2 80 holds the quotes and dashes text needs).
_EMOJI_BYTES = re.compile(rb"\xf0\x9f|\xe2[\x81-\xbf]|\xf0$|\xf0\x9f$")


def _gpt2_byte_decoder() -> dict[str, int]:
    """The inverse of GPT-2's byte-to-character table, which byte-level BPE tokenizers use."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = list(printable), 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


@dataclass(frozen=True)
class StyleVocab:
    """What the controls need to know about each token of one tokenizer."""

    size: int
    eos: frozenset[int]
    newline: int | None  # the token of a single "\n"
    marker: int | None  # the list marker "-"
    period: int | None
    bang: int | None
    sentence_end: np.ndarray  # bool [size]: the token ends a sentence (. ! ? …, maybe a closing quote)
    has_newline: np.ndarray
    has_bang: np.ndarray
    apostrophe: np.ndarray  # the token holds a typographic apostrophe (U+2019, U+00B4), as in "let's"
    hashtag: np.ndarray  # the token opens a hashtag or a markdown heading ("#")
    digit: np.ndarray  # the token is digits only
    closes_number: np.ndarray  # starts with "." or ")": after a lone number, it makes "1." or "1)"
    word: np.ndarray  # the token is letters only (maybe after a space): a contraction may follow it
    spaced: np.ndarray  # the token starts with a space
    long_word: np.ndarray  # a word of four letters or more, after a space
    list_start: np.ndarray  # the token could open a list item ("-", "*", "•", "#", a digit, a lone space)
    emoji: np.ndarray  # the token could start or carry an emoji
    ends_e2: np.ndarray  # the token ends with byte E2 (a 3-byte character follows)
    emoji_tail: np.ndarray  # starts with a continuation byte 81-BF: after E2, a symbol or emoji
    contractions: np.ndarray  # "'s", "'re", ...
    casual: np.ndarray  # casual words
    formal: np.ndarray  # formal words
    connectives: np.ndarray  # formal sentence openers (space-prefixed)
    trie: dict[tuple[int, ...], tuple[int, ...]]  # emoji token prefixes -> allowed next tokens; leaves -> ()
    word_key: np.ndarray  # int [size]: tokens that are the same word ("Weather", " weather") share a key
    same_word: dict[int, list[int]]  # key -> every token with it
    _made: dict[Any, np.ndarray] = field(default_factory=dict, repr=False, compare=False)  # see :meth:`made`

    def made(self, key: Any, make: Callable[[], np.ndarray]) -> np.ndarray:
        """``make()``, made once per ``key`` and kept: the arrays a step applies (a ban's
        ceiling, a bias), so that a step costs one vectorised operation each."""
        if (made := self._made.get(key)) is None:
            made = self._made[key] = make()
        return made

    def ceiling(self, name: str) -> np.ndarray:
        """float32 [size]: -inf on the tokens of :data:`BANS` ``name``, +inf elsewhere (the
        scores' minimum with it bans those tokens)."""
        return self.made(name, lambda: np.where(BANS[name](self), np.float32(NEG), np.float32(np.inf)))

    def lift(self, mask: str, value: float) -> np.ndarray:
        """float32 [size]: ``value`` on the tokens of this vocabulary's mask ``mask``, 0 elsewhere."""
        return self.made((mask, value), lambda: np.where(getattr(self, mask), np.float32(value), np.float32(0)))

    def ids(self, mask: str) -> np.ndarray:
        """The token ids of this vocabulary's mask ``mask``."""
        return self.made(("ids", mask), lambda: np.flatnonzero(getattr(self, mask)))

    @classmethod
    def build(cls, tokenizer: Any) -> StyleVocab:
        size = len(tokenizer)
        special = set(tokenizer.all_special_ids)
        pieces = tokenizer.convert_ids_to_tokens(list(range(size)))
        decoder = _gpt2_byte_decoder()
        byte_level = all(p is None or all(c in decoder for c in p) for p in pieces[:1000])
        raw: list[bytes] = []
        for i, piece in enumerate(pieces):
            if i in special or piece is None:
                raw.append(b"")
            elif byte_level and all(c in decoder for c in piece):
                raw.append(bytes(decoder[c] for c in piece))
            else:
                raw.append(tokenizer.decode([i]).encode("utf-8", "replace"))

        def flags(test: Any) -> np.ndarray:
            return np.array([bool(b) and bool(test(b)) for b in raw])

        def single(text: str) -> int | None:
            ids = tokenizer.encode(text, add_special_tokens=False)
            return ids[0] if len(ids) == 1 else None

        def words(names: tuple[str, ...], *, capitalised: bool = True) -> np.ndarray:
            mask = np.zeros(size, dtype=bool)
            for name in names:
                for form in {name, name.capitalize()} if capitalised else {name}:
                    for text in (form, " " + form):
                        if (i := single(text)) is not None:
                            mask[i] = True
            return mask

        eos = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
        return cls(
            size=size,
            eos=frozenset(eos),
            newline=single("\n"),
            marker=single("-"),
            period=single("."),
            bang=single("!"),
            sentence_end=flags(lambda b: re.search(rb"(?<!\.)[.!?]['\")\]]*\s*$|\xe2\x80\xa6\s*$", b.rstrip(b" "))),
            has_newline=flags(lambda b: b"\n" in b),
            has_bang=flags(lambda b: b"!" in b),
            apostrophe=flags(lambda b: b"\xe2\x80\x99" in b or b"\xc2\xb4" in b or b"`" in b),
            hashtag=flags(lambda b: b.lstrip().startswith(b"#")),
            digit=flags(lambda b: b.strip().isdigit()),
            closes_number=flags(lambda b: b[:1] in (b".", b")")),
            word=flags(lambda b: re.fullmatch(rb" ?[A-Za-z]+", b) is not None),
            spaced=flags(lambda b: b.startswith(b" ")),
            long_word=flags(lambda b: re.fullmatch(rb" [A-Za-z]{4,}", b) is not None),
            list_start=flags(lambda b: re.match(rb"\s*(?:[-*#]|\xe2\x80\xa2|\d)", b) is not None or b.strip() == b""),
            emoji=flags(lambda b: _EMOJI_BYTES.search(b)),
            ends_e2=flags(lambda b: b.endswith(b"\xe2")),
            emoji_tail=flags(lambda b: 0x81 <= b[0] <= 0xBF),
            contractions=flags(CONTRACTION.match),
            casual=words(CASUAL_WORDS),
            formal=words(FORMAL_WORDS),
            connectives=words(CONNECTIVES, capitalised=False),
            trie=_emoji_trie(tokenizer),
            **_word_keys(raw),
        )


def _word_keys(raw: list[bytes]) -> dict[str, Any]:
    """Tokens that spell the same word, whatever their case or leading space, share a key."""
    keys: dict[bytes, int] = {}
    word_key = np.full(len(raw), -1, dtype=np.int64)
    same_word: dict[int, list[int]] = {}
    for i, b in enumerate(raw):
        word = b.strip().lower()
        if word.isalpha():
            key = keys.setdefault(word, len(keys))
            word_key[i] = key
            same_word.setdefault(key, []).append(i)
    return {"word_key": word_key, "same_word": same_word}


def _emoji_trie(tokenizer: Any) -> dict[tuple[int, ...], tuple[int, ...]]:
    """Every emoji of :data:`EMOJI` as its tokens after a space, as a trie: prefix ->
    allowed next tokens (a complete emoji maps to ``()``). An emoji whose tokens begin
    another's is left out, so that a complete one always ends the choice."""
    sequences = {tuple(tokenizer.encode(" " + e, add_special_tokens=False)) for e in EMOJI.split()}
    sequences = {s for s in sequences if not any(o != s and o[: len(s)] == s for o in sequences)}
    trie: dict[tuple[int, ...], set[int]] = {}
    for seq in sequences:
        for k in range(len(seq)):
            trie.setdefault(seq[:k], set()).add(seq[k])
        trie[seq] = set()
    return {prefix: tuple(sorted(nxt)) for prefix, nxt in trie.items()}


@functools.lru_cache(maxsize=8)
def vocab_for(tokenizer: Any) -> StyleVocab:
    """The tokenizer's :class:`StyleVocab`, read once (under a second) and kept."""
    return StyleVocab.build(tokenizer)


# What a step bans, by name: unions of the vocabulary's masks (StyleVocab.ceiling).
BANS: dict[str, Callable[[StyleVocab], np.ndarray]] = {
    "item opening": lambda v: v.list_start | v.digit | v.has_newline | ~v.spaced,  # after a list marker
    "in a list": lambda v: v.hashtag | (v.has_newline & ~_one_hot(v.size, v.newline)),
    "in prose": lambda v: v.has_newline | v.hashtag,
    "list start": lambda v: v.list_start,
    "closes number": lambda v: v.closes_number,
    "emoji": lambda v: v.emoji,
    "emoji tail": lambda v: v.emoji_tail,
    "casual": lambda v: v.has_bang | v.apostrophe | v.contractions | v.casual,
    "word tail": lambda v: v.word & ~v.spaced,
    "formal": lambda v: v.formal,
}

EMOJI_ACTION = -1  # in the queue of what must come next: "an emoji here"


class StyleControl:
    """A logits processor for one request: ``style`` (None: only the loop guard) over a
    reply of at most ``budget`` tokens, after a prompt of ``prompt_length`` tokens.

    Called as transformers calls a ``LogitsProcessor``: ``(input_ids [1, L], scores
    [1, vocab]) -> scores``, once per new token, with the prompt and the reply so far."""

    def __init__(
        self,
        vocab: StyleVocab,
        style: Style | None,
        *,
        prompt_length: int,
        budget: int,
        no_repeat_ngram: int = 4,
        eos: set[int] | None = None,
    ) -> None:
        self.v = vocab
        self.eos = frozenset(eos) if eos else vocab.eos  # what ends the reply (the engine's stop tokens)
        self.stop = min(self.eos) if self.eos else None  # the one forced when the reply is to end
        self.style = style
        self.prompt_length = prompt_length
        self.budget = budget
        self.n = no_repeat_ngram
        self.reply: list[int] = []
        self.queue: deque[int] = deque()  # tokens (or EMOJI_ACTION) that must come next, in order
        self.emoji_prefix: tuple[int, ...] | None = None  # inside an emoji: its tokens so far
        self.sentences = 0  # sentences (list items included) finished
        self.items = 0  # list markers written
        self.emoji = 0
        self.since_emoji = 0  # sentences since the last emoji
        self.bangs = 0
        self.formal_words = 0
        self.contracted = 0
        self.openers: list[int] = []  # the first token of each sentence
        self.connective_last = False  # the previous sentence opened with a formal connective
        self.at_start = True  # the next token opens a sentence
        self.sentence_from = 0  # where the current sentence began in the reply
        self.seen: dict[tuple[int, ...], set[int]] = {}  # (n-1)-gram -> tokens that followed it
        self.detailed_min = min(int(DETAILED_SHARE * budget), DETAILED_MIN_TOKENS)

    def fork(self) -> StyleControl:
        """A copy that follows its own reply from here (a candidate of a steered reply's next
        block, agent_core.llm.lookahead); the vocabulary is shared."""
        twin = copy.copy(self)
        twin.reply = list(self.reply)
        twin.queue = deque(self.queue)
        twin.openers = list(self.openers)
        twin.seen = {gram: set(after) for gram, after in self.seen.items()}
        return twin

    # --- following the reply -----------------------------------------------------------

    def _observe(self, token: int) -> None:
        v, style = self.v, self.style
        previous = self.reply[-1] if self.reply else None
        if self.n > 1 and len(self.reply) >= self.n - 1:
            self.seen.setdefault(tuple(self.reply[-(self.n - 1) :]), set()).add(token)
        self.reply.append(token)
        if self.queue and self.queue[0] == token:
            self.queue.popleft()
        if self.emoji_prefix is not None:
            self.emoji_prefix += (token,)
            if not self.v.trie.get(self.emoji_prefix):
                self.emoji_prefix = None
                self.emoji += 1
                self.since_emoji = 0
            return
        if token >= v.size:
            return
        self.formal_words += bool(v.formal[token])
        self.contracted += bool(v.contractions[token])
        if self.at_start and not (token == v.marker or v.has_newline[token] or v.list_start[token]):
            self.openers.append(token)
            self.connective_last = bool(v.connectives[token])
            self.at_start = False
        elif self.at_start and token == v.marker:
            self.items += 1
        if v.has_bang[token]:
            self.bangs += 1
        after_digit = previous is not None and previous < v.size and bool(v.digit[previous])
        if v.sentence_end[token] and not after_digit:
            self.sentence_from = len(self.reply)
            self.sentences += 1
            self.since_emoji += 1
            self.at_start = True
            self._sentence_ended()
        elif v.has_newline[token]:
            self.at_start = True
            if style is not None and style.format == "bullets" and v.marker is not None and v.marker not in self.queue:
                # a line the model broke itself ends an item too, and the next one starts
                self.sentences += 1
                done = self._brief_done() and self.stop is not None
                self.queue.append(self.stop if done else v.marker)  # type: ignore[arg-type]

    def _sentence_ended(self) -> None:
        """What follows the end of a sentence: maybe an emoji, then the end or the next item."""
        style, v = self.style, self.v
        if style is None:
            return
        most = 1 if style.tone == "formal" else MAX_EMOJI  # emoji read as casual: a formal reply has one
        if style.emoji == "some" and self.emoji < most and (self.emoji == 0 or self.since_emoji >= 2):
            self.queue.append(EMOJI_ACTION)
        if self._brief_done() and self.stop is not None:
            self.queue.append(self.stop)
        elif style.format == "bullets" and v.newline is not None and v.marker is not None:
            self.queue.extend([v.newline, v.marker])

    def _brief_done(self) -> bool:
        assert self.style is not None
        n = len(self.reply)
        if self.style.length != "brief":
            return False
        if self.style.format == "bullets":
            return self.sentences >= BRIEF_ITEMS
        enough = self.sentences >= BRIEF_SENTENCES and n >= BRIEF_TOKENS
        return enough or self.sentences >= BRIEF_MAX_SENTENCES or n >= 2 * BRIEF_TOKENS

    # --- choosing ------------------------------------------------------------------------

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.apply(input_ids[0].tolist(), scores[0])
        return scores

    def apply(self, ids: Sequence[int], scores: torch.Tensor) -> None:
        """Follow the reply to the end of ``ids`` (the prompt, then the reply so far) and
        change ``scores``, the next token's (one row), in place."""
        for token in ids[self.prompt_length + len(self.reply) :]:
            self._observe(token)
        if scores.dtype == torch.float32:
            self._choose(scores.numpy())
        else:
            row = scores.float().numpy()
            self._choose(row)
            scores.copy_(torch.from_numpy(row))

    def _choose(self, row: np.ndarray) -> None:
        if not self._forced(row):
            self._guard_loops(row)
            if self.style is not None:
                self._length(row, self.style)
                self._format(row, self.style)
                self._emoji(row, self.style)
                self._tone(row, self.style)
                self._item_end(row, self.style)
            if row.max() == NEG:  # everything blocked: let the reply end rather than fail
                row[list(self.eos)] = 0.0

    def _item_end(self, row: np.ndarray, style: Style) -> None:
        """A list item the model ends with a line break, not a full stop: what a sentence
        end would have brought comes first (a casual "!", an emoji that is due)."""
        v = self.v
        if style.format != "bullets" or v.newline is None or int(row.argmax()) != v.newline:
            return
        most = 1 if style.tone == "formal" else MAX_EMOJI
        due = style.emoji == "some" and self.emoji < most and (self.emoji == 0 or self.since_emoji >= 1)
        if style.tone == "casual" and self.bangs == 0 and v.bang is not None:
            _only(row, (v.bang,))  # a sentence end: the emoji and the next item follow it
        elif due and v.trie:
            self.emoji_prefix = ()
            self.queue.append(v.newline)
            _only(row, v.trie[()])
        elif v.period is not None and len(self.reply) > self.sentence_from and self._last() != v.marker:
            _only(row, (v.period,))  # the item ends as a sentence: a brief reply is not cut there

    def _forced(self, row: np.ndarray) -> bool:
        """Inside an emoji, or a marker, line break or end is due: allow only that."""
        v = self.v
        if self.emoji_prefix is None and self.queue and self.queue[0] == EMOJI_ACTION:
            self.queue.popleft()
            if v.trie:
                self.emoji_prefix = ()
        if self.emoji_prefix is not None:
            _only(row, v.trie[self.emoji_prefix])
        elif self.queue:
            _only(row, (self.queue[0],))
        elif self.style is not None and self.style.format == "bullets" and not self.reply and v.marker is not None:
            _only(row, (v.marker,))  # a list opens with its first marker
        else:
            return False
        return True

    def _guard_loops(self, row: np.ndarray) -> None:
        """Block a token that repeats a 4-gram of the reply, a word used twice in the last
        few tokens already, and a third sentence in a row with the same opening token."""
        if self.n <= 1:
            return
        if len(self.reply) >= self.n - 1:
            banned = self.seen.get(tuple(self.reply[-(self.n - 1) :]))
            if banned:
                row[list(banned)] = NEG
        recent = Counter(t for t in self.reply[-LOOP_WINDOW:] if t < self.v.size and self.v.long_word[t])
        if crowded := [t for t, k in recent.items() if k >= 2]:
            row[crowded] = NEG
        if self.at_start and len(self.openers) >= 2:
            a, b = (int(self.v.word_key[t]) if t < self.v.size else -1 for t in self.openers[-2:])
            if a == b and a >= 0:  # the same word, in any case, with or without a space
                row[self.v.same_word[a]] = NEG
            elif self.openers[-1] == self.openers[-2]:
                row[self.openers[-1]] = NEG

    def _length(self, row: np.ndarray, style: Style) -> None:
        v, n = self.v, len(self.reply)
        short_list = style.format == "bullets" and self.sentences < BRIEF_ITEMS
        if (style.length == "detailed" and n < self.detailed_min) or short_list:
            done = int(row.argmax()) in self.eos and n > self.sentence_from and self._last() != v.marker
            row[list(self.eos)] = NEG
            if short_list and done:  # the model ends its item: with a full stop, and the next item follows
                ends = v.ids("sentence_end")
                _only(row, ends[ends < row.shape[0]])
        run_on = ITEM_TOKENS if style.format == "bullets" and style.length == "brief" else RUN_ON_TOKENS
        if n >= self.budget - CLOSING_TOKENS or n - self.sentence_from >= run_on:  # close the sentence
            _bias(row, v.lift("sentence_end", CLOSING_BIAS))

    def _format(self, row: np.ndarray, style: Style) -> None:
        v, last = self.v, self._last()
        if style.format == "bullets":
            if self._item_opened():  # an item's first word, after a space: not another marker, nor a number
                _ban(row, v.ceiling("item opening"))
            _ban(row, v.ceiling("in a list"))
            return
        _ban(row, v.ceiling("in prose"))
        if self.at_start:  # a sentence does not open with a list marker or a number ("2. Eat")
            _ban(row, v.ceiling("list start"))
        if last is not None and v.digit[last] and _lone_number(self.reply, v):
            _ban(row, v.ceiling("closes number"))  # no "1." or "1)" numbering

    def _emoji(self, row: np.ndarray, style: Style) -> None:
        v, last = self.v, self._last()
        _ban(row, v.ceiling("emoji"))  # with "some" too: emoji come only where the control puts them, one at a time
        if last is not None and v.ends_e2[last]:  # a three-byte character begun: not a symbol
            _ban(row, v.ceiling("emoji tail"))
        ending = int(row.argmax()) in self.eos or len(self.reply) >= self.budget - 4
        if style.emoji == "some" and self.emoji == 0 and v.trie and ending:
            self.emoji_prefix = ()  # about to end without one: an emoji closes the reply
            _only(row, v.trie[()])

    def _tone(self, row: np.ndarray, style: Style) -> None:
        v, last = self.v, self._last()
        if style.tone == "formal":
            _ban(row, v.ceiling("casual"))
            if last is not None and (v.connectives[last] or v.formal[last]):  # "Moreover" stays that word
                _ban(row, v.ceiling("word tail"))
            if style.format == "prose":
                opening = self.at_start and self.sentences >= 1
            else:
                opening = self._item_opened() and self.items >= 2
            if opening and not self.connective_last:
                # An emoji reads as casual: a reply with one needs a formal word to stay formal.
                owed = self.emoji > 0 and self.formal_words == 0
                _bias(row, v.lift("connectives", OWED_CONNECTIVE_BIAS if owed else CONNECTIVE_BIAS))
            return
        _ban(row, v.ceiling("formal"))
        if last is not None and v.word[last] and self.contracted < CONTRACTIONS:  # "it" -> "it's"
            _bias(row, v.lift("contractions", CONTRACTION_BIAS))
        first_end = self.bangs == 0 and len(self.reply) >= 3 and not (last is not None and v.digit[last])
        if first_end and v.bang is not None and v.period is not None:  # the first sentence ends with "!"
            row[v.bang] = max(row[v.bang], row[v.period]) + 0.5
            row[v.period] = NEG

    def _last(self) -> int | None:
        """The reply's last token, if it is an ordinary one."""
        return self.reply[-1] if self.reply and self.reply[-1] < self.v.size else None

    def _item_opened(self) -> bool:
        """The last token is a list marker that opens an item (first in the reply or after a
        line break), not the hyphen of a word the model is writing ("well-being")."""
        if self._last() != self.v.marker:
            return False
        before = self.reply[-2] if len(self.reply) >= 2 else None
        return before is None or (before < self.v.size and bool(self.v.has_newline[before]))


def _only(row: np.ndarray, allowed: Sequence[int] | np.ndarray) -> None:
    allowed = np.asarray(allowed, dtype=np.int64)
    keep = row[allowed]  # a copy
    if np.isneginf(keep).all():
        keep[:] = 0.0
    row.fill(NEG)
    row[allowed] = keep


def _ban(row: np.ndarray, ceiling: np.ndarray) -> None:
    """Ban the tokens where ``ceiling`` is -inf (StyleVocab.ceiling)."""
    size = min(len(ceiling), row.shape[0])
    np.minimum(row[:size], ceiling[:size], out=row[:size])


def _bias(row: np.ndarray, lift: np.ndarray) -> None:
    size = min(len(lift), row.shape[0])
    np.add(row[:size], lift[:size], out=row[:size])


def _one_hot(size: int, index: int | None) -> np.ndarray:
    mask = np.zeros(size, dtype=bool)
    if index is not None:
        mask[index] = True
    return mask


def _lone_number(reply: list[int], v: StyleVocab) -> bool:
    """The last token is a number on its own (after a space or at the start), as the "1"
    of a "1." list number is."""
    if len(reply) < 2:
        return True
    before = reply[-2]
    return before < v.size and bool(v.list_start[before]) and not v.digit[before]


def style_control_for(
    request: GenerationRequest, prompt_length: int, vocab: StyleVocab | None, no_repeat_ngram: int, eos: set[int]
) -> StyleControl | None:
    """The style control of ``request``: its style and the loop guard (None: no vocabulary,
    or neither a style nor a loop guard asked for)."""
    if vocab is None or (request.style is None and no_repeat_ngram <= 1):
        return None
    return StyleControl(
        vocab,
        request.style,
        prompt_length=prompt_length,
        budget=request.max_new_tokens,
        no_repeat_ngram=no_repeat_ngram,
        eos=eos,
    )


def logits_processors(
    request: GenerationRequest,
    *,
    prompt_length: int,
    vocab: StyleVocab | None,
    repetition_penalty: float,
    no_repeat_ngram: int,
    eos: set[int],
    warpers: bool = True,
) -> Any:
    """What is applied to the scores of each new token of ``request``, in this order: the
    repetition penalty, the style control and loop guard (before the sampling warpers, so
    that its biases count), then temperature, top-k 50 (``generate``'s default) and top-p.
    ``warpers`` False leaves out the last three (the batching engine applies them to all
    its rows at once, :mod:`agent_core.llm.warpers`)."""
    from transformers import (
        LogitsProcessorList,
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    processors = LogitsProcessorList()
    if repetition_penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(repetition_penalty))
    if (control := style_control_for(request, prompt_length, vocab, no_repeat_ngram, eos)) is not None:
        processors.append(control)
    if warpers and request.temperature > 0:
        processors.append(TemperatureLogitsWarper(request.temperature))
        processors.append(TopKLogitsWarper(50))
        processors.append(TopPLogitsWarper(request.top_p))
    return processors
