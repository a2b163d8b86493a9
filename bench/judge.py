"""Is a reply a real answer? The benchmarks' judge of degenerate and off-topic replies.

A reply is **degenerate** when any of these holds:

- it has fewer than three words;
- a run of four words occurs three times or more;
- a sentence occurs twice (compared lowercased, without punctuation);
- three sentences in a row open with the same word ("Reflect. Reflect. Reflect.");
- it has a run of three hashtags, or four emoji in a row;
- fewer than a third of its words are distinct (from 30 words on).

It is **on topic** when it shares a content word with the message (words of four
letters or more that are not on a short list of generic ones such as "give", "make",
"ideas", compared by their first five letters: "cleaning" matches "clean"); failing
that, when a language model finds the reply more likely after its own message than
after at least four of five other messages (:class:`TopicScorer`: the reply answers
*this* message, not any). Otherwise it is **off topic**.

A real answer is neither degenerate nor off topic.
"""

from __future__ import annotations

import re
from collections import Counter

GENERIC = frozenset({
    "about", "after", "again", "also", "best", "could", "does", "doing", "done", "every", "from", "give", "good",
    "have", "help", "ideas", "into", "just", "know", "like", "make", "many", "more", "most", "much", "need",
    "some", "such", "suggest", "recommend", "tell", "than", "that", "them", "then", "there", "these", "they",
    "thing", "things", "this", "what", "when", "where", "which", "while", "with", "would", "your", "yours",
    "explain", "simply", "easy", "easily", "quick", "quickly", "ways", "should", "something", "someone",
})  # fmt: skip
_WORD = re.compile(r"[a-zA-Z][a-zA-Z']+")
_SENTENCE = re.compile(r"[^.!?\n]+")
_EMOJI_RUN = re.compile("[\U0001f300-\U0001faff\u2600-\u27bf\U0001f000-\U0001f2ff\ufe0f\u200d]{4,}")
_HASHTAGS = re.compile(r"(?:#\w+\W*){3,}")


def degenerate(reply: str) -> str | None:
    """Why ``reply`` is degenerate, or None."""
    words = [w.lower() for w in _WORD.findall(reply)]
    if len(words) < 3:
        return "fewer than three words"
    runs = Counter(zip(words, words[1:], words[2:], words[3:], strict=False))
    if runs and (top := runs.most_common(1)[0])[1] >= 3:
        return f"'{' '.join(top[0])}' {top[1]} times"
    sentences = [" ".join(_WORD.findall(s.lower())) for s in _SENTENCE.findall(reply)]
    sentences = [s for s in sentences if s]
    repeated = [s for s, n in Counter(sentences).items() if n >= 2 and len(s.split()) >= 2]
    if repeated:
        return f"the sentence '{repeated[0]}' twice"
    openers = [s.split()[0] for s in sentences]
    if any(a == b == c for a, b, c in zip(openers, openers[1:], openers[2:], strict=False)):
        return "three sentences in a row open alike"
    if _HASHTAGS.search(reply) or _EMOJI_RUN.search(reply):
        return "a run of hashtags or emoji"
    if len(words) >= 30 and len(set(words)) < len(words) / 3:
        return "few distinct words"
    return None


def content_stems(text: str) -> set[str]:
    return {w.lower()[:5] for w in _WORD.findall(text) if len(w) >= 4 and w.lower() not in GENERIC}


def on_topic(message: str, reply: str) -> bool:
    """The reply shares a content word with the message (or the message has none)."""
    asked = content_stems(message)
    return not asked or bool(asked & content_stems(reply))


class TopicScorer:
    """Does a reply answer its own message better than others? A causal language model
    (a transformers directory) scores the reply's log-likelihood after each message."""

    def __init__(self, model_dir: str, others: list[str], system: str = "You are a helpful assistant.") -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        self.others = others
        self.system = system

    def loglik(self, message: str, reply: str) -> float:
        chat = [{"role": "system", "content": self.system}, {"role": "user", "content": message}]
        prompt = self.tokenizer.apply_chat_template(chat, add_generation_prompt=True)
        prompt = prompt["input_ids"] if isinstance(prompt, dict) or hasattr(prompt, "keys") else prompt
        answer = self.tokenizer.encode(reply, add_special_tokens=False)[:96]
        ids = self.torch.tensor([list(prompt) + answer])
        with self.torch.inference_mode():
            logp = self.torch.log_softmax(self.model(ids).logits[0, :-1].float(), dim=-1)
        picked = logp[len(prompt) - 1 :].gather(1, ids[0, len(prompt) :, None])
        return float(picked.sum())

    def answers_its_message(self, message: str, reply: str) -> bool:
        import zlib

        others = [m for m in self.others if m != message]
        start = zlib.crc32(message.encode()) % max(1, len(others))
        chosen = [others[(start + 7 * k) % len(others)] for k in range(5)]
        own = self.loglik(message, reply)
        return sum(own > self.loglik(other, reply) for other in chosen) >= 4


def verdict(message: str, reply: str, scorer: TopicScorer | None = None) -> str | None:
    """None for a real answer; else why not."""
    if why := degenerate(reply):
        return f"degenerate: {why}"
    if not on_topic(message, reply) and (scorer is None or not scorer.answers_its_message(message, reply)):
        return "off topic"
    return None
