"""Data stages (download, split, augment) and the CSV contracts between stages."""
