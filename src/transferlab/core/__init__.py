"""What every stage shares: params schema, atomic writes, paths, and the stage runner."""
