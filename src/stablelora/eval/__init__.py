"""Evaluation, one module per task family."""

# Which way each judged metric improves; the compare harness checks a grid's higher_is_better against it, since a
# wrong direction would silently pick the worst learning rate and flip every difference.
HIGHER_IS_BETTER = {"accuracy": True, "accuracy_unnormalised": True, "exact_match": True, "answer_token_loss": False}


def headline(result: dict) -> tuple[str, float]:
    """The metric a result is judged by: accuracy (multiple choice, classification), exact match (math), or the
    answer-token loss (math evaluated without generation; lower is better)."""
    key = next(k for k in ("accuracy", "exact_match", "answer_token_loss") if k in result)
    return key, result[key]
