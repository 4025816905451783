"""Offline batch generation: OpenAI batch files through a deployment, exactly once (`slurmserve batch`)."""
