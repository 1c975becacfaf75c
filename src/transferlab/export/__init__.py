"""The export stage: the classifier as standalone files, checked against evaluate, and predict."""
