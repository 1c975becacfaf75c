"""The extract_features stage: engines, engine choice, the embedding cache, decoding, features files."""
