"""Evaluation, one module per task family."""

# Which way each judged metric improves; the compare harness checks a grid's higher_is_better against it, since a
# wrong direction would silently pick the worst learning rate and flip every difference.
HIGHER_IS_BETTER = {"accuracy": True, "accuracy_unnormalised": True, "exact_match": True, "answer_token_loss": False}


# The scores each task family's evaluation reports that a comparison can be judged by (math reports exact match
# only when it generates)
JUDGED_METRICS = {"multiple_choice": ("accuracy", "accuracy_unnormalised"), "classification": ("accuracy",),
                  "generation": ("exact_match", "answer_token_loss")}


def judged_metrics(family: str, generate: bool) -> tuple[str, ...]:
    return tuple(k for k in JUDGED_METRICS[family] if generate or k != "exact_match")


def headline(result: dict) -> tuple[str, float]:
    """The metric a result is judged by: accuracy (multiple choice, classification), exact match (math), or the
    answer-token loss (math evaluated without generation; lower is better)."""
    key = next(k for k in ("accuracy", "exact_match", "answer_token_loss") if k in result)
    return key, result[key]
