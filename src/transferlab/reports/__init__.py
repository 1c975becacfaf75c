"""The evaluate stage and the reports built from metrics: evaluation, mistakes gallery, compare."""
