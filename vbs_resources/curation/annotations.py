"""What curators say of a conquest, from Label Studio or the conquest API, checked against its
type: the curation fields (``isGoldStar``, ``rating`` 1-5, ``feedback``, ``improvementNotes``)
and the answers to the type's questions."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr

from vbs_resources.curation.labeling import BOOLEAN_CHOICES, GOLD
from vbs_resources.curation.types import ConquestType, RecordError

VICTORY, DEFEAT = "VICTORY", "DEFEAT"
MAX_TEXT = 20_000


class AnnotationError(ValueError):
    """An annotation that does not fit its conquest's type; ``field`` names the field."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class AnnotateBody(BaseModel):
    """``POST /v1/conquests/{id}/annotate``, in the seed's names."""

    model_config = ConfigDict(extra="forbid")

    isGoldStar: StrictBool | None = None  # noqa: N815 - the seed's wire names
    rating: Annotated[StrictInt, Field(ge=1, le=5)] | None = None
    feedback: Annotated[StrictStr, Field(max_length=MAX_TEXT)] | None = None
    improvementNotes: Annotated[StrictStr, Field(max_length=MAX_TEXT)] | None = None  # noqa: N815
    answers: dict[StrictStr, Any] = Field(default_factory=dict)


def check_answers(conquest_type: ConquestType, answers: dict[str, Any]) -> dict[str, Any]:
    questions = {q.id: q for q in conquest_type.questions}
    for question_id, value in answers.items():
        question = questions.get(question_id)
        if question is None:
            raise AnnotationError(
                f"{conquest_type.id} has no question {question_id[:64]!r}; it asks: "
                + (", ".join(questions) or "nothing"),
                f"answers.{question_id[:64]}",
            )
        try:
            question.check_answer(value)
        except RecordError as exc:
            raise AnnotationError(str(exc), f"answers.{question_id}") from None
    return answers


def from_api(conquest_type: ConquestType, body: AnnotateBody, edited_at: float) -> dict[str, Any]:
    """An API edit as catalog values."""
    return {
        "is_gold_star": body.isGoldStar,
        "rating": body.rating,
        "feedback": body.feedback,
        "improvement_notes": body.improvementNotes,
        "answers": check_answers(conquest_type, dict(body.answers)),
        "source": "api",
        "source_ref": None,
        "edited_at": edited_at,
    }


def _text(value: dict[str, Any], field: str) -> str:
    text = value.get("text")
    if isinstance(text, list) and all(isinstance(t, str) for t in text):
        joined = "\n".join(text)
    elif isinstance(text, str):
        joined = text
    else:
        raise AnnotationError("a text answer must be text", field)
    if len(joined) > MAX_TEXT:
        raise AnnotationError(f"over {MAX_TEXT} characters", field)
    return joined


def _single_choice(value: dict[str, Any], field: str) -> str:
    choices = value.get("choices")
    if not isinstance(choices, list) or len(choices) != 1 or not isinstance(choices[0], str):
        raise AnnotationError("exactly one choice is expected", field)
    return choices[0]


def parse_time(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def from_label_studio(conquest_type: ConquestType, annotation: dict[str, Any]) -> dict[str, Any]:
    """A Label Studio annotation (its ``result`` items, by control name) as catalog values."""
    values: dict[str, Any] = {
        "is_gold_star": False,  # the gold box left unticked
        "rating": None,
        "feedback": None,
        "improvement_notes": None,
        "answers": {},
        "source": "label_studio",
        "source_ref": str(annotation.get("id")),
        "edited_at": parse_time(annotation.get("updated_at") or annotation["created_at"]),
    }
    questions = {q.id: q for q in conquest_type.questions}
    for item in annotation.get("result") or []:
        name, value = item.get("from_name"), item.get("value") or {}
        if name == "is_gold_star":
            choices = value.get("choices") or []
            if any(c != GOLD for c in choices):
                raise AnnotationError(f"the only choice is {GOLD!r}", "is_gold_star")
            values["is_gold_star"] = GOLD in choices
        elif name == "rating":
            rating = value.get("rating")
            if not isinstance(rating, int) or isinstance(rating, bool) or not 1 <= rating <= 5:
                raise AnnotationError("a rating is a whole number from 1 to 5", "rating")
            values["rating"] = rating
        elif name in ("feedback", "improvement_notes"):
            values[name] = _text(value, name)
        elif name in questions:
            question, where = questions[name], f"answers.{name}"
            if question.type == "choice":
                answer: Any = _single_choice(value, where)
            elif question.type == "boolean":
                choice = _single_choice(value, where)
                if choice not in BOOLEAN_CHOICES:
                    raise AnnotationError("yes or no", where)
                answer = choice == "yes"
            elif question.type == "rating":
                answer = value.get("rating")
            else:
                answer = _text(value, where)
            values["answers"][name] = answer
        else:
            raise AnnotationError(f"{conquest_type.id} has no control {str(name)[:64]!r}", name)
    check_answers(conquest_type, values["answers"])
    return values


def result_of(values: dict[str, Any], gold_rating: int = 4) -> str | None:
    """A conquest's result from its annotation: ``VICTORY`` for a gold star or a rating of
    ``gold_rating`` or more, ``DEFEAT`` for a rating of 2 or less, none otherwise."""
    rating = values.get("rating")
    if values.get("is_gold_star") or (rating is not None and rating >= gold_rating):
        return VICTORY
    if rating is not None and rating <= 2:
        return DEFEAT
    return None
