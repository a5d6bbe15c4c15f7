"""Local knowledge base of method cards with offline TF-IDF retrieval.

Cards live as one JSON file each under `cards/`; they are short, cited summaries of published methods
(what it does, when it applies, key components, pitfalls). Retrieval needs no network: a TF-IDF index
over the card text, queried with the task text plus the data profile's salient words.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.metrics.pairwise import cosine_similarity

from service.agents.plan import PerturbationKind
from service.errors import CellForgeError

CARDS_DIR = Path(__file__).parent / "cards"


class KnowledgeBaseError(CellForgeError, ValueError):
    """A method card file is missing fields, malformed, or duplicated."""


class MethodCard(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    id: str = Field(pattern=r"^[a-z0-9_]+$")
    name: str
    summary: str
    applies_to: list[PerturbationKind] = Field(min_length=1)
    when_to_use: str
    key_components: list[str]
    pitfalls: list[str]
    citation: str
    keywords: list[str]

    def text(self) -> str:
        # Keywords are repeated so that short domain terms weigh as much as the prose around them.
        return " ".join(
            [self.name, self.summary, self.when_to_use, *self.key_components, *self.pitfalls, *self.applies_to]
            + self.keywords * 2
        )


@dataclass(frozen=True)
class Hit:
    card: MethodCard
    score: float


def load_cards(cards_dir: Path = CARDS_DIR) -> list[MethodCard]:
    cards: dict[str, MethodCard] = {}
    for path in sorted(cards_dir.glob("*.json")):
        try:
            card = MethodCard.model_validate(json.loads(path.read_text()))
        except json.JSONDecodeError as exc:
            raise KnowledgeBaseError(f"method card {path} is not valid JSON: {exc}") from None
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'card'}: {e['msg']}" for e in exc.errors())
            raise KnowledgeBaseError(f"method card {path}: {problems}") from None
        if card.id != path.stem:
            raise KnowledgeBaseError(f"method card {path}: id {card.id!r} differs from the file name")
        cards[card.id] = card
    if not cards:
        raise KnowledgeBaseError(f"no method cards (*.json) in {cards_dir}")
    return list(cards.values())


class KnowledgeBase:
    def __init__(self, cards: list[MethodCard]):
        self.cards = {c.id: c for c in cards}
        self._ids = [c.id for c in cards]
        self._vectorizer = TfidfVectorizer(stop_words="english", ngram_range=(1, 2), sublinear_tf=True)
        self._matrix = self._vectorizer.fit_transform([c.text() for c in cards])

    def search(self, query: str, k: int = 5, kind: PerturbationKind | None = None) -> list[Hit]:
        """Top-k cards by cosine similarity; with `kind`, cards that do not apply to it are skipped."""
        sims = cosine_similarity(self._vectorizer.transform([query]), self._matrix)[0]
        order = sorted(range(len(self._ids)), key=lambda i: (-sims[i], self._ids[i]))
        hits = [Hit(self.cards[self._ids[i]], float(sims[i])) for i in order if sims[i] > 0.0]
        if kind is not None:
            hits = [h for h in hits if kind in h.card.applies_to]
        return hits[:k]


@lru_cache(maxsize=1)
def default_knowledge_base() -> KnowledgeBase:
    return KnowledgeBase(load_cards())


__all__ = ["Hit", "KnowledgeBase", "KnowledgeBaseError", "MethodCard", "default_knowledge_base", "load_cards"]
