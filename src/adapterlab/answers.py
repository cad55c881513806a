"""A prediction as adapterlab answers it, the same over HTTP and from `adapterlab predict --json`."""

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # for the annotation only: answering needs no model
    from adapterlab.engine import Prediction


def prediction_json(prediction: "Prediction", top_k: int | None = None) -> dict:
    """The label, its score, the labels' scores best first (the first `top_k`), and whether the input
    was cut to the adapter's token limit."""
    ranked = sorted(prediction.scores.items(), key=lambda item: item[1], reverse=True)[:top_k]
    return {"label": prediction.label, "score": prediction.score,
            "scores": [{"label": label, "score": score} for label, score in ranked], "truncated": prediction.truncated}
