"""What the explainer LLM is asked, and how its replies are read (the simulator's: adag.llm.simulation).

The explainer is shown a few worked examples before the real excerpts, and asked for the common
feature of the highlighted tokens in their context rather than a summary of the text. Each request
asks for a number of words (DESCRIPTION_WORDS, LABEL_WORDS) and gets as many new tokens as that needs
(`reply_tokens`). A reply is read strictly on the first attempt (longer than asked, or a label in the
stats explainer's `INPUT -> OUTPUT` / `not[...]` form: unusable, asked again) and leniently on a retry,
which keeps the reply's first phrase within the words asked for.
"""

from __future__ import annotations

import re

from adag.llm.backend import first_sentence
from adag.llm.roles import Messages, UnusableReply

MAX_DESCRIPTION = 160
DESCRIPTION_WORDS = {"input": 8, "negative": 8, "output": 12}  # asked for, and kept at most
LABEL_WORDS = 3  # the explainer's words; an inhibitory cluster's label gets one more (adag.describe.explain)
BROKEN = "\ufffd"  # what decoding a cut or invalid byte sequence gives: sampled noise, not a description
REFUSALS = re.compile(r"\b(i can(not|'t)|i'm sorry|i am sorry|as an ai|unable to)\b", re.IGNORECASE)


# For a small chat model (tried on Qwen2.5-Coder-1.5B-Instruct): say what kind of answer is wanted (a
# category, not the tokens), forbid the two failures seen (a list of the marked tokens, a copy of the
# excerpt), and bound the length in words on one line (the local backend stops at the line's end).
ANSWER = (f"Name what they share in one short phrase of at most {DESCRIPTION_WORDS['input']} words, on one line. "
          "Do not list the marked tokens and do not copy the excerpts.")
EXPLAIN_INPUT = (
    "We study a group of neurons inside a language model. You see text excerpts in which the tokens where "
    "the group fires most are marked {{like this}}. Say what the marked tokens have in common, using the text "
    "around them: what kind of token they are (a word class, a topic, a symbol, one word of a fixed template) "
    "and, when it matters, where they stand or which words come just before them. " + ANSWER)
EXPLAIN_NEGATIVE = (
    "We study a group of neurons inside a language model. You see text excerpts in which the tokens that most "
    "suppress the group (push its activation down) are marked {{like this}}. Say what the marked tokens have in "
    "common, using the text around them: what kind of token they are and, when it matters, where they stand. "
    + ANSWER)
EXPLAIN_OUTPUT = (
    "We study a group of neurons inside a language model. For each prompt you see the model's candidate next "
    "tokens and the group's direct effect on each one's logit, scaled to -10 (strongly suppresses) .. 10 "
    "(strongly promotes). Prompts end with the start of the model's reply. "
    "Say which kind of tokens the group makes the model say and which it holds back, in one short phrase of at "
    f"most {DESCRIPTION_WORDS['output']} words, on one line.")

# Worked examples, shown as earlier turns of the conversation: excerpts -> a good description.
INPUT_EXAMPLES = [
    (["The train leaves at {{7}} and arrives at {{9}} tonight",
      "She owns {{2}} cats and {{4}} dogs",
      "Turn to page {{31}} of the manual"],
     "numbers written as digits"),
    (["Which river flows through {{Vienna}}?",
      "Our hotel in {{Lisbon}} was near the sea",
      "The flight from {{Oslo}} was late"],
     "names of European cities"),
    (["He said (quietly{{)}} that it was over",
      "Call the function f(x{{)}} twice",
      "the list [1, 2, 3{{]}} is sorted"],
     "closing brackets at the end of a parenthesis"),
    (["How many legs does a {{spider}} have? Reply:{{ }}",
      "How many legs does a {{horse}} have? Reply:{{ }}",
      "How many legs does an {{ant}} have? Reply:{{ }}"],
     "the animal asked about; the space after 'Reply:'"),
]
OUTPUT_EXAMPLES = [
    (["Prompt: 'The capital of Peru is' -> ' Lima': 9, ' a': -2, ' the': -1",
      "Prompt: 'The capital of Kenya is' -> ' Nairobi': 10, ' located': 0, ' a': -3"],
     "promotes capital city names; suppresses ' a'"),
]

LABEL = (
    "A group of neurons responds to: \"{inputs}\". It makes the model: \"{outputs}\". Give a label of one to "
    f"{LABEL_WORDS} lowercase words that names what is specific to this group (not 'neurons', 'group' or 'tokens'), "
    "such as \"city names\" or \"closing brackets\", in plain words without brackets or arrows. "
    "Reply with the label only.")


def numbered(excerpts: list[str]) -> str:
    return "\n".join(f"{i + 1}. {e}" for i, e in enumerate(excerpts))


def explain_messages(kind: str, excerpts: list[str], facts: list[str] = ()) -> Messages:
    """The explainer's conversation: instruction, worked examples as earlier turns, then the excerpts and,
    where known, the cluster's facts across all its prompts as a compact table."""
    instruction, examples = {"input": (EXPLAIN_INPUT, INPUT_EXAMPLES), "negative": (EXPLAIN_NEGATIVE, INPUT_EXAMPLES),
                             "output": (EXPLAIN_OUTPUT, OUTPUT_EXAMPLES)}[kind]
    messages = [{"role": "system", "content": instruction}]
    for shown, answer in examples:
        messages += [{"role": "user", "content": f"Excerpts:\n{numbered(shown)}"},
                     {"role": "assistant", "content": answer}]
    table = "\n\nFacts across all prompts of this group:\n" + "\n".join(f"- {f}" for f in facts) if facts else ""
    return [*messages, {"role": "user", "content": f"Excerpts:\n{numbered(excerpts)}{table}"}]


def label_messages(inputs: str, outputs: str) -> Messages:
    return [{"role": "user", "content": LABEL.format(inputs=inputs, outputs=outputs)}]


def reply_tokens(words: int) -> int:
    """New tokens for a reply of `words` words: about two tokens a word (quoted tokens, subwords) and a
    few for punctuation, so that a reply as long as asked ends by itself and a longer one is cut short."""
    return 2 * words + 8


# The stats explainer's label notation (`INPUT -> OUTPUT`, `not[...]`, `@L3-17`), which an LLM label must not imitate.
TEMPLATE = re.compile(r"->|=>|\u2192|[\[\]{}<>@|]")
SEPARATOR = re.compile(r"\s*[,;:]\s+|\s+[-\u2013\u2014]+\s+|\s+\(")
DANGLING = {"a", "an", "and", "as", "at", "by", "for", "from", "in", "of", "on", "or", "the", "to", "with"}


def first_phrase(text: str, words: int) -> str:
    """`text` cut to its first clause (before a comma, semicolon, colon, dash or parenthesis) when it is longer
    than `words` words, and to `words` words when that clause still is, without a dangling function word."""
    if len(text.split()) <= words:
        return text
    kept = SEPARATOR.split(text, maxsplit=1)[0].split()[:words]
    while len(kept) > 1 and kept[-1].lower() in DANGLING:
        kept.pop()
    return " ".join(kept)


def parse_description(reply: str, kind: str, strict: bool = True) -> str:
    """The first sentence of the first line (adag.llm.backend.first_sentence), without quotes. Longer than the
    words asked for or holding a broken byte sequence: unusable when `strict`, else cut to its first phrase
    without the broken characters."""
    description = first_sentence(reply).strip('"').strip()[:MAX_DESCRIPTION].strip()
    if strict and BROKEN in description:
        raise UnusableReply(f"explainer's description holds a broken byte sequence ({description[:60]!r})")
    description = " ".join(description.replace(BROKEN, " ").split())
    if not description or REFUSALS.search(description):
        raise UnusableReply(f"explainer gave no usable description ({reply.strip()[:60]!r})")
    words = DESCRIPTION_WORDS[kind]
    if strict and len(description.split()) > words:
        raise UnusableReply(f"explainer's description runs past the {words} words asked for ({description[:60]!r})")
    return first_phrase(description, words).rstrip(",;:.-")


def parse_label(reply: str, strict: bool = True) -> str:
    """1-LABEL_WORDS lowercase words. A label in the stats explainer's notation or longer than asked:
    unusable when `strict`, else its input part (before an arrow, inside `not[...]`) cut to its first phrase."""
    line = first_sentence(reply)
    if not line or REFUSALS.search(reply):
        raise UnusableReply(f"explainer gave no usable label ({reply.strip()[:40]!r})")
    if strict and TEMPLATE.search(line):
        raise UnusableReply(f"explainer's label imitates a role template ({line[:40]!r})")
    source = re.split(r"->|=>|\u2192|@", re.sub(r"^\s*not\s*\[", "", line, flags=re.IGNORECASE))[0]
    words = re.findall(r"[a-z0-9][a-z0-9\-]*", source.lower())
    if not words:
        raise UnusableReply(f"explainer gave no usable label ({reply.strip()[:40]!r})")
    if strict and len(words) > LABEL_WORDS:
        raise UnusableReply(f"explainer's label is longer than {LABEL_WORDS} words ({line[:40]!r})")
    return first_phrase(" ".join(words), LABEL_WORDS)
