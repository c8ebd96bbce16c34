"""Evaluation, one module per task family."""


def headline(result: dict) -> tuple[str, float]:
    """The metric a result is judged by: accuracy (multiple choice, classification) or exact match (math)."""
    key = "accuracy" if "accuracy" in result else "exact_match"
    return key, result[key]
