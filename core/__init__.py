"""Plumbing both trainers share: checkpoints, the eval view, seeding, ranks, optimisation, the engine, resume."""
