"""Evaluation, one module per task family."""


def headline(result: dict) -> tuple[str, float]:
    """The metric a result is judged by: accuracy (multiple choice, classification), exact match (math), or the
    answer-token loss (math evaluated without generation; lower is better)."""
    key = next(k for k in ("accuracy", "exact_match", "answer_token_loss") if k in result)
    return key, result[key]
